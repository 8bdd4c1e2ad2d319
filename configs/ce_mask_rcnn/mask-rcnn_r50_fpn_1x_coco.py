# BN baseline: mmdet's Mask R-CNN R-50-FPN 1x, unchanged.
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'
