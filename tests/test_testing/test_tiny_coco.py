import hashlib
import os
import os.path as osp

import numpy as np
import pytest
from mmdet.datasets import CocoDataset
from mmengine.registry import DefaultScope
from PIL import Image
from pycocotools.coco import COCO
from pycocotools import mask as mask_utils

from ce_mmdet.testing import TINY_COCO_CLASSES, make_tiny_coco


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp('tiny_coco')
    make_tiny_coco(str(root))
    return str(root)


def digest(root):
    h = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            with open(osp.join(dirpath, name), 'rb') as f:
                h.update(name.encode() + f.read())
    return h.hexdigest()


def test_deterministic_and_small(tiny, tmp_path):
    make_tiny_coco(str(tmp_path))
    assert digest(tiny) == digest(str(tmp_path))
    size = sum(
        osp.getsize(osp.join(d, f)) for d, _, fs in os.walk(tiny) for f in fs)
    assert size < 3 * 2**20


@pytest.mark.parametrize('split,num', [('train', 24), ('val', 8)])
def test_pycocotools_and_geometry(tiny, split, num):
    coco = COCO(osp.join(tiny, 'annotations', f'instances_{split}2017.json'))
    assert len(coco.getImgIds()) == num
    assert [c['name'] for c in coco.loadCats(coco.getCatIds())] == list(
        TINY_COCO_CLASSES)
    anns = coco.loadAnns(coco.getAnnIds())
    assert len(anns) >= num
    for ann in anns:
        img = coco.loadImgs(ann['image_id'])[0]
        x, y, w, h = ann['bbox']
        assert w > 0 and h > 0 and ann['iscrowd'] == 0
        assert 0 <= x and x + w <= img['width']
        assert 0 <= y and y + h <= img['height']
        poly = np.array(ann['segmentation'][0]).reshape(-1, 2)
        assert (poly[:, 0] >= x - 1e-6).all() and (poly[:, 0] <=
                                                   x + w + 1e-6).all()
        assert (poly[:, 1] >= y - 1e-6).all() and (poly[:, 1] <=
                                                   y + h + 1e-6).all()
        mask = coco.annToMask(ann)
        assert mask.shape == (img['height'], img['width'])
        ys, xs = np.nonzero(mask)
        assert xs.min() >= int(x) and xs.max() <= int(np.ceil(x + w))
        assert ys.min() >= int(y) and ys.max() <= int(np.ceil(y + h))
        # area is the polygon's; rasterised masks agree within a margin
        assert abs(mask.sum() - ann['area']) < 0.25 * ann['area'] + 20
        rle = mask_utils.frPyObjects(ann['segmentation'], img['height'],
                                     img['width'])
        assert mask_utils.area(rle).sum() > 0
        with Image.open(osp.join(tiny, f'{split}2017',
                                 img['file_name'])) as im:
            assert im.size == (img['width'], img['height'])


def test_mmdet_coco_dataset(tiny):
    with DefaultScope.overwrite_default_scope('mmdet'):
        check_coco_dataset(tiny)


def check_coco_dataset(tiny):
    ds = CocoDataset(
        data_root=tiny + '/',
        ann_file='annotations/instances_train2017.json',
        data_prefix=dict(img='train2017/'),
        metainfo=dict(classes=TINY_COCO_CLASSES),
        pipeline=[
            dict(type='LoadImageFromFile'),
            dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
            dict(type='PackDetInputs')
        ])
    assert len(ds) == 24
    sample = ds[0]
    inst = sample['data_samples'].gt_instances
    assert len(inst) > 0
    assert inst.masks.masks.shape[0] == len(inst)
    assert set(inst.labels.tolist()) <= {0, 1, 2}
    h, w = sample['inputs'].shape[1:]
    assert (inst.bboxes.tensor[:, 2] <= w).all()
    assert (inst.bboxes.tensor[:, 3] <= h).all()


ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))


@pytest.mark.parametrize('config,key', [
    ('configs/ce_mask_rcnn/mask-rcnn_r50-ce_fpn_1x_coco.py', 'rcnn'),
    ('configs/ce_retinanet/retinanet_r50-ce_fpn_1x_coco.py', None),
])
def test_tiny_config_keeps_every_detection_unless_told(config, key, tmp_path):
    """A smoke run's evaluation scores boxes (score threshold 0: a model of
    a few iterations is below mmdet's 0.05); ``score_thr=None`` keeps the
    base config's threshold, and the rest of ``test_cfg`` stays."""
    from mmengine.config import Config

    from ce_mmdet.testing.tiny_coco import tiny_coco_config
    base = Config.fromfile(osp.join(ROOT, config)).model.test_cfg
    for score_thr, expected in ((0.0, 0.0), (None, 0.05), (0.3, 0.3)):
        path = tmp_path / f'tiny_{score_thr}.py'
        path.write_text(
            tiny_coco_config(osp.join(ROOT, config), str(tmp_path),
                             score_thr=score_thr))
        test_cfg = Config.fromfile(str(path)).model.test_cfg
        head, base_head = ((test_cfg[key], base[key]) if key else
                           (test_cfg, base))
        assert head.score_thr == expected
        assert {k: v for k, v in head.items() if k != 'score_thr'} == {
            k: v for k, v in base_head.items() if k != 'score_thr'}
        assert test_cfg.keys() == base.keys()


@pytest.mark.parametrize('score_thr', [-0.1, 1.5, '0', True])
def test_tiny_config_refuses_a_bad_score_thr(score_thr, tmp_path):
    from ce_mmdet.testing.tiny_coco import tiny_coco_config
    with pytest.raises(ValueError, match=r'score_thr must be None or a '
                       r'number in \[0, 1\], got'):
        tiny_coco_config(
            osp.join(ROOT,
                     'configs/ce_retinanet/retinanet_r50-ce_fpn_1x_coco.py'),
            str(tmp_path), score_thr=score_thr)


def test_tiny_config_of_a_loaded_config(tmp_path):
    """A config loaded from a file gives the text its path gives (a caller
    that loaded it does not load it again); one with no file is refused."""
    from mmengine.config import Config

    from ce_mmdet.testing.tiny_coco import tiny_coco_config
    path = osp.join(ROOT,
                    'configs/ce_retinanet/retinanet_r50-ce_fpn_1x_coco.py')
    assert (tiny_coco_config(Config.fromfile(path), str(tmp_path))
            == tiny_coco_config(path, str(tmp_path)))
    with pytest.raises(ValueError, match='has no filename'):
        tiny_coco_config(Config(Config.fromfile(path).to_dict()),
                         str(tmp_path))


def resized(node, n):
    """The expected model: every int ``num_classes`` of ``node`` but the
    RPN head's set to n (written here apart from tiny_coco's own walk); and
    how many."""
    if isinstance(node, dict):
        out, count = {}, 0
        for key, value in node.items():
            if key == 'num_classes' and isinstance(value, int):
                out[key], found = n, 1
            elif key == 'rpn_head':
                out[key], found = value, 0
            else:
                out[key], found = resized(value, n)
            count += found
        return out, count
    if isinstance(node, (list, tuple)):
        pairs = [resized(v, n) for v in node]
        return type(node)(p[0] for p in pairs), sum(p[1] for p in pairs)
    return node, 0


# mmdet configs whose heads differ in shape: a list of box heads (Cascade),
# lists of box and mask heads (HTC), no mask (Faster R-CNN, FCOS), an RPN
# head that sets its num_classes (an FCOS head, 1 class: kept), a mask head
# without a box head (SOLO)
OTHER_DETECTORS = [
    ('cascade_rcnn/cascade-mask-rcnn_r50_fpn_1x_coco.py', True, 4),
    ('htc/htc-without-semantic_r50_fpn_1x_coco.py', True, 6),
    ('faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py', False, 1),
    ('faster_rcnn/faster-rcnn_r50_fpn_fcos-rpn_1x_coco.py', False, 1),
    ('fcos/fcos_r50-caffe_fpn_gn-head_1x_coco.py', False, 1),
    ('solo/solo_r50_fpn_1x_coco.py', True, 1),
    ('vfnet/vfnet_r50_fpn_1x_coco.py', False, 1),
    ('pascal_voc/faster-rcnn_r50_fpn_1x_voc0712.py', False, 1),
]


def ce_config(tmp_path, base):
    """A user's config: mmdet's ``base`` with a CE-ResNet backbone."""
    path = tmp_path / 'my_config.py'
    path.write_text(f'_base_ = {"mmdet::" + base!r}\n'
                    "custom_imports = dict(imports=['ce_mmdet'])\n"
                    "model = dict(backbone=dict(type='CEResNet'))\n")
    return str(path)


def tiny_config_of(tmp_path, base, data_root):
    """The loaded tiny config of :func:`ce_config` (on ``data_root``)."""
    from mmengine.config import Config

    from ce_mmdet.testing.tiny_coco import tiny_coco_config
    path = tmp_path / 'tiny.py'
    path.write_text(tiny_coco_config(ce_config(tmp_path, base), data_root))
    return Config.fromfile(str(path))


@pytest.mark.parametrize('base,with_mask,heads', OTHER_DETECTORS)
def test_tiny_config_of_other_detectors(base, with_mask, heads, tmp_path):
    """Any mmdet detector's config becomes a tiny-set config that loads:
    every num_classes (in lists of heads too) is the tiny set's, the rest
    of the model is the base's but for the dropped pretrained weights and
    the test score threshold, and masks are loaded where a head needs
    them."""
    from mmengine.config import Config
    cfg = tiny_config_of(tmp_path, base, str(tmp_path))
    expected, count = resized(
        Config.fromfile(ce_config(tmp_path, base)).model.to_dict(),
        len(TINY_COCO_CLASSES))
    assert count == heads
    expected['backbone']['init_cfg'] = None
    test_cfg = expected['test_cfg']
    (test_cfg.get('rcnn') or test_cfg)['score_thr'] = 0.0
    assert cfg.model.to_dict() == expected
    assert cfg.model.get('rpn_head', {}).get('num_classes', 1) == 1
    loads = [t for t in cfg.train_pipeline if t['type'] == 'LoadAnnotations']
    assert loads[0]['with_mask'] == with_mask


@pytest.mark.parametrize('base,metric', [
    # a RepeatDataset of two VOC sets, VOC's mAP
    ('pascal_voc/faster-rcnn_r50_fpn_1x_voc0712.py', 'bbox'),
    # a RepeatDataset of COCO-format VOC annotations, COCO's metric
    ('pascal_voc/faster-rcnn_r50_fpn_1x_voc0712-cocofmt.py', 'bbox'),
    # no gradient clipping in the base (clip_grad=None)
    ('vfnet/vfnet_r50_fpn_1x_coco.py', 'bbox'),
    ('solo/solo_r50_fpn_1x_coco.py', 'segm'),
    ('mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py', ['bbox', 'segm']),
])
def test_tiny_config_reads_the_tiny_set_whatever_the_base_reads(
        base, metric, tiny, tmp_path):
    """The tiny config's datasets are plain CocoDatasets of the tiny set
    (a base's dataset wrappers and annotation files replaced), its metric
    COCO's on the tiny annotations (the base's metrics where it has COCO's,
    boxes, and masks for a mask model, where it has another), and it clips
    gradients where the base does not."""
    from mmdet.registry import DATASETS
    from mmengine.registry import init_default_scope
    cfg = tiny_config_of(tmp_path, base, tiny)
    init_default_scope('mmdet')
    for name, split, count in (('train_dataloader', 'train', 24),
                               ('test_dataloader', 'val', 8)):
        dataset = DATASETS.build(cfg[name].dataset)
        assert type(dataset) is CocoDataset
        assert dataset.ann_file == osp.join(
            tiny, 'annotations', f'instances_{split}2017.json')
        assert dataset.metainfo['classes'] == TINY_COCO_CLASSES
        # every image of the split but those the train filter drops
        assert 0 < len(dataset) <= count
    for evaluator in (cfg.val_evaluator, cfg.test_evaluator):
        assert evaluator.type == 'CocoMetric'
        assert evaluator.ann_file == osp.join(tiny, 'annotations',
                                              'instances_val2017.json')
        assert evaluator.metric == metric
    assert cfg.optim_wrapper.clip_grad == dict(max_norm=10, norm_type=2)


AMP_BASE = ('fcos/fcos_r50_fpn_gn-head-center-normbbox-centeronreg-giou_'
            '8xb8-amp-lsj-200e_coco.py')


@pytest.mark.parametrize('cuda', [False, True])
def test_tiny_config_of_an_amp_config(cuda, tmp_path, monkeypatch):
    """mmengine's AmpOptimWrapper refuses a CPU: without a GPU the tiny
    config of an AMP config trains in float32 (OptimWrapper, the base's
    other settings kept); with one it keeps AMP."""
    import torch
    from mmengine.config import Config
    from mmengine.optim import build_optim_wrapper
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: cuda)
    base = Config.fromfile(ce_config(tmp_path, AMP_BASE)).optim_wrapper
    assert base.type == 'AmpOptimWrapper'
    wrapper = tiny_config_of(tmp_path, AMP_BASE, str(tmp_path)).optim_wrapper
    assert wrapper.type == ('AmpOptimWrapper' if cuda else 'OptimWrapper')
    assert wrapper.optimizer == dict(base.optimizer, lr=0.005)
    assert wrapper.paramwise_cfg == base.paramwise_cfg
    assert wrapper.clip_grad == dict(max_norm=10, norm_type=2)
    if not cuda:
        built = build_optim_wrapper(torch.nn.Conv2d(3, 4, 1, bias=True),
                                    wrapper)
        assert type(built).__name__ == 'OptimWrapper'


def test_tiny_config_of_a_model_without_classes(tmp_path):
    from ce_mmdet.testing.tiny_coco import tiny_coco_config
    with pytest.raises(ValueError, match="sets no num_classes to resize to "
                       "the tiny set's 3 classes"):
        tiny_coco_config(ce_config(tmp_path, 'rpn/rpn_r50_fpn_1x_coco.py'),
                         str(tmp_path))


@pytest.mark.parametrize('base,detects', [
    ('cascade_rcnn/cascade-mask-rcnn_r50_fpn_1x_coco.py', True),
    # an untrained SOLO's masks are below its mask_thr: none are kept
    ('solo/solo_r50_fpn_1x_coco.py', False),
])
def test_tiny_config_of_other_detectors_trains_and_tests(
        base, detects, tiny, tmp_path):
    """A CE Cascade Mask R-CNN and a CE SOLO take a training step and
    test on the tiny set."""
    from ce_mmdet.models import CEResNet
    from ce_mmdet.testing import smoke_steps
    model, _, predictions = smoke_steps(tiny_config_of(tmp_path, base, tiny))
    assert isinstance(model.backbone, CEResNet)
    pred = predictions[0].pred_instances
    assert 'masks' in pred and (len(pred) > 0) == detects
