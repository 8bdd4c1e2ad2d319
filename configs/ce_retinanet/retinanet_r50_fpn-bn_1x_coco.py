# BN baseline for the CE neck: RetinaNet R-50-FPN 1x with BN after the FPN
# convs (what CEFPN adds CE to).
_base_ = 'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py'
model = dict(neck=dict(norm_cfg=dict(type='BN', requires_grad=True)))
