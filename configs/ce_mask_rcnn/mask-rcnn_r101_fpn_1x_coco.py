# BN baseline: mmdet's Mask R-CNN R-101-FPN 1x, unchanged.
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r101_fpn_1x_coco.py'
