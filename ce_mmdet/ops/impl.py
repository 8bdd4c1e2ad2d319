"""The one place that picks the implementation of the CE ops.

``impl`` is ``'auto'`` (default), ``'torch'`` or ``'triton'``; it comes from
``ChannelEquilibrium(impl=...)`` / ``ce_cfg=dict(impl=...)`` and is overridden
for the whole process by the environment variable ``CE_MMDET_IMPL`` (set it
to compare implementations without touching a config).

* ``'torch'``: PyTorch ops only (batched GEMMs); runs everywhere (CPU, CUDA,
  any floating dtype).
* ``'triton'``: Triton kernels for the passes over the feature map
  (:mod:`ce_mmdet.ops.triton_impl`), for float32/float16/bfloat16 inputs on
  CUDA, or on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``
  set before triton is imported: slow, for tests). Asked for where it
  cannot run, it raises ``RuntimeError`` saying why.
* ``'auto'``: ``'triton'`` for CUDA tensors of those dtypes when ``triton``
  imports (torch's CUDA wheels ship it; it is never a hard dependency) and
  the kernels pass a one-time self-check on that device for that layer's
  configuration (tiny calls compared with the torch implementation; a
  failure warns once and keeps ``'torch'`` for it), ``'torch'``
  otherwise. While ``torch.compile`` traces, the self-check runs at trace
  time, outside the graph (:func:`torch.compiler.assume_constant_result`:
  its answer is a constant of the trace), for the layer's configuration
  on every class of map size (a compiled graph may serve several sizes);
  without that function (older torch) ``'torch'``.
  Under torch.compile both implementations trace without graph breaks:
  every Triton launch is one call of the custom op
  ``torch.ops.ce_mmdet.triton_launch`` (its outputs declared mutated).
  Under ``torch.jit`` tracing (mmengine's FLOP analyser) every value means
  ``'torch'``.
"""
import contextlib
import functools
import operator
import os
import warnings
from typing import Optional, Tuple

import torch

from .export import torch_exporting

IMPLS = ('auto', 'torch', 'triton')
ENV_VAR = 'CE_MMDET_IMPL'
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_impl(impl: str, source: str = 'impl') -> str:
    """``impl`` if it is one of :data:`IMPLS`, else a ValueError naming
    them (``source`` says where the value came from)."""
    if not isinstance(impl, str) or impl not in IMPLS:
        raise ValueError(f'{source} must be one of {IMPLS}, got {impl!r}')
    return impl


#: whether torch.compile can take a function's result as a constant of the
#: trace (:func:`torch.compiler.assume_constant_result`)
_CONSTANT_RESULTS = hasattr(torch.compiler, 'assume_constant_result')


def _constant_while_tracing(fn):
    """``fn`` called at trace time, not traced, while torch.compile traces
    (its result a constant of the trace), where torch can."""
    return torch.compiler.assume_constant_result(fn) if _CONSTANT_RESULTS \
        else fn


#: the answer of :func:`triton_importable`, once asked
_TRITON_IMPORTABLE = []


@_constant_while_tracing
def triton_importable() -> bool:
    """Whether ``import triton`` works (checked once; while torch.compile
    traces, answered outside the trace: an ``lru_cache`` here made dynamo
    warn at every trace that it traces through the cache)."""
    if not _TRITON_IMPORTABLE:
        try:
            import triton  # noqa: F401
        except ImportError:
            _TRITON_IMPORTABLE.append(False)
        else:
            _TRITON_IMPORTABLE.append(True)
    return _TRITON_IMPORTABLE[0]


def triton_interpreting() -> bool:
    """Whether Triton kernels run in its interpreter (on CPU tensors)."""
    return os.environ.get('TRITON_INTERPRET', '0') == '1'


def triton_device() -> Optional[str]:
    """Where Triton kernels can run in this process: ``'cuda'`` with a GPU,
    ``'cpu'`` under the interpreter, None without triton (for tests and
    benchmarks)."""
    if not triton_importable():
        return None
    if torch.cuda.is_available():
        return 'cuda'
    return 'cpu' if triton_interpreting() else None


def _triton_usable(tensor: Optional[torch.Tensor]) -> Tuple[bool, str]:
    if not triton_importable():
        return False, ('triton is not installed (pip install triton; '
                       "torch's CUDA wheels ship it)")
    if tensor is None:
        return True, ''
    if tensor.dtype not in TRITON_DTYPES:
        return False, (f'its kernels take float32, float16 and bfloat16 '
                       f'inputs, got {tensor.dtype}')
    if tensor.is_cuda or (tensor.device.type == 'cpu'
                          and triton_interpreting()):
        return True, ''
    return False, (f'the input is on {tensor.device}; Triton runs CUDA '
                   'tensors, or CPU tensors under its interpreter '
                   '(TRITON_INTERPRET=1 set before triton is imported)')


def resolve_impl(impl: str = 'auto',
                 tensor: Optional[torch.Tensor] = None) -> str:
    """The implementation that runs a CE op on ``tensor``.

    Args:
        impl (str): the requested one (:data:`IMPLS`); the environment
            variable ``CE_MMDET_IMPL``, when set and not empty, wins.
        tensor (Tensor, optional): the op's input (device and dtype decide
            what ``'auto'`` means and whether ``'triton'`` can run).

    Returns:
        str: ``'torch'`` or ``'triton'``.

    Raises:
        ValueError: for a value not in :data:`IMPLS`.
        RuntimeError: for ``'triton'`` where it cannot run (the message
            says why).
    """
    return _resolve(requested_impl(impl), tensor)


def requested_impl(impl: str) -> str:
    """``impl``, or the environment variable ``CE_MMDET_IMPL`` when it is
    set and not empty; checked (:func:`check_impl`)."""
    env = os.environ.get(ENV_VAR, '')
    if env:
        return check_impl(env, f'the environment variable {ENV_VAR}')
    return check_impl(impl)


def _auto_may_use_triton(tensor: Optional[torch.Tensor]) -> bool:
    """Where ``'auto'`` considers Triton: CUDA tensors (never the slow
    interpreter unless asked for)."""
    return tensor is not None and tensor.is_cuda


def _resolve(impl: str, tensor: Optional[torch.Tensor]) -> str:
    """:func:`resolve_impl` for an already requested and checked ``impl``."""
    if impl == 'torch' or torch.jit.is_tracing() or torch_exporting():
        # torch.jit tracing (mmengine's FLOP analyser) records sizes as
        # tensors, which Triton launches cannot take; an exported program
        # is a graph of standard ops (ce_mmdet.ops.export)
        return 'torch'
    if impl == 'auto' and not _auto_may_use_triton(tensor):
        return 'torch'
    usable, why = _triton_usable(tensor)
    if impl == 'auto':
        return 'triton' if usable else 'torch'
    if not usable:
        raise RuntimeError(f"impl='triton' cannot run here: {why}. Use "
                           "impl='auto' or 'torch'.")
    return 'triton'


#: the self-check's map for each class of map size: 1, a multiple of 16,
#: other (:func:`check_map_size`)
MAP_SIZES = ((1, 1), (4, 4), (5, 6))
#: (C, d, hidden, num_iters, N, dtype, map size) of the generic self-check
DEFAULT_LAYER = (32, 16, 8, 3, 2, torch.float32, MAP_SIZES[2])


def check_map_size(positions: int) -> Tuple[int, int]:
    """The self-check's map for a layer whose maps have ``positions`` =
    H*W: one of the same class for Triton's specialisation of the position
    count (1, a multiple of 16, other), so that the check compiles the
    binaries the layer runs (the other integers the kernels take are not
    specialised: ``triton_impl._UNSPECIALISED``)."""
    if positions == 1:
        return MAP_SIZES[0]
    return MAP_SIZES[1] if positions % 16 == 0 else MAP_SIZES[2]


def _check_pairs(device: torch.device, layer: tuple) -> list:
    """(Triton, torch) result pairs for a layer configuration ``(C, d,
    hidden, num_iters, N, dtype[, (H, W)])`` (the map 5x6 if not given):
    every pass on its own, and the whole ops forward and backward in every
    mode a CE layer runs (CE alone in training and eval; after an eval-mode
    BN, CE in eval and in training; after a batch-statistics BN, with and
    without SyncCE's sums, and after a SyncBN), so that every kernel is
    compiled with the constants this configuration uses.

    On a 1x1 map the ops' input gradients are run but not compared: each
    sample's variance is then 0 by definition, its gradient the difference
    of two terms equal in exact arithmetic (~1e11 in size in training,
    where the scale clamps at eps), so both implementations return rounding
    noise there (the honest kernels failed the check by 90% in training,
    1e-4 in eval); outputs and parameter gradients agree to 1e-6."""
    from . import functions
    from .torch_impl import TorchPasses
    from .triton_impl import TritonPasses
    from .types import CEConfig, CEParams, CEState
    c, d, h, num_iters, n, dtype = layer[:6]
    size = tuple(layer[6]) if len(layer) > 6 else DEFAULT_LAYER[6]
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, device=device, generator=gen) * scale + \
            shift

    x0 = rand(n, c, *size, scale=1.5, shift=0.3).to(dtype)
    y = rand(n, c, *size).to(dtype)
    a, b = rand(n, c // d, d, d), rand(n, c // d, d, 1)
    passes = (TritonPasses, TorchPasses)
    pairs = [tuple(p.stats(x0, d, t) for p in passes) for t in (True, False)]
    pairs.append(tuple(p.cross(y, x0, d) for p in passes))
    pairs.append(tuple((p.apply(a, x0, d, False, b), ) for p in passes))
    # a residual block's tail (the identity and the ReLU in the map's
    # pass; without a bias after a BN with its own pass) and the stem's
    # ReLU alone
    for bias, residual in ((b, y), (None, y), (b, None)):
        pairs.append(tuple((p.apply(a, x0, d, False, bias, residual, True), )
                           for p in passes))
    pairs.append(tuple((p.apply2(a, y, a, x0, b, d), ) for p in passes))
    base = (rand(1, scale=0.3), rand(h, c, scale=0.3),
            rand(h, scale=0.1, shift=1.0), rand(h, scale=0.1),
            rand(c, h, scale=0.3))
    bn = (rand(c, scale=0.2, shift=1.0), rand(c, scale=0.2),
          rand(c, scale=0.3), rand(c, scale=0.1, shift=1.0).abs())
    # (CE training, a BN before it, the BN with batch statistics, SyncCE,
    # SyncBN, autograd): CE alone (training, eval), eval BN + eval CE
    # (folded), eval BN + CE in training, batch-statistics BN + CE in
    # training (folded), the same with SyncCE's sums (an identity in place
    # of the all-reduce), and with a SyncBN's too, and inference (eval
    # without autograd: only what the apply reads is written) of CE alone
    # and folded: every constexpr branch of the kernels the modes of CE
    # layers reach
    for training, with_bn, batch_bn, sync, sync_bn, grad in (
            (True, False, False, False, False, True),
            (False, False, False, False, False, True),
            (False, True, False, False, False, True),
            (True, True, False, False, False, True),
            (True, True, True, False, False, True),
            (True, True, True, True, False, True),
            (True, True, True, True, True, True),
            (False, False, False, False, False, False),
            (False, True, False, False, False, False)):
        results = []
        for impl in passes:
            params = CEParams(*(t.clone().requires_grad_(grad)
                                for t in base))
            state = CEState(
                torch.eye(d, device=device).repeat(c // d, 1, 1),
                torch.ones(1, device=device))
            x = x0.clone().requires_grad_(grad)
            call = functions.OpCall(
                CEConfig(d, num_iters), training, impl,
                reduce_fn=torch.clone if sync else None, needs_grad=grad,
                bn_batch_stats=batch_bn, bn_eps=1e-5,
                bn_reduce_fn=torch.clone if sync_bn else None)
            if with_bn:
                out = functions.batchnorm_channel_equilibrium(
                    x, bn, params, state, call)[0]
            else:
                out = functions.channel_equilibrium(x, params, state,
                                                    call)[0]
            if not grad:
                results.append((out, ))
                continue
            grads = torch.autograd.grad(out.float().square().sum(),
                                        [x, *params])
            if size == MAP_SIZES[0]:
                grads = grads[1:]  # run, not compared (see the doc)
            results.append((out.detach(), ) + grads)
        pairs.append(tuple(results))
    return pairs


@contextlib.contextmanager
def _ieee_cuda_matmuls():
    """CUDA float32 matmuls without TF32 while active (the process's
    setting restored after): the self-check's torch side must be float32
    to its tolerance, and TF32 (10-bit mantissa, which
    ``torch.set_float32_matmul_precision('high')`` turns on) is not."""
    matmul = torch.backends.cuda.matmul
    name, value = (('fp32_precision', 'ieee') if hasattr(
        matmul, 'fp32_precision') else ('allow_tf32', False))
    saved = getattr(matmul, name)
    setattr(matmul, name, value)
    try:
        yield
    finally:
        setattr(matmul, name, saved)


@functools.lru_cache(maxsize=None)
def triton_self_check(device: torch.device,
                      layer: tuple = DEFAULT_LAYER) -> bool:
    """Whether the Triton kernels agree with the torch implementation on
    ``device`` for a layer configuration ``(C, d, hidden, num_iters, N,
    dtype[, (H, W)])`` (:func:`_check_pairs`: a tiny map of the layer's
    class, :func:`check_map_size`; every kernel with this configuration's
    block sizes and specialisation). ``impl='auto'`` runs it once per
    device and configuration before it uses Triton there; a failure (a
    kernel that does not compile on this GPU or Triton version, runs out
    of resources, or a wrong result) warns once and keeps the torch
    implementation for that configuration. Both sides run with float32
    CUDA matmuls (no TF32) whatever the process allows."""
    tol = 1e-3 if layer[5] == torch.float32 else 3e-2
    try:
        # the first call may come from inside torch.no_grad / inference_mode
        # or a process that allows TF32 matmuls (the torch side would then
        # be the inaccurate one, and 'auto' would fall back for nothing)
        with torch.inference_mode(False), torch.enable_grad(), \
                _ieee_cuda_matmuls():
            pairs = _check_pairs(device, layer)
        for got, want in pairs:
            for u, v in zip(got, want):
                # relative to the largest entry (elementwise checks are
                # meaningless for bf16-rounded values near zero)
                err = (u.float() - v.float()).abs().max()
                if not err <= tol * v.float().abs().max() + 1e-6:
                    raise AssertionError(f'results differ by {err:.3g}')
    except Exception as exc:  # noqa: BLE001 (any failure: keep torch)
        warnings.warn(
            f"ce_mmdet: the Triton kernels failed their self-check on "
            f"{device} for a CE layer (C, d, hidden, iterations, N, dtype) "
            f"= {layer} ({type(exc).__name__}: {exc}); impl='auto' uses "
            "the torch implementation there. Please report it; "
            "impl='triton' shows the error.", RuntimeWarning)
        return False
    return True


def self_check_key(layer: Optional[tuple], tensor: torch.Tensor) -> tuple:
    """The configuration :func:`triton_self_check` checks before ``'auto'``
    uses Triton for a layer ``(C, d, hidden, num_iters, N)`` (None: the
    generic one) on ``tensor``: the layer's, at most 16 samples, the
    tensor's dtype and a map of its class (:func:`check_map_size`)."""
    if layer is None:
        return DEFAULT_LAYER
    return tuple(layer[:4]) + (min(max(int(layer[4]), 1), 16), tensor.dtype,
                               check_map_size(tensor.shape[2] *
                                              tensor.shape[3]))


@_constant_while_tracing
def _self_check_all(device_type: str, index: int, c: int, d: int,
                    hidden: int, num_iters: int, dtype: torch.dtype) -> bool:
    """:func:`triton_self_check` on the device ``(device_type, index)`` (a
    negative index: none) for a layer ``(c, d, hidden, num_iters)`` and
    ``dtype``, on the check map of every class of map size
    (:data:`MAP_SIZES`). Flat constant arguments: while ``torch.compile``
    traces it is called once at trace time, not traced."""
    device = torch.device(device_type, None if index < 0 else index)
    return all(
        triton_self_check(device, (c, d, hidden, num_iters,
                                   DEFAULT_LAYER[4], dtype, size))
        for size in MAP_SIZES)


def _self_check_while_compiling(layer: Optional[tuple],
                                tensor: torch.Tensor) -> bool:
    """The self-check ``'auto'`` needs, while dynamo traces: at trace time
    (not traced), for the layer's configuration and the tensor's dtype on
    every class of map size, since a compiled graph may serve several sizes
    (its sizes may be symbolic, which a constant of the trace cannot
    depend on)."""
    if not _CONSTANT_RESULTS:
        return False  # (the check would be traced)
    # (operator.index: a dynamic-shape trace has the channel counts as
    # symbols; this makes them constants, guarded: they are fixed per layer)
    c, d, hidden, num_iters = [
        operator.index(v) for v in (layer or DEFAULT_LAYER)[:4]
    ]
    device = tensor.device
    return _self_check_all(device.type,
                           -1 if device.index is None else device.index, c,
                           d, hidden, num_iters, tensor.dtype)


def passes_for(impl: str, tensor: torch.Tensor, layer: tuple = None):
    """The big-pass implementation (``TorchPasses`` / ``TritonPasses``)
    that :func:`resolve_impl` picks for ``tensor``; for ``'auto'`` on CUDA
    only once :func:`triton_self_check` passed there for ``layer`` (``(C,
    d, hidden, num_iters, N)`` of the calling layer; the dtype and the
    class of the map size are the tensor's)."""
    requested = requested_impl(impl)
    name = _resolve(requested, tensor)
    if name == 'triton' and requested == 'auto':  # (on CUDA only)
        if torch.compiler.is_compiling():
            passed = _self_check_while_compiling(layer, tensor)
        else:
            passed = triton_self_check(tensor.device,
                                       self_check_key(layer, tensor))
        if not passed:
            name = 'torch'
    if name == 'triton':
        from .triton_impl import TritonPasses
        return TritonPasses
    from .torch_impl import TorchPasses
    return TorchPasses
