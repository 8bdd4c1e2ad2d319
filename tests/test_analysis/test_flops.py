import os.path as osp
import re
import subprocess
import sys

import pytest
import torch
from mmengine.analysis import ActivationAnalyzer, FlopAnalyzer

from ce_mmdet.analysis import (ce_activation_handles, ce_flop_count,
                               ce_flop_handles)
from ce_mmdet.models import ChannelEquilibrium
from ce_mmdet.testing.tiny_coco import tiny_coco_config

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))


def test_rule_matches_hand_count_for_one_layer():
    # N=2, C=32, d=16, 8x8, h=8. Eval: apply N*C*d*HW = 65536, mean and sum
    # of squares 2*N*C*HW = 8192, MLP 2*N*C*h = 1024.
    layer = ChannelEquilibrium(32, group_size=16).eval()
    x = torch.randn(2, 32, 8, 8)
    analyzer = FlopAnalyzer(layer, (x, )).set_op_handle(**ce_flop_handles())
    assert analyzer.total() == 65536 + 8192 + 1024 == 74752
    assert not analyzer.unsupported_ops()
    activations = ActivationAnalyzer(layer, (x, )).set_op_handle(
        **ce_activation_handles())
    assert activations.total() == 2 * 32 * 8 * 8
    # Training: + Gram 65536, mean 4096 (no sum of squares), Newton
    # 3 * T * G * d^3 = 3 * 3 * 2 * 4096 = 73728.
    layer.train()
    total = FlopAnalyzer(layer, (x, )).set_op_handle(
        **ce_flop_handles()).total()
    assert total == 65536 + 1024 + 65536 + 4096 + 73728
    assert total == ce_flop_count(2, 32, 64, 16, 8, 3, training=True)


class _BNCE(torch.nn.Module):

    def __init__(self, ce):
        super().__init__()
        self.bn = torch.nn.BatchNorm2d(ce.in_channels)
        self.ce = ce

    def forward(self, z):
        return self.ce(z, bn=self.bn)


def test_rule_reads_the_configuration_and_counts_the_fused_bn():
    # num_iters=5 is read from the op call, not assumed; the fused BN is
    # counted as mmengine counts aten::batch_norm (5 or 2 per element)
    ce = ChannelEquilibrium(32, group_size=16, num_iters=5)
    model = _BNCE(ce)
    x = torch.randn(2, 32, 8, 8)
    numel = x.numel()
    for training, bn_flops in ((True, 5 * numel), (False, 2 * numel)):
        model.train(training)
        analyzer = FlopAnalyzer(model, (x, )).set_op_handle(
            **ce_flop_handles())
        assert analyzer.total() == bn_flops + ce_flop_count(
            2, 32, 64, 16, 8, 5, training=training)
        # (training also traces the in-place running-buffer updates)
        assert not any('CEFunction' in op for op in analyzer.unsupported_ops())
    # unregistered, the op is unknown to mmengine (nothing is patched on
    # import)
    plain = FlopAnalyzer(model, (x, )).unsupported_ops_warnings(False)
    plain.total()
    assert 'prim::PythonOp._BNCEFunction' in plain.unsupported_ops()


def run_get_flops(config, tiny_coco, tmp_path):
    cfg = tmp_path / osp.basename(config)
    text = tiny_coco_config(osp.join(ROOT, config), tiny_coco)
    cfg.write_text(text)
    proc = subprocess.run([
        sys.executable, 'tools/analysis_tools/get_flops.py',
        str(cfg), '--num-images', '1'
    ], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    match = re.search(r'Flops: ([\d.]+)([GMK]?)', proc.stdout)
    assert match, proc.stdout
    scale = {'G': 1e9, 'M': 1e6, 'K': 1e3, '': 1}[match.group(2)]
    return float(match.group(1)) * scale, proc.stdout + proc.stderr


@pytest.mark.timeout(600)
def test_get_flops_counts_ce_layers(tiny_coco, tmp_path):
    ce, log = run_get_flops(
        'configs/ce_retinanet/retinanet_r50-ce_fpn_1x_coco.py', tiny_coco,
        tmp_path)
    assert 'CEFunction' not in log  # no "unsupported operator" warning
    bn, _ = run_get_flops('configs/ce_retinanet/retinanet_r50_fpn_1x_coco.py',
                          tiny_coco, tmp_path)
    # CE adds a few percent of a ResNet-50's operations
    assert bn < ce < 1.2 * bn


def test_tracing_uses_the_torch_implementation(monkeypatch):
    """torch.jit tracing (the FLOP analyser) records sizes as tensors, which
    Triton launches cannot take: a layer set to impl='triton' is traced
    through the torch implementation and counted the same."""
    from ce_mmdet.ops.impl import triton_importable
    if not triton_importable():
        pytest.skip('needs triton')
    monkeypatch.setenv('TRITON_INTERPRET', '1')
    x = torch.randn(2, 32, 8, 8)
    counts = []
    for impl in ('torch', 'triton'):
        model = _BNCE(ChannelEquilibrium(32, group_size=16, impl=impl))
        counts.append(FlopAnalyzer(model.eval(), (x, )).set_op_handle(
            **ce_flop_handles()).total())
    assert counts[0] == counts[1] > 0
