"""CE-ResNet in mmdet's own configs: which config a folder gives, the
user's config, and a check's answer at each stage."""
import math
import re
import os.path as osp

import pytest
from mmengine.config import Config

from ce_mmdet.testing.mmdet_configs import (STAGES, ce_config_text,
                                            check_mmdet_config,
                                            config_folders, mmdet_config_root,
                                            resnet50_config)


def test_resnet50_config_of_a_folder():
    folders = config_folders()
    assert '_base_' not in folders and {'retinanet', 'mask_rcnn'} <= set(
        folders)
    # the 1x COCO config, not the first by name (retinanet_r50-caffe_...)
    assert resnet50_config('retinanet') == (
        'retinanet/retinanet_r50_fpn_1x_coco.py')
    assert resnet50_config('mask_rcnn') == (
        'mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py')
    # a detector before an RPN, one without precomputed proposals before
    # Fast R-CNN (the shortest names here are the RPN's and Fast R-CNN's)
    assert resnet50_config('cascade_rpn') == (
        'cascade_rpn/cascade-rpn_faster-rcnn_r50-caffe_fpn_1x_coco.py')
    assert resnet50_config('libra_rcnn') == (
        'libra_rcnn/libra-retinanet_r50_fpn_1x_coco.py')
    # only proposal-reading or RPN configs: still one
    assert resnet50_config('rpn') == 'rpn/rpn_r50_fpn_1x_coco.py'
    # TridentNet's backbone is a TridentResNet: nothing to put CE-ResNet in
    assert resnet50_config('tridentnet') is None
    with pytest.raises(ValueError,
                       match="no config folder 'retina'.*retinanet"):
        resnet50_config('retina')


def test_ce_config_text_inherits_by_path(tmp_path):
    """mmengine's ``mmdet::`` form refuses a folder named ``gn+ws``; the
    user's config inherits by path, and changes only the backbone type."""
    base = osp.join(mmdet_config_root(), 'gn+ws',
                    'faster-rcnn_r50_fpn_gn-ws-all_1x_coco.py')
    mine = tmp_path / 'ce.py'
    mine.write_text(ce_config_text(base))
    cfg, base_cfg = Config.fromfile(str(mine)), Config.fromfile(base)
    assert cfg.custom_imports == dict(imports=['ce_mmdet'])
    assert cfg.model.backbone.pop('type') == 'CEResNet'
    assert base_cfg.model.backbone.pop('type') == 'ResNet'
    assert cfg.model.to_dict() == base_cfg.model.to_dict()
    # the baseline: the base as it is
    mine.write_text(ce_config_text(base, ce=False))
    assert Config.fromfile(str(mine)).model.to_dict() == dict(
        base_cfg.model.to_dict(), backbone=dict(
            base_cfg.model.backbone.to_dict(), type='ResNet'))


def test_check_mmdet_config_passes(tmp_path, tiny_coco):
    result = check_mmdet_config('retinanet/retinanet_r50_fpn_1x_coco.py',
                                str(tmp_path), tiny_coco)
    assert result['ok'] is True, result
    assert math.isfinite(result['loss']) and result['detections'] > 0
    tiny = Config.fromfile(str(tmp_path / 'tiny.py'))
    assert tiny.model.backbone.type == 'CEResNet'
    assert tiny.train_dataloader.dataset.data_root == tiny_coco + '/'


@pytest.mark.parametrize('config,stage,error', [
    ('retinanet/no_such_config.py', 'config', 'FileNotFoundError: '),
    ('rpn/rpn_r50_fpn_1x_coco.py', 'tiny config',
     'ValueError: .* sets no num_classes'),
])
def test_check_mmdet_config_says_where_it_stopped(
        config, stage, error, tmp_path, tiny_coco):
    assert stage in STAGES
    result = check_mmdet_config(config, str(tmp_path), tiny_coco)
    assert result['ok'] is False and result['stage'] == stage, result
    assert result['config'] == config
    assert re.match(error, result['error']), result
    assert 'Traceback' in (tmp_path / 'traceback.txt').read_text()
