"""smoke_steps: what it returns, and that a non-finite loss stops it."""
import math

import pytest
import torch
from mmdet.registry import MODELS
from mmengine.config import Config
from mmengine.registry import init_default_scope

from ce_mmdet.testing import smoke_steps
from ce_mmdet.testing.tiny_coco import tiny_coco_config


def tiny_retinanet(tmp_path, tiny_coco, loss_weight='1.0',
                   norm="dict(type='BN', requires_grad=True)"):
    """The tiny config of a user's CE RetinaNet (the expressions
    ``loss_weight`` weigh its classification loss, ``norm`` is its
    backbone's norm_cfg)."""
    mine = tmp_path / 'my_config.py'
    mine.write_text(
        "_base_ = 'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py'\n"
        "custom_imports = dict(imports=['ce_mmdet'])\n"
        f"model = dict(backbone=dict(type='CEResNet', norm_cfg={norm}),\n"
        f"    bbox_head=dict(loss_cls=dict(loss_weight={loss_weight})))\n")
    tiny = tmp_path / 'tiny.py'
    tiny.write_text(tiny_coco_config(str(mine), tiny_coco))
    return Config.fromfile(str(tiny))


def test_smoke_steps_train_then_test(tmp_path, tiny_coco):
    cfg = tiny_retinanet(tmp_path, tiny_coco)
    model, log_vars, predictions = smoke_steps(cfg)
    assert not model.training
    # the model was built with smoke_steps' seed, then trained one step:
    # stage 3 moved, stage 1 (frozen_stages=1) did not
    init_default_scope('mmdet')
    torch.manual_seed(0)
    fresh = MODELS.build(cfg.model)
    fresh.init_weights()
    trained = dict(model.named_parameters())
    moved = {name: not torch.equal(p, trained[name])
             for name, p in fresh.named_parameters()}
    assert any(v for k, v in moved.items() if '.layer3.' in k)
    assert not any(v for k, v in moved.items() if '.layer1.' in k)
    assert {'loss', 'loss_cls', 'loss_bbox'} <= set(log_vars)
    assert math.isfinite(log_vars['loss'].item())
    assert len(predictions) == cfg.test_dataloader.batch_size == 1
    pred = predictions[0].pred_instances
    assert len(pred) > 0 and torch.isfinite(pred.bboxes).all()
    # the same seed, the same steps (the data transforms draw from numpy's
    # generator, which the first call moved on)
    _, again, _ = smoke_steps(cfg)
    assert again['loss'].item() == pytest.approx(log_vars['loss'].item(),
                                                 rel=1e-6)


def test_smoke_steps_refuses_a_non_finite_loss(tmp_path, tiny_coco):
    cfg = tiny_retinanet(tmp_path, tiny_coco, loss_weight="float('nan')")
    with pytest.raises(RuntimeError,
                       match="the training step's loss is nan: .*loss_cls"):
        smoke_steps(cfg)


def test_smoke_steps_reverts_syncbn_outside_a_process_group(tmp_path,
                                                            tiny_coco):
    """As mmengine's runner does for a run without a launcher (a SyncBN
    refuses to train on a CPU, or without a process group)."""
    cfg = tiny_retinanet(tmp_path, tiny_coco,
                         norm="dict(type='SyncBN', requires_grad=True)")
    model, log_vars, _ = smoke_steps(cfg)
    assert not any(isinstance(m, torch.nn.SyncBatchNorm)
                   for m in model.modules())
    assert math.isfinite(log_vars['loss'].item())


def test_smoke_steps_give_a_runners_first_iteration(tmp_path, tiny_coco):
    """TOOD's head reads the epoch from the current MessageHub, which a
    runner's hooks fill: without it its training step stops with
    ``'<' not supported between instances of 'NoneType' and 'int'``."""
    from mmengine.logging import MessageHub

    from ce_mmdet.testing.mmdet_configs import (ce_config_text,
                                                mmdet_config_root)
    mine = tmp_path / 'my_config.py'
    mine.write_text(ce_config_text(
        f'{mmdet_config_root()}/tood/tood_r50_fpn_1x_coco.py'))
    tiny = tmp_path / 'tiny.py'
    tiny.write_text(tiny_coco_config(str(mine), tiny_coco))
    model, log_vars, _ = smoke_steps(Config.fromfile(str(tiny)))
    assert type(model.bbox_head).__name__ == 'TOODHead'
    assert math.isfinite(log_vars['loss'].item())
    hub = MessageHub.get_current_instance()
    assert hub.instance_name.startswith('ce_mmdet.smoke_steps.')
    assert (hub.get_info('epoch'), hub.get_info('iter')) == (0, 0)
