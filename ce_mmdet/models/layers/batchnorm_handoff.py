"""How a BatchNorm hands its work to the Channel Equilibrium layer after it.

:meth:`ChannelEquilibrium.follow` declares ``conv -> bn -> ce``. The BN then
leaves a record of each call (itself, its input, its output) in a
*per-thread* slot, which the CE layer called next in the same thread takes
if its input is that very output, untouched:

* the record lets CE keep the BN's input for backward instead of its own
  and reuse the BN's output tensor (:func:`batchnorm_affine` gives the map
  between the two);
* with a *scope* (the module whose forward runs conv -> bn -> ce), the BN
  is a :class:`BatchNorm2dBeforeCE`, which in inference returns its input
  and leaves an *absorbed* record: CE then computes ``CE(BN(z))`` from ``z``.

The slot is per thread and matched by tensor identity, so models shared by
threads and the replicas of ``nn.DataParallel`` (whose BNs still point at
the original CE layer) never see each other's records.
"""
import threading
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from .ce_function import compute_dtype

_BN_NODES_WITH_INVSTD = ('NativeBatchNormBackward0',
                         'CudnnBatchNormBackward0')

_local = threading.local()


class BatchNormCall(NamedTuple):
    """One call of a followed BN: ``output = bn(input)``, unless
    ``absorbed``, where ``output is input`` and the BN is still to be
    applied (by the CE layer)."""
    bn: nn.BatchNorm2d
    input: Tensor
    output: Tensor
    version: int
    absorbed: bool


def take_call(x: Tensor) -> Optional[BatchNormCall]:
    """This thread's last BN call if ``x`` is its output, untouched (the
    slot is emptied either way)."""
    call, _local.call = getattr(_local, 'call', None), None
    if call is None or call.output is not x or x._version != call.version:
        return None
    return call


def batchnorm_affine(bn: nn.BatchNorm2d,
                     output: Tensor) -> Optional[Tuple[Tensor, Tensor]]:
    """The per-channel map ``output = input * alpha + beta`` a BN applied.

    Eval mode: from the running statistics. Training mode (batch
    statistics): from the batch mean and inverse std the BN saved for its own
    backward on ``output.grad_fn`` (None when that node is not one known to
    save them). Equal to the BN's output up to rounding.

    Returns:
        tuple | None: ``alpha``, ``beta`` of shape (C,), float32 (float64 for
        a float64 output), without autograd history.
    """
    c = output.shape[1]
    cdt = compute_dtype(output.dtype)
    with torch.no_grad():
        if bn.training or bn.running_mean is None:
            node = output.grad_fn
            if type(node).__name__ not in _BN_NODES_WITH_INVSTD:
                return None
            mean = getattr(node, '_saved_result1', None)
            invstd = getattr(node, '_saved_result2', None)
            if not (isinstance(mean, Tensor) and isinstance(invstd, Tensor)
                    and mean.shape == (c, ) and invstd.shape == (c, )):
                return None
        else:
            mean = bn.running_mean
            invstd = torch.rsqrt(bn.running_var.to(cdt) + bn.eps)
        alpha = invstd.to(cdt)
        if bn.weight is not None:
            alpha = alpha * bn.weight.to(cdt)
        beta = -mean.to(cdt) * alpha
        if bn.bias is not None:
            beta = beta + bn.bias.to(cdt)
    return alpha, beta


class RecordBatchNormCall:
    """Forward hook of a followed BN: records the call for this thread."""

    def __call__(self, bn, inputs, output) -> None:
        call = getattr(_local, 'call', None)
        if call is not None and call.absorbed and call.output is output:
            return  # the BN left its work to CE: keep that record
        _local.call = BatchNormCall(bn, inputs[0], output, output._version,
                                    False)


def only_recording_hooks(bn: nn.Module) -> bool:
    """Nothing but the recording hook sees the BN's output (so CE may
    reuse its storage, or skip computing it)."""
    return not nn.modules.module._global_forward_hooks and all(
        isinstance(h, RecordBatchNormCall) for h in bn._forward_hooks.values())


def _depths() -> dict:
    if not hasattr(_local, 'depths'):
        _local.depths = {}
    return _local.depths


class Scope:
    """Forward pre-hook (``delta=1``) and hook (``delta=-1``) of the module
    inside whose forward a BN may be absorbed by the CE layer ``ce``."""

    def __init__(self, ce: nn.Module, delta: int) -> None:
        self.ce = ce
        self.delta = delta

    def __call__(self, module, *args) -> None:
        depths = _depths()
        key = id(self.ce)
        depth = depths.get(key, 0) + self.delta
        if depth > 0:
            depths[key] = depth
        else:
            depths.pop(key, None)

    @staticmethod
    def inside(ce: nn.Module) -> bool:
        return _depths().get(id(ce), 0) > 0


class BatchNorm2dBeforeCE(nn.BatchNorm2d):
    """An ``nn.BatchNorm2d`` whose following CE layer may absorb it.

    :meth:`ChannelEquilibrium.follow` with a ``scope`` turns the BN it
    follows into this class (same parameters, buffers and state dict keys;
    ``isinstance(m, nn.BatchNorm2d)`` holds). It computes exactly what
    ``nn.BatchNorm2d`` computes, except in one case: inference (BN and CE in
    eval mode, autograd off) inside the scope's forward, with no other
    forward hook on the BN, where it returns its input untouched and the CE
    layer, called next, computes ``CE(BN(z))`` from ``z`` in one pass.
    """

    def forward(self, input: Tensor) -> Tensor:
        ce = self.__dict__.get('_ce_after')
        if ce is not None and self._may_be_absorbed(ce, input):
            _local.call = BatchNormCall(self, input, input, input._version,
                                        True)
            return input
        return super().forward(input)

    def _may_be_absorbed(self, ce: nn.Module, z) -> bool:
        return (not torch.is_grad_enabled() and not self.training
                and not ce.training and self.running_mean is not None
                and Scope.inside(ce) and isinstance(z, Tensor)
                and z.dim() == 4 and z.shape[1] == ce.in_channels
                and z.numel() > 0 and z.is_floating_point()
                and z.is_contiguous() and not torch.jit.is_tracing()
                and not torch.compiler.is_compiling()
                and only_recording_hooks(self))


def attach(ce: nn.Module, bn: nn.BatchNorm2d,
           scope: Optional[nn.Module]) -> None:
    """Install the recording hook on ``bn`` and, with a scope, make ``bn`` a
    :class:`BatchNorm2dBeforeCE` of ``ce`` inside ``scope``."""
    if not any(isinstance(h, RecordBatchNormCall)
               for h in bn._forward_hooks.values()):
        bn.register_forward_hook(RecordBatchNormCall())
    if scope is not None:
        bn.__class__ = BatchNorm2dBeforeCE
        # a plain reference, not a submodule of the BN
        bn.__dict__['_ce_after'] = ce
        scope.register_forward_pre_hook(Scope(ce, 1))
        scope.register_forward_hook(Scope(ce, -1), always_call=True)
