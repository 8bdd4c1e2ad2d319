# CE-ResNet-50 backbone and a CE neck: FPN convs followed by BN + CE.
_base_ = './mask-rcnn_r50-ce_fpn_1x_coco.py'
model = dict(
    neck=dict(
        type='CEFPN',
        norm_cfg=dict(type='BN', requires_grad=True),
        ce_cfg=dict(group_size=16, num_iters=3, reduction=4),
        ce_on=('lateral', 'output')))
