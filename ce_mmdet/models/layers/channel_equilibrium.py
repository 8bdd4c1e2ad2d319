"""Channel Equilibrium (CE) layer, Shao et al., ICML 2020."""
import numbers
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from mmengine.registry import MODELS as MMENGINE_MODELS
from mmdet.registry import MODELS
from torch import Tensor

from .batchnorm_handoff import (BatchNorm2dBeforeCE, attach, batchnorm_affine,
                                only_recording_hooks, take_call)
from .ce_function import channel_equilibrium, eval_after_affine


def _all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum of ``tensor`` over the default process group (a new tensor)."""
    out = tensor.contiguous().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f'{name} must be an int, got {value!r} '
                        f'({type(value).__name__})')
    if value < minimum:
        raise ValueError(f'{name} must be >= {minimum}, got {value}')
    return int(value)


@MODELS.register_module()
class ChannelEquilibrium(nn.Module):
    """Channel Equilibrium: batch decorrelation mixed with instance
    reweighting by a learned gate. Placed right after a BatchNorm.

    Contract (the published computation, to the letter). For an input ``X`` of
    shape (N, C, H, W), ``G = C / group_size`` groups of ``d = group_size``
    channels:

    * IR branch: ``v[n, c]`` = unbiased variance of ``X[n, c]`` over H*W;
      ``y = sigmoid(fc2(relu(LN(fc1(v)))))``; ``s = sqrt(mean(v))`` over the
      whole batch in training, ``running_scale`` in eval;
      ``ir = X * y[n, c] / s``.
    * BD branch: per group, ``S = eps*I + cov(x_g)`` over the N*H*W positions,
      ``W_g = P_T`` with ``P_0 = I``,
      ``P_{k+1} = 1.5 P_k - 0.5 P_k^3 S / tr(S)``; ``running_wm`` in eval.
      ``bd = W_g @ x_g`` on the *uncentred* input.
    * ``out = sigmoid(gate) * bd + (1 - sigmoid(gate)) * ir``.

    Running buffers follow PyTorch's momentum convention
    (``r = (1 - momentum) * r + momentum * batch_value``), are updated only in
    training mode and never carry autograd history. ``running_scale`` starts
    at 1 and ``running_wm`` at the identity, so an untrained layer is finite
    in eval mode. Where the formula is undefined (H*W == 1, a constant input)
    the result is kept finite by clamping the scale to ``eps`` and the
    variance denominator to 1; wherever the formula is defined the result
    equals it.

    Both branches are applied as one per-sample block-diagonal map
    ``sigmoid(gate) * W_g + (1 - sigmoid(gate)) * diag(y[n] / s)`` in a single
    pass over ``X``; the backward keeps only the input and small tensors
    (see :mod:`ce_mmdet.models.layers.ce_function`). After a BatchNorm
    (:meth:`follow`) it keeps the BN's input instead, may reuse the BN's
    output tensor, and in inference may absorb the BN's pass; the results are
    the same up to rounding. Statistics run in float32
    for half/bfloat16 inputs (also under autocast); the output has the input
    dtype. channels_last inputs give channels_last outputs.

    Args:
        in_channels (int): C. Must be a multiple of ``group_size``.
        group_size (int): channels per whitening group d. Default: 16.
        num_iters (int): Newton iterations T, >= 1. Default: 3.
        reduction (int): hidden width of the IR sub-network is
            ``in_channels // reduction`` (must be >= 1). Default: 4.
        eps (float): covariance ridge, scale floor and LayerNorm eps.
            Default: 1e-5.
        momentum (float): running-average momentum in [0, 1]. Default: 0.1.
        sync (bool): SyncCE. In training under an initialised
            ``torch.distributed`` process group of more than one process, sum
            the batch statistics (per-group sums of x and x x^T with their
            count, and the sum of instance variances) over all processes
            before the Newton iterations, so every process computes the
            whitening matrices and IR scale of the global batch, and sum
            their gradients in backward, as SyncBN does. Uneven per-process
            batch sizes are fine (counts are summed). Without a process group,
            or in eval mode, it is plain CE. Every process must call the layer
            the same number of times per step (as with SyncBN). Default: False.

    Example:
        >>> import torch
        >>> from ce_mmdet.models import ChannelEquilibrium
        >>> ce = ChannelEquilibrium(32, group_size=16)
        >>> x = torch.randn(2, 32, 8, 8)
        >>> ce(x).shape
        torch.Size([2, 32, 8, 8])
        >>> _ = ce.eval()
        >>> bool(torch.isfinite(ce(x)).all())
        True
    """

    _abbr_ = 'ce'
    # version 1: gate, fc1, norm, fc2, running_wm, running_scale
    _version = 1

    def __init__(self,
                 in_channels: int,
                 group_size: int = 16,
                 num_iters: int = 3,
                 reduction: int = 4,
                 eps: float = 1e-5,
                 momentum: float = 0.1,
                 sync: bool = False) -> None:
        super().__init__()
        in_channels = _check_int('in_channels', in_channels, 1)
        group_size = _check_int('group_size', group_size, 1)
        num_iters = _check_int('num_iters', num_iters, 1)
        reduction = _check_int('reduction', reduction, 1)
        if in_channels % group_size != 0:
            raise ValueError(
                f'in_channels ({in_channels}) must be a multiple of '
                f'group_size ({group_size}); groups are never shrunk silently')
        hidden = in_channels // reduction
        if hidden < 1:
            raise ValueError(
                f'reduction={reduction} leaves in_channels // reduction = '
                f'{hidden} hidden units for in_channels={in_channels}; it '
                f'must be <= in_channels')
        if not isinstance(eps, numbers.Real) or not eps > 0:
            raise ValueError(f'eps must be a positive number, got {eps!r}')
        if not isinstance(momentum, numbers.Real) or not 0 <= momentum <= 1:
            raise ValueError(f'momentum must be in [0, 1], got {momentum!r}')
        if not isinstance(sync, bool):
            raise TypeError(f'sync must be a bool, got {sync!r}')
        self.in_channels = in_channels
        self.group_size = group_size
        self.num_groups = in_channels // group_size
        self.num_iters = num_iters
        self.reduction = reduction
        self.eps = float(eps)
        self.momentum = float(momentum)
        self.sync = sync

        self.gate = nn.Parameter(torch.zeros(1))
        self.fc1 = nn.Linear(in_channels, hidden, bias=False)
        self.norm = nn.LayerNorm(hidden, eps=self.eps)
        self.fc2 = nn.Linear(hidden, in_channels, bias=False)
        self.register_buffer(
            'running_wm',
            torch.eye(group_size).repeat(self.num_groups, 1, 1))
        self.register_buffer('running_scale', torch.ones(1))
        self._inplace_after_bn = False

    def follow(self,
               norm: nn.Module,
               inplace: bool = True,
               scope: Optional[nn.Module] = None) -> bool:
        """Declare the BatchNorm whose output is this layer's input.

        Contract: this layer is the *only* consumer of ``norm``'s output
        (``x = norm(z); out = ce(x)`` and ``x`` is used nowhere else), and,
        with a ``scope``, ``norm`` is the only consumer of its input ``z``
        and is followed by this layer whenever it is called inside
        ``scope``'s forward. :class:`CEResNet` and :class:`CEFPN` call it
        for conv -> BN -> CE, with the block as the scope.

        When ``norm`` is a plain ``nn.BatchNorm2d`` (not SyncBN), a forward
        hook on it hands its input to this layer. If this layer's input is
        that BN's output, untouched:

        * backward keeps the BN's input ``z`` (which the BN saves anyway)
          instead of this layer's input, and works on ``z`` and the BN's
          per-channel affine map (:func:`batchnorm_affine`): CE then adds
          no full-size tensor to the activation memory. Gradients equal those
          of the unfused layer up to rounding; the forward is unchanged.
        * with ``inplace`` (default) on CPU, the output is written into the
          BN's output tensor (through a small buffer) instead of a new one,
          unless other forward hooks on ``norm`` could have kept that
          tensor. This saves an activation-sized allocation, which on CPU
          costs more than the layer's arithmetic; the values are the same.
        * with a ``scope``, in inference (BN and CE in eval mode, autograd
          off, inside ``scope``'s forward, no other forward hooks on
          ``norm``, not traced), ``norm`` (made a
          :class:`BatchNorm2dBeforeCE`) skips its pass and this layer
          computes ``CE(BN(z))`` from ``z`` directly (into ``z`` with
          ``inplace`` on CPU). Equal up to rounding.

        Anything else is ignored (returns False) and CE saves its input as
        usual.

        Args:
            norm (nn.Module): the norm layer right before this one.
            inplace (bool): allow reusing the BN's output (and, with a scope,
                input) tensor on CPU.
            scope (nn.Module, optional): the module whose forward runs
                conv -> ``norm`` -> this layer.

        Returns:
            bool: whether ``norm`` is followed.
        """
        if type(norm) not in (nn.BatchNorm2d, BatchNorm2dBeforeCE):
            return False
        if not isinstance(inplace, bool):
            raise TypeError(f'inplace must be a bool, got {inplace!r}')
        if scope is not None and not isinstance(scope, nn.Module):
            raise TypeError(
                f'scope must be an nn.Module, got {type(scope).__name__}')
        self._inplace_after_bn = inplace
        attach(self, norm, scope)
        return True

    def _source_and_inplace(self, call, x: Tensor):
        """(source, inplace) for input ``x``, the output of BN ``call``."""
        if call is None or not x.is_contiguous():
            return None, False
        grad = torch.is_grad_enabled() and x.requires_grad
        source = None
        if grad and call.input.shape == x.shape:
            affine = batchnorm_affine(call.bn, x)
            if affine is not None:
                source = (call.input, ) + affine
        inplace = (self._inplace_after_bn and x.device.type == 'cpu'
                   and not torch.jit.is_tracing()
                   and only_recording_hooks(call.bn)
                   and (source is not None or not grad))
        return source, inplace

    def _params(self) -> tuple:
        """The parameters in the order of :func:`channel_equilibrium`."""
        return (self.gate, self.fc1.weight, self.norm.weight, self.norm.bias,
                self.fc2.weight)

    def reset_running_stats(self) -> None:
        """Identity whitening and unit scale, as at construction."""
        with torch.no_grad():
            self.running_wm.copy_(
                torch.eye(self.group_size).expand_as(self.running_wm))
            self.running_scale.fill_(1)

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f'expected a Tensor, got {type(x).__name__}')
        if x.dim() != 4:
            raise ValueError(f'expected a 4-D (N, C, H, W) input, got shape '
                             f'{tuple(x.shape)}')
        if x.shape[1] != self.in_channels:
            raise ValueError(f'expected {self.in_channels} channels, got '
                             f'{x.shape[1]} (input shape {tuple(x.shape)})')
        if not x.is_floating_point():
            raise TypeError(f'expected a floating point input, got {x.dtype}')

    def forward(self, x: Tensor) -> Tensor:
        """Apply CE. Returns a tensor of the shape and dtype of ``x``."""
        self._check_input(x)
        if x.numel() == 0:
            return x.clone()
        channels_last = (not x.is_contiguous()
                         and x.is_contiguous(memory_format=torch.channels_last))
        params = self._params()
        reduce_fn = None
        if self.sync and self.training and dist.is_available() and \
                dist.is_initialized() and dist.get_world_size() > 1:
            reduce_fn = _all_reduce_sum
        call = take_call(x)
        if call is not None and call.absorbed:
            return self._forward_absorbed(call.bn, x)
        source, inplace = self._source_and_inplace(call, x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            out = channel_equilibrium(
                x.contiguous(), params, self.running_wm, self.running_scale,
                self.group_size, self.num_iters, self.eps, self.momentum,
                self.training, reduce_fn, source, inplace)
        if channels_last:
            out = out.contiguous(memory_format=torch.channels_last)
        return out

    def _forward_absorbed(self, bn: nn.BatchNorm2d, z: Tensor) -> Tensor:
        """Inference ``CE(bn(z))`` from ``z`` (see :meth:`follow`)."""
        alpha, beta = batchnorm_affine(bn, z)
        params = self._params()
        inplace = self._inplace_after_bn and z.device.type == 'cpu'
        with torch.autocast(device_type=z.device.type, enabled=False):
            return eval_after_affine(z, alpha, beta, params, self.running_wm,
                                     self.running_scale, self.group_size,
                                     self.eps, inplace)

    def extra_repr(self) -> str:
        return (f'{self.in_channels}, group_size={self.group_size}, '
                f'num_groups={self.num_groups}, num_iters={self.num_iters}, '
                f'reduction={self.reduction}, eps={self.eps}, '
                f'momentum={self.momentum}, sync={self.sync}')


# mmcv's build_plugin_layer looks the type up in mmengine's root registry
# unless the default scope is 'mmdet'; register there too so that
# ``plugins=[dict(cfg=dict(type='ChannelEquilibrium'), ...)]`` works in plain
# Python as well as in mmdet configs.
MMENGINE_MODELS.register_module(module=ChannelEquilibrium)
