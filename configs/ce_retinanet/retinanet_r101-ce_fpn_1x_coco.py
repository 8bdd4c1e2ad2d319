# CE-ResNet-101 RetinaNet, 1x. No ImageNet CE-ResNet-101 was published: the
# backbone starts from torchvision's BN ResNet-101 with fresh CE layers.
_base_ = './retinanet_r50-ce_fpn_1x_coco.py'
model = dict(
    backbone=dict(
        depth=101,
        init_cfg=dict(
            type='Pretrained', checkpoint='torchvision://resnet101')))
