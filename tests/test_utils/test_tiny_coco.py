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
