"""The PyTorch implementation of the CE ops: the big passes over the feature
map, as batched GEMMs, with hand-written backward passes.

Two private autograd Functions:

* :class:`_CEFunction`, CE on its input ``X``:

  - forward: per-sample channel means and per-sample group Gram matrices
    ``Q[n, g] = X[n, g] X[n, g]^T`` (training; one batched GEMM reading ``X``
    in place) or per-sample variances (eval), then the small graph
    (:mod:`ce_mmdet.ops.small_graph`) gives the per-sample block-diagonal
    map ``A = sig(a) W + (1 - sig(a)) diag(y / s)``, and ``out[n, g] =
    A[n, g] X[n, g]`` (one batched GEMM);
  - backward: ``dA = dout X^T`` (one GEMM), the small graph is re-run under
    autograd to map ``dA`` onto the statistics and the parameters, then
    ``dX = A^T dout + S X + b`` as two accumulating GEMMs into one new
    tensor. Only the input and small tensors are saved.

* :class:`_BNCEFunction`, ``CE(BN(Z))`` for a plain BatchNorm: the BN is
  applied inside the op, and only the BN's input ``Z`` is saved (the tensor
  a BN saves anyway), with the BN's per-channel affine map
  ``X = alpha Z + beta``:

  - BN with batch statistics (or CE in training): the BN's pass by
    ``torch.native_batch_norm`` (which updates its running statistics as
    ``nn.BatchNorm2d`` does), CE on ``X``, written into ``X`` itself on CPU
    (``X`` is the op's own temporary); backward works on ``Z``
    (``dout X^T = (dout Z^T) diag(alpha) + (dout 1) beta^T``, likewise
    ``S X``) and ends with ``aten.native_batch_norm_backward``;
  - BN with running statistics and CE in eval (inference, and detection
    training with ``norm_eval=True``): no BN pass at all. The variances of
    ``X`` are ``alpha^2`` those of ``Z``, and ``A X = (A diag(alpha)) Z + A
    beta``: one statistics pass over ``Z`` and one GEMM with a bias (into
    ``Z`` itself on CPU when the caller allows it and autograd does not need
    ``Z``). Its backward gives ``dZ`` by the same two GEMMs with the maps
    scaled by ``alpha``, and the BN's weight and bias gradients from small
    tensors (``sum dX`` and ``sum dX Z`` per channel follow from ``dout
    Z^T`` and ``Z``'s variances), without materialising ``dX``.

CPU-specific: an output may be written into a tensor that nobody reads
afterwards (:func:`apply_inplace`), through a cache-sized buffer. A fresh
activation-sized allocation costs more than the GEMM there (page faults on
first touch); on CUDA the caching allocator makes it free, so new tensors
are written there.

Statistics, Gram matrices and Newton iterations run in float32 (float64 for
float64 inputs) whatever the input dtype; outputs have the input dtype.
"""
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from .small_graph import block_map, compute_dtype, local_statistics
from .types import CEConfig, CEParams, CEState

#: A function that sums small statistic tensors over processes (SyncCE).
ReduceFn = Optional[Callable[[Tensor], Tensor]]

#: Column chunk of the in-place apply, in bytes (a few MiB: stays in cache).
INPLACE_CHUNK_BYTES = 4 << 20

_NUM_PARAMS = len(CEParams._fields)
_NUM_STATE = len(CEState._fields)


@dataclass(frozen=True)
class OpCall:
    """The non-tensor arguments of one CE op call.

    Attributes:
        config (CEConfig): the layer's settings.
        training (bool): CE uses batch statistics.
        reduce_fn (callable, optional): SyncCE's sum over processes.
        inplace (bool): the caller does not read the op's input afterwards;
            used only where autograd does not need that input either.
        needs_grad (bool): autograd will call backward.
        bn_batch_stats (bool): the BN (if any) normalises by batch
            statistics.
        bn_momentum (float): the BN's running-average factor for this call.
        bn_eps (float): the BN's eps.
    """
    config: CEConfig
    training: bool
    reduce_fn: ReduceFn = None
    inplace: bool = False
    needs_grad: bool = False
    bn_batch_stats: bool = False
    bn_momentum: float = 0.0
    bn_eps: float = 1e-5


def _grouped(x: Tensor, group_size: int) -> Tensor:
    """(N, C, H, W) contiguous -> (N, G, d, HW) view, no copy."""
    n, c, h, w = x.shape
    return x.view(n, c // group_size, group_size, h * w)


def apply_inplace(a: Tensor, xg: Tensor, chunk_bytes: int,
                  bias: Optional[Tensor] = None) -> None:
    """``xg[n, g] = a[n, g] @ xg[n, g] (+ bias[n, g])`` in place.

    Columns (positions) are independent, so the product is taken over
    column chunks of about ``chunk_bytes`` through one small buffer and
    copied back: the same arithmetic as one batched GEMM, without a new
    activation-sized tensor.

    Args:
        a (Tensor): (N, G, d, d) maps, dtype of ``xg``.
        xg (Tensor): (N, G, d, HW) contiguous, overwritten.
        chunk_bytes (int): buffer size.
        bias (Tensor, optional): (N, G, d, 1), added to every column.
    """
    n, g, d, hw = xg.shape
    flat = xg.view(n * g, d, hw)
    maps = a.reshape(n * g, d, d)
    bias = None if bias is None else bias.reshape(n * g, d, 1)
    cols = max(1, min(hw, chunk_bytes // (n * g * d * xg.element_size())))
    buf = xg.new_empty((n * g, d, cols))
    for start in range(0, hw, cols):
        stop = min(start + cols, hw)
        part = buf[..., :stop - start]
        torch.bmm(maps, flat[..., start:stop], out=part)
        if bias is None:
            flat[..., start:stop].copy_(part)
        else:
            torch.add(part, bias, out=flat[..., start:stop])


def apply_map(a: Tensor, x: Tensor, group_size: int, inplace: bool,
              bias: Optional[Tensor] = None) -> Tensor:
    """``a[n, g] @ X[n, g] (+ bias[n, g])`` for the groups ``X`` of ``x``.

    Args:
        a (Tensor): (N, G, d, d) maps, dtype of ``x``.
        x (Tensor): (N, C, H, W) contiguous.
        group_size (int): d.
        inplace (bool): ``x`` may be overwritten. Done on CPU for tensors
            larger than one chunk (:func:`apply_inplace`); elsewhere a new
            tensor is cheaper or as cheap.
        bias (Tensor, optional): (N, G, d, 1), added to every position.

    Returns:
        Tensor: ``x`` itself, or a new (N, C, H, W) tensor (not a view:
        callers may modify the output in place, ``out += identity``).
    """
    xg = _grouped(x, group_size)
    if inplace and x.device.type == 'cpu' and x.nbytes > INPLACE_CHUNK_BYTES:
        apply_inplace(a, xg, INPLACE_CHUNK_BYTES, bias)
        return x
    out = x.new_empty(x.shape)
    if bias is None:
        torch.matmul(a, xg, out=_grouped(out, group_size))
    else:
        n, g, d, hw = xg.shape
        torch.baddbmm(
            bias.reshape(n * g, d, 1).expand(n * g, d, hw),
            a.reshape(n * g, d, d), xg.reshape(n * g, d, hw),
            out=out.view(n * g, d, hw))
    return out


def instance_moments(xg: Tensor, cdt: torch.dtype) -> Tuple[Tensor, Tensor]:
    """Per-sample channel means and unbiased variances of (N, G, d, HW),
    as (N, G * d) in ``cdt``: from the sum and the sum of squares, one read
    each (``torch.var_mean`` is ~10x slower on CPU); the rounding error of
    the difference is clamped, never a defined value."""
    n, g, d, hw = xg.shape
    mean = xg.mean(-1, dtype=cdt).reshape(n, g * d)
    sumsq = torch.linalg.vector_norm(xg, dim=-1, dtype=cdt).square()
    var = (sumsq.reshape(n, g * d) - hw * mean * mean) / max(hw - 1, 1)
    return mean, var.clamp_min(0)


def _statistics(x: Tensor, call: OpCall) -> Tuple[Tensor, Tensor]:
    """``(mean, second)`` of :func:`local_statistics` for the input ``x``:
    per-sample channel means and, in training, per-sample group Gram
    matrices, in eval per-sample variances."""
    n, c = x.shape[:2]
    cdt = compute_dtype(x.dtype)
    xg = _grouped(x, call.config.group_size)
    if not call.training:
        return instance_moments(xg, cdt)
    # float32 copy for half inputs: Gram entries sum HW products and
    # would overflow / round badly in fp16
    xs = xg if x.dtype == cdt else xg.to(cdt)
    mean = xs.mean(-1).reshape(n, c)
    second = torch.matmul(xs, xs.transpose(-1, -2))
    return mean, second


def _small_graph_forward(mean: Tensor, second: Tensor, hw: int,
                         params: CEParams, state: CEState, call: OpCall):
    """Statistics -> (batch sums, A, batch whitening, batch scale)."""
    with torch.no_grad():
        var, sums = local_statistics(mean, second, hw, call.training)
        if sums is not None and call.reduce_fn is not None:
            sums = call.reduce_fn(sums)  # SyncCE: global batch statistics
        a, wm, scale = block_map(var, sums, params, state, call.config)
    if not call.training:
        wm = scale = mean.new_empty(0)
    return sums, a, wm, scale


def _small_graph_backward(grad_a: Tensor, mean: Tensor, second: Tensor,
                          sums: Optional[Tensor], hw: int, params: CEParams,
                          state: CEState, need_params, call: OpCall):
    """Map ``dL/dA`` back onto the statistics and the parameters by
    re-running the small graph under autograd.

    Returns:
        tuple: ``d_mean``, ``d_second`` and a list of parameter gradients
        (None where not needed).
    """
    synced = call.training and call.reduce_fn is not None
    with torch.enable_grad():
        mean_l = mean.detach().requires_grad_()
        second_l = second.detach().requires_grad_()
        leaf = CEParams(*(p.detach().requires_grad_(bool(req))
                          for p, req in zip(params, need_params)))
        var, local_sums = local_statistics(mean_l, second_l, hw,
                                           call.training)
        # without SyncCE the batch sums are this process's own: one graph
        glob = sums.detach().requires_grad_() if synced else local_sums
        a_re, _, _ = block_map(var, glob, leaf, state, call.config)
        outputs, grad_outputs = [a_re], [grad_a]
        if synced:
            # dL/d(global sums): every process's loss depends on them, so
            # their gradients are summed (as SyncBN's)
            d_glob, = torch.autograd.grad(
                a_re, glob, grad_a, retain_graph=True)
            outputs.append(local_sums)
            grad_outputs.append(call.reduce_fn(d_glob))
        wrt = [mean_l, second_l] + [p for p in leaf if p.requires_grad]
        grads = torch.autograd.grad(
            outputs, wrt, grad_outputs, allow_unused=True)
    d_mean, d_second = grads[0], grads[1]
    rest = iter(grads[2:])
    d_params = []
    for p in leaf:
        grad = next(rest) if p.requires_grad else None
        if grad is None and p.requires_grad:
            grad = torch.zeros_like(p)
        d_params.append(grad)
    return d_mean, d_second, d_params


def _input_grad_maps(d_mean: Tensor, d_second: Tensor, mean: Tensor,
                     hw: int, call: OpCall) -> Tuple[Tensor, Tensor]:
    """``(S, b)`` with ``dX = A^T dout + S X + b`` (the statistics' part).

    Training: ``S = dQ + dQ^T`` (N, G, d, d), ``b = d_mean / HW``.
    Eval: ``v = sum((x - m)^2) / (HW - 1)``, so ``S = diag(coef)`` with
    ``coef = 2 dv / (HW - 1)`` and ``b = -coef m``; returned as the
    diagonal (N, G, d) and ``b`` (N, G, d, 1).
    """
    n, c = mean.shape
    d = call.config.group_size
    g = c // d
    if call.training:
        s_mat = d_second + d_second.transpose(-1, -2)
        b = d_mean.reshape(n, g, d, 1) / hw
        return s_mat, b
    coef = (2 * d_second / max(hw - 1, 1)).reshape(n, g, d)
    b = (-coef * mean.reshape(n, g, d)).unsqueeze(-1)
    return coef, b


def _grad_x_from_z(a: Tensor, s_mat: Tensor, b: Tensor, go: Tensor,
                   z: Tensor, alpha: Optional[Tensor],
                   beta: Optional[Tensor], out_scale: Optional[Tensor] = None
                   ) -> Tensor:
    """``diag(out_scale) (A^T dout + S X + b)`` with ``X = alpha z + beta``
    (or ``X = z``), as two accumulating GEMMs into one new tensor.

    Args:
        a (Tensor): (N, G, d, d).
        s_mat (Tensor): (N, G, d, d) or its diagonal (N, G, d).
        b (Tensor): (N, G, d, 1).
        go, z (Tensor): (N, G, d, HW) in the compute dtype.
        alpha, beta (Tensor, optional): (C,) affine map of ``z``.
        out_scale (Tensor, optional): (C,) per-channel factor of the result.

    Returns:
        Tensor: (N, G, d, HW) in the compute dtype.
    """
    n, g, d, hw = z.shape
    if s_mat.dim() == 3:
        s_mat = torch.diag_embed(s_mat)
    if alpha is not None:  # S X = (S diag(alpha)) z + S beta
        b = b + s_mat @ beta.view(1, g, d, 1)
        s_mat = s_mat * alpha.view(1, g, 1, d)
    a_t = a.transpose(-1, -2)
    if out_scale is not None:
        scale = out_scale.view(1, g, d, 1)
        b, s_mat, a_t = b * scale, s_mat * scale, a_t * scale
    dx = torch.baddbmm(
        b.reshape(n * g, d, 1).expand(n * g, d, hw),
        s_mat.reshape(n * g, d, d), z.reshape(n * g, d, hw))
    dx.baddbmm_(a_t.reshape(n * g, d, d), go.reshape(n * g, d, hw))
    return dx.view(n, g, d, hw)


def _split(tensors) -> Tuple[CEParams, CEState]:
    return (CEParams(*tensors[:_NUM_PARAMS]),
            CEState(*tensors[_NUM_PARAMS:_NUM_PARAMS + _NUM_STATE]))


class _CEFunction(torch.autograd.Function):
    """CE on its input (see the module doc). Inputs: ``call, x, *params,
    *state``; outputs: the result, the batch whitening matrices and scale
    (empty in eval)."""

    @staticmethod
    def forward(ctx, call: OpCall, x: Tensor, *tensors: Tensor):
        params, state = _split(tensors)
        hw = x.shape[2] * x.shape[3]
        mean, second = _statistics(x, call)
        sums, a, wm, scale = _small_graph_forward(mean, second, hw, params,
                                                  state, call)
        inplace = call.inplace and not call.needs_grad
        out = apply_map(a.to(x.dtype), x, call.config.group_size, inplace)
        if out is x:
            ctx.mark_dirty(x)
        ctx.mark_non_differentiable(wm, scale)
        if call.needs_grad:
            # training never reads the running state (which is updated
            # right after this call): do not save it
            kept = (None, None) if call.training else tuple(state)
            ctx.save_for_backward(x, mean, second, sums, a, *kept, *params)
            ctx.call = call
        return out, wm, scale

    @staticmethod
    def backward(ctx, grad_out: Tensor, _grad_wm, _grad_scale):
        x, mean, second, sums, a, *rest = ctx.saved_tensors
        state = CEState(*rest[:_NUM_STATE])
        params = CEParams(*rest[_NUM_STATE:])
        call = ctx.call
        n, c, h, w = x.shape
        d, hw = call.config.group_size, h * w
        cdt = a.dtype
        xg = _grouped(x.contiguous(), d).to(cdt)
        go = _grouped(grad_out.contiguous(), d).to(cdt)
        grad_a = torch.matmul(go, xg.transpose(-1, -2))
        need_params = ctx.needs_input_grad[2:2 + _NUM_PARAMS]
        d_mean, d_second, d_params = _small_graph_backward(
            grad_a, mean, second, sums, hw, params, state, need_params, call)
        grad_x = None
        if ctx.needs_input_grad[1]:
            s_mat, b = _input_grad_maps(d_mean, d_second, mean, hw, call)
            grad_x = _grad_x_from_z(a, s_mat, b, go, xg, None, None)
            grad_x = grad_x.view(n, c, h, w).to(x.dtype)
        return (None, grad_x, *d_params) + (None, ) * _NUM_STATE


def _bn_affine(weight: Optional[Tensor], bias: Optional[Tensor],
               mean: Tensor, invstd: Tensor,
               cdt: torch.dtype) -> Tuple[Tensor, Tensor]:
    """``(alpha, beta)`` with ``BN(z) = alpha z + beta`` per channel."""
    alpha = invstd.to(cdt)
    if weight is not None:
        alpha = alpha * weight.to(cdt)
    beta = -mean.to(cdt) * alpha
    if bias is not None:
        beta = beta + bias.to(cdt)
    return alpha, beta


class _BNCEFunction(torch.autograd.Function):
    """``CE(BN(z))`` for a plain BatchNorm (see the module doc). Inputs:
    ``call, z, bn_weight, bn_bias, bn_running_mean, bn_running_var, *params,
    *state``; outputs as :class:`_CEFunction`."""

    @staticmethod
    def forward(ctx, call: OpCall, z: Tensor, bn_weight: Optional[Tensor],
                bn_bias: Optional[Tensor], running_mean: Optional[Tensor],
                running_var: Optional[Tensor], *tensors: Tensor):
        params, state = _split(tensors)
        cdt = compute_dtype(z.dtype)
        d = call.config.group_size
        n, c, h, w = z.shape
        hw = h * w
        if not call.bn_batch_stats:
            # alpha, beta from the running statistics as they are now (a
            # later training call may move them before backward)
            bn_var = running_var.to(cdt, copy=True)
            invstd = torch.rsqrt(bn_var + call.bn_eps)
            bn_mean = running_mean.to(cdt, copy=True)
        if call.bn_batch_stats or call.training:
            # the BN's pass (and its running-statistics update)
            x, save_mean, save_invstd = torch.native_batch_norm(
                z, bn_weight, bn_bias, running_mean, running_var,
                call.bn_batch_stats, call.bn_momentum, call.bn_eps)
            if call.bn_batch_stats:
                bn_mean, invstd, bn_var = save_mean, save_invstd, None
            alpha, beta = _bn_affine(bn_weight, bn_bias, bn_mean, invstd, cdt)
            mean, second = _statistics(x, call)
            sums, a, wm, scale = _small_graph_forward(mean, second, hw,
                                                      params, state, call)
            # x is this op's own temporary: always free to overwrite
            out = apply_map(a.to(x.dtype), x, d, inplace=True)
            folded = False
        else:
            # BN with running statistics, CE in eval: no BN pass
            alpha, beta = _bn_affine(bn_weight, bn_bias, bn_mean, invstd, cdt)
            mean_z, var_z = instance_moments(_grouped(z, d), cdt)
            mean = mean_z * alpha + beta
            second = var_z * alpha * alpha
            sums, a, wm, scale = _small_graph_forward(mean, second, hw,
                                                      params, state, call)
            g = c // d
            bias = (a @ beta.view(1, g, d, 1)).to(z.dtype)
            inplace = call.inplace and not call.needs_grad
            out = apply_map((a * alpha.view(1, g, 1, d)).to(z.dtype), z, d,
                            inplace, bias)
            if out is z:
                ctx.mark_dirty(z)
            folded = True
        ctx.mark_non_differentiable(wm, scale)
        if call.needs_grad:
            kept = (None, None) if call.training else tuple(state)
            # what the BN's backward needs: the batch mean and inverse std,
            # or the running mean and inverse std (small copies)
            ctx.save_for_backward(z, alpha, beta, bn_mean, invstd, bn_var,
                                  bn_weight, mean, second,
                                  var_z if folded else None, sums, a, *kept,
                                  *params)
            ctx.call = call
            ctx.folded = folded
            ctx.bias_dtype = None if bn_bias is None else bn_bias.dtype
        return out, wm, scale

    @staticmethod
    def backward(ctx, grad_out: Tensor, _grad_wm, _grad_scale):
        (z, alpha, beta, bn_mean, invstd, bn_var, bn_weight, mean, second,
         var_z, sums, a, *rest) = ctx.saved_tensors
        state = CEState(*rest[:_NUM_STATE])
        params = CEParams(*rest[_NUM_STATE:])
        call = ctx.call
        n, c, h, w = z.shape
        d, hw = call.config.group_size, h * w
        g = c // d
        cdt = a.dtype
        zg = _grouped(z.contiguous(), d).to(cdt)
        go = _grouped(grad_out.contiguous(), d).to(cdt)
        # dL/dA = dout X^T = (dout z^T) diag(alpha) + (dout 1) beta^T
        gz = torch.matmul(go, zg.transpose(-1, -2))
        go_sum = go.sum(-1, keepdim=True)
        grad_a = gz * alpha.view(1, g, 1, d) + go_sum * beta.view(1, g, 1, d)
        need_params = ctx.needs_input_grad[6:6 + _NUM_PARAMS]
        d_mean, d_second, d_params = _small_graph_backward(
            grad_a, mean, second, sums, hw, params, state, need_params, call)
        s_mat, b = _input_grad_maps(d_mean, d_second, mean, hw, call)
        need_z, need_w, need_b = ctx.needs_input_grad[1:4]
        grad_z = grad_w = grad_b = None
        if ctx.folded:
            # BN in eval: dz = alpha dX; the BN's parameter gradients need
            # only per-channel sums of dX and dX z, which follow from small
            # tensors: sum_hw dX = A^T sum_hw dout (the variance term sums
            # to zero), sum_hw dX z = diag(A^T dout z^T) + coef alpha
            # (HW - 1) var_z
            if need_z:
                grad_z = _grad_x_from_z(a, s_mat, b, go, zg, alpha, beta,
                                        out_scale=alpha)
                grad_z = grad_z.view(n, c, h, w).to(z.dtype)
            if need_w or need_b:
                a_t = a.transpose(-1, -2)
                sum_dx = (a_t @ go_sum).reshape(n, c)
                sum_dxz = (a * gz).sum(-2).reshape(n, c) + \
                    s_mat.reshape(n, c) * alpha * (hw - 1) * var_z
                if need_b:
                    grad_b = sum_dx.sum(0).to(ctx.bias_dtype)
                if need_w:
                    grad_w = ((sum_dxz.sum(0) - bn_mean * sum_dx.sum(0)) *
                              invstd).to(bn_weight.dtype)
        else:
            grad_x = _grad_x_from_z(a, s_mat, b, go, zg, alpha, beta)
            grad_x = grad_x.view(n, c, h, w).to(z.dtype)
            if call.bn_batch_stats:
                stats = (None, None, bn_mean, invstd, True)
            else:  # eval-mode BN: the running statistics of the forward
                stats = (bn_mean, bn_var, None, None, False)
            grad_z, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
                grad_x, z, bn_weight, *stats, call.bn_eps,
                [need_z, need_w, need_b])
        return (None, grad_z if need_z else None, grad_w if need_w else None,
                grad_b if need_b else None, None, None,
                *d_params) + (None, ) * _NUM_STATE


def channel_equilibrium(x: Tensor, params: CEParams, state: CEState,
                        call: OpCall) -> Tuple[Tensor, Tensor, Tensor]:
    """CE on a contiguous (N, C, H, W) ``x`` (torch implementation).

    Returns:
        tuple: the output, and the batch whitening matrices and scale
        (empty in eval) for the running averages.
    """
    return _CEFunction.apply(call, x, *params, *state)


def batchnorm_channel_equilibrium(z: Tensor, bn_tensors: Tuple,
                                  params: CEParams, state: CEState,
                                  call: OpCall
                                  ) -> Tuple[Tensor, Tensor, Tensor]:
    """``CE(BN(z))`` on a contiguous (N, C, H, W) ``z`` (torch
    implementation); ``bn_tensors`` are the BN's weight, bias, running mean
    and running variance (each may be None)."""
    return _BNCEFunction.apply(call, z, *bn_tensors, *params, *state)
