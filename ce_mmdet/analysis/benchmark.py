"""Measurement helpers shared by the benchmark scripts."""
import contextlib
import gc
import logging
import multiprocessing as mp
import os
import statistics
import time
import traceback
from typing import Callable, Dict, List, Optional

import torch


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (no-op on CPU)."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds ``fn()`` takes, device work included."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def alternating_samples(fns: Dict[str, Callable[[], object]], repeats: int,
                        warmup: int, device: torch.device,
                        reverse: bool = False) -> Dict[str, List[float]]:
    """Seconds per call (:func:`time_once`) of each of ``fns``, ``repeats``
    rounds after ``warmup`` unrecorded ones. Every round calls each function
    once, in turn, so a shared machine's slow drifts hit all candidates
    alike; ``reverse``: the order flips every round (none always runs
    first). A CPU ``device`` times the host alone (no synchronization)."""
    samples = {k: [] for k in fns}
    order = list(fns)
    for i in range(warmup + repeats):
        for k in order:
            t = time_once(fns[k], device)
            if i >= warmup:
                samples[k].append(t)
        if reverse:
            order.reverse()
    return samples


def ratio(b, a) -> float:
    """``b / a``; 1 for two zero counts (host syncs), inf for ``b / 0``."""
    if a:
        return b / a
    return 1.0 if b == 0 else float('inf')


def spread_summary(values) -> str:
    """``min, quartiles q1-q3, max`` of the paired ratios (the noise of a
    shared machine: how far one repeat's ratio moves)."""
    lo, hi = min(values), max(values)
    if len(values) < 2:
        return f'{lo:.3f}'
    q1, _, q3 = statistics.quantiles(values, n=4, method='inclusive')
    return f'min {lo:.3f}, quartiles {q1:.3f}-{q3:.3f}, max {hi:.3f}'


def record_samples(results: Dict[str, dict], per_repeat: dict, metric: str,
                   samples: Dict[str, List[float]], baseline: str) -> None:
    """Each model's median and fastest call of ``metric`` (seconds; the
    fastest under ``metric`` with ``, best``) into ``results[k]``, and
    every other model's ratio to ``baseline`` within each repeat into
    ``per_repeat[k, metric]`` (``samples``: :func:`alternating_samples`)."""
    for k, values in samples.items():
        if k != baseline:
            per_repeat[k, metric] = [
                c / b for b, c in zip(samples[baseline], values)
            ]
        results[k][metric] = statistics.median(values)
        # the least disturbed call of each (its ratio: of the minima)
        results[k][metric.replace(' (s)', ', best (s)')] = min(values)


def paired_ratio(results: Dict[str, dict], per_repeat: dict, k: str,
                 metric: str, baseline: str) -> float:
    """Model ``k``'s ``metric`` over ``baseline``'s: for times
    (:func:`record_samples`) the median of the per-repeat ratios, which a
    shared machine's slow drifts do not bias; else :func:`ratio` of the
    values (nan where ``k`` lacks the metric)."""
    if (k, metric) in per_repeat:
        return statistics.median(per_repeat[k, metric])
    return ratio(results[k].get(metric, float('nan')),
                 results[baseline][metric])


def cuda_peak_bytes(fn: Callable[[], object],
                    device: torch.device) -> Optional[int]:
    """Peak CUDA memory ``fn()`` allocates on top of what was allocated
    before it (``torch.cuda.max_memory_allocated``); None on other
    devices."""
    if device.type != 'cuda':
        return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def saved_for_backward_bytes(fn: Callable[[], object]) -> int:
    """Bytes of the distinct storages autograd saves while ``fn()`` runs
    (the activation memory a backward pass needs)."""
    storages = {}

    def pack(t):
        try:
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        except RuntimeError:  # tensors without storage (e.g. sparse)
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(storages.values())


def _rss_kib() -> dict:
    """Current and peak resident set size of this process (KiB, Linux)."""
    fields = {}
    with open('/proc/self/status') as f:
        for line in f:
            key, _, value = line.partition(':')
            if key in ('VmRSS', 'VmHWM'):
                fields[key] = int(value.split()[0])
    return fields


def _peak_rss_child(conn, make_step, args) -> None:
    try:
        step = make_step(*args)
        gc.collect()
        # no warm-up: memory the allocator keeps from one step would hide
        # the next step's needs (one-time buffers count for both models)
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')  # reset the peak (VmHWM) to the current RSS
        base = _rss_kib()['VmRSS']
        step()
        conn.send((_rss_kib()['VmHWM'] - base) * 1024)
    except Exception:  # raised in the parent, with the child's traceback
        conn.send(RuntimeError('measuring peak RSS failed in the child '
                               'process:\n' + traceback.format_exc()))
    finally:
        conn.close()


def peak_rss_increase(make_step: Callable[..., Callable[[], object]],
                      *args) -> Optional[int]:
    """Peak resident memory a step adds, measured in a fresh process.

    ``make_step(*args)`` (an importable top-level function) builds a model
    and returns ``step``; the child process resets its peak RSS and runs
    ``step()`` once. The result is the peak RSS during the call minus the
    RSS before it: what the step needs on top of the model (activations,
    gradients, temporaries, allocator slack, one-time buffers).
    CPU peak memory, the counterpart of ``torch.cuda.max_memory_allocated``.

    Returns:
        int | None: bytes, or None where ``/proc`` cannot report it (not
        Linux).
    """
    if not os.path.exists('/proc/self/clear_refs'):
        return None
    ctx = mp.get_context('spawn')
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_peak_rss_child, args=(child, make_step, args))
    proc.start()
    child.close()
    try:
        result = parent.recv()
    except EOFError:  # the child died before sending anything
        result = None
    proc.join()
    if result is None:
        raise RuntimeError(
            f'the measuring process died (exit code {proc.exitcode})')
    if isinstance(result, Exception):
        raise result
    return result


@contextlib.contextmanager
def init_log_quiet():
    """mmengine's logger at WARNING while the block runs: ``init_weights``
    without its per-parameter table."""
    from mmengine.logging import MMLogger
    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def build_backbone_pair(depth: int, device='cpu', norm_eval: bool = False):
    """``(ResNet, CEResNet)`` of ``depth``, the CE one with the BN one's
    weights wherever they share a name; nothing frozen. ``norm_eval``: BN
    (and CE) keep running statistics in training mode, as in mmdet's
    detection configs; otherwise batch statistics."""
    from mmdet.models import ResNet

    from ce_mmdet.models import CEResNet
    torch.manual_seed(0)
    bn = ResNet(depth=depth, norm_eval=norm_eval, frozen_stages=-1)
    with init_log_quiet():
        bn.init_weights()
    ce = CEResNet(depth=depth, norm_eval=norm_eval, frozen_stages=-1)
    ce.load_state_dict(bn.state_dict(), strict=False)
    return bn.to(device), ce.to(device)


def backbone_train_step(model: torch.nn.Module, x: torch.Tensor) -> None:
    """Forward, a scalar loss over all outputs, backward."""
    outs = model(x)
    loss = sum(o.float().mean() for o in outs)
    loss.backward()
    model.zero_grad(set_to_none=True)


def make_backbone_train_step(kind: str, depth: int, shape: tuple,
                             threads: int,
                             norm_eval: bool = False) -> Callable[[], None]:
    """A training step of the ``kind`` ('bn' or 'ce') backbone of
    :func:`build_backbone_pair` on a random CPU batch of ``shape`` (for
    :func:`peak_rss_increase`)."""
    torch.set_num_threads(threads)
    bn, ce = build_backbone_pair(depth, norm_eval=norm_eval)
    model = {'bn': bn, 'ce': ce}[kind]
    model.train()  # (mmdet's ResNet.train returns None)
    torch.manual_seed(1)
    x = torch.randn(*shape)
    return lambda: backbone_train_step(model, x)
