# CE-ResNet-101 Mask R-CNN, 1x. No ImageNet CE-ResNet-101 was published: the
# backbone starts from torchvision's BN ResNet-101; its CE layers start fresh
# (the log says how many CE tensors were not in the checkpoint).
_base_ = './mask-rcnn_r50-ce_fpn_1x_coco.py'
model = dict(
    backbone=dict(
        depth=101,
        init_cfg=dict(
            type='Pretrained', checkpoint='torchvision://resnet101')))
