# CE-ResNet-50 Mask R-CNN with batch statistics trained across GPUs: SyncBN and
# SyncCE (CE batch statistics summed over all processes) and norm_eval=False.
# Use it when the backbone's BN/CE statistics should keep learning on COCO
# (e.g. from scratch or with large per-GPU images); with the default
# norm_eval=True (frozen statistics) plain CE is equivalent and cheaper.
_base_ = './mask-rcnn_r50-ce_fpn_1x_coco.py'
model = dict(
    backbone=dict(
        norm_cfg=dict(type='SyncBN', requires_grad=True),
        norm_eval=False,
        ce_cfg=dict(group_size=16, num_iters=3, reduction=4, sync=True)))
