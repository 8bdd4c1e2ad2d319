"""The Triton implementation of CE's big passes over the feature map
(:class:`TritonPasses`), for the autograd Functions of
:mod:`ce_mmdet.ops.functions`.

Two kernels, each one pass over memory, reading activations in their own
dtype (float32, float16, bfloat16) and accumulating in float32 (``tl.dot``
with ``input_precision='ieee'``: no TF32):

* :func:`_stats_kernel`: for each sample ``n`` and group ``g``, over a slice
  of the ``H*W`` positions, the ``d x d`` product ``P Q^T`` (or only its
  diagonal) and the row sums of ``P`` (and ``Q``). With ``P = Q = X`` these
  are CE's training statistics (Gram matrices and channel sums), with the
  diagonal only its eval statistics (sums and sums of squares), with
  ``P = dout, Q = Z`` the backward reductions ``dout Z^T`` and ``dout 1``.
  The positions are split over several programs (enough to fill the GPU
  when ``N * G`` is small, as in detection's 2 images per GPU); their
  partial results are summed by one torch reduction.
* :func:`_map_kernel`: ``out[n, g] = M1[n, g] P[n, g] (+ M2[n, g] Q[n, g])
  (+ b[n, g])`` over a block of positions per program: CE's apply (``M1 =
  A``, with the BN's affine map folded into ``M1`` and ``b`` after a BN) and
  the input gradient (``M1 = A^T``, ``M2 = S``, ``P = dout``, ``Q = Z``).
  Each program reads its tile before writing it, so the output may be the
  input itself (in place).

Block sizes follow ``d`` (``tl.dot`` needs tiles of at least 16: groups of 8
are padded by masking); any ``H*W`` (1 included) and ``N`` work.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

#: Programs to aim for in a statistics launch (a few per SM of a large GPU).
_TARGET_PROGRAMS = 512


class LaunchStats:
    """How many kernels this module launched, and whether one is running
    (read by :class:`ce_mmdet.analysis.launches.LaunchCounter`, which must
    not count the torch ops Triton's interpreter runs inside a launch)."""
    launches = 0
    running = False


def _launch(kernel, grid, *args, **kwargs) -> None:
    LaunchStats.launches += 1
    LaunchStats.running = True
    try:
        kernel[grid](*args, **kwargs)
    finally:
        LaunchStats.running = False


@triton.jit
def _stats_kernel(P, Q, OUT_PQ, OUT_PS, OUT_QS, HW, CHUNK, NSPLIT,
                  D: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_HW: tl.constexpr, CROSS: tl.constexpr,
                  FULL: tl.constexpr):
    """Program (ng, s): rows ``ng*D ... ng*D + D - 1`` of the (N*C, HW)
    matrices P (and Q), positions ``s*CHUNK ... min((s+1)*CHUNK, HW) - 1``.
    Writes ``P Q^T`` (FULL) or ``sum(P * Q)`` per row, and the row sums,
    to slot ``ng * NSPLIT + s`` of the outputs."""
    ng = tl.program_id(0)
    s = tl.program_id(1)
    rows = tl.arange(0, BLOCK_D)
    rmask = rows < D
    base = ng.to(tl.int64) * D * HW
    start = s * CHUNK
    end = tl.minimum(start + CHUNK, HW)
    if FULL:
        acc = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_D, ), dtype=tl.float32)
    psum = tl.zeros((BLOCK_D, ), dtype=tl.float32)
    qsum = tl.zeros((BLOCK_D, ), dtype=tl.float32)
    for off in range(start, end, BLOCK_HW):
        cols = off + tl.arange(0, BLOCK_HW)
        mask = rmask[:, None] & (cols[None, :] < end)
        offs = base + rows[:, None] * HW + cols[None, :]
        p = tl.load(P + offs, mask=mask, other=0.).to(tl.float32)
        if CROSS:
            q = tl.load(Q + offs, mask=mask, other=0.).to(tl.float32)
            qsum += tl.sum(q, 1)
        else:
            q = p
        if FULL:
            acc += tl.dot(p, tl.trans(q), input_precision='ieee')
        else:
            acc += tl.sum(p * q, 1)
        psum += tl.sum(p, 1)
    slot = (ng * NSPLIT + s).to(tl.int64)
    if FULL:
        out = slot * D * D + rows[:, None] * D + rows[None, :]
        tl.store(OUT_PQ + out, acc, mask=rmask[:, None] & rmask[None, :])
    else:
        tl.store(OUT_PQ + slot * D + rows, acc, mask=rmask)
    tl.store(OUT_PS + slot * D + rows, psum, mask=rmask)
    if CROSS:
        tl.store(OUT_QS + slot * D + rows, qsum, mask=rmask)


@triton.jit
def _map_kernel(M1, P, M2, Q, B, OUT, HW, D: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_HW: tl.constexpr,
                HAS_Q: tl.constexpr, HAS_B: tl.constexpr):
    """Program (ng, j): ``OUT = M1 P (+ M2 Q) (+ B)`` for the rows of
    sample-group ``ng`` and the j-th block of positions."""
    ng = tl.program_id(0)
    j = tl.program_id(1)
    rows = tl.arange(0, BLOCK_D)
    rmask = rows < D
    cols = j * BLOCK_HW + tl.arange(0, BLOCK_HW)
    mask = rmask[:, None] & (cols[None, :] < HW)
    offs = ng.to(tl.int64) * D * HW + rows[:, None] * HW + cols[None, :]
    moffs = ng.to(tl.int64) * D * D + rows[:, None] * D + rows[None, :]
    mmask = rmask[:, None] & rmask[None, :]
    m1 = tl.load(M1 + moffs, mask=mmask, other=0.)
    p = tl.load(P + offs, mask=mask, other=0.).to(tl.float32)
    acc = tl.dot(m1, p, input_precision='ieee')
    if HAS_Q:
        m2 = tl.load(M2 + moffs, mask=mmask, other=0.)
        q = tl.load(Q + offs, mask=mask, other=0.).to(tl.float32)
        acc += tl.dot(m2, q, input_precision='ieee')
    if HAS_B:
        b = tl.load(B + ng.to(tl.int64) * D + rows, mask=rmask, other=0.)
        acc += b[:, None]
    tl.store(OUT + offs, acc.to(OUT.dtype.element_ty), mask=mask)


def _blocks(d: int) -> Tuple[int, int]:
    """(BLOCK_D, BLOCK_HW): ``d`` padded to a power of two >= 16, and a
    position block that keeps a tile at about 2K elements."""
    block_d = max(16, triton.next_power_of_2(d))
    return block_d, max(16, 2048 // block_d)


def _check(x: Tensor, name: str) -> None:
    if not x.is_contiguous():
        raise ValueError(f'{name} must be contiguous')


def _statistics(p: Tensor, q: Optional[Tensor], group_size: int,
                full: bool) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """Sums over positions, per sample and group: ``P Q^T`` (N, G, d, d)
    or ``sum(P * Q)`` (N, C), and the row sums of P (N, C) (and Q)."""
    n, c, h, w = p.shape
    d, hw = group_size, h * w
    g = c // d
    block_d, block_hw = _blocks(d)
    _check(p, 'P')
    cross = q is not None
    if cross:
        _check(q, 'Q')
    # split the positions so that the launch has enough programs
    split = max(1, min(triton.cdiv(hw, block_hw),
                       triton.cdiv(_TARGET_PROGRAMS, n * g)))
    chunk = triton.cdiv(triton.cdiv(hw, split), block_hw) * block_hw
    split = triton.cdiv(hw, chunk)
    f32 = dict(dtype=torch.float32, device=p.device)
    pq = torch.empty((n * g, split) + ((d, d) if full else (d, )), **f32)
    ps = torch.empty((n * g, split, d), **f32)
    qs = torch.empty((n * g, split, d), **f32) if cross else ps
    _launch(
        _stats_kernel, (n * g, split),
        p, q if cross else p, pq, ps, qs, hw, chunk, split, D=d,
        BLOCK_D=block_d, BLOCK_HW=block_hw, CROSS=cross, FULL=full)
    if split > 1:
        pq, ps = pq.sum(1), ps.sum(1)
        qs = qs.sum(1) if cross else None
    else:
        pq, ps = pq.squeeze(1), ps.squeeze(1)
        qs = qs.squeeze(1) if cross else None
    if full:
        pq = pq.view(n, g, d, d)
    else:
        pq = pq.view(n, c)
    return pq, ps.view(n, c), None if qs is None else qs.view(n, c)


def _map(m1: Tensor, p: Tensor, m2: Optional[Tensor], q: Optional[Tensor],
         b: Optional[Tensor], group_size: int, out: Tensor) -> Tensor:
    n, c, h, w = p.shape
    d, hw = group_size, h * w
    block_d, block_hw = _blocks(d)
    f32 = torch.float32
    m1 = m1.to(f32).contiguous()
    m2 = None if m2 is None else m2.to(f32).contiguous()
    b = None if b is None else b.to(f32).contiguous()
    _check(p, 'P')
    if q is not None:
        _check(q, 'Q')
    grid = (n * (c // d), triton.cdiv(hw, block_hw))
    _launch(
        _map_kernel, grid,
        m1, p, m1 if m2 is None else m2, p if q is None else q,
        m1 if b is None else b, out, hw, D=d, BLOCK_D=block_d,
        BLOCK_HW=block_hw, HAS_Q=q is not None, HAS_B=b is not None)
    return out


class TritonPasses:
    """The big passes by Triton kernels (same contract as
    :class:`~ce_mmdet.ops.torch_impl.TorchPasses`; compute dtype float32)."""

    name = 'triton'

    @staticmethod
    def stats(x: Tensor, group_size: int,
              training: bool) -> Tuple[Tensor, Tensor]:
        hw = x.shape[2] * x.shape[3]
        if training:
            gram, sums, _ = _statistics(x, None, group_size, full=True)
            return sums / hw, gram
        sumsq, sums, _ = _statistics(x, None, group_size, full=False)
        mean = sums / hw
        # unbiased variance; the rounding error of the difference is
        # clamped, never a defined value
        var = (sumsq - hw * mean * mean) / max(hw - 1, 1)
        return mean, var.clamp_min(0)

    @staticmethod
    def cross(go: Tensor, z: Tensor,
              group_size: int) -> Tuple[Tensor, Tensor]:
        n, c = z.shape[:2]
        d = group_size
        gz, go_sum, _ = _statistics(go, z, group_size, full=True)
        return gz, go_sum.view(n, c // d, d, 1)

    @staticmethod
    def apply(a: Tensor, x: Tensor, group_size: int, inplace: bool,
              bias: Optional[Tensor] = None) -> Tensor:
        out = x if inplace else torch.empty_like(x)
        return _map(a, x, None, None, bias, group_size, out)

    @staticmethod
    def apply2(m1: Tensor, p: Tensor, m2: Tensor, q: Tensor, b: Tensor,
               group_size: int) -> Tensor:
        return _map(m1, p, m2, q, b, group_size, torch.empty_like(q))
