# Mask R-CNN, CE-ResNet-50 backbone (published placement), FPN neck, 1x.
# The backbone starts from the authors' ImageNet CE-ResNet-50, converted with
# tools/model_converters/cenet2mmdet.py (see configs/ce_mask_rcnn/README.md).
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['ce_mmdet'], allow_failed_imports=False)
model = dict(
    backbone=dict(
        type='CEResNet',
        ce_cfg=dict(group_size=16, num_iters=3, reduction=4),
        ce_stages=(True, True, True, False),
        stem_ce=True,
        init_cfg=dict(
            type='Pretrained',
            checkpoint='checkpoints/cenet50_imagenet_mmdet.pth')))
