"""A tiny, deterministic, synthetic COCO-format detection/segmentation set.

Images show a few filled shapes (rectangles, circles, triangles) on a noisy
background; every shape is one instance with its box, polygon mask, area and
``iscrowd=0``. Shapes do not overlap, so each polygon is the visible mask.
The same arguments always give the same files (numpy RandomState; JPEG by
Pillow at a fixed quality).
"""
import json
import keyword
import math
import numbers
import os
import os.path as osp
from typing import (TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple,
                    Union)

import numpy as np
from PIL import Image, ImageDraw

if TYPE_CHECKING:
    from mmengine.config import Config

CLASSES = ('rectangle', 'circle', 'triangle')
SIZES = ((320, 240), (256, 256), (240, 320))  # (width, height)


def _polygon(kind: str, cx: float, cy: float, r: float,
             rng: np.random.RandomState) -> List[Tuple[float, float]]:
    if kind == 'rectangle':
        w, h = r * rng.uniform(0.7, 1.0), r * rng.uniform(0.5, 1.0)
        return [(cx - w, cy - h), (cx + w, cy - h), (cx + w, cy + h),
                (cx - w, cy + h)]
    if kind == 'circle':
        return [(cx + r * math.cos(2 * math.pi * k / 16),
                 cy + r * math.sin(2 * math.pi * k / 16)) for k in range(16)]
    angle = rng.uniform(0, 2 * math.pi)
    return [(cx + r * math.cos(angle + 2 * math.pi * k / 3),
             cy + r * math.sin(angle + 2 * math.pi * k / 3)) for k in range(3)]


def _area(poly: Sequence[Tuple[float, float]]) -> float:
    x = np.array([p[0] for p in poly])
    y = np.array([p[1] for p in poly])
    return float(0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x,
                                                                        1))))


def _make_image(rng: np.random.RandomState, width: int, height: int,
                max_objects: int):
    base = rng.randint(40, 200, size=3)
    noise = rng.randint(-25, 26, size=(height, width, 3))
    img = np.clip(base[None, None] + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(img)
    draw = ImageDraw.Draw(image)
    placed: List[Tuple[float, float, float]] = []
    objects = []
    for _ in range(rng.randint(1, max_objects + 1)):
        for _attempt in range(50):
            r = rng.uniform(14, min(width, height) / 5)
            cx = rng.uniform(r + 2, width - r - 2)
            cy = rng.uniform(r + 2, height - r - 2)
            if all(math.hypot(cx - px, cy - py) > r + pr + 4
                   for px, py, pr in placed):
                break
        else:
            continue
        placed.append((cx, cy, r))
        label = int(rng.randint(len(CLASSES)))
        poly = _polygon(CLASSES[label], cx, cy, r, rng)
        poly = [(round(x, 2), round(y, 2)) for x, y in poly]
        colour = tuple(int(c) for c in (255 - base + rng.randint(-30, 31, 3))
                       % 256)
        draw.polygon(poly, fill=colour)
        objects.append((label, poly))
    return image, objects


def make_split(out_dir: str, split: str, num_images: int, seed: int,
               max_objects: int = 4) -> Dict:
    """Write ``{split}2017/*.jpg`` and return the COCO dict of the split."""
    rng = np.random.RandomState(seed)
    img_dir = osp.join(out_dir, f'{split}2017')
    os.makedirs(img_dir, exist_ok=True)
    images, annotations = [], []
    for i in range(num_images):
        width, height = SIZES[i % len(SIZES)]
        image, objects = _make_image(rng, width, height, max_objects)
        image_id = i + 1
        file_name = f'{image_id:012d}.jpg'
        image.save(osp.join(img_dir, file_name), quality=95)
        images.append(
            dict(id=image_id, file_name=file_name, width=width, height=height))
        for label, poly in objects:
            xs = [p[0] for p in poly]
            ys = [p[1] for p in poly]
            x0, y0 = min(xs), min(ys)
            annotations.append(
                dict(
                    id=len(annotations) + 1,
                    image_id=image_id,
                    category_id=label + 1,
                    bbox=[
                        round(x0, 2),
                        round(y0, 2),
                        round(max(xs) - x0, 2),
                        round(max(ys) - y0, 2)
                    ],
                    area=round(_area(poly), 2),
                    segmentation=[[c for p in poly for c in p]],
                    iscrowd=0))
    categories = [
        dict(id=i + 1, name=name, supercategory='shape')
        for i, name in enumerate(CLASSES)
    ]
    return dict(
        info=dict(description=f'ce_mmdet tiny synthetic COCO ({split})'),
        licenses=[],
        images=images,
        annotations=annotations,
        categories=categories)


def make_tiny_coco(out_dir: str, num_train: int = 24, num_val: int = 8,
                   seed: int = 0) -> Dict[str, str]:
    """Write the tiny set under ``out_dir``; returns the annotation paths."""
    if num_train < 1 or num_val < 1:
        raise ValueError(f'num_train and num_val must be >= 1, got '
                         f'{num_train}, {num_val}')
    ann_dir = osp.join(out_dir, 'annotations')
    os.makedirs(ann_dir, exist_ok=True)
    paths = {}
    for split, num, split_seed in (('train', num_train, seed),
                                   ('val', num_val, seed + 1000)):
        coco = make_split(out_dir, split, num, split_seed)
        path = osp.join(ann_dir, f'instances_{split}2017.json')
        with open(path, 'w') as f:
            json.dump(coco, f)
        paths[split] = path
    return paths


def ensure_tiny_coco(out_dir: str) -> str:
    """Make the tiny set under ``out_dir`` (defaults of
    :func:`make_tiny_coco`) unless its val annotations are there already;
    returns ``out_dir``."""
    if not osp.isfile(osp.join(out_dir, 'annotations',
                               'instances_val2017.json')):
        make_tiny_coco(out_dir)
    return out_dir


TINY_CONFIG_TEMPLATE = '''\
# Generated by ce_mmdet.testing.tiny_coco_config: {base_name} on the tiny
# synthetic COCO set ({data_root}), image scale {scale},
# {max_iters} iterations, random initialisation. For smoke runs only.
_base_ = {base!r}

data_root = {data_root!r}
metainfo = dict(classes={classes!r})
backend_args = None
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask={with_mask}),
    dict(type='Resize', scale={scale!r}, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale={scale!r}, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask={with_mask}),
    dict(
        type='PackDetInputs',
        meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                   'scale_factor'))
]
model = {model}
train_dataloader = dict(
    batch_size=2,
    num_workers=0,
    persistent_workers=False,
    # the base's dataset replaced whole: wrappers (RepeatDataset,
    # ClassBalancedDataset...) and other annotation files do not apply here
    dataset=dict(
        {replace_train_dataset}type='CocoDataset',
        data_root=data_root,
        ann_file='annotations/instances_train2017.json',
        data_prefix=dict(img='train2017/'),
        metainfo=metainfo,
        filter_cfg=dict(filter_empty_gt=True, min_size=8),
        pipeline=train_pipeline,
        backend_args=backend_args))
val_dataloader = dict(
    batch_size=1,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(
        {replace_val_dataset}type='CocoDataset',
        data_root=data_root,
        ann_file='annotations/instances_val2017.json',
        data_prefix=dict(img='val2017/'),
        metainfo=metainfo,
        test_mode=True,
        pipeline=test_pipeline,
        backend_args=backend_args))
test_dataloader = val_dataloader
val_evaluator = {evaluator}
test_evaluator = val_evaluator
train_cfg = dict(
    {replace_train_cfg}type='IterBasedTrainLoop', max_iters={max_iters},
    val_interval={val_interval})
param_scheduler = [
    dict(type='ConstantLR', factor=1.0, by_epoch=False, begin=0,
         end={max_iters})
]
optim_wrapper = {optim_wrapper}
default_hooks = dict(
    logger=dict(interval=1),
    checkpoint=dict(by_epoch=False, interval={ckpt_interval}),
    visualization=dict(draw=False))
log_processor = dict(by_epoch=False, window_size=1)
env_cfg = dict(dist_cfg=dict(backend='gloo'))
'''


def _score_thr_override(model, score_thr: Optional[float]) -> dict:
    """``model``'s test score threshold set to ``score_thr``: the second
    stage's (``test_cfg.rcnn``) or a one-stage head's (``test_cfg``)."""
    if score_thr is None:
        return {}
    if isinstance(score_thr, bool) or not isinstance(
            score_thr, numbers.Real) or not 0 <= score_thr <= 1:
        raise ValueError(
            f'score_thr must be None or a number in [0, 1], got {score_thr!r}')
    test_cfg = model.get('test_cfg') or {}
    if 'score_thr' in (test_cfg.get('rcnn') or {}):
        return dict(test_cfg=dict(rcnn=dict(score_thr=score_thr)))
    if 'score_thr' in test_cfg:
        return dict(test_cfg=dict(score_thr=score_thr))
    return {}


def _with_classes(node, num_classes: int):
    """``node`` (a config value) with every ``num_classes`` set to
    ``num_classes``, and whether it had any. An ``rpn_head`` keeps its
    own: proposals are class-agnostic (mmdet's two-stage detectors set an
    RPN head's ``num_classes`` to 1 and warn about any other value)."""
    if isinstance(node, dict):
        out, found = {}, False
        for key, value in node.items():
            if key == 'num_classes' and isinstance(value, int):
                out[key], hit = num_classes, True
            elif key == 'rpn_head':
                out[key], hit = value, False
            else:
                out[key], hit = _with_classes(value, num_classes)
            found = found or hit
        return out, found
    if isinstance(node, (list, tuple)):
        items = [_with_classes(value, num_classes) for value in node]
        return type(node)(v for v, _ in items), any(h for _, h in items)
    return node, False


def sets_num_classes(model_cfg) -> bool:
    """Whether a model config sets a ``num_classes`` (outside an RPN head):
    what :func:`tiny_coco_config` resizes, and refuses a model without."""
    return _with_classes(model_cfg, len(CLASSES))[1]


def _changes(old: dict, new: dict) -> dict:
    """What a child config of ``old`` writes to make it ``new`` (same
    keys). mmengine merges a child's dicts into the base's key by key but
    replaces anything else whole: dicts on the way hold the changed keys
    alone, a changed list (Cascade R-CNN's three box heads) is written out
    in full."""
    return {
        key: (_changes(old[key], value) if isinstance(value, dict)
              and isinstance(old[key], dict) else value)
        for key, value in new.items() if value != old[key]
    }


def _merged(a: dict, b: dict) -> dict:
    """``b`` merged into ``a``, dict by dict."""
    out = dict(a)
    for key, value in b.items():
        out[key] = (_merged(out[key], value) if isinstance(value, dict)
                    and isinstance(out.get(key), dict) else value)
    return out


def _config_text(value, indent: int = 0, lead: int = 0) -> str:
    """``value`` as config text in mmdet's style (``dict(key=...)``), on
    one line where it fits in 79 columns (``lead`` characters and a comma
    beside it), else one item a line."""
    pad = ' ' * (indent + 4)
    if isinstance(value, dict) and all(
            isinstance(k, str) and k.isidentifier() and
            not keyword.iskeyword(k) for k in value):
        items = [f'{k}={_config_text(v, indent + 4, len(k) + 1)}'
                 for k, v in value.items()]
        opening, closing = 'dict(', ')'
    elif isinstance(value, (list, tuple)):
        items = [_config_text(v, indent + 4) for v in value]
        opening, closing = '[]' if isinstance(value, list) else '()'
        if isinstance(value, tuple) and len(value) == 1:
            items[0] += ','
    else:
        return repr(value)
    line = opening + ', '.join(items) + closing
    if indent + lead + len(line) < 79 and '\n' not in line:
        return line
    return opening + '\n' + ',\n'.join(pad + item
                                       for item in items) + closing


def _in_base(base: dict, path: str) -> bool:
    """Whether the base config has the key ``path`` (dotted). mmengine
    consumes a child's ``_delete_`` only where the base has the key:
    elsewhere it would stay in the dict and reach the built object's
    arguments, so it is written only where this is True."""
    *parents, key = path.split('.')
    node = base
    for name in parents:
        node = node.get(name) if isinstance(node, dict) else None
    return isinstance(node, dict) and key in node


def _replacing(base: dict, path: str, sep: str = ' ') -> str:
    """``'_delete_=True,'`` and ``sep`` for the template where the base
    has ``path`` (:func:`_in_base`), so that the child's dict replaces its
    value whole; else nothing."""
    return f'_delete_=True,{sep}' if _in_base(base, path) else ''


def _optim_wrapper(base) -> dict:
    """The tiny config's ``optim_wrapper``: the base's, at learning rate
    0.005, clipping gradients; without a GPU an ``AmpOptimWrapper`` becomes
    an ``OptimWrapper`` (mmengine's AMP wrapper refuses a CPU), its other
    settings (``paramwise_cfg``...) kept."""
    import torch
    override = dict(optimizer=dict(lr=0.005),
                    clip_grad=dict(max_norm=10, norm_type=2))
    wrapper = base.get('optim_wrapper')
    if isinstance(wrapper, dict) and wrapper.get('type') in (
            'AmpOptimWrapper', 'mmengine.AmpOptimWrapper') and \
            not torch.cuda.is_available():
        kept = {k: v for k, v in wrapper.items()
                if k not in ('type', 'loss_scale', 'dtype')}
        return _merged(dict(_delete_=True, type='OptimWrapper', **kept),
                       override)
    if _in_base(base, 'optim_wrapper.clip_grad'):
        override['clip_grad']['_delete_'] = True
    return override


def _evaluator(base, data_root: str, with_mask: bool) -> dict:
    """The tiny config's ``val_evaluator``: the base's COCO metric (its
    metrics kept) on the tiny set's annotations, or, where the base
    evaluates otherwise (VOC's mAP...), a COCO metric of boxes, and of
    masks where the model predicts them."""
    ann_file = osp.join(osp.abspath(data_root), 'annotations',
                        'instances_val2017.json')
    evaluator = base.get('val_evaluator')
    if isinstance(evaluator, dict) and evaluator.get('type') in (
            'CocoMetric', 'mmdet.CocoMetric'):
        return dict(ann_file=ann_file)
    replace = {'_delete_': True} if _in_base(base, 'val_evaluator') else {}
    return dict(replace, type='CocoMetric', ann_file=ann_file,
                metric=['bbox', 'segm'] if with_mask else 'bbox',
                format_only=False, backend_args=None)


def tiny_coco_config(base: Union[str, 'Config'], data_root: str,
                     scale=(128, 128), max_iters: int = 4,
                     ckpt_interval: int = 2, val_interval: int = 10**6,
                     score_thr: Optional[float] = 0.0) -> str:
    """Text of a config that runs ``base`` on the tiny set, for smoke runs.

    Whatever ``base`` is shaped like: every ``num_classes`` of its model but
    an RPN head's becomes the tiny set's (lists of heads written out whole),
    its datasets become plain CocoDatasets of the tiny set and its
    metric COCO's, and without a GPU an ``AmpOptimWrapper`` becomes an
    ``OptimWrapper``.

    Args:
        base (str | Config): the config to inherit (its model,
            schedule...): its path, or the config loaded from a file (its
            ``filename`` is inherited), so a caller that has loaded it
            need not load it again.
        data_root (str): where :func:`make_tiny_coco` wrote the set.
        scale (tuple): image scale (w, h) of the Resize transforms.
        max_iters (int): iterations of the IterBasedTrainLoop.
        ckpt_interval (int): checkpoint every so many iterations.
        val_interval (int): validate every so many iterations (default:
            only after the last one, as mmengine's loop always does).
        score_thr (float, optional): the detector's test score threshold
            (``test_cfg.rcnn.score_thr`` or ``test_cfg.score_thr``). The
            default 0 keeps every detection up to ``max_per_img``, so the
            evaluation of a few iterations' model scores boxes (at mmdet's
            0.05 a RetinaNet that young detects nothing and the COCO metric
            logs an error instead). None: the base config's.

    Returns:
        str: the config text; write it to a ``.py`` file and use it anywhere
        a config path is taken.
    """
    from mmengine.config import Config

    from ce_mmdet.utils.mmdet_tools import mask_head_paths
    if isinstance(base, Config):
        if not base.filename:
            raise ValueError('base: a Config loaded from a file is needed '
                             '(its filename is inherited); this one has '
                             'no filename')
        base, base_cfg = base.filename, base.to_dict()
    else:
        base_cfg = Config.fromfile(base).to_dict()
    model = base_cfg['model']
    resized, found = _with_classes(model, len(CLASSES))
    if not found:
        raise ValueError(f'{base}: its model sets no num_classes to resize '
                         f'to the tiny set\'s {len(CLASSES)} classes')
    with_mask = bool(mask_head_paths(model))
    override = _merged(
        _merged(dict(backbone=dict(init_cfg=None)), _changes(model, resized)),
        _score_thr_override(model, score_thr))
    return TINY_CONFIG_TEMPLATE.format(
        base=osp.abspath(base),
        base_name=osp.basename(base),
        data_root=osp.abspath(data_root) + '/',
        classes=tuple(CLASSES),
        scale=tuple(scale),
        with_mask=with_mask,
        model=_config_text(override, lead=len('model = ')),
        evaluator=_config_text(_evaluator(base_cfg, data_root, with_mask),
                               lead=len('val_evaluator = ')),
        replace_train_dataset=_replacing(base_cfg, 'train_dataloader.dataset',
                                         '\n        '),
        replace_val_dataset=_replacing(base_cfg, 'val_dataloader.dataset',
                                       '\n        '),
        replace_train_cfg=_replacing(base_cfg, 'train_cfg'),
        optim_wrapper=_config_text(_optim_wrapper(base_cfg),
                                   lead=len('optim_wrapper = ')),
        max_iters=max_iters,
        ckpt_interval=ckpt_interval,
        val_interval=val_interval)
