# BN baseline for the SyncBN + SyncCE config: mmdet's R-50-FPN 1x with SyncBN
# in the backbone and norm_eval=False.
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'
model = dict(
    backbone=dict(
        norm_cfg=dict(type='SyncBN', requires_grad=True), norm_eval=False))
