# BN baseline: mmdet's RetinaNet R-101-FPN 1x, unchanged.
_base_ = 'mmdet::retinanet/retinanet_r101_fpn_1x_coco.py'
