"""End to end on the tiny COCO set: tools/train.py, tools/test.py, --resume,
mmdet's own train.py on an outside config, EMAHook, the missing-weights stop,
and publishing a checkpoint."""
import hashlib
import json
import os
import os.path as osp
import subprocess
import sys

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmengine.runner import Runner

from ce_mmdet.models import ChannelEquilibrium
from ce_mmdet.testing.tiny_coco import tiny_coco_config
from ce_mmdet.utils.mmdet_tools import mmdet_tool_path

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
MASK_CE = osp.join(ROOT,
                   'configs/ce_mask_rcnn/mask-rcnn_r50-ce_fpn_1x_coco.py')
RETINA_CE = osp.join(ROOT,
                     'configs/ce_retinanet/retinanet_r50-ce_fpn_1x_coco.py')


def run(args, cwd, timeout=600):
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    proc = subprocess.run([sys.executable] + args, cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


def first_val_image(tiny_coco):
    """Path of the tiny set's first validation image."""
    val = osp.join(tiny_coco, 'val2017')
    return osp.join(val, sorted(os.listdir(val))[0])


def ce_buffers(state):
    return {
        k: v
        for k, v in state.items()
        if k.endswith('running_wm') or k.endswith('running_scale')
    }


@pytest.fixture(scope='module')
def mask_run(tiny_coco, tmp_path_factory):
    """CE Mask R-CNN trained 4 iterations by tools/train.py."""
    work = tmp_path_factory.mktemp('mask_ce')
    cfg = work / 'tiny_mask_ce.py'
    cfg.write_text(tiny_coco_config(MASK_CE, tiny_coco, max_iters=4))
    log = run(['tools/train.py', str(cfg), '--work-dir', str(work / 'wd')],
              cwd=ROOT)
    return cfg, work / 'wd', log


def test_train_writes_checkpoints_with_ce_buffers(mask_run):
    _, wd, log = mask_run
    assert 'Iter(train) [4/4]' in log
    for it in (2, 4):
        assert (wd / f'iter_{it}.pth').exists()
    state = torch.load(wd / 'iter_4.pth', weights_only=True)['state_dict']
    bufs = ce_buffers(state)
    assert any(k.startswith('backbone.ce1.') for k in bufs)
    # norm_eval=True in the config: CE buffers stay at their initial values
    assert torch.equal(state['backbone.ce1.running_scale'], torch.ones(1))


def test_test_prints_bbox_and_segm_ap(mask_run):
    cfg, wd, _ = mask_run
    log = run([
        'tools/test.py',
        str(cfg),
        str(wd / 'iter_4.pth'), '--work-dir',
        str(wd / 'test')
    ], cwd=ROOT)
    assert 'coco/bbox_mAP:' in log and 'coco/segm_mAP:' in log
    assert 'Average Precision' in log


INFERENCE_SCRIPT = r'''
import json, sys
import torch
from mmdet.apis import init_detector, inference_detector
cfg, ckpt, img = sys.argv[1:4]
before = 'ce_mmdet' in sys.modules
model = init_detector(cfg, ckpt, device='cpu')
state = torch.load(ckpt, weights_only=True)['state_dict']
loaded = all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
pred = inference_detector(model, img).pred_instances
print('RESULT', json.dumps(dict(
    imported_before=before, backbone=type(model.backbone).__name__,
    loaded=loaded, keys=len(state), boxes=len(pred),
    masks=tuple(pred.masks.shape) if 'masks' in pred else None)))
'''


def test_mmdet_inference_api_runs_a_ce_checkpoint(mask_run, tiny_coco):
    """mmdet's own inference API (``init_detector``, ``inference_detector``)
    in a fresh process: the config's ``custom_imports`` alone bring
    ce_mmdet in before the checkpoint is read (``weights_only`` loading),
    every tensor of the checkpoint lands in the CE model, and it predicts
    boxes and masks."""
    cfg, wd, _ = mask_run
    out = run(['-c', INFERENCE_SCRIPT, str(cfg), str(wd / 'iter_4.pth'),
               first_val_image(tiny_coco)], cwd=ROOT)
    line, = [line for line in out.splitlines() if line.startswith('RESULT ')]
    result = json.loads(line[len('RESULT '):])
    assert result['imported_before'] is False
    assert result['backbone'] == 'CEResNet'
    assert result['loaded'] and result['keys'] > 100
    assert result['boxes'] > 0
    assert result['masks'] is not None and result['masks'][0] == \
        result['boxes']


def test_resume_continues_iterations_and_ce_buffers(mask_run, tmp_path):
    cfg_path, wd, _ = mask_run
    ckpt = torch.load(wd / 'iter_2.pth', weights_only=True)
    # in process: the runner restores the iteration and the CE buffers
    cfg = Config.fromfile(str(cfg_path))
    cfg.work_dir = str(tmp_path / 'resume_check')
    cfg.resume = True
    cfg.load_from = str(wd / 'iter_2.pth')
    init_default_scope('mmdet')
    runner = Runner.from_cfg(cfg)
    runner._train_loop = runner.build_train_loop(runner._train_loop)
    runner.optim_wrapper = runner.build_optim_wrapper(runner.optim_wrapper)
    runner.load_or_resume()
    assert runner.iter == 2
    state = runner.model.state_dict()
    for k, v in ce_buffers(ckpt['state_dict']).items():
        assert torch.equal(state[k], v), k
    # and on the command line: iterations 3 and 4 only
    log = run([
        'tools/train.py',
        str(cfg_path), '--work-dir',
        str(wd), '--resume',
        str(wd / 'iter_2.pth')
    ], cwd=ROOT)
    assert 'resumed epoch: 0, iter: 2' in log
    assert 'Iter(train) [3/4]' in log and 'Iter(train) [1/4]' not in log


@pytest.fixture(scope='module')
def retina_run(tiny_coco, tmp_path_factory):
    work = tmp_path_factory.mktemp('retina_ce')
    cfg = work / 'tiny_retina_ce.py'
    cfg.write_text(tiny_coco_config(RETINA_CE, tiny_coco, max_iters=2,
                                    ckpt_interval=2))
    log = run(['tools/train.py', str(cfg), '--work-dir', str(work / 'wd')],
              cwd=ROOT)
    return cfg, work / 'wd', log


def test_retinanet_train_and_test_returns_metrics(retina_run, monkeypatch):
    cfg, wd, log = retina_run
    assert (wd / 'iter_2.pth').exists()
    sys.path.insert(0, osp.join(ROOT, 'tools'))
    try:
        import test as test_tool
    finally:
        sys.path.pop(0)
    monkeypatch.setattr(sys, 'argv', [
        'test.py', str(cfg),
        str(wd / 'iter_2.pth'), '--work-dir',
        str(wd / 'test')
    ])
    # (2 iterations from scratch: every score is near the 0.01 prior, below
    # RetinaNet's 0.05; the tiny config's threshold 0 keeps them scored)
    metrics = test_tool.main()
    assert 'coco/bbox_mAP' in metrics
    assert 0.0 <= metrics['coco/bbox_mAP'] <= 1.0


OUTSIDE_CONFIG = """\
_base_ = 'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['ce_mmdet'], allow_failed_imports=False)
model = dict(
    backbone=dict(
        type='CEResNet',
        depth=50,
        ce_cfg=dict(group_size=16, num_iters=3, reduction=4),
        ce_stages=(True, True, True, False),
        stem_ce=True,
        norm_eval=False))
"""


@pytest.mark.parametrize('tool', ['mmdet', 'ours'])
def test_outside_config_trains(tool, tiny_coco, tmp_path):
    user_cfg = tmp_path / 'my_ce_retinanet.py'
    user_cfg.write_text(OUTSIDE_CONFIG)
    tiny = tmp_path / 'tiny.py'
    tiny.write_text(tiny_coco_config(str(user_cfg), tiny_coco, max_iters=2))
    script = (mmdet_tool_path('train') if tool == 'mmdet' else osp.join(
        ROOT, 'tools', 'train.py'))
    log = run([script, str(tiny), '--work-dir',
               str(tmp_path / 'wd')], cwd=str(tmp_path))
    assert 'Iter(train) [2/2]' in log
    state = torch.load(tmp_path / 'wd' / 'iter_2.pth',
                       weights_only=True)['state_dict']
    # norm_eval=False: the CE buffers of unfrozen stages (2+) were trained
    assert not torch.equal(state['backbone.layer2.0.ce.running_scale'],
                           torch.ones(1))


EMA_CONFIG = """\
_base_ = '{base}'
model = dict(backbone=dict(norm_eval=False, init_cfg=None))
custom_hooks = [
    dict(type='EMAHook', ema_type='ExpMomentumEMA', momentum=0.3,
         update_buffers=True, priority=49)
]
"""


def test_ema_hook_averages_ce_and_its_checkpoint_tests(tiny_coco, tmp_path):
    """mmengine's EMAHook (RTMDet/YOLOX's, any config may add it): it deep-
    copies the model, averages CE's parameters and buffers, validates with
    them, and saves them as the checkpoint's weights; tools/test.py runs it."""
    user_cfg = tmp_path / 'ema.py'
    user_cfg.write_text(EMA_CONFIG.format(base=RETINA_CE))
    tiny = tmp_path / 'tiny_ema.py'
    tiny.write_text(tiny_coco_config(str(user_cfg), tiny_coco, max_iters=3,
                                     ckpt_interval=3))
    log = run(['tools/train.py', str(tiny), '--work-dir',
               str(tmp_path / 'wd')], cwd=ROOT)
    assert 'coco/bbox_mAP' in log  # validated with the averaged weights
    ckpt = torch.load(tmp_path / 'wd' / 'iter_3.pth', weights_only=True)
    # the checkpoint's weights are the averages, ema_state_dict the model's
    averaged, trained = ckpt['state_dict'], ckpt['ema_state_dict']
    assert int(trained['steps']) == 3
    for name in ('running_wm', 'running_scale', 'gate', 'fc1.weight'):
        key = f'backbone.layer2.0.ce.{name}'
        assert not torch.equal(averaged[key], trained['module.' + key]), key
    # trained buffers, averaged: neither the initial values nor NaN
    assert torch.isfinite(averaged['backbone.layer2.0.ce.running_wm']).all()
    assert not torch.equal(averaged['backbone.layer2.0.ce.running_scale'],
                           torch.ones(1))
    log = run(['tools/test.py', str(tiny),
               str(tmp_path / 'wd' / 'iter_3.pth'), '--work-dir',
               str(tmp_path / 'test')], cwd=ROOT)
    assert 'coco/bbox_mAP' in log


def test_missing_pretrained_stops_before_runner(tmp_path):
    proc = subprocess.run([
        sys.executable, 'tools/train.py', MASK_CE, '--work-dir',
        str(tmp_path / 'wd'), '--cfg-options',
        'model.backbone.init_cfg.checkpoint=checkpoints/nope.pth'
    ], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert 'checkpoints/nope.pth' in proc.stderr
    assert 'cenet2mmdet.py' in proc.stderr
    assert 'torchvision://resnet50' in proc.stderr
    assert not (tmp_path / 'wd').exists()  # no runner was built


def test_tta_of_mask_rcnn_stops_before_runner(tmp_path):
    """mmdet's TTA merges no masks: tools/test.py says so before it loads
    the model, the checkpoint (here none) or the data."""
    proc = subprocess.run([
        sys.executable, 'tools/test.py', MASK_CE,
        str(tmp_path / 'none.pth'), '--work-dir',
        str(tmp_path / 'wd'), '--tta'
    ], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert 'model.roi_head.mask_head' in proc.stderr
    assert 'merges boxes only' in proc.stderr
    assert not (tmp_path / 'wd').exists()


def test_ce_layers_in_built_model_match_config(tiny_coco):
    cfg = Config.fromfile(RETINA_CE)
    init_default_scope('mmdet')
    from mmdet.registry import MODELS
    cfg.model.backbone.init_cfg = None
    model = MODELS.build(cfg.model)
    n = sum(isinstance(m, ChannelEquilibrium) for m in model.modules())
    assert n == 1 + 3 + 4 + 6


def test_publish_model_keeps_weights_and_meta_loadable_anywhere(
        mask_run, tiny_coco, tmp_path):
    """tools/model_converters/publish_model.py (mmdet's command line) on a
    checkpoint tools/train.py wrote: ``OUT-<first 8 hex digits of its
    SHA-256>.pth`` with the weights and the meta only, which a process
    without ce_mmdet loads with ``weights_only=True`` and mmdet's
    inferencer runs from alone (its meta holds the config). mmdet's own tool
    stops on the same file with torch >= 2.6 (the reason ours exists)."""
    _, wd, _ = mask_run
    src = str(wd / 'iter_4.pth')
    log = run(['tools/model_converters/publish_model.py', src,
               str(tmp_path / 'out' / 'ce_mask.pth')], cwd=ROOT)
    published, = (tmp_path / 'out').iterdir()
    digest = hashlib.sha256(published.read_bytes()).hexdigest()
    assert published.name == f'ce_mask-{digest[:8]}.pth'
    assert str(published) in log
    assert 'Key `optimizer` is removed' in log
    out = run(['-c', 'import sys, torch; '
               'ck = torch.load(sys.argv[1], weights_only=True); '
               "print('KEYS', sorted(ck), 'ce_mmdet' in sys.modules)",
               str(published)], cwd=str(tmp_path))
    assert "KEYS ['meta', 'state_dict'] False" in out
    # the meta's config builds the model: mmdet's inferencer needs nothing
    # else (its custom_imports bring ce_mmdet in)
    out = run(['-c', 'import sys; from mmdet.apis import DetInferencer; '
               "inf = DetInferencer(weights=sys.argv[1], device='cpu'); "
               'pred = inf(sys.argv[2])["predictions"][0]; '
               "print('MODEL', type(inf.model.backbone).__name__, "
               "len(pred['bboxes']) > 0)",
               str(published), first_val_image(tiny_coco)],
              cwd=str(tmp_path))
    assert 'MODEL CEResNet True' in out
    want = torch.load(src, weights_only=True)
    got = torch.load(published, weights_only=True)
    assert got['meta'] == want['meta']
    assert got['state_dict'].keys() == want['state_dict'].keys()
    for k, v in want['state_dict'].items():
        assert torch.equal(got['state_dict'][k], v), k
    mmdet_tool = subprocess.run(
        [sys.executable, mmdet_tool_path('model_converters/publish_model'),
         src, str(tmp_path / 'mmdet.pth')], capture_output=True, text=True,
        cwd=str(tmp_path), timeout=300)
    assert mmdet_tool.returncode != 0
    assert 'Unsupported global' in mmdet_tool.stderr
