"""The small graph of CE: everything that only touches per-sample and
per-group statistics (instance variances, group Gram matrices), never the
feature map. Its tensors have ``N*C`` and ``G*d*d`` elements; it is plain
autograd and the same for every implementation of the big passes.

With SyncCE the batch sums between :func:`local_statistics` and
:func:`block_map` are summed over processes.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .types import CEConfig, CEParams, CEState


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


def instance_weights(var: Tensor, params: CEParams, ln_eps: float) -> Tensor:
    """``sigmoid(fc2(relu(LN(fc1(v)))))`` of the instance reweighting branch,
    in the dtype of ``var``."""
    dt = var.dtype
    hidden = F.linear(var, params.fc1_weight.to(dt))
    hidden = F.layer_norm(hidden, hidden.shape[-1:], params.ln_weight.to(dt),
                          params.ln_bias.to(dt), ln_eps)
    return torch.sigmoid(F.linear(F.relu(hidden), params.fc2_weight.to(dt)))


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


def block_map(var: Tensor, sums: Optional[Tensor], params: CEParams,
              state: Optional[CEState], config: CEConfig
              ) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """The per-sample block-diagonal map ``A`` from statistics and parameters.

    ``A[n, g] = sig(a) W_g + (1 - sig(a)) diag(y[n, g] / s)``.

    Args:
        var (Tensor): per-sample unbiased variances (N, C).
        sums (Tensor, optional): the (global) batch sums of
            :func:`local_statistics` in training; None in eval, where the
            running ``state`` is used.
        params (CEParams): the layer's parameters.
        state (CEState, optional): the running state (eval only).
        config (CEConfig): group size, Newton iterations, eps.

    Returns:
        tuple: ``A`` (N, G, d, d) in the dtype of ``var``, and in training
        the batch whitening matrices (G, d, d) and scale (1,) for the
        running averages (None, None in eval).
    """
    d, eps = config.group_size, config.eps
    n, c = var.shape
    g = c // d
    if sums is not None:
        var_sum, samples, positions = sums[0:1], sums[1:2], sums[2:3]
        x_sum = sums[3:3 + c]
        gram_sum = sums[3 + c:].reshape(g, d, d)
        # s = sqrt(mean v); clamping under the sqrt keeps its gradient finite
        scale = torch.sqrt((var_sum / (samples * c)).clamp_min(eps * eps))
        mu = (x_sum / positions).reshape(g, d, 1)
        eye = torch.eye(d, dtype=var.dtype, device=var.device)
        cov = gram_sum / positions - mu @ mu.transpose(1, 2) + eps * eye
        wm = newton_whitening(cov, config.num_iters)
    else:
        wm = state.running_wm.to(var.dtype)
        scale = state.running_scale.to(var.dtype).clamp_min(eps)
    y = instance_weights(var, params, eps)
    lam = torch.sigmoid(params.gate.to(var.dtype))
    diag = ((1 - lam) * y / scale).reshape(n, g, d)
    a = lam * wm.unsqueeze(0) + torch.diag_embed(diag)
    if sums is not None:
        return a, wm, scale
    return a, None, None
