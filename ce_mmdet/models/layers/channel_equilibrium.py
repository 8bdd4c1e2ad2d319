"""Channel Equilibrium (CE) layer, Shao et al., ICML 2020."""
import functools
from contextlib import nullcontext
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from mmengine.registry import MODELS as MMENGINE_MODELS
from mmdet.registry import MODELS
from torch import Tensor

from ...ops import (BatchNormArgs, CEConfig, CEParams, CEState, Epilogue,
                    batchnorm_channel_equilibrium, channel_equilibrium,
                    check_impl, is_plain_batchnorm, is_sync_batchnorm)
from ...ops.export import traces_sizes
from ...ops.types import check_int


def _all_reduce_sum(tensor: Tensor, group=None) -> Tensor:
    """Sum of ``tensor`` over ``group`` (default: the default process
    group), a new tensor."""
    out = tensor.contiguous().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


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

    **BN + CE as one op.** ``ce(z, bn=norm)`` computes ``ce(norm(z))``; when
    ``norm`` is a plain ``nn.BatchNorm2d`` (or mmengine's ``_BatchNormXd``,
    what its runner makes of a SyncBN in one process, or a SyncBN that does
    not synchronise in this call: eval mode, one process;
    :func:`ce_mmdet.ops.is_plain_batchnorm`) it does so with one fused op
    (:func:`ce_mmdet.ops.batchnorm_channel_equilibrium`): the BN is applied
    inside it, its running statistics and ``num_batches_tracked`` are
    updated exactly as ``nn.BatchNorm2d`` updates them, backward keeps only
    ``z`` (the tensor the BN keeps anyway), and in eval mode the BN's pass
    is folded into CE's. A SyncBN in training across processes
    (:func:`ce_mmdet.ops.is_sync_batchnorm`) is fused as well while CE is
    in training, with its batch statistics and their gradient sums summed
    over its process group, as ``nn.SyncBatchNorm`` sums them (CPU tensors
    too). Forward hooks and pre-hooks registered on ``norm`` do **not** run
    on this path (``norm`` is not called as a module); any other norm (a
    SyncBN in training before CE in eval mode, GN, ``nn.Identity`` after
    mmcv's ``fuse_conv_bn``...) is called as a module and CE follows it.
    :class:`~ce_mmdet.models.CEResNet` and :class:`~ce_mmdet.models.CEFPN`
    call their CE layers this way. ``ce(z, bn=norm, residual=identity,
    relu=True)`` is a residual block's tail, ``relu(ce(norm(z)) +
    identity)``, with the sum and the ReLU made in the op's own pass over
    the feature map (CE-ResNet's blocks and stem call it so).

    Statistics run in float32 for half/bfloat16 inputs (also under
    autocast); the output has the input dtype. channels_last inputs give
    channels_last outputs.

    Gradients are first derivatives, by a hand-derived backward. A second
    derivative through the layer (``create_graph=True``: a gradient
    penalty, a Hessian-vector product) raises ``RuntimeError`` when
    autograd reaches it; the ``create_graph=True`` gradients themselves are
    the usual ones.

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
        impl (str): implementation of the op: ``'auto'``, ``'torch'`` or
            ``'triton'`` (:func:`ce_mmdet.ops.resolve_impl`; the environment
            variable ``CE_MMDET_IMPL`` overrides it). Default: ``'auto'``.

    Example:
        >>> import torch
        >>> from ce_mmdet.models import ChannelEquilibrium
        >>> ce = ChannelEquilibrium(32, group_size=16)
        >>> x = torch.randn(2, 32, 8, 8)
        >>> ce(x).shape
        torch.Size([2, 32, 8, 8])
        >>> bn = torch.nn.BatchNorm2d(32)
        >>> ce(x, bn=bn).shape  # ce(bn(x)), one op
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
                 sync: bool = False,
                 impl: str = 'auto') -> None:
        super().__init__()
        in_channels = check_int('in_channels', in_channels, 1)
        reduction = check_int('reduction', reduction, 1)
        config = CEConfig(group_size, num_iters, eps, momentum)
        if in_channels % config.group_size != 0:
            raise ValueError(
                f'in_channels ({in_channels}) must be a multiple of '
                f'group_size ({group_size}); groups are never shrunk silently')
        hidden = in_channels // reduction
        if hidden < 1:
            raise ValueError(
                f'reduction={reduction} leaves in_channels // reduction = '
                f'{hidden} hidden units for in_channels={in_channels}; it '
                f'must be <= in_channels')
        if not isinstance(sync, bool):
            raise TypeError(f'sync must be a bool, got {sync!r}')
        self.config = config
        self.in_channels = in_channels
        self.num_groups = in_channels // config.group_size
        self.reduction = reduction
        self.sync = sync
        self.impl = check_impl(impl)

        self.gate = nn.Parameter(torch.zeros(1))
        self.fc1 = nn.Linear(in_channels, hidden, bias=False)
        self.norm = nn.LayerNorm(hidden, eps=config.eps)
        self.fc2 = nn.Linear(hidden, in_channels, bias=False)
        self.register_buffer(
            'running_wm',
            torch.eye(config.group_size).repeat(self.num_groups, 1, 1))
        self.register_buffer('running_scale', torch.ones(1))

    # the settings, read from the one config object
    group_size = property(lambda self: self.config.group_size)
    num_iters = property(lambda self: self.config.num_iters)
    eps = property(lambda self: self.config.eps)

    @property
    def momentum(self) -> float:
        return self.config.momentum

    @momentum.setter
    def momentum(self, value: float) -> None:
        self.config = CEConfig(self.group_size, self.num_iters, self.eps,
                               value)

    def ce_params(self) -> CEParams:
        """The parameters, as the op takes them."""
        return CEParams(self.gate, self.fc1.weight, self.norm.weight,
                        self.norm.bias, self.fc2.weight)

    def ce_state(self) -> CEState:
        """The running state, as the op takes it (updated in place)."""
        return CEState(self.running_wm, self.running_scale)

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
        if not traces_sizes() and x.shape[1] != self.in_channels:
            raise ValueError(f'expected {self.in_channels} channels, got '
                             f'{x.shape[1]} (input shape {tuple(x.shape)})')
        if not x.is_floating_point():
            raise TypeError(f'expected a floating point input, got {x.dtype}')

    def _reduce_fn(self):
        if self.sync and self.training and dist.is_available() and \
                dist.is_initialized() and dist.get_world_size() > 1:
            return _all_reduce_sum
        return None

    def forward(self,
                x: Tensor,
                bn: Optional[nn.Module] = None,
                *,
                inplace: bool = False,
                residual: Optional[Tensor] = None,
                relu: bool = False) -> Tensor:
        """``CE(x)``, or ``CE(bn(x))`` with a norm layer ``bn``; with
        ``residual`` and ``relu``, ``relu(CE(bn(x)) + residual)``: a
        residual block's tail in the same op.

        Args:
            x (Tensor): (N, C, H, W) input; with ``bn``, the norm's input.
            bn (nn.Module, optional): the norm layer right before CE. A plain
                ``nn.BatchNorm2d`` (:func:`ce_mmdet.ops.is_plain_batchnorm`),
                or a SyncBN with CE in training, is applied inside the fused
                op (its hooks do not run; see the class doc); any other
                module is called.
            inplace (bool): the caller does not read ``x`` after this call
                (for example a convolution output only this layer reads);
                the result may then be written into ``x``'s storage where
                autograd does not need ``x``. Default: False.
            residual (Tensor, optional): added to the result (the block's
                identity), the shape of ``x``, in the op's own pass over
                the feature map (on CPU chunk by chunk while it is in
                cache; see :func:`ce_mmdet.ops.channel_equilibrium`).
                Default: None.
            relu (bool): ReLU of the result (after ``residual``), in the
                same pass. Default: False.

        Returns:
            Tensor: the shape and dtype of ``x``.
        """
        bn_reduce_fn = None
        if bn is not None and not is_plain_batchnorm(bn):
            if self.training and is_sync_batchnorm(bn):
                # a SyncBN that synchronises (else it is plain), with CE's
                # batch statistics: folded, its moments summed over its
                # process group
                bn_reduce_fn = functools.partial(_all_reduce_sum,
                                                 group=bn.process_group)
            else:
                x, bn = bn(x), None
        self._check_input(x)
        if bn is not None:
            bn._check_input_dim(x)  # what its class adds to its forward
        if not traces_sizes() and x.numel() == 0:  # (empty: never traced)
            out = (x if bn is None else bn(x)).clone()
            return Epilogue.of(x, residual, relu, fuse=False).finish(out)
        channels_last = (
            not x.is_contiguous()
            and x.is_contiguous(memory_format=torch.channels_last))
        if not x.is_contiguous():
            x, inplace = x.contiguous(), True  # our own copy
        kwargs = dict(config=self.config, training=self.training,
                      reduce_fn=self._reduce_fn(), inplace=inplace,
                      impl=self.impl, residual=residual, relu=relu)
        # the op casts itself (statistics in float32, output in x's dtype);
        # no autocast context where autocast is off (its cost is that of a
        # few small ops)
        device = x.device.type
        with (torch.autocast(device_type=device, enabled=False)
              if torch.is_autocast_enabled(device) else nullcontext()):
            if bn is None:
                out = channel_equilibrium(x, self.ce_params(),
                                          self.ce_state(), **kwargs)
            else:
                out = batchnorm_channel_equilibrium(
                    x, BatchNormArgs.from_module(bn), self.ce_params(),
                    self.ce_state(), bn_reduce_fn=bn_reduce_fn, **kwargs)
        if channels_last:
            out = out.contiguous(memory_format=torch.channels_last)
        return out

    def extra_repr(self) -> str:
        return (f'{self.in_channels}, group_size={self.group_size}, '
                f'num_groups={self.num_groups}, num_iters={self.num_iters}, '
                f'reduction={self.reduction}, eps={self.eps}, '
                f'momentum={self.momentum}, sync={self.sync}, '
                f'impl={self.impl!r}')


# mmcv's build_plugin_layer looks the type up in mmengine's root registry
# unless the default scope is 'mmdet'; register there too so that
# ``plugins=[dict(cfg=dict(type='ChannelEquilibrium'), ...)]`` works in plain
# Python as well as in mmdet configs.
MMENGINE_MODELS.register_module(module=ChannelEquilibrium)
