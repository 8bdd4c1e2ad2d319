"""The small graph of CE: everything that only touches per-sample and
per-group statistics (instance variances, group Gram matrices), never the
feature map. Its tensors have ``N*C`` and ``G*d*d`` elements.

:func:`forward` computes the block maps ``A`` from the statistics and keeps
what :func:`backward` needs; :func:`backward` maps dL/dA back onto the
statistics and the parameters by hand-derived formulas (tested against
autograd through :func:`forward`). With SyncCE the batch sums, and their
gradient, are summed over processes in between. The Triton implementation
fuses the same arithmetic into a few kernels (:mod:`ce_mmdet.ops.triton_impl`).
"""
from typing import List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .export import exporting_onnx
from .types import CEConfig, CEParams, CEState


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype the statistics are computed in: float64 stays, the rest
    float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def unbiased_divisor(hw):
    """``hw - 1``, the divisor of an unbiased variance over ``hw`` values,
    and 1 where ``hw`` is 1 (one value: the numerator, and so the variance,
    is 0). ``hw`` is an int, or a 0-dim tensor where ``torch.jit`` traces
    sizes (the TorchScript ONNX exporter): there ``max`` would bake the
    traced size's branch into the graph, and an export traced at H*W > 1
    would divide by 0 at H*W = 1."""
    if isinstance(hw, Tensor):
        return (hw - 1).clamp(min=1)
    return max(hw - 1, 1)


class SmallGraphCache(NamedTuple):
    """What :func:`backward` needs from :func:`forward` (all small)."""
    mean: Tensor
    raw_var: Optional[Tensor]  # training: before the clamp at 0
    var: Tensor
    sums: Optional[Tensor]
    hidden: Tensor  # fc1 output, the LayerNorm input
    ln_mean: Tensor
    ln_rstd: Tensor
    post_relu: Tensor
    y: Tensor
    lam: Tensor
    scale: Tensor
    wm: Tensor
    # training: the covariance, and the Newton iterates if kept
    # ((cov, trace, cov_n, [P_k], [(P_k^2, P_k^3)]); recomputed when None)
    cov: Optional[Tensor]
    newton: Optional[tuple]
    # training, fused Triton forward: P_1 ... P_{T-1} stacked (T-1, G, d, d)
    iterates: Optional[Tensor] = None


def _newton(cov: Tensor, num_iters: int) -> Tuple[Tensor, tuple]:
    """Approximate inverse square root by Newton's iterations, as published:
    ``S_N = S / tr(S)``, ``P_0 = I``, ``P_{k+1} = 1.5 P_k - 0.5 P_k^3 S_N``;
    returns ``P_T`` (not rescaled by the trace) and the iterates for the
    backward. ``P_1 = 1.5 I - 0.5 S_N`` exactly (``I^3 S_N`` is ``S_N``)."""
    trace = cov.diagonal(dim1=-2, dim2=-1).sum(-1)
    cov_n = cov / trace[:, None, None]
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
    p = 1.5 * eye - 0.5 * cov_n
    iterates, powers = [p], []
    for _ in range(num_iters - 1):
        p2 = p @ p
        p3 = p2 @ p
        p = 1.5 * p - 0.5 * p3 @ cov_n
        iterates.append(p)
        powers.append((p2, p3))
    return p, (cov, trace, cov_n, iterates, powers)


def _newton_backward(grad_w: Tensor, saved: tuple) -> Tensor:
    """dL/dcov from dL/dW through the Newton iterations and the trace
    normalisation."""
    cov, trace, cov_n, iterates, powers = saved
    grad_sn = torch.zeros_like(cov_n)
    g = grad_w
    for k in reversed(range(len(powers))):
        # P_{k+1} = 1.5 P_k - 0.5 P_k^3 S_N
        p, (p2, p3) = iterates[k], powers[k]
        h = -0.5 * g
        grad_sn = grad_sn + p3.transpose(-1, -2) @ h
        g3 = h @ cov_n.transpose(-1, -2)  # dL/dP^3; P^3 = P^2 P
        g2 = g3 @ p.transpose(-1, -2)  # dL/dP^2; P^2 = P P
        g = 1.5 * g + p2.transpose(-1, -2) @ g3 + g2 @ p.transpose(
            -1, -2) + p.transpose(-1, -2) @ g2
    grad_sn = grad_sn - 0.5 * g  # P_1 = 1.5 I - 0.5 S_N
    # S_N = cov / tr(cov)
    inner = (grad_sn * cov).sum((-2, -1)) / (trace * trace)
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
    return grad_sn / trace[:, None, None] - inner[:, None, None] * eye


def forward(mean: Tensor, second: Tensor, hw: int, params: CEParams,
            state: CEState, config: CEConfig, training: bool,
            reduce_fn=None) -> Tuple[Tensor, Tensor, Tensor, SmallGraphCache]:
    """``A[n, g] = sig(a) W_g + (1 - sig(a)) diag(y[n, g] / s)`` from the
    statistics.

    Args:
        mean (Tensor): per-sample channel means (N, C).
        second (Tensor): training: per-sample Gram matrices (N, G, d, d);
            eval: per-sample unbiased variances (N, C).
        hw (int): H * W.
        params, state, config: the layer's (the running state in eval).
        training (bool): batch statistics (``W`` by Newton's iterations on
            the batch covariance, ``s = sqrt(mean v)``) or the running state.
        reduce_fn (callable, optional): SyncCE's sum over processes of the
            flat batch sums ``[sum v, N, N*H*W, sum x (C), sum Gram
            (G*d*d)]`` (positions are counted apart from samples: processes
            may see different spatial sizes).

    Returns:
        tuple: ``A`` (N, G, d, d), the batch whitening matrices and scale
        (training; the running ones in eval), and the cache for
        :func:`backward`.
    """
    d, eps = config.group_size, config.eps
    n, c = mean.shape
    g = c // d
    dt = mean.dtype
    newton = raw = sums = None
    if training:
        sumsq = second.diagonal(dim1=-2, dim2=-1).reshape(n, c)
        raw = (sumsq - hw * mean * mean) / unbiased_divisor(hw)
        var = raw.clamp_min(0)
        # the counts by fills on the device (a tensor from Python data
        # would be a synchronous host-to-device copy on a GPU)
        sums = torch.cat([
            var.sum().reshape(1),
            var.new_full((1, ), n),
            var.new_full((1, ), n * hw), hw * mean.sum(0),
            second.sum(0).reshape(-1)
        ])
        if reduce_fn is not None:
            sums = reduce_fn(sums)  # SyncCE: global batch statistics
        samples, positions = sums[1], sums[2]
        scale = torch.sqrt((sums[0:1] / (samples * c)).clamp_min(eps * eps))
        mu = (sums[3:3 + c] / positions).reshape(g, d, 1)
        eye = torch.eye(d, dtype=dt, device=mean.device)
        cov = sums[3 + c:].reshape(g, d, d) / positions - \
            mu * mu.transpose(1, 2) + eps * eye  # (outer products)
        wm, newton = _newton(cov, config.num_iters)
    else:
        var = second
        wm = state.running_wm.to(dt)
        scale = state.running_scale.to(dt).clamp_min(eps)
    fc1, ln_w, ln_b, fc2 = (params.fc1_weight.to(dt), params.ln_weight.to(dt),
                            params.ln_bias.to(dt), params.fc2_weight.to(dt))
    # the IR MLP's weights as the left operand, the (tiny) batch on the
    # right: MKL reads a weight that is not in cache ~25% faster this way
    # than as a transposed right operand (the results are transposed views)
    hidden = (fc1 @ var.t()).t()
    if exporting_onnx():  # (the statistics are for the backward only)
        pre_relu = torch.nn.functional.layer_norm(
            hidden, (fc1.shape[0], ), ln_w, ln_b, eps)
        ln_mean = ln_rstd = None
    else:
        pre_relu, ln_mean, ln_rstd = torch.native_layer_norm(
            hidden, hidden.shape[-1:], ln_w, ln_b, eps)
    post_relu = torch.relu(pre_relu)
    y = torch.sigmoid((fc2 @ post_relu.t()).t())
    lam = torch.sigmoid(params.gate.to(dt))
    diag = ((1 - lam) / scale * y).reshape(n, g, d)
    if exporting_onnx():  # (ONNX has no diag_embed)
        a = diag.unsqueeze(-1) * torch.eye(d, dtype=dt, device=diag.device) \
            + lam * wm
    else:
        a = torch.diag_embed(diag).add_(lam * wm)
    cache = SmallGraphCache(mean, raw, var, sums, hidden, ln_mean, ln_rstd,
                            post_relu, y, lam, scale, wm,
                            None if newton is None else newton[0], newton)
    return a, wm, scale, cache


def backward(grad_a: Tensor, cache: SmallGraphCache, hw: int,
             params: CEParams, config: CEConfig, training: bool,
             reduce_fn=None) -> Tuple[Tensor, Tensor, List[Tensor]]:
    """dL/d(mean), dL/d(second) and dL/d(params) from dL/dA.

    With SyncCE (``reduce_fn``), the gradient of the global batch sums is
    summed over processes before it reaches this process's statistics, as
    SyncBN's is.

    Returns:
        tuple: ``d_mean`` (N, C), ``d_second`` (training: (N, G, d, d);
        eval: (N, C)) and the parameter gradients in :class:`CEParams`
        order, each in its parameter's dtype.
    """
    d, eps = config.group_size, config.eps
    n, c = cache.mean.shape
    g = c // d
    y, lam, scale = cache.y, cache.lam, cache.scale
    fc1, ln_w, ln_b, fc2 = (p.to(y.dtype) for p in params[1:])
    grad_diag = grad_a.diagonal(dim1=-2, dim2=-1).reshape(n, c)
    dy_s = grad_diag * y  # dL/dD * y, reused below
    # A = lam W + diag((1 - lam) y / s)
    grad_lam = (grad_a.sum(0) * cache.wm).sum() - dy_s.sum() / scale
    grad_gate = grad_lam * lam * (1 - lam)
    grad_y = grad_diag * ((1 - lam) / scale)
    # IR MLP: y = sigmoid(fc2 relu(LN(fc1 v)))
    grad_t = grad_y * y * (1 - y)
    grad_fc2 = grad_t.t() @ cache.post_relu
    aten = torch.ops.aten
    grad_pre = aten.threshold_backward(grad_t @ fc2, cache.post_relu, 0)
    grad_hidden, grad_ln_w, grad_ln_b = aten.native_layer_norm_backward(
        grad_pre, cache.hidden, cache.hidden.shape[-1:], cache.ln_mean,
        cache.ln_rstd, ln_w, ln_b, [True, True, True])
    grad_fc1 = grad_hidden.t() @ cache.var
    grad_var = grad_hidden @ fc1
    if training:
        # s = sqrt(max(sum v / (N C), eps^2))
        sums = cache.sums
        samples, positions = sums[1], sums[2]
        grad_scale = -dy_s.sum() * (1 - lam) / (scale * scale)
        unclamped = sums[0] / (samples * c) >= eps * eps
        grad_vsum = grad_scale * unclamped / (2 * scale * samples * c)
        # W from cov = Gram / P - mu mu^T + eps I, mu = x_sum / P
        newton = cache.newton
        if newton is None:
            newton = _newton(cache.cov, config.num_iters)[1]
        grad_cov = _newton_backward(lam * grad_a.sum(0), newton)
        mu = (sums[3:3 + c] / positions).reshape(g, d, 1)
        grad_mu = -(grad_cov + grad_cov.transpose(1, 2)) @ mu
        grad_sums = torch.cat([
            grad_vsum.reshape(1),
            grad_vsum.new_zeros(2),
            (grad_mu / positions).reshape(-1),
            (grad_cov / positions).reshape(-1)
        ])
        if reduce_fn is not None:
            grad_sums = reduce_fn(grad_sums)
        # this process's share: v -> sum v, hw * sum_n mean, sum_n Gram
        grad_var = grad_var + grad_sums[0]
        grad_var = grad_var * (cache.raw_var >= 0)  # clamp_min(0)
        grad_var = grad_var / unbiased_divisor(hw)
        # v = (diag(Gram) - hw mean^2) / (hw - 1)
        grad_mean = hw * grad_sums[3:3 + c] - 2 * hw * cache.mean * grad_var
        grad_second = torch.diag_embed(grad_var.reshape(n, g, d)).add_(
            grad_sums[3 + c:].reshape(g, d, d))
    else:
        grad_mean = torch.zeros_like(cache.mean)
        grad_second = grad_var
    grads = (grad_gate.reshape(1), grad_fc1, grad_ln_w, grad_ln_b, grad_fc2)
    return grad_mean, grad_second, [
        gr.to(p.dtype) for gr, p in zip(grads, params)
    ]
