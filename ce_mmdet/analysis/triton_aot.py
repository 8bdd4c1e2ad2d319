"""Compile CE's Triton kernels for an NVIDIA GPU on a machine without one.

Triton's interpreter (what the tests run on CPU) checks what the kernels
compute, not that they build for a GPU: whether Triton's compiler accepts
them, how much shared memory a program needs, how many registers a thread
uses and whether it spills are known only to Triton's compiler and NVIDIA's
``ptxas``, and both ship with the ``triton`` wheel and need no GPU. This
module runs them, in two steps (two processes: Triton decides when a kernel
is defined whether it is interpreted):

1. :func:`record_launches` (``TRITON_INTERPRET=1``): runs CE steps
   (:class:`Scenario`) on CPU tensors with ``impl='triton'`` and records
   every launch as a :class:`LaunchRecord`: the kernel, its constexprs and
   launch options, and the type of each argument as Triton specialises a
   compilation on it (pointer dtype and 16-byte alignment, integers equal
   to 1 or divisible by 16). Launches that would compile to the same
   binary are recorded once. None of that depends on the values the
   kernels compute, so by default they are not run (the interpreter would
   take up to an hour for CE-ResNet-50's layers; recording takes seconds).
2. :func:`compile_launch` (no interpreter): Triton's compiler for
   ``GPUTarget('cuda', arch, 32)``, with the specialisation a launch with
   those arguments on that GPU gets, then ``cuobjdump`` on the cubin:
   registers per thread, local memory (spills), shared memory, and the
   checks :func:`problems` applies (a program must fit the GPU's shared
   memory per block; no spills).

``tools/analysis_tools/triton_aot_check.py`` runs both for CE-ResNet's
layers and prints one row per compiled kernel.

The compile step mirrors ``triton.runtime.jit.JITFunction.run`` (its binder
and ``_pack_args``) for a target given instead of the current device's;
written against Triton 3.9, checked with 3.4 (torch 2.8's), 3.5, 3.6 and
3.7.1 (``requirements/pinned.txt``).
"""
import dataclasses
import os
import re
import subprocess
import tempfile
import time
from contextlib import contextmanager
from typing import (Callable, Dict, Iterator, List, NamedTuple, Optional,
                    Sequence, Tuple)

import torch
from torch import Tensor

#: Shared memory a program may use, bytes
#: (``cudaDevAttrMaxSharedMemoryPerBlockOptin``): sm_70 V100, sm_75 T4, sm_80
#: A100, sm_86 A10/A40/RTX 30xx, sm_89 L4/L40S/RTX 40xx, sm_90 H100/H200,
#: sm_100 B200.
SHARED_MEMORY_LIMIT = {
    70: 98304, 75: 65536, 80: 166912, 86: 101376, 89: 101376, 90: 232448,
    100: 232448
}


class SMResources(NamedTuple):
    """Per streaming multiprocessor: shared memory (bytes), 32-bit
    registers, resident warps and programs, and the shared memory the
    driver reserves per program."""
    shared: int
    registers: int
    warps: int
    programs: int
    reserved: int


#: The CUDA occupancy tables, per compute capability.
SM_RESOURCES = {
    70: SMResources(98304, 65536, 64, 32, 0),
    75: SMResources(65536, 65536, 32, 16, 0),
    80: SMResources(167936, 65536, 64, 32, 1024),
    86: SMResources(102400, 65536, 48, 16, 1024),
    89: SMResources(102400, 65536, 48, 24, 1024),
    90: SMResources(233472, 65536, 64, 32, 1024),
    100: SMResources(233472, 65536, 64, 32, 1024),
}

#: What the ``mode`` of a :class:`Scenario` runs.
MODES = {
    'train': 'BN (batch statistics) + CE in training, forward and backward '
    '(alone and with a residual block\'s tail, as in every mode with a BN)',
    'norm_eval': 'BN and CE with running statistics, forward and backward '
    '(mmdet detection configs)',
    'inference': 'BN and CE in eval mode under torch.no_grad: alone, with '
    'the ReLU (the stem) and with a residual and the ReLU (a block)',
    'bn_eval_ce_train': 'BN with running statistics + CE in training, '
    'forward and backward',
    'ce_train': 'CE alone in training, forward and backward',
    'ce_eval': 'CE alone in eval mode, forward and backward',
    'sync_train': 'BN (batch statistics) + CE in training with SyncCE sums, '
    'and with SyncBN and SyncCE sums (a reduce function in place of each '
    'all-reduce), forward and backward',
}


@dataclasses.dataclass(frozen=True)
class Scenario:
    """One CE step to record.

    Attributes:
        channels (int): C.
        group_size (int): d.
        batch (int): N.
        size (tuple): (H, W).
        dtype (str): the activations' dtype (``'float32'``, ``'float16'``,
            ``'bfloat16'``); parameters stay float32, as under autocast.
        mode (str): a key of :data:`MODES`.
        reduction (int): the IR MLP's reduction (hidden = C / reduction).
    """
    channels: int
    group_size: int
    batch: int = 2
    size: Tuple[int, int] = (5, 7)
    dtype: str = 'float32'
    mode: str = 'train'
    reduction: int = 4

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f'mode must be one of {sorted(MODES)}, got '
                             f'{self.mode!r}')
        if self.dtype not in ('float32', 'float16', 'bfloat16'):
            raise ValueError("dtype must be 'float32', 'float16' or "
                             f"'bfloat16', got {self.dtype!r}")


@dataclasses.dataclass(frozen=True)
class LaunchRecord:
    """What one launch compiles from.

    Attributes:
        kernel (str): the kernel's name in :mod:`ce_mmdet.ops.triton_impl`.
        args (tuple): one entry per runtime argument: ``('tensor', dtype,
            aligned)``, ``('int', value)``, ``('float', value)`` or
            ``('bool', value)``.
        kwargs (tuple): ``(name, value)`` pairs, sorted: the constexprs and
            launch options (``num_warps``).
        scenario (str): the first :class:`Scenario` that launched it.
    """
    kernel: str
    args: tuple
    kwargs: tuple
    scenario: str = ''

    def key(self) -> tuple:
        """What Triton specialises a compilation on: equal keys, one
        binary (integers the kernel does not specialise, by their width
        only)."""
        from ..ops.triton_impl import _KERNELS
        kernel = _KERNELS.get(self.kernel)
        names = kernel.args if kernel is not None else ()
        free = kernel.unspecialised if kernel is not None else ()
        args = []
        for i, arg in enumerate(self.args):
            if arg[0] == 'int':
                v = arg[1]
                free_int = i < len(names) and names[i] in free
                args.append(('int', 'free' if free_int else 'one' if v == 1
                             else 'div16' if v % 16 == 0 else 'any',
                             -2**31 <= v < 2**31))
            elif arg[0] == 'float':
                args.append(('float', ))
            else:
                args.append(tuple(arg))
        return (self.kernel, tuple(args), self.kwargs)

    def to_json(self) -> dict:
        return dict(kernel=self.kernel, args=[list(a) for a in self.args],
                    kwargs=[list(k) for k in self.kwargs],
                    scenario=self.scenario)

    @classmethod
    def from_json(cls, obj: dict) -> 'LaunchRecord':
        return cls(obj['kernel'], tuple(tuple(a) for a in obj['args']),
                   tuple(tuple(k) for k in obj['kwargs']),
                   obj.get('scenario', ''))


def _describe(value) -> tuple:
    if isinstance(value, Tensor):
        return ('tensor', str(value.dtype).replace('torch.', ''),
                value.data_ptr() % 16 == 0)
    if isinstance(value, bool):
        return ('bool', value)
    if isinstance(value, int):
        return ('int', value)
    if isinstance(value, float):
        return ('float', value)
    raise TypeError(f'unexpected kernel argument of type '
                    f'{type(value).__name__}')


@contextmanager
def record_launches(records: Dict[tuple, LaunchRecord],
                    scenario: str = '',
                    run: bool = True) -> Iterator[None]:
    """While active, every Triton launch of :mod:`ce_mmdet.ops.triton_impl`
    is added to ``records`` (keyed by :meth:`LaunchRecord.key`, the first
    one kept).

    Args:
        records (dict): filled in place.
        scenario (str): a name stored with new records.
        run (bool): also run the kernels. Without, their outputs keep
            whatever they held: what a launch compiles from (dtypes,
            alignment, integer values, constexprs) never depends on the
            values computed, and Triton's interpreter, which runs them on
            the CPU, is what makes recording slow.
    """
    from ..ops.triton_impl import LaunchStats
    if LaunchStats.recorder is not None:
        raise RuntimeError('launches are already being recorded')

    def recorder(name, grid, args, kwargs):
        record = LaunchRecord(name, tuple(_describe(a) for a in args),
                              tuple(sorted(kwargs.items())), scenario)
        records.setdefault(record.key(), record)
        return not run

    LaunchStats.recorder = recorder
    try:
        yield
    finally:
        LaunchStats.recorder = None


def run_scenario(scenario: Scenario) -> None:
    """One step of ``scenario`` with ``impl='triton'`` on CPU tensors (Triton's
    interpreter must be on: ``TRITON_INTERPRET=1`` before triton is
    imported)."""
    import torch.nn as nn

    from ..models.layers import ChannelEquilibrium
    from ..ops import BatchNormArgs, batchnorm_channel_equilibrium
    from ..ops.impl import triton_interpreting
    if not triton_interpreting():
        raise RuntimeError('recording runs the kernels in Triton\'s '
                           'interpreter: set TRITON_INTERPRET=1 before '
                           'triton is imported')
    s = scenario
    torch.manual_seed(0)
    ce = ChannelEquilibrium(s.channels, group_size=s.group_size,
                            reduction=s.reduction, impl='triton')
    bn = nn.BatchNorm2d(s.channels)
    batch_bn = s.mode in ('train', 'sync_train')
    ce_training = s.mode in ('train', 'sync_train', 'bn_eval_ce_train',
                             'ce_train')
    bn.train(batch_bn)
    ce.train(ce_training)
    dtype = getattr(torch, s.dtype)
    z = torch.randn(s.batch, s.channels, *s.size).to(dtype)
    if s.mode == 'inference':
        with torch.no_grad():  # as CEFPN, the stem and a residual block
            ce(z.clone(), bn=bn, inplace=True)
            ce(z.clone(), bn=bn, inplace=True, relu=True)
            ce(z.clone(), bn=bn, inplace=True, residual=torch.randn_like(z),
               relu=True)
        return
    z.requires_grad_()
    if s.mode == 'sync_train':  # after a BN, and after a SyncBN
        out = sum(
            batchnorm_channel_equilibrium(
                z, BatchNormArgs.from_module(bn), ce.ce_params(),
                ce.ce_state(), config=ce.config, training=True,
                reduce_fn=lambda t: t.clone(), impl='triton',
                bn_reduce_fn=bn_reduce_fn)
            for bn_reduce_fn in (None, lambda t: t.clone()))
    elif s.mode.startswith('ce_'):
        out = ce(z)
    else:  # as CEFPN, and as a residual block (with its tail)
        residual = torch.randn_like(z).requires_grad_()
        out = ce(z, bn=bn) + ce(z, bn=bn, residual=residual, relu=True)
    out.float().square().sum().backward()


def record_scenarios(scenarios: Sequence[Scenario],
                     run: bool = False) -> List[LaunchRecord]:
    """The distinct launches of ``scenarios``, in order of first launch
    (``run``: see :func:`record_launches`; off, recording takes seconds
    where running every kernel in the interpreter takes up to an hour)."""
    records: Dict[tuple, LaunchRecord] = {}
    for s in scenarios:
        with record_launches(records, scenario=_name(s), run=run):
            run_scenario(s)
    return list(records.values())


def _name(s: Scenario) -> str:
    return (f'{s.mode} C={s.channels} d={s.group_size} N={s.batch} '
            f'{s.size[0]}x{s.size[1]} {s.dtype}')


def resnet_layers(depth: int = 50,
                  group_size: int = 16) -> List[Tuple[int, int]]:
    """``(channels, group size)`` of CE-ResNet's CE layers: the stem's one
    group of 64 channels, then every stage's width in groups of
    ``group_size`` (the last stage included: it has CE only when
    ``ce_stages`` says so)."""
    widths = (64, 128, 256, 512) if depth in (18, 34) else \
        (256, 512, 1024, 2048)
    return [(64, 64)] + [(c, group_size) for c in widths]


def scenarios(layers: Sequence[Tuple[int, int]],
              batches: Sequence[int] = (2, 16),
              dtypes: Sequence[str] = ('float32', 'bfloat16'),
              modes: Sequence[str] = tuple(MODES),
              sizes: Sequence[Tuple[int, int]] = ((4, 4), (3, 5), (1, 1))
              ) -> List[Scenario]:
    """Every combination: each layer ``(channels, group size)`` in every
    mode, batch size and dtype, at every size (the defaults: H*W divisible
    by 16, not, and 1, which Triton compiles apart), but one sample of a
    1x1 map (no batch statistics)."""
    return [
        Scenario(c, d, n, tuple(size), dtype, mode) for c, d in layers
        for mode in modes for n in batches for dtype in dtypes
        for size in sizes if n * size[0] * size[1] > 1
    ]


@dataclasses.dataclass
class KernelReport:
    """What compiling one :class:`LaunchRecord` gave.

    Attributes:
        record (LaunchRecord): what was compiled.
        arch (int): the compute capability (90: H100/H200).
        seconds (float): compile time.
        registers (int): registers per thread.
        local_bytes (int): local memory per thread (spills and stack).
        shared_bytes (int): shared memory per program.
        num_warps (int): warps per program.
        error (str): the compiler's error, if it failed.
        triton (str): the version of Triton that compiled it.
        binder_us (float): host microseconds per launch of Triton's own
            Python before its C launcher (``JITFunction.run``'s argument
            binder and cache key), on this CPU (:func:`binder_us`).
    """
    record: LaunchRecord
    arch: int
    seconds: float = 0.0
    registers: int = -1
    local_bytes: int = -1
    shared_bytes: int = -1
    num_warps: int = -1
    error: str = ''
    triton: str = ''
    binder_us: float = -1.0

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out['record'] = self.record.to_json()
        return out

    @classmethod
    def from_json(cls, obj: dict) -> 'KernelReport':
        return cls(**dict(obj, record=LaunchRecord.from_json(obj['record'])))


def occupancy(report: KernelReport) -> Optional[float]:
    """Resident warps per SM over the SM's maximum, as the CUDA occupancy
    calculator gives it from registers (allocated per warp in units of
    256), shared memory (plus what the driver reserves per program: 1 KiB
    from sm_80 on) and warps; None for an architecture not in
    :data:`SM_RESOURCES` or a failed compile."""
    sm = SM_RESOURCES.get(report.arch)
    if sm is None or report.error or report.num_warps <= 0:
        return None
    per_warp = -(-report.registers * 32 // 256) * 256
    shared = report.shared_bytes + sm.reserved
    programs = min(sm.programs, sm.warps // report.num_warps,
                   sm.registers // (per_warp * report.num_warps),
                   sm.shared // shared if shared else sm.programs)
    return programs * report.num_warps / sm.warps


def problems(report: KernelReport, spills: bool = True) -> List[str]:
    """Why ``report``'s kernel would fail or be slow on its GPU: a compile
    error, more shared memory than a program may have, spills (local
    memory; not with ``spills=False``). Empty: none."""
    if report.error:
        lines = [line for line in report.error.splitlines() if line.strip()]
        why = lines[0] if len(lines) < 2 else f'{lines[0]} ... {lines[-1]}'
        return [f'does not compile: {why}']
    out = []
    limit = SHARED_MEMORY_LIMIT.get(report.arch)
    if limit is not None and report.shared_bytes > limit:
        out.append(f'{report.shared_bytes} bytes of shared memory, more '
                   f'than the {limit} a program may use on sm_{report.arch}')
    if spills and report.local_bytes > 0:
        out.append(f'{report.local_bytes} bytes of local memory per thread '
                   '(register spills)')
    return out


def _arguments(record: LaunchRecord) -> list:
    args = []
    for arg in record.args:
        if arg[0] == 'tensor':
            t = torch.empty(64, dtype=getattr(torch, arg[1]))
            # an unaligned pointer is specialised as such
            args.append(t if arg[2] else t[1:])
        else:
            args.append(arg[1])
    return args


_RESOURCE = re.compile(r'REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+'
                       r'LOCAL:(\d+)')


def _resource_usage(cubin: bytes) -> Tuple[int, int]:
    """(registers, local bytes) per thread of the kernel in ``cubin``, by
    ``cuobjdump --dump-resource-usage`` (the tool ships with triton)."""
    from triton import knobs
    tool = knobs.nvidia.cuobjdump.path
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, 'kernel.cubin')
        with open(path, 'wb') as f:
            f.write(cubin)
        text = subprocess.run([tool, '--dump-resource-usage', path],
                              check=True, capture_output=True,
                              text=True).stdout
    match = _RESOURCE.search(text)
    if match is None:
        raise RuntimeError(f'no resource usage in cuobjdump output:\n{text}')
    reg, stack, _, local = (int(v) for v in match.groups())
    return reg, max(local, stack)


def binder_us(binder: Callable, args: list, kwargs: dict,
              repeats: int = 500) -> float:
    """Microseconds per call (best of five rounds) of what
    ``JITFunction.run`` does on the host for every launch of a compiled
    kernel before its C launcher: the argument binder (each argument's
    specialisation) and the cache key. Not included: the C launcher and
    the driver (a few us per launch on a GPU machine). At 2 images per GPU
    a CE layer's launches cost the host this much each, beside the op's
    own Python (``benchmark_host.py``)."""
    try:
        from triton.runtime.jit import compute_cache_key
    except ImportError:  # triton 3.4: the key JITFunction.run computes

        def compute_cache_key(cache, specialization, options):
            return str(specialization) + str(options)

    best, keys = float('inf'), {}  # (the kernel's key cache: hits)
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeats):
            _, specialization, options = binder(*args, **kwargs)
            compute_cache_key(keys, specialization, options)
        best = min(best, (time.perf_counter() - start) / repeats)
    return best * 1e6


def _pack_args(fn, backend, kwargs: dict, bound: dict, specialization,
               options) -> tuple:
    """``fn._pack_args(...)``: the compile options, signature, constexprs
    and attributes of a bound launch. Triton 3.4 (torch 2.8's) has no such
    method; its ``JITFunction.run`` computes them inline, with these
    lines (3.5 moved them into ``_pack_args`` unchanged)."""
    pack = getattr(fn, '_pack_args', None)
    if pack is not None:
        return pack(backend, kwargs, bound, specialization, options)
    from triton.runtime.jit import find_paths_if, get_iterable_path
    options = backend.parse_options(kwargs)
    sigkeys = [p.name for p in fn.params]
    sigvals = [s[0] for s in specialization]
    signature = dict(zip(sigkeys, sigvals))
    values = list(bound.values())
    constexprs = {
        path: get_iterable_path(values, path)
        for path in find_paths_if(sigvals, lambda _, v: v == 'constexpr')
    }
    attrvals = [s[1] for s in specialization]
    attrs = {
        path: backend.parse_attr(get_iterable_path(attrvals, path))
        for path in find_paths_if(attrvals, lambda _, v: isinstance(v, str))
    }
    return options, signature, constexprs, attrs


def compile_launch(record: LaunchRecord, arch: int = 90) -> KernelReport:
    """Compile ``record``'s kernel for ``GPUTarget('cuda', arch, 32)`` as a
    launch with its arguments would on that GPU; Triton's interpreter must
    be off in this process."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    from ..ops import triton_impl
    fn = triton_impl._KERNELS[record.kernel].fn
    if not isinstance(fn, JITFunction):
        raise RuntimeError('compiling needs Triton\'s compiler: unset '
                           'TRITON_INTERPRET in this process')
    report = KernelReport(record, arch, triton=triton.__version__)
    target = GPUTarget('cuda', arch, 32)
    backend = make_backend(target)
    kwargs = dict(record.kwargs)
    kwargs['debug'] = False
    start = time.perf_counter()
    try:
        # what JITFunction.run does for the current device's target
        binder = create_function_from_signature(fn.signature, fn.params,
                                                backend)
        args = _arguments(record)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = _pack_args(
            fn, backend, kwargs, bound, specialization, options)
        kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs),
                                target=target, options=options.__dict__)
    except Exception as err:  # noqa: BLE001  (reported, not raised)
        report.error = f'{type(err).__name__}: {err}'
        report.seconds = time.perf_counter() - start
        return report
    report.seconds = time.perf_counter() - start
    report.shared_bytes = int(kernel.metadata.shared)
    report.num_warps = int(kernel.metadata.num_warps)
    report.registers, report.local_bytes = _resource_usage(
        kernel.asm['cubin'])
    report.binder_us = binder_us(binder, args, kwargs)
    return report
