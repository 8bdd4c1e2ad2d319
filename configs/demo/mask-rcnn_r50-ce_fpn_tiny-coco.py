# `make demo`: the CE Mask R-CNN
# (configs/ce_mask_rcnn/mask-rcnn_r50-ce_fpn_1x_coco.py) trained for a
# CPU-sized schedule on the tiny synthetic COCO set written by
# tools/misc/make_tiny_coco.py. From scratch (no ImageNet weights), so BN and
# CE train their statistics (norm_eval=False) and nothing is frozen. Expect
# small APs: this shows the pipeline works end to end, not what CE is worth.
_base_ = '../ce_mask_rcnn/mask-rcnn_r50-ce_fpn_1x_coco.py'

data_root = 'data/tiny_coco/'
classes = ('rectangle', 'circle', 'triangle')
metainfo = dict(classes=classes, palette=[(220, 20, 60), (0, 128, 255),
                                          (0, 200, 0)])
scale = (320, 320)

model = dict(
    backbone=dict(frozen_stages=-1, norm_eval=False, init_cfg=None),
    roi_head=dict(
        bbox_head=dict(num_classes=len(classes)),
        mask_head=dict(num_classes=len(classes))))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=scale, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(
        type='PackDetInputs',
        meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                   'scale_factor'))
]
train_dataloader = dict(
    batch_size=2,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(
        data_root=data_root,
        metainfo=metainfo,
        filter_cfg=dict(filter_empty_gt=True, min_size=8),
        pipeline=train_pipeline))
# evaluation is done once, by tools/test.py on the last checkpoint
val_dataloader = None
val_evaluator = None
val_cfg = None
test_dataloader = dict(
    batch_size=1,
    num_workers=0,
    persistent_workers=False,
    drop_last=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type='CocoDataset',
        data_root=data_root,
        metainfo=metainfo,
        ann_file='annotations/instances_val2017.json',
        data_prefix=dict(img='val2017/'),
        test_mode=True,
        pipeline=test_pipeline))
test_evaluator = dict(
    type='CocoMetric',
    ann_file=data_root + 'annotations/instances_val2017.json',
    metric=['bbox', 'segm'],
    format_only=False)

max_iters = 60
train_cfg = dict(_delete_=True, type='IterBasedTrainLoop', max_iters=max_iters)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=10),
    dict(
        type='MultiStepLR',
        by_epoch=False,
        begin=0,
        end=max_iters,
        milestones=[45],
        gamma=0.1)
]
optim_wrapper = dict(
    optimizer=dict(lr=0.01), clip_grad=dict(max_norm=10, norm_type=2))
default_hooks = dict(
    logger=dict(interval=10),
    checkpoint=dict(by_epoch=False, interval=30, max_keep_ckpts=2),
    visualization=dict(draw=False))
log_processor = dict(by_epoch=False, window_size=10)
env_cfg = dict(dist_cfg=dict(backend='gloo'))
randomness = dict(seed=0)
