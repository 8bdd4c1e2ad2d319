"""torchrun (tools/dist_train.sh, tools/dist_test.sh) with 2 CPU processes,
gloo, SyncCE."""
import os
import os.path as osp
import socket
import subprocess
import sys

import pytest
import torch

from ce_mmdet.testing.tiny_coco import tiny_coco_config

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
SYNC_CFG = osp.join(
    ROOT, 'configs/ce_mask_rcnn/mask-rcnn_r50-ce_fpn_syncbn-synce_1x_coco.py')


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


#: torch's SyncBatchNorm needs GPUs: plain BN on CPU; SyncCE itself works
#: on CPU (gloo)
CPU_OPTIONS = [
    '--cfg-options', 'env_cfg.dist_cfg.backend=gloo',
    'model.backbone.norm_cfg.type=BN'
]


def torchrun(script, args, timeout=800):
    """``bash tools/SCRIPT ARGS`` (two processes on this machine); the
    log, after checking the run succeeded."""
    env = dict(
        os.environ,
        PYTHON=sys.executable,
        PORT=str(free_port()),
        MASTER_ADDR='127.0.0.1',
        OMP_NUM_THREADS='1',
        PYTHONUNBUFFERED='1')
    proc = subprocess.run(['bash', osp.join('tools', script)] + args,
                          cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    return log


@pytest.fixture(scope='module')
def synce_run(tiny_coco, tmp_path_factory):
    """SyncCE Mask R-CNN trained 2 iterations by dist_train.sh on two
    processes, with CESyncCheckHook dumping each rank's CE buffers."""
    tmp_path = tmp_path_factory.mktemp('synce')
    cfg = tmp_path / 'tiny_synce.py'
    cfg.write_text(
        tiny_coco_config(SYNC_CFG, tiny_coco, max_iters=2, ckpt_interval=2) +
        "custom_hooks = [dict(type='CESyncCheckHook', interval=1, "
        'dump=True)]\n')
    wd = tmp_path / 'wd'
    log = torchrun('dist_train.sh',
                   [str(cfg), '2', '--work-dir', str(wd)] + CPU_OPTIONS)
    return cfg, wd, log


@pytest.mark.timeout(900)
def test_dist_train_synce_two_processes(synce_run):
    cfg, wd, log = synce_run
    assert (wd / 'iter_2.pth').exists()
    assert 'Iter(train) [2/2]' in log
    checks = [line for line in log.splitlines() if 'CESyncCheckHook (' in line]
    assert len(checks) >= 3, log[-3000:]
    assert all(line.endswith('processes: 0') for line in checks), checks
    ranks = [
        torch.load(wd / f'ce_buffers_rank{r}.pth', weights_only=True)
        for r in range(2)
    ]
    assert set(ranks[0]) == set(ranks[1]) and ranks[0]
    for k in ranks[0]:
        assert torch.equal(ranks[0][k], ranks[1][k]), k
    # the buffers were trained (norm_eval=False), not left at init
    assert not torch.equal(ranks[0]['backbone.layer2.0.ce.running_scale'],
                           torch.ones(1))
    ckpt = torch.load(wd / 'iter_2.pth', weights_only=True)['state_dict']
    assert torch.equal(ckpt['backbone.layer2.0.ce.running_wm'],
                       ranks[1]['backbone.layer2.0.ce.running_wm'])


@pytest.mark.timeout(900)
def test_dist_test_two_processes(synce_run, tmp_path):
    """dist_test.sh on the trained checkpoint: the two ranks' halves of the
    val set are gathered and scored (boxes and masks)."""
    cfg, wd, _ = synce_run
    log = torchrun('dist_test.sh', [
        str(cfg), str(wd / 'iter_2.pth'), '2', '--work-dir',
        str(tmp_path / 'test')
    ] + CPU_OPTIONS)
    assert 'Iter(test) [4/4]' in log  # 8 images, 1 per rank and iteration
    assert 'coco/bbox_mAP:' in log and 'coco/segm_mAP:' in log
