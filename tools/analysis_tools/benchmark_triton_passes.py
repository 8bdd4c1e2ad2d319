"""Time CE's Triton passes over the feature map against the memory floor, and
try the neighbours of their launch configurations.

Usage:
    python tools/analysis_tools/benchmark_triton_passes.py [--device cuda]
        [--batch-size 2] [--shape 800 1216] [--depth 50]
        [--dtype float32|float16|bfloat16] [--repeats 20] [--sweep]
        [--budget 60] [--max-candidates K] [--json OUT.json]

For every distinct CE layer shape of a CE-ResNet at the given input (the
stem's CE at stride 2, stage ``i``'s at stride ``2**(i+1)``), the passes a
CE layer makes over its feature map (``ce_mmdet/ops/triton_impl.py``):

* ``stats``: training statistics (per-sample group Gram matrices and
  channel sums), reads X;
* ``stats-eval``: eval statistics (sums and sums of squares), reads X;
* ``apply``: ``A X + b`` per sample and group, reads X, writes the output;
* ``tail``: the same with a residual block's tail, ``relu(A X + b + R)``
  (what CE-ResNet's blocks run), reads X and R, writes the output; a
  diagnostic row, not in the sums below (the floor is a BN's passes);
* ``cross``: the backward reductions ``dout Z^T`` and ``dout 1``, reads
  dout and Z;
* ``grad``: the input gradient ``M1 dout + M2 Z + c``, reads both, writes
  dZ.

A fused BN + CE makes these passes and no others, so they are CE's floor
(the issue's "the passes BN alone makes"). Each is timed with the
implementation's own launch configuration (``stats_launch`` /
``map_launch``), and the bytes it moves are compared with a copy of the same
bytes (``Tensor.copy_``, what a memory-bound pass can reach on that device):
``%copy`` is the share of that speed the pass reaches. On CUDA the device
time is measured with the launches queued behind a GPU spin, so host time
does not count.

``--sweep`` also tries the neighbouring configurations (positions per
block halved, doubled and quadrupled; other warp counts; for the statistics
other program counts), nearest first, until ``--budget`` seconds are spent
(each new block size and warp count compiles once), and checks each one's
result against the default's; the ``best`` columns then say what to change
in ``stats_launch`` / ``map_launch`` where a neighbour is clearly faster.

The last lines sum the passes per network call, weighted by the number of
layers of each shape: a training step's four (stats, apply, cross, grad)
and an inference call's two (stats-eval, apply), by the default and the
best configurations, beside the copy floor.

Without a GPU the kernels run in Triton's interpreter (selected here): the
times mean nothing there, but every configuration tried is still checked
against the default's results (a test runs the script so).
"""
import argparse
import itertools
import json
import os
import time
from collections import Counter

import torch

# the interpreter must be selected before triton is imported
if not torch.cuda.is_available():
    os.environ.setdefault('TRITON_INTERPRET', '1')

import ce_mmdet  # noqa: E402,F401  (registers the modules)
from ce_mmdet.models import CEResNet, ChannelEquilibrium  # noqa: E402

#: tensors of the feature map's size each pass reads or writes
TRAFFIC = {'stats': 1, 'stats-eval': 1, 'apply': 2, 'tail': 3, 'cross': 2,
           'grad': 3}
#: the passes by the statistics kernel (the rest by the map kernel)
STATS_PASSES = ('stats', 'stats-eval', 'cross')
#: the passes of one CE layer in a training step and in an inference call
TRAIN = ('stats', 'apply', 'cross', 'grad')
INFER = ('stats-eval', 'apply')
DTYPES = {
    'float32': torch.float32,
    'float16': torch.float16,
    'bfloat16': torch.bfloat16
}


def layer_shapes(depth: int, height: int, width: int) -> Counter:
    """(C, d, h, w) -> number of CE layers of a ``CEResNet(depth)`` with that
    feature map at an input of ``height x width`` (the stem's CE ``ce1`` at
    stride 2, ``layer{i}``'s at stride ``2**(i+1)``; every stride-2 layer of
    ResNet maps a size ``s`` to ``(s - 1) // 2 + 1``)."""
    shapes = Counter()
    for name, m in CEResNet(depth=depth).named_modules():
        if not isinstance(m, ChannelEquilibrium):
            continue
        top = name.split('.')[0]
        halvings = 1 if top == 'ce1' else int(top[len('layer'):]) + 1
        h, w = height, width
        for _ in range(halvings):
            h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
        shapes[(m.in_channels, m.group_size, h, w)] += 1
    return shapes


def make_case(c: int, d: int, h: int, w: int, n: int, dtype, device):
    """Random activations and maps of one layer shape (maps in float32, as
    the small graph makes them)."""
    gen = torch.Generator().manual_seed(0)
    g = c // d

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen)).to(device)

    eye = torch.eye(d).expand(n, g, d, d).to(device)
    x = randn(n, c, h, w).to(dtype)
    return dict(
        d=d, x=x, dout=randn(n, c, h, w).to(dtype), out=torch.empty_like(x),
        a=(eye + randn(n, g, d, d, scale=0.1)).contiguous(),
        m2=randn(n, g, d, d, scale=0.1), b=randn(n, g, d, 1))


def default_launch(name: str, d: int):
    """The implementation's own configuration of pass ``name`` for groups of
    ``d``."""
    from ce_mmdet.ops.triton_impl import map_launch, stats_launch
    if name in STATS_PASSES:
        return stats_launch(d, name != 'stats-eval')
    return map_launch(d)


def run_pass(ti, name: str, case: dict, launch):
    """One launch of pass ``name`` (what a layer runs); returns its raw
    outputs."""
    d, x = case['d'], case['x']
    if name in ('stats', 'stats-eval'):
        return ti._partials(x, None, d, name == 'stats', launch)
    if name == 'cross':
        return ti._partials(case['dout'], x, d, True, launch)
    if name in ('apply', 'tail'):  # (the tail's residual: dout)
        return ti._map(case['a'], x, None, None, case['b'], d, case['out'],
                       launch, case['dout'] if name == 'tail' else None,
                       name == 'tail')
    return ti._map(case['a'], case['dout'], case['m2'], x, case['b'], d,
                   case['out'], launch)


def result_of(name: str, raw) -> list:
    """Outputs comparable across configurations (partial sums summed over
    their position slices, whose number follows the configuration)."""
    if name in STATS_PASSES:
        return [t.float().sum(1) for t in raw[:3] if t is not None]
    return [raw.float().clone()]


def mismatch(got: list, want: list) -> float:
    """Largest difference relative to the largest magnitude, over outputs."""
    worst = 0.0
    for a, b in zip(got, want):
        scale = max(float(b.abs().max()), 1e-30)
        worst = max(worst, float((a - b).abs().max()) / scale)
    return worst


def device_us(fn, device: torch.device, repeats: int) -> float:
    """Microseconds per call of ``fn``. On CUDA the device's time: the calls
    are queued behind a GPU spin long enough for the host to enqueue them
    all, between two events."""
    fn()  # compiles a new configuration
    if device.type != 'cuda':
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - start) * 1e6 / repeats
    torch.cuda.synchronize(device)
    begin = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(int(2e7))  # ~10 ms: the host runs ahead meanwhile
    begin.record()
    for _ in range(repeats):
        fn()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) * 1e3 / repeats


def candidates(name: str, d: int, default) -> list:
    """The default configuration first, then its neighbours, those that
    change fewer of its values first (block sizes before warps before
    program counts)."""
    from ce_mmdet.ops.triton_impl import LaunchConfig
    blocks = [default.block_hw] + [
        b for b in (default.block_hw // 2, default.block_hw * 2,
                    default.block_hw * 4) if 16 <= b <= 1024
    ]
    warps = [default.warps] + [
        w for w in (default.warps // 2, default.warps * 2)
        if 2 <= w <= 16 and (w >= 4 or d <= 16)
    ]
    programs = [default.programs]
    if default.programs:
        programs += [p for p in (256, 1024, 2048) if p != default.programs]
    grid = [LaunchConfig(b, w, p)
            for p, w, b in itertools.product(programs, warps, blocks)]
    return sorted(grid, key=lambda c: sum(
        a != b for a, b in zip(c, default)))


def config_name(launch) -> str:
    text = f'{launch.block_hw}/{launch.warps}'
    return text + (f'/{launch.programs}' if launch.programs else '')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--device', default='cuda'
                        if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--batch-size', type=int, default=2)
    parser.add_argument('--shape', type=int, nargs=2, default=(800, 1216),
                        metavar=('HEIGHT', 'WIDTH'), help='network input')
    parser.add_argument('--depth', type=int, default=50)
    parser.add_argument('--dtype', choices=sorted(DTYPES), default='float32')
    parser.add_argument('--repeats', type=int, default=20)
    parser.add_argument('--sweep', action='store_true',
                        help='also try neighbouring launch configurations')
    parser.add_argument('--budget', type=float, default=60.0,
                        help='seconds for the sweep (default 60)')
    parser.add_argument('--max-candidates', type=int, default=0,
                        help='configurations tried per pass and shape, the '
                        'default included (0: all)')
    parser.add_argument('--json', help='write the results here')
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if args.batch_size < 1 or args.repeats < 1:
        parser.error('--batch-size and --repeats must be >= 1')
    from ce_mmdet.ops import triton_impl as ti

    shapes = layer_shapes(args.depth, *args.shape)
    name_of_device = (torch.cuda.get_device_name(device)
                      if device.type == 'cuda' else
                      'CPU, Triton interpreter: times mean nothing')
    print(f'Triton passes of CE-ResNet-{args.depth} at {args.batch_size}x3x'
          f'{args.shape[0]}x{args.shape[1]}, {args.dtype}, {name_of_device},'
          f' torch {torch.__version__}; us per call, device time')
    head = (f'{"layer (count)":<24}{"pass":<11}{"config":>12}{"us":>9}'
            f'{"GB/s":>8}{"%copy":>7}')
    if args.sweep:
        head += f'{"best":>14}{"us":>9}{"gain":>7}{"tried":>6}'
    print(head)
    deadline = time.perf_counter() + args.budget
    records, mismatches = [], []
    totals = {k: Counter() for k in ('train', 'inference')}
    for (c, d, h, w), count in sorted(shapes.items()):
        case = make_case(c, d, h, w, args.batch_size, dtype, device)
        nbytes = case['x'].numel() * case['x'].element_size()
        copy_us = device_us(lambda: case['out'].copy_(case['x']), device,
                            args.repeats)
        copy_bps = 2 * nbytes / (copy_us * 1e-6)
        layer = f'C={c} d={d} {h}x{w}'
        for name in TRAFFIC:
            default = default_launch(name, d)
            want = result_of(name, run_pass(ti, name, case, default))
            tried = []
            todo = candidates(name, d, default) if args.sweep else [default]
            if args.max_candidates:
                todo = todo[:args.max_candidates]
            for launch in todo:
                if tried and time.perf_counter() > deadline:
                    break
                us = device_us(lambda: run_pass(ti, name, case, launch),
                               device, args.repeats)
                err = mismatch(
                    result_of(name, run_pass(ti, name, case, launch)), want)
                if err > (1e-4 if dtype == torch.float32 else 1e-2):
                    mismatches.append((layer, name, config_name(launch), err))
                tried.append(dict(config=config_name(launch), us=us,
                                  mismatch=err))
            moved = TRAFFIC[name] * nbytes
            base, best = tried[0], min(tried, key=lambda t: t['us'])
            floor_us = moved / copy_bps * 1e6
            row = (f'{layer + f" ({count})":<24}{name:<11}'
                   f'{base["config"]:>12}{base["us"]:>9.1f}'
                   f'{moved / base["us"] / 1e3:>8.0f}'
                   f'{100 * floor_us / base["us"]:>6.0f}%')
            if args.sweep:
                row += (f'{best["config"]:>14}{best["us"]:>9.1f}'
                        f'{base["us"] / best["us"]:>7.2f}{len(tried):>6}')
            print(row)
            records.append(dict(layer=layer, count=count, c=c, d=d, h=h, w=w,
                                pass_=name, bytes=moved, floor_us=floor_us,
                                default=base, best=best, tried=tried))
            for mode, passes in (('train', TRAIN), ('inference', INFER)):
                if name in passes:
                    totals[mode]['default'] += count * base['us']
                    totals[mode]['best'] += count * best['us']
                    totals[mode]['floor'] += count * floor_us
    for mode, total in totals.items():
        print(f'network, {mode} passes: default {total["default"]:.0f} us, '
              f'best {total["best"]:.0f} us, copy floor '
              f'{total["floor"]:.0f} us (default at '
              f'{100 * total["floor"] / total["default"]:.0f}% of it)')
    for layer, name, config, err in mismatches:
        print(f'MISMATCH {layer} {name} {config}: {err:.2e} of the '
              f'default\'s result')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(args=vars(args), device=name_of_device,
                           records=records, mismatches=mismatches,
                           totals={k: dict(v) for k, v in totals.items()}),
                      f, indent=2)
    return records, totals, mismatches


if __name__ == '__main__':
    raise SystemExit(1 if main()[2] else 0)
