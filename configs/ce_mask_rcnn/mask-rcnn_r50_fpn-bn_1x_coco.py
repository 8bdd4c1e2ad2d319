# BN baseline for the CE neck: mmdet's R-50-FPN 1x with BN after the FPN
# convs (what CEFPN adds CE to), so the neck comparison isolates CE.
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'
model = dict(neck=dict(norm_cfg=dict(type='BN', requires_grad=True)))
