# BN baseline: mmdet's RetinaNet R-50-FPN 1x, unchanged.
_base_ = 'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py'
