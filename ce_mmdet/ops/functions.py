"""The CE ops as private autograd Functions, independent of how the big
passes over the feature map are computed (``call.passes``: PyTorch GEMMs,
:class:`~ce_mmdet.ops.torch_impl.TorchPasses`, or Triton kernels,
:class:`~ce_mmdet.ops.triton_impl.TritonPasses`).

* :class:`_CEFunction`, CE on its input ``X``:

  - forward: per-sample channel means and per-sample group Gram matrices
    ``Q[n, g] = X[n, g] X[n, g]^T`` (training) or per-sample variances
    (eval), then the small graph (:mod:`ce_mmdet.ops.small_graph`) gives the
    per-sample block-diagonal map ``A = sig(a) W + (1 - sig(a)) diag(y /
    s)``, and ``out[n, g] = A[n, g] X[n, g]``;
  - backward: ``dA = dout X^T``, the small graph's hand-derived backward
    maps ``dA`` onto the statistics and the parameters, then ``dX = A^T
    dout + S X + b`` in one pass. Only the input and small tensors are
    saved (and, with the block tail's ReLU, the output: below).

* :class:`_BNCEFunction`, ``CE(BN(Z))`` for a plain BatchNorm: the BN is
  applied inside the op, and only the BN's input ``Z`` is saved (the tensor
  a BN saves anyway), with the BN's per-channel affine map
  ``X = alpha Z + beta``:

  - BN with batch statistics and CE in training, with an implementation
    that folds it (``passes.fuses_batch_bn``: both do): no BN pass.
    One statistics pass over ``Z`` (per-sample means and Gram matrices)
    gives the BN's batch mean and variance and, through the affine map,
    CE's statistics of ``X``; the output is ``(A diag(alpha)) Z + A beta``
    in one pass; backward folds the BN's backward into the maps of ``dZ =
    M1 dout + M2 Z + c`` (it needs only per-channel sums of ``dX`` and
    ``dX Z``, which follow from ``dout Z^T``, ``dout 1`` and ``Z``'s
    statistics): one reduction pass and one pass writing ``dZ``, the passes
    a BN alone makes. A SyncBN across processes is folded here too
    (``call.bn_reduce_fn``): the BN's per-channel sums and count are summed
    over its processes before its statistics are formed, and in backward
    its gradient sums before ``dZ``'s maps;
  - otherwise, BN with batch statistics (or CE in training): the BN's pass by
    ``torch.native_batch_norm`` (which updates its running statistics as
    ``nn.BatchNorm2d`` does), CE on ``X``, written into ``X`` itself where
    the implementation does that (``X`` is the op's own temporary);
    backward works on ``Z`` (``dout X^T = (dout Z^T) diag(alpha) + (dout 1)
    beta^T``, likewise ``S X``) and ends with
    ``aten.native_batch_norm_backward``;
  - BN with running statistics and CE in eval (inference, and detection
    training with ``norm_eval=True``): no BN pass at all. The variances of
    ``X`` are ``alpha^2`` those of ``Z``, and ``A X = (A diag(alpha)) Z + A
    beta``: one statistics pass over ``Z`` and one pass with a bias (into
    ``Z`` itself when the caller allows it and autograd does not need
    ``Z``). Its backward gives ``dZ`` in one pass with the maps scaled by
    ``alpha``, and the BN's weight and bias gradients from small tensors
    (``sum dX`` and ``sum dX Z`` per channel follow from ``dout Z^T`` and
    ``Z``'s variances), without materialising ``dX``.

Where autograd has nothing to record (``call.needs_grad`` False: inference,
a frozen stage) the entries run the same forward bodies (:func:`_ce_forward`,
:func:`_bnce_forward`) without the autograd Function, whose own host time is
~10% of an inference layer's on the Triton path, and the implementation
leaves out what only the backward reads (``forward_map(..., keep=False)``).
While ``torch.compile`` or ``torch.jit`` traces, the Functions run (one
graph; one node for the FLOP analyser), except in an export (ONNX or
``torch.export``: standard ops only, :mod:`ce_mmdet.ops.export`).

Both ops may end a residual block, ``relu(CE(...) + identity)``: the
``residual`` input and ``call.relu`` are applied in the map's own pass
(``passes.apply(..., residual, relu)``), not in passes of their own over
the feature map. With autograd the ReLU's backward is the first step of
the op's (the output is saved, as the ReLU would save it, and
``threshold_backward`` masks ``dout``), and that masked gradient is also
the residual's.

Both backwards are first derivatives only (:func:`_first_derivative_only`):
a second derivative through a CE op (``create_graph=True``: a gradient
penalty, a Hessian-vector product) raises ``RuntimeError`` where autograd
reaches the op's gradients, never a number that leaves out CE's terms.

Statistics, Gram matrices and Newton iterations run in float32 (float64 for
float64 inputs) whatever the input dtype; outputs have the input dtype.
"""
import functools
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .export import exporting
from .small_graph import compute_dtype
from .torch_impl import BatchBNStats, BNAffine, bn_affine
from .types import CEConfig, CEParams, CEState

#: A function that sums small statistic tensors over processes (SyncCE).
ReduceFn = Optional[Callable[[Tensor], Tensor]]

_NUM_PARAMS = len(CEParams._fields)
_NUM_STATE = len(CEState._fields)


@dataclass(frozen=True)
class OpCall:
    """The non-tensor arguments of one CE op call.

    Attributes:
        config (CEConfig): the layer's settings.
        training (bool): CE uses batch statistics.
        passes: the implementation of the big passes
            (``TorchPasses`` or ``TritonPasses``).
        reduce_fn (callable, optional): SyncCE's sum over processes.
        inplace (bool): the caller does not read the op's input afterwards;
            used only where autograd does not need that input either.
        needs_grad (bool): autograd will call backward.
        bn_batch_stats (bool): the BN (if any) normalises by batch
            statistics.
        bn_momentum (float): the BN's running-average factor for this call.
        bn_eps (float): the BN's eps.
        relu (bool): the op ends with a ReLU (after the residual, if any).
        bn_reduce_fn (callable, optional): a SyncBN's sum over its
            processes (its batch moments, and their gradient sums), with
            ``bn_batch_stats`` and ``training`` only.
    """
    config: CEConfig
    training: bool
    passes: Any
    reduce_fn: ReduceFn = None
    inplace: bool = False
    needs_grad: bool = False
    bn_batch_stats: bool = False
    bn_momentum: float = 0.0
    bn_eps: float = 1e-5
    relu: bool = False
    bn_reduce_fn: ReduceFn = None


def _forward_map(x: Tensor, params: CEParams, state: CEState, call: OpCall,
                 affine=None):
    """The statistics of ``x`` (or of ``alpha x + beta`` with ``affine``)
    and the small graph: ``call.passes.forward_map`` (the intermediates
    only the backward reads are made where autograd will call it)."""
    return call.passes.forward_map(x, params, state, call.config,
                                   call.training, call.reduce_fn, affine,
                                   keep=call.needs_grad)


def _as_function(call: OpCall) -> bool:
    """Whether the op runs as its autograd Function: autograd will call its
    backward, or dynamo (``torch.compile``: one graph) or torch.jit
    (mmengine's FLOP analyser, which counts the Function's node by
    :mod:`ce_mmdet.analysis.flops`' rules) traces it, unless for an export
    (ONNX or ``torch.export``: :mod:`ce_mmdet.ops.export`)."""
    return call.needs_grad or (
        (torch.compiler.is_compiling() or torch.jit.is_tracing())
        and not exporting())


def _cache_to_keep(result, call: OpCall):
    """The small graph's intermediates for the backward (this op's own
    tensors, never an input or output)."""
    cache = result.cache
    if not call.training:
        # in eval the cache's wm may be the running buffer itself, which
        # a later training call moves: keep a (small) copy
        cache = cache._replace(wm=cache.wm.clone())
    return cache


class _Saved(NamedTuple):
    """What a forward leaves for its backward (autograd only)."""
    tensors: tuple
    cache: Any
    mode: str = ''
    bias_dtype: Optional[torch.dtype] = None


def _finish_forward(ctx, call: OpCall, inp: Tensor, out: Tensor,
                    saved: Optional[_Saved], statistics) -> None:
    """An autograd Function's bookkeeping after a forward body: the input
    written in place, the statistics outputs, what the backward needs."""
    if out is inp:
        ctx.mark_dirty(inp)
    ctx.mark_non_differentiable(*statistics)
    # no zero-filled gradients for the statistics outputs
    ctx.set_materialize_grads(False)
    if saved is not None:
        # the output after a ReLU, for the ReLU's backward (as the ReLU
        # itself would keep it)
        ctx.save_for_backward(*saved.tensors, out if call.relu else None)
        ctx.call, ctx.cache = call, saved.cache
        ctx.mode, ctx.bias_dtype = saved.mode, saved.bias_dtype


def _outputs_without_autograd(inp: Tensor, out: Tensor, statistics,
                              dtype: torch.dtype) -> Tuple[Tensor, ...]:
    """A forward body's outputs where no autograd Function runs: the
    statistics not computed (None) are one empty tensor, and an input
    written in place is marked modified, as ``mark_dirty`` would."""
    if out is inp:
        torch.autograd.graph.increment_version(inp)
    empty = None
    if any(t is None for t in statistics):
        empty = inp.new_empty(0, dtype=dtype)
    return (out, ) + tuple(empty if t is None else t for t in statistics)


def _distinct_empties(inp: Tensor, statistics,
                      dtype: torch.dtype) -> Tuple[Tensor, ...]:
    """The statistics outputs of an autograd Function: one empty tensor for
    each not computed (distinct: dynamo does not trace a tensor returned
    twice)."""
    return tuple(inp.new_empty(0, dtype=dtype) if t is None else t
                 for t in statistics)


def _tail_grad(grad_out: Tensor, out: Optional[Tensor]) -> Tensor:
    """dL/d(the sum before the ReLU) from dL/d(out) (``out``: the saved
    output after a ReLU, or None without one), contiguous: the gradient
    of CE's result and of the residual."""
    grad_out = grad_out.contiguous()
    if out is None:
        return grad_out
    return torch.ops.aten.threshold_backward(grad_out, out, 0)


def _backward_maps(ctx, grad_out: Tensor, kept: Tensor, a: Tensor,
                   params: CEParams, call: OpCall, need_params, affine=None,
                   fold=None):
    """``call.passes.backward_maps`` with this call's cache."""
    maps = call.passes.backward_maps(grad_out, kept, a, ctx.cache, params,
                                     call.config, call.training,
                                     call.reduce_fn, affine, fold)
    return _only_needed(maps, need_params)


def _only_needed(maps, need_params):
    """``maps`` with None for the parameter gradients autograd does not
    need."""
    return maps._replace(params=[
        grad if need else None for grad, need in zip(maps.params, need_params)
    ])


def _split(tensors) -> Tuple[CEParams, CEState]:
    return (CEParams(*tensors[:_NUM_PARAMS]),
            CEState(*tensors[_NUM_PARAMS:_NUM_PARAMS + _NUM_STATE]))


def _ce_forward(call: OpCall, x: Tensor, residual: Optional[Tensor],
                params: CEParams, state: CEState):
    """:class:`_CEFunction`'s forward without autograd's bookkeeping:
    ``(out, wm, scale, saved)``, ``wm`` and ``scale`` None in eval,
    ``saved`` None unless ``call.needs_grad``; ``residual`` (or None) and
    ``call.relu`` in the map's pass."""
    passes, d = call.passes, call.config.group_size
    result = _forward_map(x, params, state, call)
    out = passes.apply(result.a, x, d, call.inplace and not call.needs_grad,
                       None, residual, call.relu)
    saved = None
    if call.needs_grad:
        # the running state is not saved: training never reads it (it is
        # updated right after this call), eval keeps a copy of W
        saved = _Saved((x, result.a, *params), _cache_to_keep(result, call))
    if not call.training:
        return out, None, None, saved
    return out, result.wm, result.scale, saved


SECOND_DERIVATIVE_MESSAGE = (
    'a second derivative through a CE op (ce_mmdet) was asked for: its '
    'backward is derived by hand and has no derivative itself, so '
    'create_graph=True gradients (gradient penalties, Hessian-vector '
    'products) cannot be differentiated through CE layers')


class _NoSecondDerivative(torch.autograd.Function):
    """A CE op's gradients where autograd records its backward
    (``create_graph=True``): the gradients unchanged, joined to what they
    depend on (the incoming gradients, the op's saved inputs), and a
    backward that raises. ``torch.autograd.function.once_differentiable``
    would leave the gradients unjoined, so ``torch.autograd.grad`` with
    ``inputs`` would skip CE's terms without an error."""

    @staticmethod
    def forward(ctx, num_grads: int, *tensors: Tensor):
        return tensors[:num_grads]

    @staticmethod
    def backward(ctx, *_grads):
        raise RuntimeError(SECOND_DERIVATIVE_MESSAGE)


def _first_derivative_only(backward):
    """An autograd Function's ``backward``, made to refuse a second
    derivative (see :class:`_NoSecondDerivative`); without
    ``create_graph`` it runs as it is."""

    @functools.wraps(backward)
    def wrapper(ctx, *grad_outputs):
        if not torch.is_grad_enabled():
            return backward(ctx, *grad_outputs)
        with torch.no_grad():
            grads = backward(ctx, *grad_outputs)
        given = [g for g in grads if g is not None]
        sources = [
            t for t in (*grad_outputs, *ctx.saved_tensors)
            if t is not None and t.requires_grad
        ]
        if not given or not sources:
            return grads
        joined = iter(_NoSecondDerivative.apply(len(given), *given,
                                                *sources))
        return tuple(None if g is None else next(joined) for g in grads)

    return wrapper


class _CEFunction(torch.autograd.Function):
    """CE on its input (see the module doc). Inputs: ``call, x, residual
    (or None), *params, *state``; outputs: the result, the batch whitening
    matrices and scale (empty in eval)."""

    @staticmethod
    def forward(ctx, call: OpCall, x: Tensor, residual: Optional[Tensor],
                *tensors: Tensor):
        out, wm, scale, saved = _ce_forward(call, x, residual,
                                            *_split(tensors))
        statistics = _distinct_empties(x, (wm, scale),
                                       compute_dtype(x.dtype))
        _finish_forward(ctx, call, x, out, saved, statistics)
        return (out, ) + statistics

    @staticmethod
    @_first_derivative_only
    def backward(ctx, grad_out: Tensor, _grad_wm, _grad_scale):
        if grad_out is None:  # the output did not reach the loss
            return (None, ) * (3 + _NUM_PARAMS + _NUM_STATE)
        x, a, *rest, out = ctx.saved_tensors
        params = CEParams(*rest)
        call = ctx.call
        passes, d = call.passes, call.config.group_size
        grad_out = _tail_grad(grad_out, out)
        maps = _backward_maps(ctx, grad_out, x, a, params, call,
                              ctx.needs_input_grad[3:3 + _NUM_PARAMS])
        grad_x = None
        if ctx.needs_input_grad[1]:
            grad_x = passes.apply2(maps.m1, grad_out, maps.m2, x, maps.shift,
                                   d)
        grad_residual = grad_out if ctx.needs_input_grad[2] else None
        return (None, grad_x, grad_residual, *maps.params) + \
            (None, ) * _NUM_STATE


def _bnce_forward(call: OpCall, z: Tensor, residual: Optional[Tensor],
                  bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                  running_mean: Optional[Tensor],
                  running_var: Optional[Tensor], params: CEParams,
                  state: CEState):
    """:class:`_BNCEFunction`'s forward without autograd's bookkeeping:
    ``(out, wm, scale, batch_mean, batch_var, saved)``, a statistic None
    where not computed (``wm`` and ``scale`` in eval, the BN's batch
    statistics unless the op computed them itself), ``saved`` None unless
    ``call.needs_grad``. ``residual`` and ``call.relu`` as for
    :func:`_ce_forward`."""
    cdt = compute_dtype(z.dtype)
    passes, d = call.passes, call.config.group_size
    bn_stats = var_z = batch_mean = batch_var = None
    if not call.bn_batch_stats:
        # the running statistics as they are now (copies for the
        # backward: a later training call may move them)
        bn_var = running_var.to(cdt, copy=call.needs_grad)
        bn_mean = running_mean.to(cdt, copy=call.needs_grad)
    if call.bn_batch_stats and call.training and passes.fuses_batch_bn:
        # BN with batch statistics folded: one statistics pass over z
        # gives the BN's statistics and CE's, and A X is applied to z
        result, bn_stats = passes.batch_bn_map(
            z, params, state, call.config, call.reduce_fn, bn_weight,
            bn_bias, call.bn_eps, call.bn_reduce_fn)
        # for the running statistics (updated by the caller, as CE's)
        batch_mean, batch_var = bn_stats.mean, bn_stats.unbiased_var
        a, a_z, bias, wm, scale, _, _, alpha, beta = result
        bn_mean, invstd, bn_var = bn_stats.mean, bn_stats.invstd, None
        out = passes.apply(a_z, z, d, call.inplace and not call.needs_grad,
                           bias, residual, call.relu)
        mode = 'batch_bn'
    elif call.bn_reduce_fn is not None:
        raise RuntimeError('a SyncBN is folded only with batch statistics '
                           'in the BN and CE, by an implementation that '
                           'folds a batch-statistics BN')
    elif call.bn_batch_stats or call.training:
        # the BN's pass (and its running-statistics update)
        x, save_mean, save_invstd = torch.native_batch_norm(
            z, bn_weight, bn_bias, running_mean, running_var,
            call.bn_batch_stats, call.bn_momentum, call.bn_eps)
        if call.bn_batch_stats:
            bn_mean, invstd, bn_var = save_mean, save_invstd, None
        else:
            invstd = torch.rsqrt(bn_var + call.bn_eps)
        alpha, beta = bn_affine(bn_weight, bn_bias, bn_mean, invstd, cdt)
        result = _forward_map(x, params, state, call)
        a, _, _, wm, scale = result[:5]
        # x is this op's own temporary: always free to overwrite
        out = passes.apply(a, x, d, True, None, residual, call.relu)
        mode = 'separate'
    else:
        # BN with running statistics, CE in eval: no BN pass
        result = _forward_map(z, params, state, call,
                              affine=BNAffine(bn_weight, bn_bias, bn_mean,
                                              bn_var, call.bn_eps))
        a, a_z, bias, wm, scale, _, var_z, alpha, beta = result
        invstd = torch.rsqrt(bn_var + call.bn_eps) if call.needs_grad \
            else None
        out = passes.apply(a_z, z, d, call.inplace and not call.needs_grad,
                           bias, residual, call.relu)
        mode = 'folded'
    saved = None
    if call.needs_grad:
        # what the BN's backward needs: the batch mean and inverse std, or
        # the running mean and inverse std (small copies), and for a folded
        # batch-statistics BN the statistics of z
        extra = (None, None, None) if bn_stats is None else \
            (bn_stats.mean_z, bn_stats.gram_z, bn_stats.positions)
        saved = _Saved((z, alpha, beta, bn_mean, invstd, bn_var, bn_weight,
                        var_z, *extra, a, *params),
                       _cache_to_keep(result, call), mode,
                       None if bn_bias is None else bn_bias.dtype)
    if not call.training:
        wm = scale = None
    return out, wm, scale, batch_mean, batch_var, saved


class _BNCEFunction(torch.autograd.Function):
    """``CE(BN(z))`` for a plain BatchNorm (see the module doc). Inputs:
    ``call, z, residual (or None), bn_weight, bn_bias, bn_running_mean,
    bn_running_var, *params, *state``; outputs as :class:`_CEFunction`,
    then the BN's batch mean and unbiased variance where the op computed
    them itself (the folded batch-statistics BN; empty otherwise,
    ``native_batch_norm`` updated the running statistics): the caller
    updates the running statistics, as it updates CE's (a traced graph
    then shows the update outside the op)."""

    @staticmethod
    def forward(ctx, call: OpCall, z: Tensor, residual: Optional[Tensor],
                bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                running_mean: Optional[Tensor],
                running_var: Optional[Tensor], *tensors: Tensor):
        out, *statistics, saved = _bnce_forward(call, z, residual, bn_weight,
                                                bn_bias, running_mean,
                                                running_var, *_split(tensors))
        statistics = _distinct_empties(z, statistics,
                                       compute_dtype(z.dtype))
        _finish_forward(ctx, call, z, out, saved, statistics)
        return (out, ) + statistics

    @staticmethod
    @_first_derivative_only
    def backward(ctx, grad_out: Tensor, *_grad_statistics):
        if grad_out is None:  # the output did not reach the loss
            return (None, ) * (7 + _NUM_PARAMS + _NUM_STATE)
        (z, alpha, beta, bn_mean, invstd, bn_var, bn_weight, var_z, mean_z,
         gram_z, positions, a, *rest, out) = ctx.saved_tensors
        params = CEParams(*rest)
        call = ctx.call
        passes, d = call.passes, call.config.group_size
        grad_out = _tail_grad(grad_out, out)
        need_z, need_residual, need_w, need_b = ctx.needs_input_grad[1:5]
        need_params = ctx.needs_input_grad[7:7 + _NUM_PARAMS]
        grad_z = grad_w = grad_b = None
        if ctx.mode == 'separate':
            maps = _backward_maps(ctx, grad_out, z, a, params, call,
                                  need_params, (alpha, beta))
            grad_x = passes.apply2(maps.m1, grad_out, maps.m2, z, maps.shift,
                                   d)
            if call.bn_batch_stats:
                stats = (None, None, bn_mean, invstd, True)
            else:  # eval-mode BN: the running statistics of the forward
                stats = (bn_mean, bn_var, None, None, False)
            grad_z, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
                grad_x, z, bn_weight, *stats, call.bn_eps,
                [need_z, need_w, need_b])
        else:
            # the BN folded into the maps: dz in one pass, the BN's
            # parameter gradients from small tensors
            if ctx.mode == 'folded':
                maps = _backward_maps(ctx, grad_out, z, a, params, call,
                                      need_params, (alpha, beta),
                                      (bn_mean, invstd, var_z))
            else:
                maps = passes.batch_bn_backward_maps(
                    grad_out, z, a, ctx.cache, params, call.config,
                    call.reduce_fn, alpha, beta,
                    BatchBNStats(bn_mean, None, invstd, mean_z, gram_z,
                                 positions), bn_weight, call.bn_reduce_fn)
                maps = _only_needed(maps, need_params)
            if need_z:
                grad_z = passes.apply2(maps.m1, grad_out, maps.m2, z,
                                       maps.shift, d)
            if need_w:
                grad_w = maps.bn_weight.to(bn_weight.dtype)
            if need_b:
                grad_b = maps.bn_bias.to(ctx.bias_dtype)
        return (None, grad_z if need_z else None,
                grad_out if need_residual else None,
                grad_w if need_w else None, grad_b if need_b else None, None,
                None, *maps.params) + (None, ) * _NUM_STATE


def channel_equilibrium(x: Tensor, params: CEParams, state: CEState,
                        call: OpCall, residual: Optional[Tensor] = None
                        ) -> Tuple[Tensor, Tensor, Tensor]:
    """CE on a contiguous (N, C, H, W) ``x``, plus ``residual`` (NCHW
    contiguous, the dtype of ``x``) if given, then ReLU if ``call.relu``.

    Returns:
        tuple: the output, and the batch whitening matrices and scale
        (empty in eval) for the running averages.
    """
    if _as_function(call):
        return _CEFunction.apply(call, x, residual, *params, *state)
    # nothing for autograd to record (inference, frozen stages): the body
    # alone, without the Function's host time (~10% of an eval layer's)
    out, wm, scale, _ = _ce_forward(call, x, residual, params, state)
    return _outputs_without_autograd(x, out, (wm, scale),
                                     compute_dtype(x.dtype))


def batchnorm_channel_equilibrium(z: Tensor, bn_tensors: Tuple,
                                  params: CEParams, state: CEState,
                                  call: OpCall,
                                  residual: Optional[Tensor] = None
                                  ) -> Tuple[Tensor, ...]:
    """``CE(BN(z))`` on a contiguous (N, C, H, W) ``z`` (plus ``residual``
    and the ReLU as for :func:`channel_equilibrium`); ``bn_tensors`` are the
    BN's weight, bias, running mean and running variance (each may be
    None). Returns the output, CE's batch whitening matrices and scale,
    the BN's batch mean and unbiased variance (empty where the op did not
    compute them itself)."""
    if _as_function(call):
        return _BNCEFunction.apply(call, z, residual, *bn_tensors, *params,
                                   *state)
    # nothing for autograd to record (see channel_equilibrium)
    out, *statistics, _ = _bnce_forward(call, z, residual, *bn_tensors,
                                        params, state)
    return _outputs_without_autograd(z, out, statistics,
                                     compute_dtype(z.dtype))
