"""The benchmark scripts run and report what they promise (no timing
assertions: speed is read from their output, not tested)."""
import json
import os
import os.path as osp
import sys

import pytest
import torch

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))


def load(name):
    sys.path.insert(0, osp.join(ROOT, 'tools', 'analysis_tools'))
    try:
        return __import__(name)
    finally:
        sys.path.pop(0)


def test_benchmark_backbone_reports_ratios(tmp_path, capsys):
    out = tmp_path / 'bench.json'
    results, ratios = load('benchmark_backbone').main([
        '--depth', '18', '--shape', '64', '64', '--repeats', '2', '--warmup',
        '0', '--json',
        str(out)
    ])
    printed = capsys.readouterr().out
    assert 'CE/BN' in printed
    # the spread of the paired ratios, and each model's fastest call
    assert 'CE/BN per repeat, inference: min ' in printed
    per_repeat = json.loads(out.read_text())['paired_per_repeat']
    assert len(per_repeat['ce/bn train step (s)']) == 2
    for k in ('bn', 'ce'):
        for phase in ('train step', 'inference'):
            assert 0 < results[k][f'{phase}, best (s)'] <= results[k][
                f'{phase} (s)']
    for metric in ('train step (s)', 'inference (s)', 'inference, best (s)',
                   'saved for backward (MiB)', 'peak RSS, train step (MiB)',
                   'params (M)', 'FLOPs, 1 image (G)', 'ops per train step',
                   'ops per inference'):
        assert ratios[metric] > 0
    # CE adds work: more ops per step than the same ResNet
    assert ratios['ops per train step'] > 1
    # measured in fresh processes: a training step needs memory
    assert results['bn']['peak RSS, train step (MiB)'] > 0
    # CE adds parameters and operations to the same ResNet
    assert ratios['params (M)'] > 1 and ratios['FLOPs, 1 image (G)'] > 1
    # and, following each BN, almost no activation memory
    assert ratios['saved for backward (MiB)'] < 1.1
    assert json.loads(out.read_text())['ratios'] == ratios
    # no host sync in either backbone: the same (zero) count
    for key in ('host syncs per train step', 'host syncs per inference'):
        assert results['bn'][key] == results['ce'][key] == 0
        assert ratios[key] == 1.0
    # the detection setting (frozen statistics), without the RSS processes,
    # inference timed first (a fresh process, as tools/test.py)
    results, ratios = load('benchmark_backbone').main([
        '--depth', '18', '--shape', '64', '64', '--repeats', '1', '--warmup',
        '0', '--norm-eval', '--no-rss', '--profile', '5', '--inference-first'
    ])
    printed = capsys.readouterr().out
    assert 'norm_eval=True' in printed
    # the profiler tables, one per model and phase, inference's first
    assert printed.count('torch.profiler, 2 calls') == 4
    assert printed.index('--- bn, eval') < printed.index('--- bn, train')
    assert 'Self CPU' in printed
    assert 'peak RSS, train step (MiB)' not in ratios
    assert ratios['saved for backward (MiB)'] < 1.1


def test_benchmark_backbone_times_the_aten_ops_beside(capsys, monkeypatch):
    """--aten-ops: a CE model with the fused CPU kernels off, in the same
    alternating run; the switch is set around its calls only."""
    from ce_mmdet.ops import cpu_kernels
    monkeypatch.delenv(cpu_kernels.ENV_VAR, raising=False)
    results, _ = load('benchmark_backbone').main([
        '--depth', '18', '--shape', '64', '64', '--repeats', '1', '--warmup',
        '0', '--no-rss', '--aten-ops'
    ])
    assert 'CE-ATEN/BN' in capsys.readouterr().out
    assert results['ce-aten']['inference (s)'] > 0
    assert cpu_kernels.ENV_VAR not in os.environ
    ops = 'ops per inference'
    if cpu_kernels.library() is None:  # both run the PyTorch ops
        assert results['ce-aten'][ops] == results['ce'][ops]
    else:  # a fused call stands for several ATen ops
        assert results['ce-aten'][ops] > results['ce'][ops]


def test_benchmark_ce_layer_prints_ratios(capsys):
    load('benchmark_ce_layer').main([
        '--repeats', '1', '--warmup', '0', '--image', '64', '96',
        '--stages', '1'
    ])
    printed = capsys.readouterr().out
    assert 'ref/ce' in printed and 'ce/bn' in printed
    assert 'train fwd+bwd' in printed and 'eval fwd' in printed


def test_benchmark_backbone_counts_triton_launches(tmp_path):
    """--counts-only under Triton's interpreter: the Triton launches count,
    the interpreter's own torch ops inside a launch do not."""
    from ce_mmdet.ops.impl import triton_importable, triton_interpreting
    if not (triton_importable() and triton_interpreting()):
        pytest.skip('needs triton in interpreter mode')
    from ce_mmdet.analysis.launches import LaunchCounter
    from ce_mmdet.models import ChannelEquilibrium
    ce = ChannelEquilibrium(16, group_size=16, impl='triton').eval()
    x = torch.randn(1, 16, 4, 4)
    with LaunchCounter() as counter:
        ce(x)
    # statistics, small graph (per group, per sample), apply: four launches
    assert counter.triton_launches == 4
    assert counter.total < 10
    results, ratios = load('benchmark_backbone').main([
        '--depth', '18', '--shape', '64', '64', '--batch-size', '1',
        '--counts-only', '--impls', 'torch', 'triton', '--json',
        str(tmp_path / 'counts.json')
    ])
    assert 'train step (s)' not in ratios
    by_model = json.loads((tmp_path / 'counts.json').read_text())[
        'ratios_by_model']
    # CE adds ops; the Triton kernels far fewer than the torch small graph
    ops = 'ops per train step'
    assert results['bn'][ops] < results['ce-triton'][ops] < results[
        'ce-torch'][ops]
    assert by_model['ce-triton'][ops] < by_model['ce-torch'][ops]
    assert results['ce'][ops] == results['ce-torch'][ops]  # auto on CPU
    assert results['ce-triton']['host syncs per train step'] == 0
    assert results['ce-triton']['host syncs per inference'] == 0


def test_benchmark_host_reports_every_mode(tmp_path):
    """The host-time benchmark: every mode of every CE-ResNet-18 layer
    shape, the network's sums and their ratios to the BN alone (the Triton
    implementation too where triton imports: its kernels are skipped)."""
    from ce_mmdet.ops import cpu_kernels
    from ce_mmdet.ops.impl import triton_importable
    out = tmp_path / 'host.json'
    calls = cpu_kernels.KernelStats.calls
    totals, ratios = load('benchmark_host').main(
        ['--depth', '18', '--repeats', '2', '--json', str(out)])
    # a GPU host's dispatch: the fused CPU kernels never ran
    assert cpu_kernels.KernelStats.calls == calls
    impls = ['torch'] + (['triton'] if triton_importable() else [])
    assert set(totals) == {'train', 'norm_eval', 'inference'}
    for mode, total in totals.items():
        assert set(total) == {'bn', *impls}
        assert all(v > 0 for v in total.values())
        assert ratios[mode] == {k: total[k] / total['bn'] for k in impls}
    saved = json.loads(out.read_text())
    # CE-ResNet-18: the stem (64, one group) and three stages
    assert len(saved['layers']) == 3 * 4
    assert any(key.startswith('train C=64 d=64') for key in saved['layers'])


def test_benchmark_triton_passes_sweeps_and_checks(tmp_path, capsys):
    """Every pass of every CE-ResNet-18 layer shape at 16x16 (down to a 1x1
    map), in half precision, with its default launch configuration and the
    neighbouring block sizes: the same results as the default's, which is
    the implementation's own configuration."""
    from ce_mmdet.ops.impl import triton_importable, triton_interpreting
    if not (triton_importable() and triton_interpreting()):
        pytest.skip('needs triton in interpreter mode')
    from ce_mmdet.ops.triton_impl import map_launch, stats_launch
    bench = load('benchmark_triton_passes')
    # the implementation's own configurations
    assert bench.default_launch('stats', 16) == stats_launch(16, True)
    assert bench.default_launch('cross', 64) == stats_launch(64, True)
    assert bench.default_launch('stats-eval', 16) == stats_launch(16, False)
    assert bench.default_launch('grad', 16) == map_launch(16)
    assert bench.layer_shapes(18, 16, 16) == {
        (64, 64, 8, 8): 1, (64, 16, 4, 4): 2, (128, 16, 2, 2): 2,
        (256, 16, 1, 1): 2}
    assert bench.layer_shapes(50, 800, 1216)[(256, 16, 200, 304)] == 3
    out = tmp_path / 'passes.json'
    records, totals, mismatches = bench.main([
        '--depth', '18', '--shape', '16', '16', '--repeats', '1', '--sweep',
        '--max-candidates', '4', '--dtype', 'float16', '--json', str(out)])
    assert mismatches == []
    assert {(r['c'], r['d'], r['h'], r['pass_']) for r in records} == {
        (c, d, h, p) for c, d, h in ((64, 64, 8), (64, 16, 4), (128, 16, 2),
                                     (256, 16, 1))
        for p in bench.TRAFFIC}
    for r in records:
        default = bench.default_launch(r['pass_'], r['d'])
        configs = [t['config'] for t in r['tried']]
        assert configs[0] == bench.config_name(default)
        # the default's block size halved, doubled, quadrupled (>= 16)
        blocks = {int(cfg.split('/')[0]) for cfg in configs}
        assert blocks == {b for b in (default.block_hw // 2,
                                      default.block_hw, default.block_hw * 2,
                                      default.block_hw * 4) if b >= 16}
        assert r['bytes'] == bench.TRAFFIC[r['pass_']] * 2 * r['c'] * (
            r['h'] * r['w']) * 2  # batch 2, float16
    assert set(totals) == {'train', 'inference'}
    assert totals['train']['floor'] > totals['inference']['floor'] > 0
    assert json.loads(out.read_text())['mismatches'] == []
    assert 'network, train passes' in capsys.readouterr().out
    # a wrong result is reported
    want = [torch.ones(3)]
    assert bench.mismatch([torch.ones(3)], want) == 0
    assert bench.mismatch([torch.tensor([1., 1., 1.5])], want) == 0.5


MASK_RCNN = ('configs/ce_mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py',
             'configs/ce_mask_rcnn/mask-rcnn_r50-ce_fpn_1x_coco.py')


def test_benchmark_detector_pairs_ce_with_its_baseline(tmp_path, capsys):
    """CE Mask R-CNN beside mmdet's on one tiny-COCO batch: the paired
    ratios, detections, op counts; CE adds no host sync to the detector."""
    out = tmp_path / 'det.json'
    results, ratios = load('benchmark_detector').main([
        *(osp.join(ROOT, p) for p in MASK_RCNN), '--scale', '128', '96',
        '--repeats', '2', '--warmup', '0', '--data-root',
        str(tmp_path / 'tiny'), '--json', str(out)
    ])
    printed = capsys.readouterr().out
    assert '[0] mask-rcnn_r50_fpn_1x_coco (baseline)' in printed
    assert '[1]/[0] per repeat, train step: min ' in printed
    saved = json.loads(out.read_text())
    assert saved['ratios'] == ratios
    assert len(saved['paired_per_repeat']['[1]/[0] inference (s)']) == 2
    # the CE model took every tensor it shares with the BN one
    assert saved['tensors_from_baseline']['1'] > 300
    for k in ('0', '1'):
        for phase in ('train step', 'inference'):
            assert 0 < results[k][f'{phase}, best (s)'] <= results[k][
                f'{phase} (s)']
        # an untrained Mask R-CNN still detects (post-processing runs)
        assert results[k]['detections per image'] > 0
    ce = ratios['1']
    assert ce['params (M)'] > 1 and ce['ops per train step'] > 1
    # CE reads nothing back to the host: mmdet's own syncs only
    for key in ('host syncs per train step', 'host syncs per inference'):
        assert results['0'][key] > 0
        assert results['1'][key] == results['0'][key]


def test_benchmark_detector_helpers(tmp_path):
    """Weights shared by name and shape, the learning rate at 0 (every
    repeat times the same weights), a clear error for --amp on a CPU."""
    from mmdet.utils import register_all_modules
    from mmengine.optim import build_optim_wrapper

    from ce_mmdet.testing.tiny_coco import make_tiny_coco
    bench = load('benchmark_detector')
    register_all_modules()
    data = str(tmp_path / 'tiny')
    make_tiny_coco(data, num_train=2, num_val=2)
    cfgs = [
        bench.load_config(osp.join(ROOT, p), data, (128, 96), str(tmp_path))
        for p in MASK_RCNN
    ]
    assert all(cfg.optim_wrapper.optimizer.lr == 0 for cfg in cfgs)
    (bn, ce), shared = bench.build_models(cfgs, 'cpu')
    assert shared[0] == len(bn.state_dict())
    bn_state, ce_state = bn.state_dict(), ce.state_dict()
    for name in ('backbone.conv1.weight', 'neck.fpn_convs.0.conv.weight',
                 'roi_head.mask_head.conv_logits.weight'):
        assert torch.equal(bn_state[name], ce_state[name])
    assert any('.ce.' in k or k.startswith('backbone.ce')
               for k in set(ce_state) - set(bn_state))
    before = {k: v.clone() for k, v in ce.state_dict().items()
              if v.is_floating_point()}
    wrapper = build_optim_wrapper(ce, cfgs[1].optim_wrapper)
    batch = bench.one_batch(cfgs[0], 'train', 2)
    outputs = bench.inference_call(ce, bench.one_batch(cfgs[0], 'test', 2))()
    assert len(outputs) == 2 and not ce.training
    # each call sets its own mode: a training step after a test step
    losses = bench.train_call(ce, wrapper, batch)()
    assert ce.training
    assert torch.isfinite(sum(v for k, v in losses.items()
                              if 'loss' in k)).all()
    assert all(torch.equal(v, ce.state_dict()[k]) for k, v in before.items()
               if 'running' not in k)
    with pytest.raises(ValueError, match='only 2 train images'):
        bench.one_batch(cfgs[0], 'train', 3)
    with pytest.raises(SystemExit):
        bench.main([*MASK_RCNN, '--amp'])
