"""The functional CE ops: ``channel_equilibrium`` and
``batchnorm_channel_equilibrium`` (a plain BatchNorm followed by CE, as one
op).

These entries own what is the same for every implementation: argument
checks, the running-state updates (CE's running whitening matrices and
scale, the BN's ``num_batches_tracked`` and momentum), and the choice of the
implementation (:func:`ce_mmdet.ops.impl.resolve_impl`); the arithmetic is
in the autograd Functions (:mod:`ce_mmdet.ops.functions`) and the
implementation of their big passes (:mod:`ce_mmdet.ops.torch_impl`,
:mod:`ce_mmdet.ops.triton_impl`).
"""
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from ..utils.torch_version import compiles_ce
from . import functions
from .export import exporting, traces_sizes
from .impl import passes_for
from .types import BatchNormArgs, CEConfig, CEParams, CEState


def _check_input(x: Tensor, state: CEState, config: CEConfig) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f'expected a Tensor, got {type(x).__name__}')
    if x.dim() != 4 or not x.is_contiguous():
        raise ValueError('expected a contiguous 4-D (N, C, H, W) input, got '
                         f'shape {tuple(x.shape)}, strides {x.stride()}')
    if not x.is_floating_point():
        raise TypeError(f'expected a floating point input, got {x.dtype}')
    if traces_sizes():
        return
    g, d = state.running_wm.shape[:2]
    if d != config.group_size or x.shape[1] != g * d:
        raise ValueError(
            f'input has {x.shape[1]} channels; running_wm '
            f'{tuple(state.running_wm.shape)} '
            f'and group_size={config.group_size} need {g * d}')


class Epilogue(NamedTuple):
    """A residual block's tail, ``relu(out + residual)``, split into the
    part the op applies in its own pass over the feature map and the part
    applied after it (:meth:`finish`).

    The op reads a residual itself when it is NCHW-contiguous with the
    op's dtype; any other is added after the op (``out += residual``, then
    ReLU), as a residual block would add it.
    """
    residual: Optional[Tensor]  # read by the op
    relu: bool  # applied by the op
    late_residual: Optional[Tensor]  # added after the op
    late_relu: bool

    @classmethod
    def of(cls, x: Tensor, residual: Optional[Tensor], relu: bool,
           fuse: bool = True) -> 'Epilogue':
        """Checks ``residual`` (a Tensor of the shape and device of ``x``,
        or None) and ``relu`` (a bool); ``fuse=False``: all after the op."""
        if not isinstance(relu, bool):
            raise TypeError(f'relu must be a bool, got {relu!r}')
        if residual is not None:
            if not isinstance(residual, Tensor):
                raise TypeError('residual must be a Tensor or None, got '
                                f'{type(residual).__name__}')
            if residual.device != x.device or (
                    not traces_sizes() and residual.shape != x.shape):
                raise ValueError(
                    f'residual must have the shape and device of the input '
                    f'{tuple(x.shape)} on {x.device}, got '
                    f'{tuple(residual.shape)} on {residual.device}')
            fuse = fuse and residual.dtype == x.dtype and \
                residual.is_contiguous()
        if fuse:
            return cls(residual, relu, None, False)
        return cls(None, False, residual, relu)

    def finish(self, out: Tensor) -> Tensor:
        """What the op left to do: ``out += late_residual``, then ReLU (in
        place: ``out`` is the op's own result)."""
        if self.late_residual is not None:
            out += self.late_residual
        return out.relu_() if self.late_relu else out


def _needs_grad(*tensors: Optional[Tensor]) -> bool:
    """Whether autograd will call the op's backward (never while exporting:
    a graph of standard ops, :mod:`ce_mmdet.ops.export`)."""
    return torch.is_grad_enabled() and any(
        t is not None and t.requires_grad
        for t in tensors) and not exporting()


def _update_running_state(state: CEState, wm: Tensor, scale: Tensor,
                          config: CEConfig) -> None:
    if config.momentum > 0:
        with torch.no_grad():
            state.running_wm.lerp_(wm.to(state.running_wm.dtype),
                                   config.momentum)
            state.running_scale.lerp_(scale.to(state.running_scale.dtype),
                                      config.momentum)


def _op_call(x: Tensor, config: CEConfig, training: bool, reduce_fn,
             inplace: bool, impl: str, differentiable, hidden: int,
             relu: bool, **bn) -> functions.OpCall:
    return functions.OpCall(
        config=config,
        training=bool(training),
        passes=passes_for(impl, x, (x.shape[1], config.group_size,
                                    hidden, config.num_iters, x.shape[0])),
        reduce_fn=reduce_fn if training else None,
        # under torch.compile no writes into the input (dynamo does not trace
        # an autograd.Function's mark_dirty; inductor plans memory itself),
        # nor while exporting (:mod:`ce_mmdet.ops.export`)
        inplace=bool(inplace) and not torch.compiler.is_compiling()
        and not exporting(),
        needs_grad=_needs_grad(x, *differentiable),
        relu=relu,
        **bn)


def channel_equilibrium(x: Tensor,
                        params: CEParams,
                        state: CEState,
                        *,
                        config: CEConfig,
                        training: bool,
                        reduce_fn: Optional[Callable[[Tensor],
                                                     Tensor]] = None,
                        inplace: bool = False,
                        impl: str = 'auto',
                        residual: Optional[Tensor] = None,
                        relu: bool = False) -> Tensor:
    """Channel Equilibrium of a contiguous (N, C, H, W) tensor, optionally
    followed by a residual addition and a ReLU:
    ``relu(CE(x) + residual)``.

    The published computation (see
    :class:`~ce_mmdet.models.layers.ChannelEquilibrium` for the formulas);
    statistics in float32 (float64 for float64 inputs), output in the input
    dtype.

    Args:
        x (Tensor): NCHW-contiguous input, C = G * d.
        params (CEParams): the learned parameters.
        state (CEState): the running state; updated in place in training.
        config (CEConfig): group size, Newton iterations, eps, momentum.
        training (bool): batch statistics (and running-state update) or the
            running state.
        reduce_fn (callable, optional): sums a small statistics tensor over
            processes (SyncCE), in forward and, for their gradient, in
            backward.
        inplace (bool): the caller does not read ``x`` afterwards; the
            implementation may then write the result into ``x`` when
            autograd does not need ``x`` (inference). A permission, not a
            demand: check the returned tensor, not ``x``.
        impl (str): ``'auto'``, ``'torch'`` or ``'triton'``
            (:func:`~ce_mmdet.ops.impl.resolve_impl`).
        residual (Tensor, optional): added to CE's result (a residual
            block's identity), shape and device of ``x``: in the map's own
            pass over the feature map (NCHW-contiguous, the dtype of
            ``x``; any other is added after the op, as ``out +=
            residual``: :class:`Epilogue`). Its gradient is the
            output's, through the ReLU.
        relu (bool): ReLU of the result (after ``residual``), in the same
            pass; with autograd the output is saved for its backward (as a
            ReLU module would save it). Default: False.

    Returns:
        Tensor: same shape and dtype as ``x``.

    Example:
        >>> import torch
        >>> from ce_mmdet.ops import CEConfig, CEParams, CEState
        >>> from ce_mmdet.ops import channel_equilibrium
        >>> c, d = 32, 16
        >>> params = CEParams(torch.zeros(1), torch.randn(8, c),
        ...                   torch.ones(8), torch.zeros(8), torch.randn(c, 8))
        >>> state = CEState(torch.eye(d).repeat(c // d, 1, 1), torch.ones(1))
        >>> out = channel_equilibrium(torch.randn(2, c, 5, 5), params, state,
        ...                           config=CEConfig(group_size=d),
        ...                           training=True)
        >>> out.shape
        torch.Size([2, 32, 5, 5])
    """
    _check_input(x, state, config)
    tail = Epilogue.of(x, residual, relu)
    call = _op_call(x, config, training, reduce_fn, inplace, impl,
                    params + (tail.residual, ), params.fc1_weight.shape[0],
                    tail.relu)
    out, wm, scale = functions.channel_equilibrium(x, params, state, call,
                                                   tail.residual)
    if training:
        _update_running_state(state, wm, scale, config)
    return tail.finish(out)


def batchnorm_channel_equilibrium(z: Tensor,
                                  bn: BatchNormArgs,
                                  params: CEParams,
                                  state: CEState,
                                  *,
                                  config: CEConfig,
                                  training: bool,
                                  reduce_fn: Optional[Callable[[Tensor],
                                                               Tensor]] = None,
                                  inplace: bool = False,
                                  impl: str = 'auto',
                                  residual: Optional[Tensor] = None,
                                  relu: bool = False,
                                  bn_reduce_fn: Optional[Callable[
                                      [Tensor], Tensor]] = None) -> Tensor:
    """``CE(BN(z))`` as one op, for a plain BatchNorm (optionally
    ``relu(CE(BN(z)) + residual)``, a residual block's tail), or a SyncBN
    across processes (``bn_reduce_fn``).

    Equal (up to rounding) to ``channel_equilibrium(F.batch_norm(z, ...))``,
    and the BN's running statistics and ``num_batches_tracked`` are updated
    exactly as ``nn.BatchNorm2d.forward`` updates them (momentum, or the
    cumulative average for ``momentum=None``; unbiased variance; nothing
    without running statistics or in eval mode). What the fusion buys:
    backward keeps only ``z`` (which a BN keeps anyway), and with the BN in
    eval mode and CE in eval mode the BN's pass is not made at all (see
    :mod:`ce_mmdet.ops.torch_impl`).

    Args:
        z (Tensor): the BN's NCHW-contiguous input.
        bn (BatchNormArgs): the BN's tensors and settings
            (``BatchNormArgs.from_module(bn)``).
        params, state: as for :func:`channel_equilibrium`.
        config, training, reduce_fn, impl: as for
            :func:`channel_equilibrium` (``training`` is CE's mode; the BN's
            is ``bn.training``).
        inplace (bool): the caller does not read ``z`` afterwards (it is a
            convolution's output that only this op reads); the result may
            then be written into ``z`` when autograd does not need it.
        residual, relu: as for :func:`channel_equilibrium`.
        bn_reduce_fn (callable, optional): sums a small tensor over the
            processes of a SyncBN (its process group), with batch
            statistics in the BN and CE (``bn.uses_batch_stats`` and
            ``training``) only: the BN's statistics are then the global
            batch's (one call on its per-channel sums and count), and in
            backward its gradient sums are summed too (one call); the
            BN's weight and bias gradients stay this process's, as
            SyncBN's. Default: None (the BN's statistics are this
            process's batch's).

    Returns:
        Tensor: same shape and dtype as ``z``.

    Example:
        >>> import torch
        >>> from ce_mmdet.ops import (BatchNormArgs, CEConfig, CEParams,
        ...                           CEState, batchnorm_channel_equilibrium,
        ...                           channel_equilibrium)
        >>> c, d = 32, 16
        >>> params = CEParams(torch.zeros(1), torch.randn(8, c),
        ...                   torch.ones(8), torch.zeros(8), torch.randn(c, 8))
        >>> def new_state():
        ...     return CEState(torch.eye(d).repeat(c // d, 1, 1),
        ...                    torch.ones(1))
        >>> bn, z = torch.nn.BatchNorm2d(c), torch.randn(2, c, 5, 5)
        >>> fused = batchnorm_channel_equilibrium(
        ...     z, BatchNormArgs.from_module(bn), params, new_state(),
        ...     config=CEConfig(group_size=d), training=True)
        >>> int(bn.num_batches_tracked)  # the BN's bookkeeping, as bn(z)'s
        1
        >>> plain = channel_equilibrium(bn(z), params, new_state(),
        ...                             config=CEConfig(group_size=d),
        ...                             training=True)
        >>> torch.allclose(fused, plain, rtol=1e-4, atol=1e-5)
        True
    """
    _check_input(z, state, config)
    tail = Epilogue.of(z, residual, relu)
    if not isinstance(bn, BatchNormArgs):
        raise TypeError('bn must be a BatchNormArgs (BatchNormArgs.'
                        f'from_module(module)), got {type(bn).__name__}')
    for name in ('weight', 'bias', 'running_mean', 'running_var'):
        t = getattr(bn, name)
        if t is not None and not traces_sizes() and \
                t.shape != (z.shape[1], ):
            raise ValueError(f'BN {name} has shape {tuple(t.shape)}, '
                             f'expected ({z.shape[1]},)')
    batch_stats = bn.uses_batch_stats
    if bn_reduce_fn is not None and not (batch_stats and training):
        raise ValueError(
            'bn_reduce_fn (a SyncBN across processes) needs batch statistics '
            f'in the BN and CE; got the BN with batch statistics: '
            f'{batch_stats}, CE training: {training}')
    if batch_stats and bn_reduce_fn is None and \
            z.shape[0] * z.shape[2] * z.shape[3] == 1:
        # what F.batch_norm (and so nn.BatchNorm2d) says (a SyncBN across
        # processes takes one value here: the count is global)
        raise ValueError('Expected more than 1 value per channel when '
                         f'training, got input size {z.size()}')
    if not batch_stats and (bn.running_mean is None
                            or bn.running_var is None):
        raise ValueError('a BN in eval mode needs both running_mean and '
                         'running_var (or neither)')
    # nn.BatchNorm2d.forward's bookkeeping, before its batch_norm call
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.num_batches_tracked is not None and \
            bn.running_mean is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            factor = 1.0 / float(bn.num_batches_tracked)
    call = _op_call(z, config, training, reduce_fn, inplace, impl,
                    (bn.weight, bn.bias, tail.residual) + tuple(params),
                    params.fc1_weight.shape[0], tail.relu,
                    bn_batch_stats=batch_stats, bn_momentum=float(factor),
                    bn_eps=float(bn.eps), bn_reduce_fn=bn_reduce_fn)
    bn_tensors = (bn.weight, bn.bias, bn.running_mean, bn.running_var)
    out, wm, scale, batch_mean, batch_var = \
        functions.batchnorm_channel_equilibrium(z, bn_tensors, params, state,
                                                call, tail.residual)
    if batch_stats and batch_mean.numel() and bn.running_mean is not None:
        # the op computed the BN's batch statistics itself (never without
        # batch_stats): the running update of native_batch_norm
        # (r + m (x - r), one launch)
        with torch.no_grad():
            running = [bn.running_mean, bn.running_var]
            torch._foreach_lerp_(running, [
                batch_mean.to(running[0].dtype),
                batch_var.to(running[1].dtype)
            ], factor)
    if training:
        _update_running_state(state, wm, scale, config)
    return tail.finish(out)


if not compiles_ce(torch.__version__):
    # an older dynamo fails on CE's Function (ce_mmdet.utils.torch_version):
    # a compiled model runs these two ops eagerly, between its graphs
    channel_equilibrium = torch.compiler.disable(channel_equilibrium)
    batchnorm_channel_equilibrium = torch.compiler.disable(
        batchnorm_channel_equilibrium)
