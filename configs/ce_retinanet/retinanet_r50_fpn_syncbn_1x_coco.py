# BN baseline for the SyncBN + SyncCE config: mmdet's RetinaNet R-50-FPN 1x
# with SyncBN in the backbone and norm_eval=False.
_base_ = 'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py'
model = dict(
    backbone=dict(
        norm_cfg=dict(type='SyncBN', requires_grad=True), norm_eval=False))
