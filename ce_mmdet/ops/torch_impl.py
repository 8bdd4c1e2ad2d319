"""The PyTorch implementation of CE's big passes over the feature map, as
batched GEMMs (:class:`TorchPasses`), for the autograd Functions of
:mod:`ce_mmdet.ops.functions`.

CPU-specific: an output may be written into a tensor that nobody reads
afterwards (:func:`apply_inplace`), through a cache-sized buffer. A fresh
activation-sized allocation costs more than the GEMM there (page faults on
first touch); on CUDA the caching allocator makes it free, so new tensors
are written there. Float32 maps and eval statistics on an x86-64 CPU with
AVX2 go to the fused C kernels of :mod:`ce_mmdet.ops.cpu_kernels` where
they can run (one pass each instead of ATen's two or three, the same
numbers to float32 rounding).

Statistics and gradients are accumulated in float32 (float64 for float64
inputs) whatever the input dtype; outputs have the input dtype.
"""
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from . import cpu_kernels, small_graph
from .export import exporting
from .small_graph import compute_dtype, unbiased_divisor

#: Column chunk of the in-place apply, in bytes (a few MiB: stays in cache).
INPLACE_CHUNK_BYTES = 4 << 20


def _grouped(x: Tensor, group_size: int) -> Tensor:
    """(N, C, H, W) contiguous -> (N, G, d, HW) view, no copy."""
    n, c, h, w = x.shape
    return x.view(n, c // group_size, group_size, h * w)


def _map_into(maps: Tensor, cols: Tensor, acc: Tensor, dst: Tensor,
              bias: Optional[Tensor], residual: Optional[Tensor],
              relu: bool) -> None:
    """``dst = maps @ cols (+ bias) (+ residual)``, then ReLU if ``relu``:
    batched (B, d, m) columns, accumulated in ``acc`` (which must not
    overlap ``cols``); ``dst`` may be ``cols`` (in place) or ``acc``.

    The GEMM accumulates onto ``residual + bias``, ``residual`` or the
    broadcast ``bias`` (one GEMM with beta = 1, which first writes that
    term into ``acc``); ReLU is the write to ``dst``, so the sum, the bias
    and the ReLU add no pass of their own over ``dst``.
    """
    if residual is not None:
        if bias is None:
            acc.copy_(residual)
        else:
            torch.add(residual, bias, out=acc)
        acc.baddbmm_(maps, cols)
    elif bias is not None:
        torch.baddbmm(bias.expand_as(acc), maps, cols, out=acc)
    else:
        torch.bmm(maps, cols, out=acc)
    if relu:
        torch.clamp_min(acc, 0, out=dst)
    elif dst is not acc:
        dst.copy_(acc)


def apply_inplace(a: Tensor, xg: Tensor, chunk_bytes: int,
                  bias: Optional[Tensor] = None,
                  residual: Optional[Tensor] = None,
                  relu: bool = False) -> None:
    """``xg[n, g] = a[n, g] @ xg[n, g] (+ bias[n, g]) (+ residual[n, g])``
    in place, then ReLU if ``relu``.

    Groups and columns (positions) are independent, so the product is
    taken over chunks of about ``chunk_bytes`` through one small buffer and
    written back: the same arithmetic as one batched GEMM, without a new
    activation-sized tensor; the bias, the residual and the ReLU are
    applied to each chunk while it is in cache. A chunk is a run of whole
    (sample, group) blocks where one fits (contiguous memory for the input,
    the residual and the write-back), else a run of columns of all blocks.

    Args:
        a (Tensor): (N, G, d, d) maps, dtype of ``xg``.
        xg (Tensor): (N, G, d, HW) contiguous, overwritten.
        chunk_bytes (int): buffer size.
        bias (Tensor, optional): (N, G, d, 1), added to every column.
        residual (Tensor, optional): (N, G, d, HW) contiguous, dtype of
            ``xg``, added to the result (it may be ``xg`` itself).
        relu (bool): ReLU of the result.
    """
    n, g, d, hw = xg.shape
    blocks = n * g
    flat = xg.view(blocks, d, hw)
    maps = a.reshape(blocks, d, d)
    bias = None if bias is None else bias.reshape(blocks, d, 1)
    res = None if residual is None else residual.view(blocks, d, hw)
    per_block = d * hw * xg.element_size()
    if per_block <= chunk_bytes:
        # runs of whole blocks, as equal as the count allows
        step = min(blocks, chunk_bytes // per_block)
        step = -(-blocks // -(-blocks // step))
        buf = xg.new_empty(step * d * hw)
        for start in range(0, blocks, step):
            stop = min(start + step, blocks)
            part = flat[start:stop]
            acc = buf[:(stop - start) * d * hw].view(stop - start, d, hw)
            _map_into(maps[start:stop], part, acc, part,
                      None if bias is None else bias[start:stop],
                      None if res is None else res[start:stop], relu)
        return
    # chunks of equal width (a narrow last one would run ATen's per-matrix
    # loop), each accumulated in a contiguous view of one buffer
    cols = max(1, chunk_bytes // (blocks * d * xg.element_size()))
    chunks = -(-hw // cols)
    cols = -(-hw // chunks)
    buf = xg.new_empty(blocks * d * cols)
    for start in range(0, hw, cols):
        stop = min(start + cols, hw)
        part = flat[..., start:stop]
        acc = buf[:blocks * d * (stop - start)].view(blocks, d, stop - start)
        _map_into(maps, part, acc, part, bias,
                  None if res is None else res[..., start:stop], relu)


def apply_map(a: Tensor, x: Tensor, group_size: int, inplace: bool,
              bias: Optional[Tensor] = None,
              residual: Optional[Tensor] = None,
              relu: bool = False) -> Tensor:
    """``a[n, g] @ X[n, g] (+ bias[n, g]) (+ residual)`` for the groups
    ``X`` of ``x``, then ReLU if ``relu``.

    Args:
        a (Tensor): (N, G, d, d) maps, dtype of ``x``.
        x (Tensor): (N, C, H, W) contiguous.
        group_size (int): d.
        inplace (bool): ``x`` may be overwritten. Done on CPU for tensors
            larger than one chunk (:func:`apply_inplace`); elsewhere a new
            tensor is cheaper or as cheap.
        bias (Tensor, optional): (N, G, d, 1), added to every position.
        residual (Tensor, optional): (N, C, H, W) contiguous, dtype of
            ``x``, added to the result.
        relu (bool): ReLU of the result.

    Returns:
        Tensor: ``x`` itself, or a new (N, C, H, W) tensor (not a view:
        callers may modify the output in place, ``out += identity``).
    """
    if cpu_kernels.usable(x, group_size, residual):  # one fused pass
        out = x if inplace else torch.empty_like(x)
        return cpu_kernels.apply_map(a, x, group_size, out, bias, residual,
                                     relu)
    xg = _grouped(x, group_size)
    rg = None if residual is None else _grouped(residual, group_size)
    if inplace and x.device.type == 'cpu' and x.nbytes > INPLACE_CHUNK_BYTES:
        apply_inplace(a, xg, INPLACE_CHUNK_BYTES, bias, rg, relu)
        return x
    if exporting() or torch.compiler.is_compiling():
        return _traced_apply_map(a, xg, x.shape, bias, residual, relu)
    out = x.new_empty(x.shape)
    n, g, d, hw = xg.shape
    flat = out.view(n * g, d, hw)
    _map_into(a.reshape(n * g, d, d), xg.reshape(n * g, d, hw), flat, flat,
              None if bias is None else bias.reshape(n * g, d, 1),
              None if rg is None else rg.reshape(n * g, d, hw), relu)
    return out


def _traced_apply_map(a: Tensor, xg: Tensor, shape: torch.Size,
                      bias: Optional[Tensor], residual: Optional[Tensor],
                      relu: bool) -> Tensor:
    """:func:`apply_map` for a tracer, in :func:`_map_into`'s order (the
    same numbers) but with functional ops (no ``out=``:
    :mod:`ce_mmdet.ops.export`), and a result that is a (N, C, H, W) tensor
    of its own, never a view of the GEMM's (N * G, d, HW) product: inductor
    (torch 2.11 to 2.13) fails on a view among a graph's outputs once shapes
    are dynamic, sorting its strides without their symbols' ranges ("cannot
    determine truth value of Relational", pytorch/pytorch#185510), and a CE
    output that the next conv saves for its backward is one. The ReLU makes
    that tensor; without it, ``+ 0.0`` does: a copy that inductor keeps
    (it drops ``clone`` as a no-op), exact but for the sign of a zero."""
    n, g, d, hw = xg.shape
    maps, cols = a.reshape(n * g, d, d), xg.reshape(n * g, d, hw)
    if residual is not None:
        start = residual if bias is None else residual + bias.reshape(
            n, g * d, 1, 1)
        out = torch.baddbmm(start.reshape(n * g, d, hw), maps, cols)
    elif bias is not None:
        out = torch.baddbmm(bias.reshape(n * g, d, 1).expand(n * g, d, hw),
                            maps, cols)
    else:
        out = torch.bmm(maps, cols)
    out = out.view(shape)
    return torch.relu(out) if relu else out + 0.0


def instance_moments(xg: Tensor, cdt: torch.dtype) -> Tuple[Tensor, Tensor]:
    """Per-sample channel means and unbiased variances of (N, G, d, HW),
    as (N, G * d) in ``cdt``: from the sum and the sum of squares, one read
    each (``torch.var_mean`` is ~10x slower on CPU); the rounding error of
    the difference is clamped, never a defined value."""
    n, g, d, hw = xg.shape
    mean = xg.mean(-1, dtype=cdt).reshape(n, g * d)
    sumsq = torch.linalg.vector_norm(xg, dim=-1, dtype=cdt).square()
    var = (sumsq.reshape(n, g * d) - hw * mean * mean) / \
        unbiased_divisor(hw)
    return mean, var.clamp_min(0)


def bn_affine(weight: Optional[Tensor], bias: Optional[Tensor],
              mean: Tensor, invstd: Tensor,
              dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """``(alpha, beta)`` with ``BN(z) = alpha z + beta`` per channel, in
    ``dtype``, from the BN's weight and bias (or None), mean and inverse
    standard deviation."""
    alpha = invstd.to(dtype)
    if weight is not None:
        alpha = alpha * weight.to(dtype)
    if bias is None:
        return alpha, -mean.to(dtype) * alpha
    return alpha, torch.addcmul(bias.to(dtype), mean.to(dtype), alpha,
                                value=-1)


class BNAffine(NamedTuple):
    """An eval-mode BatchNorm as the affine map ``alpha x + beta`` it
    applies: its weight and bias (or None), running mean and variance (C,)
    and eps."""
    weight: Optional[Tensor]
    bias: Optional[Tensor]
    mean: Tensor
    var: Tensor
    eps: float

    def alpha_beta(self, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
        """``(alpha, beta)`` in ``dtype``."""
        return bn_affine(self.weight, self.bias, self.mean,
                         torch.rsqrt(self.var.to(dtype) + self.eps), dtype)


class MapResult(NamedTuple):
    """What ``forward_map`` returns.

    Attributes:
        a (Tensor): (N, G, d, d) CE's per-sample block maps.
        a_in (Tensor): the map to apply to the op's input: ``a``, or ``a
            diag(alpha)`` with an affine input map.
        bias (Tensor, optional): (N, G, d, 1) ``a beta`` with an affine
            input map.
        wm, scale (Tensor): batch whitening matrices and scale (training).
        cache (SmallGraphCache): for :func:`small_graph.backward`.
        var_in (Tensor, optional): per-sample variances of the input
            itself (N, C), with an affine input map.
        alpha, beta (Tensor, optional): (C,) the affine input map.
    """
    a: Tensor
    a_in: Tensor
    bias: Optional[Tensor]
    wm: Tensor
    scale: Tensor
    cache: 'small_graph.SmallGraphCache'
    var_in: Optional[Tensor]
    alpha: Optional[Tensor] = None
    beta: Optional[Tensor] = None


def map_from_stats(mean: Tensor, second: Tensor, hw: int, params, state,
                   config, training: bool, reduce_fn, affine) -> MapResult:
    """:func:`small_graph.forward` on statistics of the input (eval with an
    affine map, a :class:`BNAffine`: of ``alpha x + beta``)."""
    var_in = None
    if affine is not None:  # eval: mean and variance of alpha x + beta
        alpha, beta = affine.alpha_beta(mean.dtype)
        var_in = second
        mean = torch.addcmul(beta, mean, alpha)
        second = second * alpha * alpha
    a, wm, scale, cache = small_graph.forward(mean, second, hw, params,
                                              state, config, training,
                                              reduce_fn)
    if affine is None:
        return MapResult(a, a, None, wm, scale, cache, None)
    n, g, d, _ = a.shape
    bias = a @ beta.view(1, g, d, 1)
    return MapResult(a, a * alpha.view(1, g, 1, d), bias, wm, scale, cache,
                     var_in, alpha, beta)


def input_grad_maps(d_mean: Tensor, d_second: Tensor, mean: Tensor,
                    hw: int, group_size: int,
                    training: bool) -> Tuple[Tensor, Tensor]:
    """``(S, b)`` with ``dX = A^T dout + S X + b`` (the statistics' part).

    Training: ``S = dQ + dQ^T`` (N, G, d, d), ``b = d_mean / HW``.
    Eval: ``v = sum((x - m)^2) / (HW - 1)``, so ``S = diag(coef)`` with
    ``coef = 2 dv / (HW - 1)`` and ``b = -coef m``; returned as the
    diagonal (N, G, d) and ``b`` (N, G, d, 1).
    """
    n, c = mean.shape
    d = group_size
    g = c // d
    if training:
        s_mat = d_second + d_second.transpose(-1, -2)
        b = d_mean.reshape(n, g, d, 1) / hw
        return s_mat, b
    coef = (2 * d_second / unbiased_divisor(hw)).reshape(n, g, d)
    b = (-coef * mean.reshape(n, g, d)).unsqueeze(-1)
    return coef, b


def grad_maps(
        a: Tensor, s_mat: Tensor, b: Tensor, alpha: Optional[Tensor],
        beta: Optional[Tensor], out_scale: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor, Tensor]:
    """``(M1, M2, c)`` with ``diag(out_scale) (A^T dout + S X + b) = M1 dout
    + M2 z + c`` for ``X = alpha z + beta`` (or ``X = z``): the input
    gradient as one pass over ``(dout, z)``.

    Args:
        a (Tensor): (N, G, d, d).
        s_mat (Tensor): (N, G, d, d) or its diagonal (N, G, d).
        b (Tensor): (N, G, d, 1).
        alpha, beta (Tensor, optional): (C,) affine map of ``z``.
        out_scale (Tensor, optional): (C,) per-channel factor of the result.
    """
    n, g, d, _ = a.shape
    if s_mat.dim() == 3:
        s_mat = torch.diag_embed(s_mat)
    if alpha is not None:  # S X = (S diag(alpha)) z + S beta
        b = b + s_mat @ beta.view(1, g, d, 1)
        s_mat = s_mat * alpha.view(1, g, 1, d)
    a_t = a.transpose(-1, -2)
    if out_scale is not None:
        scale = out_scale.view(1, g, d, 1)
        b, s_mat, a_t = b * scale, s_mat * scale, a_t * scale
    return a_t, s_mat, b


class GradMaps(NamedTuple):
    """What ``backward_maps`` returns: the input gradient as ``m1 dout + m2
    kept + shift`` (per sample and group), the CE parameters' gradients and,
    for a folded eval-mode BN, its weight and bias gradients."""
    m1: Tensor
    m2: Tensor
    shift: Tensor
    params: list
    bn_weight: Optional[Tensor] = None
    bn_bias: Optional[Tensor] = None


def backward_maps_from_cross(gz: Tensor, go_sum: Tensor, a: Tensor, cache,
                             hw: int, params, config, training: bool,
                             reduce_fn, affine=None, fold=None) -> GradMaps:
    """:class:`GradMaps` from ``dout kept^T`` and ``dout 1`` (see
    :meth:`TorchPasses.backward_maps`)."""
    n, g, d, _ = a.shape
    c = g * d
    alpha, beta = affine if affine is not None else (None, None)
    # dL/dA = dout X^T = (dout z^T) diag(alpha) + (dout 1) beta^T
    grad_a = gz if alpha is None else \
        gz * alpha.view(1, g, 1, d) + go_sum * beta.view(1, g, 1, d)
    d_mean, d_second, d_params = small_graph.backward(
        grad_a, cache, hw, params, config, training, reduce_fn)
    s_mat, b = input_grad_maps(d_mean, d_second, cache.mean, hw, d, training)
    if fold is None:
        return GradMaps(*grad_maps(a, s_mat, b, alpha, beta), d_params)
    # eval-mode BN folded: dz = alpha dX; its parameter gradients need only
    # per-channel sums of dX and dX z: sum_hw dX = A^T sum_hw dout (the
    # variance term sums to zero), sum_hw dX z = diag(A^T dout z^T) + coef
    # alpha (HW - 1) var_z
    bn_mean, invstd, var_z = fold
    sum_dx = (a.transpose(-1, -2) @ go_sum).reshape(n, c).sum(0)
    sum_dxz = ((a * gz).sum(-2).reshape(n, c) +
               s_mat.reshape(n, c) * alpha * (hw - 1) * var_z).sum(0)
    return GradMaps(*grad_maps(a, s_mat, b, alpha, beta, out_scale=alpha),
                    d_params, (sum_dxz - bn_mean * sum_dx) * invstd, sum_dx)


class BatchBNStats(NamedTuple):
    """The batch statistics of a BatchNorm in training mode folded into the
    op (:func:`batch_bn_map_by`), and the statistics of its input ``z`` they
    came from (all small).

    Attributes:
        mean (Tensor): (C,) batch mean of ``z``.
        unbiased_var (Tensor): (C,) unbiased batch variance (for the running
            variance; the BN divides by the biased one).
        invstd (Tensor): (C,) ``1 / sqrt(biased variance + eps)``.
        mean_z (Tensor): (N, C) per-sample means of ``z``.
        gram_z (Tensor): (N, G, d, d) per-sample group Gram matrices of
            ``z``.
        positions (Tensor, optional): () the number of positions the batch
            statistics are over, with a SyncBN (``bn_reduce_fn``: every
            process's); None: this process's ``N * H * W``.
    """
    mean: Tensor
    unbiased_var: Tensor
    invstd: Tensor
    mean_z: Tensor
    gram_z: Tensor
    positions: Optional[Tensor] = None


def batch_bn_map_by(passes, z: Tensor, params, state, config, reduce_fn,
                    weight: Optional[Tensor], bias: Optional[Tensor],
                    eps: float,
                    bn_reduce_fn=None) -> Tuple[MapResult, BatchBNStats]:
    """``forward_map`` of ``CE(BN(z))`` for a BN with batch statistics and
    CE in training, from one statistics pass over ``z`` (``passes.stats``):
    the BN's batch mean and variance are the sample means of ``z``'s
    per-sample means and Gram diagonals; ``X = alpha z + beta`` is never
    materialised, its statistics follow from ``z``'s (``X - m_X =
    diag(alpha) (z - m_z)`` per sample), and the returned ``a_in, bias``
    apply ``A X`` to ``z``.

    The BN's variance is ``E[z^2] - E[z]^2`` in the compute dtype (float32
    for half and single inputs): exact in float64, and in float32 accurate
    while ``|mean| / std`` of a channel stays below ~100 (conv outputs are
    far inside that).

    ``bn_reduce_fn`` (a SyncBN that synchronises): the BN's per-channel
    sums of ``z`` and ``z^2`` and its count of positions are summed over
    its processes first, in one call, so its batch statistics are the
    global batch's; CE's statistics follow ``reduce_fn`` as without it.
    """
    n, c, h, w = z.shape
    hw = h * w
    d = config.group_size
    g = c // d
    mean_z, gram_z = passes.stats(z, d, True)
    positions = n * hw
    sumsq = gram_z.diagonal(dim1=-2, dim2=-1).reshape(n, c).sum(0)
    if bn_reduce_fn is None:
        mean = mean_z.mean(0)
    else:
        moments = bn_reduce_fn(
            torch.cat([hw * mean_z.sum(0), sumsq,
                       sumsq.new_full((1, ), positions)]))
        sumsq, positions = moments[c:2 * c], moments[2 * c]
        mean = moments[:c] / positions
    var = (sumsq / positions - mean * mean).clamp_min(0)
    invstd = torch.rsqrt(var + eps)
    alpha, beta = bn_affine(weight, bias, mean, invstd, mean.dtype)
    mean_x = mean_z * alpha + beta
    mz = mean_z.reshape(n, g, d, 1)
    mx = mean_x.reshape(n, g, d, 1)
    # outer products as broadcast products (the same values): a batched
    # GEMM with K = 1 runs ATen's per-matrix loop on a CPU, ~20x slower
    centred = gram_z - hw * (mz * mz.transpose(-1, -2))
    gram_x = centred * (alpha.view(1, g, d, 1) * alpha.view(1, g, 1, d)) + \
        hw * (mx * mx.transpose(-1, -2))
    a, wm, scale, cache = small_graph.forward(mean_x, gram_x, hw, params,
                                              state, config, True, reduce_fn)
    result = MapResult(a, a * alpha.view(1, g, 1, d),
                       a @ beta.view(1, g, d, 1), wm, scale, cache, None,
                       alpha, beta)
    return result, BatchBNStats(mean, var * (positions / (positions - 1)),
                                invstd, mean_z, gram_z,
                                None if bn_reduce_fn is None else positions)


def batch_bn_backward_maps_by(passes, grad_out: Tensor, z: Tensor,
                              a: Tensor, cache, params, config, reduce_fn,
                              alpha: Tensor, beta: Tensor,
                              bn: BatchBNStats,
                              weight: Optional[Tensor],
                              bn_reduce_fn=None) -> GradMaps:
    """``backward_maps`` of :func:`batch_bn_map_by`: ``dz = m1 dout + m2 z +
    shift`` and the BN's weight and bias gradients, from one reduction pass
    over ``(dout, z)`` (``passes.cross``).

    CE's input gradient is ``dX = A^T dout + S X + b`` (as for CE alone);
    the BN's backward ``dz = gamma invstd (dX - mean(dX) - xhat mean(dX
    xhat))`` needs only the per-channel sums ``sum dX`` and ``sum dX z``,
    which follow from ``dout z^T``, ``dout 1`` and ``z``'s statistics: the
    BN's backward is folded into the maps (no ``dX`` tensor, no BN pass).
    With a SyncBN (``bn_reduce_fn``) those sums are summed over its
    processes for ``dz`` (one call, after SyncCE's); its weight and bias
    gradients stay this process's, as SyncBN's (DDP sums them).
    """
    gz, go_sum = passes.cross(grad_out, z, config.group_size)
    n, g, d, _ = a.shape
    c = g * d
    hw = z.shape[2] * z.shape[3]
    positions = n * hw if bn.positions is None else bn.positions
    # dL/dA = dout X^T = (dout z^T) diag(alpha) + (dout 1) beta^T
    grad_a = gz * alpha.view(1, g, 1, d) + go_sum * beta.view(1, g, 1, d)
    d_mean, d_second, d_params = small_graph.backward(
        grad_a, cache, hw, params, config, True, reduce_fn)
    s_mat, b = input_grad_maps(d_mean, d_second, cache.mean, hw, d, True)
    # per-sample sums over positions: sum dX and sum dX z (diagonal)
    a_t = a.transpose(-1, -2)
    xsum = hw * cache.mean.reshape(n, g, d, 1)
    sum_dx = (a_t @ go_sum + s_mat @ xsum + hw * b).reshape(n, c).sum(0)
    mz = bn.mean_z.reshape(n, g, d)
    # sum_hw x_j z_i = alpha_j Gram_z[j, i] + beta_j hw m_z[i]
    xz = bn.gram_z * alpha.view(1, g, d, 1) + \
        hw * beta.view(1, g, d, 1) * mz.unsqueeze(-2)
    sum_dxz = ((a * gz).sum(-2) + (s_mat * xz.transpose(-1, -2)).sum(-1) +
               hw * b.squeeze(-1) * mz).reshape(n, c).sum(0)
    sum_dx_xhat = (sum_dxz - bn.mean * sum_dx) * bn.invstd
    all_dx, all_dx_xhat = sum_dx, sum_dx_xhat  # over the BN's batch
    if bn_reduce_fn is not None:
        sums = bn_reduce_fn(torch.cat([sum_dx, sum_dx_xhat]))
        all_dx, all_dx_xhat = sums[:c], sums[c:]
    # dz = c1 dX - c1 invstd k z + c1 (invstd mean k - sum dX / P),
    # c1 = gamma invstd, k = sum(dX xhat) / P
    c1 = bn.invstd if weight is None else bn.invstd * weight.to(a.dtype)
    k = all_dx_xhat / positions
    m1, m2, shift = grad_maps(a, s_mat, b, alpha, beta, out_scale=c1)
    m2 = m2 - torch.diag_embed((c1 * bn.invstd * k).view(1, g, d))
    shift = shift + (c1 * (bn.invstd * bn.mean * k -
                           all_dx / positions)).view(1, g, d, 1)
    return GradMaps(m1, m2, shift, d_params, sum_dx_xhat, sum_dx)


def forward_map_by(passes, x: Tensor, params, state, config,
                   training: bool, reduce_fn, affine) -> MapResult:
    """``forward_map`` from a pass implementation's ``stats`` and the torch
    small graph."""
    hw = x.shape[2] * x.shape[3]
    mean, second = passes.stats(x, config.group_size, training)
    return map_from_stats(mean, second, hw, params, state, config, training,
                          reduce_fn, affine)


def backward_maps_by(passes, grad_out: Tensor, kept: Tensor, a: Tensor,
                     cache, params, config, training: bool, reduce_fn,
                     affine, fold) -> GradMaps:
    """``backward_maps`` from a pass implementation's ``cross`` and the
    torch small graph."""
    gz, go_sum = passes.cross(grad_out, kept, config.group_size)
    hw = kept.shape[2] * kept.shape[3]
    return backward_maps_from_cross(gz, go_sum, a, cache, hw, params, config,
                                    training, reduce_fn, affine, fold)


class TorchPasses:
    """The big passes by PyTorch ops. Every pass takes and returns
    (N, C, H, W) contiguous activations and small (N, G, d, d) / (N, G, d,
    1) matrices in the compute dtype."""

    name = 'torch'
    #: a BN with batch statistics before CE in training is folded into the
    #: op (:func:`batch_bn_map_by`): no BN pass forward or backward
    fuses_batch_bn = True

    @staticmethod
    def batch_bn_map(z: Tensor, params, state, config, reduce_fn,
                     weight: Optional[Tensor], bias: Optional[Tensor],
                     eps: float,
                     bn_reduce_fn=None) -> Tuple[MapResult, BatchBNStats]:
        """``forward_map`` with a batch-statistics BN folded in
        (:func:`batch_bn_map_by`)."""
        return batch_bn_map_by(TorchPasses, z, params, state, config,
                               reduce_fn, weight, bias, eps, bn_reduce_fn)

    @staticmethod
    def batch_bn_backward_maps(grad_out: Tensor, z: Tensor, a: Tensor,
                               cache, params, config, reduce_fn,
                               alpha: Tensor, beta: Tensor,
                               bn: BatchBNStats,
                               weight: Optional[Tensor],
                               bn_reduce_fn=None) -> GradMaps:
        """``backward_maps`` of :meth:`batch_bn_map`
        (:func:`batch_bn_backward_maps_by`)."""
        return batch_bn_backward_maps_by(TorchPasses, grad_out, z, a, cache,
                                         params, config, reduce_fn, alpha,
                                         beta, bn, weight, bn_reduce_fn)

    @staticmethod
    def stats(x: Tensor, group_size: int,
              training: bool) -> Tuple[Tensor, Tensor]:
        """Per-sample channel means (N, C) and, in training, per-sample
        group Gram matrices ``X X^T`` (N, G, d, d), in eval per-sample
        unbiased variances (N, C)."""
        n, c = x.shape[:2]
        cdt = compute_dtype(x.dtype)
        xg = _grouped(x, group_size)
        if not training:
            if cpu_kernels.usable(x, group_size):  # one read, not two
                return cpu_kernels.moments(x)
            return instance_moments(xg, cdt)
        # float32 copy for half inputs: Gram entries sum HW products and
        # would overflow / round badly in fp16
        xs = xg if x.dtype == cdt else xg.to(cdt)
        mean = xs.mean(-1).reshape(n, c)
        return mean, torch.matmul(xs, xs.transpose(-1, -2))

    @staticmethod
    def forward_map(x: Tensor, params, state, config, training: bool,
                    reduce_fn, affine=None, keep: bool = True) -> MapResult:
        """Statistics of ``x`` and the small graph (:func:`map_from_stats`;
        ``affine`` only in eval). ``keep``: whether the backward will run;
        without it an implementation may leave out what only the backward
        reads (the small graph's cache, ``a`` where ``a_in`` differs, and
        in eval ``var_in`` and ``scale``), which are then None. Here
        everything is made (the torch small graph computes it anyway),
        except in eval without ``keep`` where the fused CPU kernels take the
        call (:mod:`ce_mmdet.ops.cpu_kernels`): the statistics and the
        small graph are then two kernel calls, and only ``a_in`` and
        ``bias`` are made (``a`` too without ``affine``)."""
        d = config.group_size
        if not training and not keep and cpu_kernels.usable(x, d) and \
                cpu_kernels.takes_eval_small(params, state, affine):
            _, var = cpu_kernels.moments(x)
            a_in, bias = cpu_kernels.eval_small_graph(var, params, state,
                                                      config.eps, d, affine)
            return MapResult(a_in if affine is None else None, a_in, bias,
                             None, None, None, None)
        return forward_map_by(TorchPasses, x, params, state, config,
                              training, reduce_fn, affine)

    @staticmethod
    def cross(go: Tensor, z: Tensor,
              group_size: int) -> Tuple[Tensor, Tensor]:
        """``(go z^T, go 1)`` per sample and group: (N, G, d, d) and
        (N, G, d, 1), in the compute dtype."""
        cdt = compute_dtype(z.dtype)
        gog = _grouped(go, group_size).to(cdt)
        zg = _grouped(z, group_size).to(cdt)
        return (torch.matmul(gog, zg.transpose(-1, -2)),
                gog.sum(-1, keepdim=True))

    @staticmethod
    def backward_maps(grad_out: Tensor, kept: Tensor, a: Tensor, cache,
                      params, config, training: bool, reduce_fn,
                      affine=None, fold=None) -> GradMaps:
        """The backward's small part: ``dout kept^T`` and ``dout 1``, the
        small graph's backward, and the maps of the input gradient.

        Args:
            grad_out (Tensor): dL/d(out), (N, C, H, W) contiguous.
            kept (Tensor): the saved input (X, or Z with ``affine``).
            a (Tensor): (N, G, d, d) the forward's block maps.
            cache (SmallGraphCache): the forward's small-graph cache.
            affine (tuple, optional): ``(alpha, beta)``, ``X = alpha kept +
                beta``.
            fold (tuple, optional): ``(bn_mean, invstd, var_z)`` of an
                eval-mode BN folded into the op: the maps give ``dZ`` and
                the BN's parameter gradients are returned too.
        """
        return backward_maps_by(TorchPasses, grad_out, kept, a, cache,
                                params, config, training, reduce_fn, affine,
                                fold)

    @staticmethod
    def apply(a: Tensor, x: Tensor, group_size: int, inplace: bool,
              bias: Optional[Tensor] = None,
              residual: Optional[Tensor] = None,
              relu: bool = False) -> Tensor:
        """``a X (+ bias) (+ residual)`` per sample and group, then ReLU
        if ``relu`` (:func:`apply_map`: the sum and the ReLU in the map's
        own pass). ``residual``: NCHW-contiguous, the dtype of ``x``."""
        return apply_map(a.to(x.dtype), x, group_size, inplace,
                         None if bias is None else bias.to(x.dtype),
                         residual, relu)

    @staticmethod
    def apply2(m1: Tensor, p: Tensor, m2: Tensor, q: Tensor, b: Tensor,
               group_size: int) -> Tensor:
        """``m1 P + m2 Q + b`` per sample and group, accumulated in the
        compute dtype (two accumulating GEMMs into one new tensor); the
        result has the dtype of ``q``."""
        cdt = m1.dtype
        n, c, h, w = q.shape
        g, d, hw = c // group_size, group_size, h * w
        pg = _grouped(p, d).to(cdt).reshape(n * g, d, hw)
        qg = _grouped(q, d).to(cdt).reshape(n * g, d, hw)
        out = torch.baddbmm(
            b.reshape(n * g, d, 1).expand(n * g, d, hw),
            m2.reshape(n * g, d, d), qg)
        out.baddbmm_(m1.reshape(n * g, d, d), pg)
        return out.view(n, c, h, w).to(q.dtype)
