# CE-ResNet-50 RetinaNet with a CE neck; the extra P6/P7 convs get CE too.
_base_ = './retinanet_r50-ce_fpn_1x_coco.py'
model = dict(
    neck=dict(
        type='CEFPN',
        norm_cfg=dict(type='BN', requires_grad=True),
        ce_cfg=dict(group_size=16, num_iters=3, reduction=4),
        ce_on=('lateral', 'output')))
