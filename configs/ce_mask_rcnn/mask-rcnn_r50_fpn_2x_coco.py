# BN baseline: mmdet's Mask R-CNN R-50-FPN 2x, unchanged.
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_2x_coco.py'
