"""The fused Channel Equilibrium operator (one concept: the op and its gradient).

The layer (:class:`~ce_mmdet.models.layers.ChannelEquilibrium`) holds parameters
and buffers; this file holds the arithmetic. It is split in two parts:

* the *small graph* (:func:`local_statistics`, :func:`block_map`): everything
  that only touches per-sample / per-group statistics (LayerNorm MLP, Newton
  iterations, the gate). Its tensors are tiny (``N*C`` and ``G*d*d``
  elements) and it is plain autograd. With SyncCE the batch sums between the
  two are summed over processes, in forward and (their gradient) in backward.
* the *big passes* over the feature map, done by :class:`_CEFunction`:

  - forward: per-sample channel means and per-sample group Gram matrices
    ``Q[n, g] = X[n, g] X[n, g]^T`` (one batched GEMM reading ``X`` in place,
    no transposed copy), then ``out[n, g] = A[n, g] X[n, g]`` with the
    per-sample block-diagonal map ``A = sig(a) W + (1 - sig(a)) diag(y / s)``
    (one batched GEMM);
  - backward: ``dA = dout X^T`` (one GEMM), the small graph is re-run under
    autograd to map ``dA`` back onto the statistics and the parameters, then
    ``dX = A^T dout + (dQ + dQ^T) X + dmean / HW`` as two accumulating GEMMs
    (``baddbmm``) into one new tensor.

Only the input and small tensors are saved for backward. When the layer
follows a plain BatchNorm (:meth:`ChannelEquilibrium.follow`), ``X`` is that
BN's per-channel affine map of its input ``Z`` (``X = alpha Z + beta``), and
the BN saves ``Z`` anyway: backward then keeps ``Z`` and works on it directly
(``dout X^T = (dout Z^T) diag(alpha) + (dout 1) beta^T``, and likewise for
``(dQ + dQ^T) X``), so CE adds no full-size tensor to the activation memory
and never rebuilds ``X``. In that case, on CPU, the output can also be
written into ``X``'s own storage, through a cache-sized buffer: a fresh
activation-sized allocation costs more than the GEMM there (page faults).
Statistics, Gram matrices and Newton iterations run in float32 (or float64 for a
float64 input) whatever the input dtype; the output has the input dtype.
"""
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

#: A hook that sums small statistic tensors over processes (SyncCE), or None.
ReduceFn = Optional[Callable[[Tensor], Tensor]]
#: ``(z, alpha, beta)``: the input is ``z * alpha + beta`` per channel (up to
#: rounding), with ``alpha`` and ``beta`` of shape (C,) in the statistics
#: dtype; backward then saves ``z`` instead of the input.
Source = Tuple[Tensor, Tensor, Tensor]

#: Column chunk of the in-place apply, in bytes (a few MiB: stays in cache).
INPLACE_CHUNK_BYTES = 4 << 20


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype the statistics are computed in: float64 stays, the rest float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def newton_whitening(cov: Tensor, num_iters: int) -> Tensor:
    """Approximate inverse square root by Newton's iterations, as published.

    ``S_N = S / tr(S)``, ``P_0 = I``, ``P_{k+1} = 1.5 P_k - 0.5 P_k^3 S_N``;
    returns ``P_T`` (not rescaled by the trace).

    Args:
        cov (Tensor): (G, d, d) covariance matrices (eps already added).
        num_iters (int): T, the number of iterations (>= 1).

    Returns:
        Tensor: (G, d, d) whitening matrices.
    """
    trace = cov.diagonal(dim1=-2, dim2=-1).sum(-1)
    cov_n = cov / trace[:, None, None]
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
    # P_1 = 1.5 I - 0.5 S_N exactly (I^3 S_N is S_N bit for bit)
    p = 1.5 * eye - 0.5 * cov_n
    for _ in range(num_iters - 1):
        p = 1.5 * p - 0.5 * torch.linalg.matrix_power(p, 3) @ cov_n
    return p


def instance_weights(var: Tensor, fc1_weight: Tensor, ln_weight: Tensor,
                     ln_bias: Tensor, fc2_weight: Tensor,
                     ln_eps: float) -> Tensor:
    """``sigmoid(fc2(relu(LN(fc1(v)))))`` of the instance reweighting branch."""
    hidden = F.linear(var, fc1_weight)
    hidden = F.layer_norm(hidden, hidden.shape[-1:], ln_weight, ln_bias,
                          ln_eps)
    return torch.sigmoid(F.linear(F.relu(hidden), fc2_weight))


def local_statistics(mean: Tensor, second: Tensor, hw: int, training: bool
                     ) -> Tuple[Tensor, Optional[Tensor]]:
    """Per-sample variances and (training) this process's batch sums.

    Args:
        mean (Tensor): per-sample channel means (N, C).
        second (Tensor): training: per-sample Gram matrices (N, G, d, d);
            eval: per-sample unbiased variances (N, C).
        hw (int): H * W.
        training (bool): which of the two ``second`` holds.

    Returns:
        tuple: ``v`` (N, C), and in training the flat sufficient statistics
        ``[sum_{n,c} v, N, N*H*W, sum_{n,hw} x (C), sum_n Gram (G*d*d)]``
        that SyncCE sums over processes (None in eval). Positions are
        counted apart from samples because processes may see different
        spatial sizes (detection pads each batch to its own size).
    """
    if not training:
        return second, None
    n, c = mean.shape
    # unbiased per-sample variance from the Gram diagonal; clamp the rounding
    # error of the difference, never a defined value.
    sumsq = second.diagonal(dim1=-2, dim2=-1).reshape(n, c)
    var = ((sumsq - hw * mean * mean) / max(hw - 1, 1)).clamp_min(0)
    counts = torch.tensor([float(n), float(n * hw)],
                          dtype=mean.dtype,
                          device=mean.device)
    sums = torch.cat([
        var.sum().reshape(1), counts,
        hw * mean.sum(0),
        second.sum(0).reshape(-1)
    ])
    return var, sums


def block_map(var: Tensor, sums: Optional[Tensor], params: Tuple[Tensor, ...],
              buffers: Tuple[Tensor, Tensor], group_size: int,
              num_iters: int, eps: float
              ) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """The per-sample block-diagonal map ``A`` from statistics and parameters.

    ``A[n, g] = sig(a) W_g + (1 - sig(a)) diag(y[n, g] / s)``.

    Args:
        var (Tensor): per-sample unbiased variances (N, C).
        sums (Tensor, optional): the (global) batch sums of
            :func:`local_statistics` in training; None in eval, where the
            running buffers are used.
        params (tuple[Tensor]): gate (1,), fc1 weight, LN weight, LN bias, fc2
            weight.
        buffers (tuple[Tensor]): running whitening matrices (G, d, d) and
            running scale (1,).
        group_size (int): d.
        num_iters (int): Newton iterations.
        eps (float): the covariance ridge, the scale floor and the LN eps.

    Returns:
        tuple: ``A`` (N, G, d, d) in the statistics dtype, and in training the
        batch whitening matrices (G, d, d) and scale (1,) for the running
        averages (None, None in eval).
    """
    gate, fc1_w, ln_w, ln_b, fc2_w = params
    n, c = var.shape
    g = c // group_size
    if sums is not None:
        var_sum, samples, positions = sums[0:1], sums[1:2], sums[2:3]
        x_sum = sums[3:3 + c]
        gram_sum = sums[3 + c:].reshape(g, group_size, group_size)
        # s = sqrt(mean v); clamping under the sqrt keeps its gradient finite
        scale = torch.sqrt((var_sum / (samples * c)).clamp_min(eps * eps))
        mu = (x_sum / positions).reshape(g, group_size, 1)
        eye = torch.eye(group_size, dtype=var.dtype, device=var.device)
        cov = gram_sum / positions - mu @ mu.transpose(1, 2) + eps * eye
        wm = newton_whitening(cov, num_iters)
    else:
        wm = buffers[0].to(var.dtype)
        scale = buffers[1].to(var.dtype).clamp_min(eps)
    y = instance_weights(var, fc1_w.to(var.dtype), ln_w.to(var.dtype),
                         ln_b.to(var.dtype), fc2_w.to(var.dtype), eps)
    lam = torch.sigmoid(gate.to(var.dtype))
    diag = ((1 - lam) * y / scale).reshape(n, g, group_size)
    a = lam * wm.unsqueeze(0) + torch.diag_embed(diag)
    if sums is not None:
        return a, wm, scale
    return a, None, None


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
        inplace (bool): write into ``x`` (:func:`apply_inplace`), unless it
            is no larger than one chunk.
        bias (Tensor, optional): (N, G, d, 1), added to every position.

    Returns:
        Tensor: ``x`` itself, or a new (N, C, H, W) tensor (not a view:
        callers may modify the output in place, ``out += identity``).
    """
    xg = _grouped(x, group_size)
    if inplace and x.nbytes > INPLACE_CHUNK_BYTES:
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


def eval_after_affine(z: Tensor, alpha: Tensor, beta: Tensor,
                      params: Tuple[Tensor, ...], running_wm: Tensor,
                      running_scale: Tensor, group_size: int, eps: float,
                      inplace: bool) -> Tensor:
    """Eval-mode CE of ``x = z * alpha + beta`` (per channel), from ``z``.

    For a BatchNorm in eval mode followed by CE in eval mode, without
    autograd (inference): the BN's pass is not needed. The per-sample
    variance of ``x`` is ``alpha^2`` times that of ``z``, and
    ``A x = (A diag(alpha)) z + A beta``: one statistics pass over ``z`` and
    one GEMM with a bias. Equal to ``CE(BN(z))`` up to rounding.

    Args:
        z (Tensor): (N, C, H, W) contiguous, the BN's input.
        alpha (Tensor): (C,) BN scale, float32 (float64 for float64 ``z``).
        beta (Tensor): (C,) BN shift, same dtype.
        params, running_wm, running_scale, group_size, eps: as for
            :func:`channel_equilibrium`.
        inplace (bool): write the result into ``z`` (returned); otherwise
            into a new tensor.

    Returns:
        Tensor: ``CE(z * alpha + beta)``, the dtype of ``z``.
    """
    g, d = z.shape[1] // group_size, group_size
    zg = _grouped(z, d)
    _, var_z = instance_moments(zg, compute_dtype(z.dtype))
    a, _, _ = block_map(var_z * alpha * alpha, None, params,
                        (running_wm, running_scale), group_size, 1, eps)
    bias = (a @ beta.view(1, g, d, 1)).to(z.dtype)
    a = (a * alpha.view(1, g, 1, d)).to(z.dtype)
    return apply_map(a, z, d, inplace, bias)


class _CEFunction(torch.autograd.Function):
    """Channel Equilibrium with a recomputing backward (see module doc)."""

    @staticmethod
    def forward(ctx, x: Tensor, wm_buf: Tensor, scale_buf: Tensor,
                group_size: int, num_iters: int, eps: float, training: bool,
                reduce_fn: ReduceFn, source: Optional[Source], inplace: bool,
                *params: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        n, c, h, w = x.shape
        hw = h * w
        cdt = compute_dtype(x.dtype)
        xg = _grouped(x, group_size)
        if training:
            # float32 copy for half inputs: Gram entries sum HW products and
            # would overflow / round badly in fp16
            xs = xg if x.dtype == cdt else xg.to(cdt)
            mean = xs.mean(-1).reshape(n, c)
            second = torch.matmul(xs, xs.transpose(-1, -2))
            del xs
        else:
            mean, second = instance_moments(xg, cdt)
        with torch.no_grad():
            var, sums = local_statistics(mean, second, hw, training)
            if sums is not None and reduce_fn is not None:
                sums = reduce_fn(sums)  # SyncCE: global batch statistics
            a, wm, scale = block_map(var, sums, params, (wm_buf, scale_buf),
                                     group_size, num_iters, eps)
        out = apply_map(a.to(x.dtype), x, group_size, inplace)
        if out is x:
            ctx.mark_dirty(x)
        if not training:
            wm = scale = torch.empty(0, dtype=cdt, device=x.device)
            sums = torch.empty(0, dtype=cdt, device=x.device)
        # Save the input, or (after a BN) the BN's input, which the BN saves
        # anyway, with the BN's per-channel affine map.
        kept, alpha, beta = (x, None, None) if source is None else source
        ctx.save_for_backward(kept, alpha, beta, mean, second, sums, a,
                              wm_buf, scale_buf, *params)
        ctx.conf = (group_size, num_iters, eps, training, reduce_fn)
        ctx.mark_non_differentiable(wm, scale)
        return out, wm, scale

    @staticmethod
    def backward(ctx, grad_out: Tensor, _grad_wm, _grad_scale):
        (z, alpha, beta, mean, second, sums, a, wm_buf, scale_buf,
         *params) = ctx.saved_tensors
        group_size, num_iters, eps, training, reduce_fn = ctx.conf
        n, c, h, w = z.shape
        g, d, hw = c // group_size, group_size, h * w
        cdt = a.dtype
        # the input X is z (alpha, beta None) or z * alpha + beta per channel
        zg = _grouped(z.contiguous(), d)
        go = _grouped(grad_out.contiguous(), d)
        lowp = z.dtype != cdt
        go_c = go.to(cdt) if lowp else go
        z_c = zg.to(cdt) if lowp else zg
        # dL/dA[n, g] = dout[n, g] @ X[n, g]^T, reduced over HW in cdt
        grad_a = torch.matmul(go_c, z_c.transpose(-1, -2))
        if alpha is not None:
            grad_a.mul_(alpha.view(1, g, 1, d)).addcmul_(
                go_c.sum(-1, keepdim=True), beta.view(1, g, 1, d))

        need_params = ctx.needs_input_grad[10:]
        synced = training and reduce_fn is not None
        with torch.enable_grad():
            mean_l = mean.detach().requires_grad_()
            second_l = second.detach().requires_grad_()
            leaf_params = tuple(
                p.detach().requires_grad_(bool(req))
                for p, req in zip(params, need_params))
            var, local_sums = local_statistics(mean_l, second_l, hw, training)
            # without SyncCE the batch sums are this process's own: one graph
            glob = sums.detach().requires_grad_() if synced else local_sums
            a_re, _, _ = block_map(var, glob, leaf_params, (wm_buf, scale_buf),
                                   group_size, num_iters, eps)
            outputs, grad_outputs = [a_re], [grad_a]
            if synced:
                # dL/d(global sums): every process's loss depends on them, so
                # their gradients are summed (as SyncBN's)
                d_glob, = torch.autograd.grad(
                    a_re, glob, grad_a, retain_graph=True)
                outputs.append(local_sums)
                grad_outputs.append(reduce_fn(d_glob))
            wrt = [mean_l, second_l
                   ] + [p for p in leaf_params if p.requires_grad]
            grads = torch.autograd.grad(
                outputs, wrt, grad_outputs, allow_unused=True)
        d_mean, d_second = grads[0], grads[1]
        param_grads = iter(grads[2:])
        d_params = [
            next(param_grads) if p.requires_grad else None
            for p in leaf_params
        ]
        d_params = [
            torch.zeros_like(p) if (d is None and p.requires_grad) else d
            for p, d in zip(leaf_params, d_params)
        ]

        grad_x = None
        if ctx.needs_input_grad[0]:
            # dX = A^T dout + S X + b, with S and b from the statistics' grads
            if training:
                s_mat = d_second + d_second.transpose(-1, -2)
                b = d_mean.reshape(n, g, d, 1) / hw
            else:
                # v = sum((x - m)^2) / (HW - 1): dv -> 2 dv (x - m) / (HW - 1)
                coef = (2 * d_second / max(hw - 1, 1)).reshape(n, g, d)
                s_mat = torch.diag_embed(coef)
                b = (-coef * mean.reshape(n, g, d)).unsqueeze(-1)
            if alpha is not None:  # S X = (S diag(alpha)) z + S beta
                b = b + s_mat @ beta.view(1, g, d, 1)
                s_mat = s_mat * alpha.view(1, g, 1, d)
            dx = torch.baddbmm(
                b.reshape(n * g, d, 1).expand(n * g, d, hw),
                s_mat.reshape(n * g, d, d), z_c.reshape(n * g, d, hw))
            dx.baddbmm_(a.transpose(-1, -2).reshape(n * g, d, d),
                        go_c.reshape(n * g, d, hw))
            grad_x = dx.view(n, c, h, w).to(z.dtype)
        return (grad_x, None, None, None, None, None, None, None, None, None,
                *d_params)


def channel_equilibrium(x: Tensor, params: Tuple[Tensor, ...],
                        running_wm: Tensor, running_scale: Tensor,
                        group_size: int, num_iters: int, eps: float,
                        momentum: float, training: bool,
                        reduce_fn: ReduceFn = None,
                        source: Optional[Source] = None,
                        inplace: bool = False) -> Tensor:
    """Functional Channel Equilibrium on a contiguous (N, C, H, W) tensor.

    Args:
        x (Tensor): NCHW-contiguous input.
        params (tuple[Tensor]): gate (1,), fc1 weight (C', C), LN weight (C',),
            LN bias (C',), fc2 weight (C, C').
        running_wm (Tensor): (G, d, d) running whitening matrices, updated in
            place in training.
        running_scale (Tensor): (1,) running IR scale, updated in place in
            training.
        group_size (int): channels per whitening group.
        num_iters (int): Newton iterations.
        eps (float): covariance ridge, scale floor and LayerNorm eps.
        momentum (float): running-average momentum (PyTorch convention).
        training (bool): use batch statistics and update running buffers.
        reduce_fn (callable, optional): sums statistics over processes.
        source (tuple, optional): ``(z, alpha, beta)`` with ``x`` equal to
            ``z * alpha[c] + beta[c]`` up to rounding (the preceding
            BatchNorm's input and affine map; ``alpha``, ``beta`` of shape
            (C,) in float32, float64 for a float64 ``x``): backward saves
            ``z`` instead of ``x`` and never rebuilds ``x``. When ``z`` is
            saved by another op anyway, CE then adds no full-size tensor to
            the activation memory.
        inplace (bool): write the output into ``x`` (returned). Only when
            nothing else reads ``x`` afterwards; with autograd, only with a
            ``source`` (backward must not need ``x``). Tensors of a few MiB
            or less are not worth it and get a new output anyway.

    Returns:
        Tensor: same shape and dtype as ``x``.
    """
    if inplace and source is None and torch.is_grad_enabled() and \
            x.requires_grad:
        raise ValueError('inplace=True with autograd needs a source: the '
                         'backward would read the overwritten input')
    if training:
        # Training reads no running buffer (and must not save one: the update
        # below would trip autograd's version check). Zero-size placeholders
        # keep G and d visible in the op's input shapes (FLOP counting).
        wm_in = running_wm.new_empty(running_wm.shape[:2] + (0, ))
        scale_in = running_scale.new_empty((0, ))
    else:
        wm_in, scale_in = running_wm, running_scale
    out, wm, scale = _CEFunction.apply(x, wm_in, scale_in, group_size,
                                       num_iters, eps, training, reduce_fn,
                                       source, inplace, *params)
    if training and momentum > 0:
        with torch.no_grad():
            running_wm.lerp_(wm.to(running_wm.dtype), momentum)
            running_scale.lerp_(scale.to(running_scale.dtype), momentum)
    return out
