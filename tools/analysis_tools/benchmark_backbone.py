"""Compare CE-ResNet with the same ResNet without CE, side by side.

Usage:
    python tools/analysis_tools/benchmark_backbone.py [--device cpu|cuda]
        [--batch-size 2] [--shape 512 512] [--depth 50] [--repeats 5]
        [--warmup 2] [--norm-eval] [--json OUT.json] [--profile ROWS]
        [--no-rss]
        [--counts-only] [--impls torch triton] [--aten-ops]
        [--inference-first]

Both backbones are built with the same depth and the CE one gets the BN one's
weights (the shared tensors). They are timed alternately (A/B within every
repeat, in the order A B, B A, A B, ... so neither always runs second, after
a warm-up) and the medians are reported:

* train step: forward + backward in training mode (BN and CE use batch
  statistics, ``norm_eval=False``; ``--norm-eval`` for the detection
  setting, running statistics and trainable affine parameters);
* inference: forward in eval mode under ``torch.no_grad``, timed after the
  training phase (as a validation pass during training runs), or first with
  ``--inference-first`` (a fresh process, as ``tools/test.py`` runs it; on
  CPU the two differ: after training steps the allocator reuses its pages
  and the BN model gains more than the CE model);
* saved for backward: bytes of the distinct storages autograd keeps for one
  training forward (the activation memory of a training step);
* peak memory of a training step on top of the model: on CUDA
  ``torch.cuda.max_memory_allocated``, on CPU the peak resident set size
  (Linux ``/proc``; measured in a fresh process per model after a warm-up
  step, skip with ``--no-rss``);
* parameters, and FLOPs of one image by mmengine's analyser (CE counted by
  the rule in ``ce_mmdet/analysis/flops.py``);
* ops per train step / per inference call: the aten ops that do work
  (views and metadata ops not counted) plus Triton launches
  (:class:`ce_mmdet.analysis.launches.LaunchCounter`): on a GPU, the kernel
  launches that bound a small-batch step. ``--counts-only`` measures only
  these (and parameters), e.g. on CPU under Triton's interpreter:
  ``CE_MMDET_IMPL=triton TRITON_INTERPRET=1 python
  tools/analysis_tools/benchmark_backbone.py --counts-only --batch-size 1
  --shape 64 64``;
* host syncs per train step / per inference call: the ops that make a GPU's
  host wait for the device (a value read into Python, a tensor made from
  Python data; ``LaunchCounter.host_syncs``); 0 for both backbones.

``--impls torch triton`` adds one CE model per named implementation (same
weights, ``impl`` set on every CE layer) to the same alternating run, so the
implementations are compared side by side with the paired ratios
``CE-<impl>/BN``; the plain ``CE`` column is ``impl='auto'`` (or
``CE_MMDET_IMPL``). ``--aten-ops`` adds a ``CE-ATEN`` model run with the
fused CPU kernels off (``CE_MMDET_CPU_KERNELS=0`` around its calls): the
PyTorch ops they replace, side by side with them.

The last column is CE / BN; for times it is the median over repeats of the
ratio within each repeat (both measured within a second of each other), which
a shared machine's slow drifts do not bias; below the table, the spread of
those per-repeat ratios (min, quartiles, max: how much one repeat moves),
and the ``best (s)`` rows give each model's fastest call and their ratio,
the ratio of the least disturbed calls (a short burst from another
process on a shared host slows one call of a pair, and moves the paired
ratio, not the minima). ``--profile ROWS`` also prints
``torch.profiler``'s key_averages table (top ROWS ops by self time) of two
training steps and two inference passes of each model: where the time goes.
"""
import argparse
import contextlib
import copy
import json

import torch
from mmengine.analysis import FlopAnalyzer

import ce_mmdet  # noqa: F401  (registers the modules)
from ce_mmdet.analysis import ce_flop_handles
from ce_mmdet.analysis.launches import LaunchCounter
from ce_mmdet.ops import cpu_kernels
from ce_mmdet.analysis.benchmark import (alternating_samples,
                                         backbone_train_step,
                                         build_backbone_pair, cuda_peak_bytes,
                                         make_backbone_train_step,
                                         paired_ratio, peak_rss_increase,
                                         record_samples,
                                         saved_for_backward_bytes,
                                         spread_summary)


#: models run with the fused CPU kernels off (``--aten-ops``)
ATEN_MODEL = 'ce-aten'


def kernels_for(name):
    """The context a model's calls run in: kernels off for
    :data:`ATEN_MODEL`."""
    return cpu_kernels.switched_off() if name == ATEN_MODEL else \
        contextlib.nullcontext()


def run_phase(model, x, phase):
    if phase == 'train':
        backbone_train_step(model, x)
    else:
        with torch.no_grad():
            model(x)


def profile_table(fn, rows, device):
    """torch.profiler key_averages of two calls of ``fn``, by self time (on
    the device for CUDA)."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU]
    if device.type == 'cuda':
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        fn()
        fn()
    key = 'self_device_time_total' if len(activities) > 1 else \
        'self_cpu_time_total'
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def with_impl(model, impl):
    """A copy of ``model`` whose CE layers all use ``impl``."""
    from ce_mmdet.models import ChannelEquilibrium
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, ChannelEquilibrium):
            m.impl = impl
    return model


def run_phase_in(name, model, x, phase):
    """:func:`run_phase` in the model's context (:func:`kernels_for`)."""
    with kernels_for(name):
        run_phase(model, x, phase)


def count_ops(name, model, x, phase):
    """Working ops (and Triton launches, fused CPU kernel calls) and host
    syncs of one call after a warm-up."""
    model.train(phase == 'train')
    run_phase_in(name, model, x, phase)
    with LaunchCounter() as counter:
        run_phase_in(name, model, x, phase)
    return counter.total, counter.host_syncs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--batch-size', type=int, default=2)
    parser.add_argument('--shape', type=int, nargs=2, default=(512, 512),
                        help='input height width (800 1216 for COCO size)')
    parser.add_argument('--depth', type=int, default=50)
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--json', help='write the results here')
    parser.add_argument('--profile', type=int, default=0, metavar='ROWS',
                        help='also print the top ROWS ops of a profile')
    parser.add_argument('--norm-eval', action='store_true',
                        help='train with frozen BN/CE statistics (mmdet '
                        'detection configs) instead of batch statistics')
    parser.add_argument('--no-rss', action='store_true',
                        help='skip the CPU peak RSS (two extra processes)')
    parser.add_argument('--counts-only', action='store_true',
                        help='only count ops per step (no timing, memory '
                        'or FLOPs)')
    parser.add_argument('--impls', nargs='+', default=(),
                        choices=('torch', 'triton'),
                        help='also time CE with these implementations')
    parser.add_argument('--aten-ops', action='store_true',
                        help='also time CE with the fused CPU kernels off '
                        '(the PyTorch ops they replace)')
    parser.add_argument('--inference-first', action='store_true',
                        help='time inference before the training steps (a '
                        'fresh process, as tools/test.py runs it)')
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    h, w = args.shape
    bn, ce = build_backbone_pair(args.depth, device, args.norm_eval)
    models = {'bn': bn, 'ce': ce}
    for impl in args.impls:
        models[f'ce-{impl}'] = with_impl(ce, impl)
    if args.aten_ops:
        models[ATEN_MODEL] = copy.deepcopy(ce)
    torch.manual_seed(1)
    x = torch.randn(args.batch_size, 3, h, w, device=device)

    results = {k: {} for k in models}
    per_repeat = {}  # (CE model, metric): its CE/BN ratio in each repeat
    timed = () if args.counts_only else (
        ('train step (s)', 'train'), ('inference (s)', 'eval'))
    if args.inference_first:
        timed = timed[::-1]
    for name, phase in timed:
        for m in models.values():
            m.train(phase == 'train')
        fns = {k: (lambda k=k, m=m: run_phase_in(k, m, x, phase))
               for k, m in models.items()}
        samples = alternating_samples(fns, args.repeats, args.warmup, device,
                                      reverse=True)
        record_samples(results, per_repeat, name, samples, 'bn')
        if args.profile:
            for k, m in models.items():
                print(f'--- {k}, {phase}: torch.profiler, 2 calls')
                print(profile_table(fns[k], args.profile, device))
    for k, m in models.items():
        for phase, call in (('train', 'train step'), ('eval', 'inference')):
            ops, syncs = count_ops(k, m, x, phase)
            results[k][f'ops per {call}'] = ops
            results[k][f'host syncs per {call}'] = syncs
        results[k]['params (M)'] = sum(p.numel()
                                       for p in m.parameters()) / 1e6
        if args.counts_only:
            continue
        m.train()
        results[k]['saved for backward (MiB)'] = saved_for_backward_bytes(
            lambda m=m: m(x)) / 2**20
        peak = cuda_peak_bytes(
            lambda m=m: backbone_train_step(m, x), device)
        if peak is not None:
            results[k]['CUDA peak, train step (MiB)'] = peak / 2**20
        elif not args.no_rss and k in ('bn', 'ce'):
            peak = peak_rss_increase(make_backbone_train_step, k, args.depth,
                                     tuple(x.shape), torch.get_num_threads(),
                                     args.norm_eval)
            if peak is not None:
                results[k]['peak RSS, train step (MiB)'] = peak / 2**20
        m.eval()
        flops = FlopAnalyzer(m, (x[:1], )).set_op_handle(**ce_flop_handles())
        results[k]['FLOPs, 1 image (G)'] = flops.unsupported_ops_warnings(
            False).uncalled_modules_warnings(False).total() / 1e9

    print(f'ResNet-{args.depth} vs CE-ResNet-{args.depth}: device={device}, '
          f'batch={args.batch_size}, input={h}x{w}, repeats={args.repeats} '
          f'(median), norm_eval={args.norm_eval}, torch {torch.__version__}, '
          f'{torch.get_num_threads()} threads')
    ces = [k for k in models if k != 'bn']
    print(f'{"metric":<30}' + ''.join(f'{k.upper():>12}' for k in models) +
          ''.join(f'{k.upper() + "/BN":>15}' for k in ces))
    by_model = {k: {} for k in ces}
    for metric in results['bn']:
        row = f'{metric:<30}' + ''.join(
            f'{results[k].get(metric, float("nan")):>12.4g}' for k in models)
        for k in ces:
            by_model[k][metric] = paired_ratio(results, per_repeat, k, metric,
                                               'bn')
            row += f'{by_model[k][metric]:>15.3f}'
        print(row)
    for (k, metric), values in per_repeat.items():
        print(f'{k.upper()}/BN per repeat, {metric.replace(" (s)", "")}: '
              f'{spread_summary(values)}')
    ratios = by_model['ce']
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(args=vars(args), results=results, ratios=ratios,
                           ratios_by_model=by_model,
                           paired_per_repeat={
                               f'{k}/bn {metric}': values
                               for (k, metric), values in per_repeat.items()
                           }), f, indent=2)
    return results, ratios


if __name__ == '__main__':
    main()
