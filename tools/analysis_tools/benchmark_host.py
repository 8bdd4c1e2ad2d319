"""Host time of CE-ResNet's CE layers: what a launch-bound GPU step pays on
the CPU.

Usage:
    python tools/analysis_tools/benchmark_host.py [--depth 50]
        [--impls torch triton] [--repeats 200] [--device cpu|cuda]
        [--json OUT.json]

At 2 images per GPU (mmdet's default) a training step is bound by its host:
the GPU runs each kernel faster than Python, the dispatcher and the launcher
queue the next one. This measures that host side, on any machine, for every
CE layer of a CE-ResNet (the BN before it and CE as one op, as the blocks
call them) in three modes: a training step with batch statistics (forward and
backward), a training step with ``norm_eval`` (the BN and CE in eval
mode, as ``CEResNet(norm_eval=True)`` puts them: mmdet's detection
configs), and inference. The kernels are not run: the Triton
implementation's launches are recorded and skipped
(``triton_impl.LaunchStats.recorder``; on a CPU Triton's interpreter is
selected but never runs), and the tensors are tiny (2 x C x 2 x 2), so the
torch ops cost little more than their dispatch; the fused CPU kernels
(:mod:`ce_mmdet.ops.cpu_kernels`) are switched off, since a GPU host never
calls them and dispatches the PyTorch ops. Not included: Triton's own
launcher and the driver's launch per kernel (``benchmark_backbone.py``'s op
counts give their number).

Each layer shape of the network is timed once (median of ``--repeats``
calls, CE and the BN alone alternating) and weighted by how often the
network has it; the last table is the network's sum per step, with the ratio
to the BN alone (what ResNet pays for the same norms).
"""
import argparse
import json
import os
import statistics
from collections import Counter

import torch

# the Triton implementation on a CPU needs the interpreter selected before
# triton is imported (its kernels are skipped here: it never runs)
if not torch.cuda.is_available():
    os.environ.setdefault('TRITON_INTERPRET', '1')

import ce_mmdet  # noqa: E402,F401  (registers the modules)
from ce_mmdet.analysis.benchmark import alternating_samples  # noqa: E402
from ce_mmdet.models import CEResNet, ChannelEquilibrium  # noqa: E402
from ce_mmdet.ops import cpu_kernels  # noqa: E402
from ce_mmdet.ops.impl import triton_importable  # noqa: E402

MODES = ('train', 'norm_eval', 'inference')


def layer_shapes(depth: int) -> Counter:
    """(C, d) -> number of CE layers of that shape in a CEResNet."""
    model = CEResNet(depth=depth)
    return Counter((m.in_channels, m.group_size) for m in model.modules()
                   if isinstance(m, ChannelEquilibrium))


def host_call(c: int, d: int, impl, mode: str, device):
    """A no-argument function making one call of the layer in ``mode``:
    ``impl`` None for the BN alone."""
    bn = torch.nn.BatchNorm2d(c).to(device).train(mode == 'train')
    ce = ChannelEquilibrium(c, group_size=d, impl=impl or 'torch').to(device)
    ce.train(mode == 'train')  # norm_eval: CE in eval too (CEResNet)
    z = torch.randn(2, c, 2, 2, device=device,
                    requires_grad=mode != 'inference')

    def call():
        if mode == 'inference':
            with torch.no_grad():
                return bn(z) if impl is None else ce(z, bn=bn, inplace=True)
        out = bn(z) if impl is None else ce(z, bn=bn)
        out.sum().backward()

    return call


def median_us(fns: dict, repeats: int) -> dict:
    """Median host microseconds per call of each function, alternating
    (no device synchronization: the host alone)."""
    samples = alternating_samples(fns, repeats, 10, torch.device('cpu'))
    return {k: statistics.median(v) * 1e6 for k, v in samples.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--depth', type=int, default=50)
    parser.add_argument('--impls', nargs='+', choices=('torch', 'triton'),
                        default=None, help='default: torch, and triton when '
                        'it imports')
    parser.add_argument('--repeats', type=int, default=200)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--json', help='write the results here')
    args = parser.parse_args(argv)
    impls = args.impls or (['torch', 'triton']
                           if triton_importable() else ['torch'])
    device = torch.device(args.device)
    skipped = None
    if 'triton' in impls:
        from ce_mmdet.ops.triton_impl import LaunchStats
        skipped, LaunchStats.recorder = LaunchStats.recorder, (
            lambda *launch: True)  # record nothing, run nothing
    shapes = layer_shapes(args.depth)
    per_layer, totals = {}, {}
    try:
        with cpu_kernels.switched_off():  # a GPU host's dispatch
            for mode in MODES:
                totals[mode] = Counter()
                for (c, d), count in sorted(shapes.items()):
                    fns = {k: host_call(c, d, None if k == 'bn' else k, mode,
                                        device)
                           for k in ['bn'] + list(impls)}
                    us = median_us(fns, args.repeats)
                    per_layer[f'{mode} C={c} d={d}'] = us
                    for k, v in us.items():
                        totals[mode][k] += count * v
    finally:
        if 'triton' in impls:
            LaunchStats.recorder = skipped
    names = ['bn'] + list(impls)
    print(f'Host time of CE-ResNet-{args.depth}\'s CE layers, us per call '
          f'(kernels not run), device={device}, torch {torch.__version__}; '
          f'layers {dict(shapes)}')
    head = f'{"layer":<26}' + ''.join(f'{k:>10}' for k in names)
    print(head + ''.join(f'{k + "/bn":>12}' for k in impls))
    for key, us in per_layer.items():
        print(f'{key:<26}' + ''.join(f'{us[k]:>10.1f}' for k in names) +
              ''.join(f'{us[k] / us["bn"]:>12.2f}' for k in impls))
    print(f'{"network, per step":<26}' + ''.join(f'{k:>10}' for k in names))
    ratios = {}
    for mode, total in totals.items():
        ratios[mode] = {k: total[k] / total['bn'] for k in impls}
        print(f'{mode:<26}' + ''.join(f'{total[k]:>10.0f}' for k in names) +
              ''.join(f'{ratios[mode][k]:>12.2f}' for k in impls))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(args=vars(args), layers=per_layer,
                           totals={m: dict(t) for m, t in totals.items()},
                           ratios=ratios), f, indent=2)
    return totals, ratios


if __name__ == '__main__':
    main()
