"""The benchmark scripts run and report what they promise (no timing
assertions: speed is read from their output, not tested)."""
import json
import os.path as osp
import sys

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
        '--depth', '18', '--shape', '64', '64', '--repeats', '1', '--warmup',
        '0', '--json',
        str(out)
    ])
    printed = capsys.readouterr().out
    assert 'CE/BN' in printed
    for metric in ('train step (s)', 'inference (s)',
                   'saved for backward (MiB)', 'peak RSS, train step (MiB)',
                   'params (M)', 'FLOPs, 1 image (G)'):
        assert ratios[metric] > 0
    # measured in fresh processes: a training step needs memory
    assert results['bn']['peak RSS, train step (MiB)'] > 0
    # CE adds parameters and operations to the same ResNet
    assert ratios['params (M)'] > 1 and ratios['FLOPs, 1 image (G)'] > 1
    # and, following each BN, almost no activation memory
    assert ratios['saved for backward (MiB)'] < 1.1
    assert json.loads(out.read_text())['ratios'] == ratios
    # the detection setting (frozen statistics), without the RSS processes
    results, ratios = load('benchmark_backbone').main([
        '--depth', '18', '--shape', '64', '64', '--repeats', '1', '--warmup',
        '0', '--norm-eval', '--no-rss', '--profile', '5'
    ])
    printed = capsys.readouterr().out
    assert 'norm_eval=True' in printed
    # the profiler tables, one per model and phase
    assert printed.count('torch.profiler, 2 calls') == 4
    assert 'Self CPU' in printed
    assert 'peak RSS, train step (MiB)' not in ratios
    assert ratios['saved for backward (MiB)'] < 1.1


def test_benchmark_ce_layer_prints_ratios(capsys):
    load('benchmark_ce_layer').main([
        '--repeats', '1', '--warmup', '0', '--image', '64', '96',
        '--stages', '1'
    ])
    printed = capsys.readouterr().out
    assert 'ref/ce' in printed and 'ce/bn' in printed
    assert 'train fwd+bwd' in printed and 'eval fwd' in printed
