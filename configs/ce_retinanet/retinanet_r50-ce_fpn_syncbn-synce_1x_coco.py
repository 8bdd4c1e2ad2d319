# CE-ResNet-50 RetinaNet with SyncBN + SyncCE and norm_eval=False (batch
# statistics trained across GPUs). See the Mask R-CNN twin for when to use it.
_base_ = './retinanet_r50-ce_fpn_1x_coco.py'
model = dict(
    backbone=dict(
        norm_cfg=dict(type='SyncBN', requires_grad=True),
        norm_eval=False,
        ce_cfg=dict(group_size=16, num_iters=3, reduction=4, sync=True)))
