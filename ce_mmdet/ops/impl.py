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
  the kernels pass a one-time self-check on that device (a few small calls
  compared with the torch implementation; a failure warns once and keeps
  ``'torch'``), ``'torch'`` otherwise, and ``'torch'`` while
  ``torch.compile`` traces (dynamo traces the torch implementation without
  graph breaks; the Triton launches are not registered as custom ops yet,
  so forcing ``'triton'`` under torch.compile is not supported). Under
  ``torch.jit`` tracing (mmengine's FLOP analyser) every value means
  ``'torch'``.
"""
import functools
import os
import warnings
from typing import Optional, Tuple

import torch

IMPLS = ('auto', 'torch', 'triton')
ENV_VAR = 'CE_MMDET_IMPL'
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_impl(impl: str, source: str = 'impl') -> str:
    """``impl`` if it is one of :data:`IMPLS`, else a ValueError naming
    them (``source`` says where the value came from)."""
    if not isinstance(impl, str) or impl not in IMPLS:
        raise ValueError(f'{source} must be one of {IMPLS}, got {impl!r}')
    return impl


@functools.lru_cache(maxsize=None)
def triton_importable() -> bool:
    """Whether ``import triton`` works (checked once)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpreting() -> bool:
    """Whether Triton kernels run in its interpreter (on CPU tensors)."""
    return os.environ.get('TRITON_INTERPRET', '0') == '1'


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
    env = os.environ.get(ENV_VAR, '')
    if env:
        impl = check_impl(env, f'the environment variable {ENV_VAR}')
    else:
        impl = check_impl(impl)
    if impl == 'torch' or torch.jit.is_tracing():
        # torch.jit tracing (mmengine's FLOP analyser) records sizes as
        # tensors, which Triton launches cannot take
        return 'torch'
    if impl == 'auto' and (tensor is None or not tensor.is_cuda
                           or torch.compiler.is_compiling()):
        # never the (slow) interpreter unless asked for; under
        # torch.compile the torch implementation, which dynamo traces
        # without graph breaks and inductor fuses
        return 'torch'
    usable, why = _triton_usable(tensor)
    if impl == 'auto':
        return 'triton' if usable else 'torch'
    if not usable:
        raise RuntimeError(f"impl='triton' cannot run here: {why}. Use "
                           "impl='auto' or 'torch'.")
    return 'triton'


def _op_pairs(device: torch.device, gen: torch.Generator) -> list:
    """Outputs and gradients of the whole ops (the fused small-graph
    kernels too) with the Triton and the torch passes: CE in training and
    eval, and an eval-mode BN folded into CE."""
    from . import functions
    from .torch_impl import TorchPasses
    from .triton_impl import TritonPasses
    from .types import CEConfig, CEParams, CEState
    c, d, h = 32, 16, 8

    def rand(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, device=device, generator=gen) * scale + \
            shift

    base = (rand(1, scale=0.3), rand(h, c, scale=0.3), rand(h, scale=0.1,
                                                           shift=1.0),
            rand(h, scale=0.1), rand(c, h, scale=0.3))
    x0 = rand(2, c, 5, 6, scale=1.5, shift=0.3)
    bn = (rand(c, scale=0.2, shift=1.0), rand(c, scale=0.2),
          rand(c, scale=0.3), rand(c, scale=0.1, shift=1.0).abs())
    pairs = []
    for training, with_bn in ((True, False), (False, False), (False, True)):
        results = []
        for passes in (TritonPasses, TorchPasses):
            params = CEParams(*(t.clone().requires_grad_() for t in base))
            state = CEState(
                torch.eye(d, device=device).repeat(c // d, 1, 1),
                torch.ones(1, device=device))
            x = x0.clone().requires_grad_()
            call = functions.OpCall(CEConfig(d), training, passes,
                                    needs_grad=True, bn_eps=1e-5)
            if with_bn:
                out = functions.batchnorm_channel_equilibrium(
                    x, bn, params, state, call)[0]
            else:
                out = functions.channel_equilibrium(x, params, state,
                                                    call)[0]
            grads = torch.autograd.grad(out.square().sum(), [x, *params])
            results.append((out.detach(), ) + grads)
        pairs.append(tuple(results))
    return pairs


@functools.lru_cache(maxsize=None)
def triton_self_check(device: torch.device) -> bool:
    """Whether the Triton passes agree with the torch passes on ``device``
    (small float32 inputs, every pass, groups of 8 and 16, and whole ops
    forward and backward, so every kernel is compiled and run). Run once per
    device by ``impl='auto'``; a failure (a kernel that does not compile on
    this GPU or Triton version, or a wrong result) warns once and makes
    ``'auto'`` keep the torch implementation there."""
    from .torch_impl import TorchPasses
    try:
        from .triton_impl import TritonPasses
        gen = torch.Generator(device=device).manual_seed(0)
        for n, c, h, w, d in ((2, 32, 5, 7, 16), (1, 16, 3, 1, 8)):
            x = torch.randn(n, c, h, w, device=device, generator=gen)
            y = torch.randn(n, c, h, w, device=device, generator=gen)
            a = torch.randn(n, c // d, d, d, device=device, generator=gen)
            b = torch.randn(n, c // d, d, 1, device=device, generator=gen)
            pairs = [(TritonPasses.stats(x, d, t), TorchPasses.stats(x, d, t))
                     for t in (True, False)]
            pairs.append((TritonPasses.cross(y, x, d),
                          TorchPasses.cross(y, x, d)))
            pairs.append(((TritonPasses.apply(a, x, d, False, b), ),
                          (TorchPasses.apply(a, x, d, False, b), )))
            pairs.append(((TritonPasses.apply2(a, y, a, x, b, d), ),
                          (TorchPasses.apply2(a, y, a, x, b, d), )))
            pairs += _op_pairs(device, gen)
            for got, want in pairs:
                for u, v in zip(got, want):
                    if not torch.allclose(u, v, rtol=1e-3, atol=1e-3):
                        raise AssertionError(
                            f'results differ by {(u - v).abs().max():.3g}')
    except Exception as exc:  # noqa: BLE001 (any failure: keep torch)
        warnings.warn(
            f"ce_mmdet: the Triton kernels failed their self-check on "
            f"{device} ({type(exc).__name__}: {exc}); impl='auto' uses the "
            "torch implementation there. Please report it; impl='triton' "
            'shows the error.', RuntimeWarning)
        return False
    return True


def passes_for(impl: str, tensor: torch.Tensor):
    """The big-pass implementation (``TorchPasses`` / ``TritonPasses``)
    that :func:`resolve_impl` picks for ``tensor`` (for ``'auto'`` on CUDA,
    only after :func:`triton_self_check` passed there)."""
    name = resolve_impl(impl, tensor)
    auto = (os.environ.get(ENV_VAR, '') or impl) == 'auto'
    if name == 'triton' and not (auto and tensor.is_cuda
                                 and not triton_self_check(tensor.device)):
        from .triton_impl import TritonPasses
        return TritonPasses
    from .torch_impl import TorchPasses
    return TorchPasses
