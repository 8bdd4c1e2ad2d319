"""The Triton implementation of CE (:class:`TritonPasses`), for the autograd
Functions of :mod:`ce_mmdet.ops.functions`.

Every kernel reads activations in their own dtype (float32, float16,
bfloat16) and accumulates in float32 (``tl.dot`` with
``input_precision='ieee'``: no TF32).

The passes over the feature map, one pass over memory each:

* :func:`_stats_kernel`: for each sample ``n`` and group ``g``, over a slice
  of the ``H*W`` positions, the ``d x d`` product ``P Q^T`` (or only its
  diagonal) and the row sums of ``P`` (and ``Q``). With ``P = Q = X`` these
  are CE's training statistics (Gram matrices and channel sums), with the
  diagonal only its eval statistics (sums and sums of squares), with
  ``P = dout, Q = Z`` the backward reductions ``dout Z^T`` and ``dout 1``.
  The positions are split over several programs (enough to fill the GPU
  when ``N * G`` is small, as in detection's 2 images per GPU); the small
  graph's kernels sum the partial results.
* :func:`_map_kernel`: ``out[n, g] = M1[n, g] P[n, g] (+ M2[n, g] Q[n, g])
  (+ b[n, g])`` over a block of positions per program: CE's apply (``M1 =
  A``, with the BN's affine map folded into ``M1`` and ``b`` after a BN) and
  the input gradient (``M1 = A^T``, ``M2 = S``, ``P = dout``, ``Q = Z``).
  Each program reads its tile before writing it, so the output may be the
  input itself (in place).

The small graph (tiny arithmetic, so its cost on a GPU is the number of
launches), two kernels forward and three backward instead of ~200 torch ops
per layer:

* :func:`_group_stats_kernel` (a program per group): per-sample means and
  variances, batch sums, covariance and Newton iterations (with a
  batch-statistics BN folded in, first the BN's batch statistics of the
  group's channels from the same partial sums of its input);
  :func:`_sample_map_kernel` (programs per sample and slice of groups):
  the IR scale, the LayerNorm MLP (its first layer from the groups' shares
  computed by the per-group kernel, so that no program reads all of fc1)
  and the block maps (with an eval-mode BN's map folded in);
* :func:`_group_grad_kernel` (per group): dL/dA, the Newton iterations'
  backward; :func:`_mlp_grad_samples_kernel` (a program per 16 samples):
  the MLP's backward to the variances; :func:`_mlp_grad_weights_kernel`
  (per group): the MLP's weight gradients, the gate, the scale;
  :func:`_grad_maps_kernel` (per group): the input gradient's maps and a
  folded BN's gradients (a batch-statistics BN's backward folded into the
  maps).

With SyncCE the batch sums (forward) and their gradient (backward) are
all-reduced between those kernels, one collective each way. With parameters
that are not float32 the statistics and map kernels run with the torch small
graph. Block sizes follow ``d`` (``tl.dot`` needs tiles of at least
16: groups of 8 are padded by masking) and so do the warps of a program
(:func:`_warps`), so that no pass over the feature map spills registers on
sm_90 (``tools/analysis_tools/triton_aot_check.py`` compiles every kernel
for it on a machine without a GPU); any ``H*W`` (1 included) and ``N``
work.
"""
import inspect
from typing import List, NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .small_graph import SmallGraphCache, unbiased_divisor
from .torch_impl import (BatchBNStats, BNAffine, GradMaps, MapResult,
                         backward_maps_by, batch_bn_backward_maps_by,
                         batch_bn_map_by, forward_map_by)

#: Programs to aim for in a statistics launch (a few per SM of a large GPU).
_TARGET_PROGRAMS = 512
#: Programs to aim for in the per-sample small-graph launch.
_SAMPLE_PROGRAMS = 64

#: Samples per program of the MLP backward (``tl.dot`` needs 16 rows): its
#: tiles, shared memory and registers do not grow with the batch, which
#: any size splits over programs (a batch of 128 in one program needed
#: 221 KB of shared memory and spilled 3 KB per thread on sm_90).
_MLP_SAMPLES = 16


class LaunchStats:
    """How many kernels this module launched, and whether one is running
    (read by :class:`ce_mmdet.analysis.launches.LaunchCounter`, which must
    not count the torch ops Triton's interpreter runs inside a launch).

    ``recorder``: None, or a callable ``recorder(name, grid, args, kwargs)``
    called before every launch with the kernel's name and exactly what it
    is launched with (set by
    :func:`ce_mmdet.analysis.triton_aot.record_launches`); when it returns
    True the kernel is not run (its outputs keep what they held: recording
    what is launched needs no results)."""
    launches = 0
    running = False
    recorder = None


#: Integer arguments Triton does not specialise on (equal to 1, divisible by
#: 16), where they occur: the number of position slices of the statistics
#: passes (1 on the tiny maps of ``impl='auto'``'s self-check, up to 16 on
#: real maps), the batch size and what follows from it (sample blocks,
#: groups per program) in the small-graph kernels. They only bound loops and
#: index small tensors; unspecialised, the self-check (N <= 16, a 5x6 or 4x4
#: map) compiles the binaries the real layers run (tested with
#: :mod:`ce_mmdet.analysis.triton_aot`'s recorder). Likewise the position
#: count ``hw`` of the small-graph kernels (scalar arithmetic only; the
#: streaming kernels' ``HW`` stays specialised: it decides vector loads).
#: Sizes reach the kernels as integers only, never as floats made from
#: them: under torch.compile with dynamic shapes a float is guarded on, and
#: every new image size would recompile the graph.
_UNSPECIALISED = ('NSPLIT', 'N', 'NUM_BLOCKS', 'GPP', 'hw')


class _Kernel:
    """A Triton kernel and what its custom-op launch needs (plain Python
    attributes, which dynamo reads as constants).

    Attributes:
        fn: the ``triton.jit`` function.
        name (str): its name (the key of :data:`_KERNELS`).
        args (tuple): its runtime (not ``tl.constexpr``) parameter names.
        writes (frozenset): the parameters it stores to (checked against the
            kernel's source by the tests).
        unspecialised (frozenset): its arguments among
            :data:`_UNSPECIALISED` that Triton does not specialise on.
    """

    def __init__(self, fn, writes: Tuple[str, ...]):
        self.fn = fn
        self.name = fn.fn.__name__
        self.args = tuple(
            name for name, par in inspect.signature(fn.fn).parameters.items()
            if par.annotation is not tl.constexpr)
        # (JITFunction keeps the names; the interpreter's function its
        # kwargs from triton 3.5, while 3.4's drops them: there, those of
        # _UNSPECIALISED, what the kernels with such arguments are jitted
        # with)
        free = getattr(fn, 'do_not_specialize', None)
        if free is None:
            kwargs = getattr(fn, 'kwargs', None)
            free = (_UNSPECIALISED if kwargs is None else
                    kwargs.get('do_not_specialize'))
        self.unspecialised = frozenset(free or ()) & set(self.args)
        self.writes = frozenset(writes)
        if not self.writes <= set(self.args):
            raise ValueError(f'{self.name}: {sorted(self.writes)} are not '
                             f'all among its parameters {self.args}')
        _KERNELS[self.name] = self


#: every kernel of this module by name (for :func:`_launch_op`)
_KERNELS = {}


#: Compile options of every launch: FMA contraction on, as Triton did by
#: default up to 3.9 (3.10 turns it off): the same code on every version,
#: and no warning that the default changes.
_OPTIONS = dict(enable_fp_fusion=True)


def _run(kernel: _Kernel, grid, args, kwargs) -> None:
    kwargs = {**kwargs, **_OPTIONS}
    if LaunchStats.recorder is not None and LaunchStats.recorder(
            kernel.name, tuple(grid), args, kwargs):
        return
    LaunchStats.launches += 1
    LaunchStats.running = True
    try:
        kernel.fn[tuple(grid)](*args, **kwargs)
    finally:
        LaunchStats.running = False


@torch.library.custom_op('ce_mmdet::triton_launch', mutates_args=('outputs', ))
def _launch_op(kernel: str, grid: List[int], inputs: List[Optional[Tensor]],
               outputs: List[Tensor], ints: List[int], floats: List[float],
               order: List[int], constexpr_names: str,
               constexpr_ints: List[int], bool_names: str,
               bool_values: List[bool]) -> None:
    """One launch of a kernel of this module, as a torch custom op (what
    ``torch.compile`` sees: an opaque node that writes ``outputs``).

    The kernel's runtime arguments are rebuilt from ``order``: entry ``i``
    is ``4 * k + kind``, argument ``i`` being ``inputs[k]`` (kind 0; None
    for a pointer the kernel does not read, replaced by any tensor),
    ``outputs[k]`` (1), ``ints[k]`` (2) or ``floats[k]`` (3). Tensors the
    kernel only reads are inputs, the ones it writes outputs (declared
    mutated; an argument passed twice, as the output of an in-place map,
    is one output). Keyword arguments (constexprs, ``num_warps``): names
    separated by spaces, values in the same order.
    """
    pools = (inputs, outputs, ints, floats)
    spare = outputs[0]
    args = []
    for code in order:
        value = pools[code % 4][code // 4]
        args.append(spare if value is None else value)
    kwargs = dict(zip(constexpr_names.split(), constexpr_ints))
    kwargs.update(zip(bool_names.split(), bool_values))
    _run(_KERNELS[kernel], grid, args, kwargs)


@_launch_op.register_fake
def _(*args, **kwargs) -> None:
    return None


def _launch(kernel: _Kernel, grid, *args, **kwargs) -> None:
    """``kernel.fn[grid](*args, **kwargs)``, counted in
    :class:`LaunchStats`. While ``torch.compile`` traces, through the custom
    op ``torch.ops.ce_mmdet.triton_launch`` (:func:`_launch_op`), with the
    tensors the kernel writes declared as mutated; in eager mode directly
    (a custom op's dispatch would add host time to every launch, which is
    what a small-batch GPU step is bound by)."""
    if not torch.compiler.is_compiling():
        _run(kernel, grid, args, kwargs)
        return
    inputs, outputs, ints, floats, order = [], [], [], [], []
    for name, value in zip(kernel.args, args):
        if isinstance(value, Tensor) or value is None:
            # one entry per distinct tensor object among the outputs
            index = next((i for i, t in enumerate(outputs) if t is value),
                         None)
            if index is None and name in kernel.writes and value is not None:
                outputs.append(value)
                index = len(outputs) - 1
            if index is not None:
                order.append(4 * index + 1)
            else:
                inputs.append(value)
                order.append(4 * (len(inputs) - 1))
        elif isinstance(value, bool) or not isinstance(
                value, (int, float, torch.SymInt, torch.SymFloat)):
            raise TypeError(f'{kernel.name}: argument {name} is '
                            f'{type(value).__name__}')
        elif isinstance(value, (int, torch.SymInt)):
            ints.append(value)
            order.append(4 * (len(ints) - 1) + 2)
        else:
            floats.append(value)
            order.append(4 * (len(floats) - 1) + 3)
    bools = {k: v for k, v in kwargs.items() if isinstance(v, bool)}
    others = {k: v for k, v in kwargs.items() if not isinstance(v, bool)}
    torch.ops.ce_mmdet.triton_launch(kernel.name, list(grid), inputs,
                                     outputs, ints, floats, order,
                                     ' '.join(others), list(others.values()),
                                     ' '.join(bools), list(bools.values()))


@triton.jit(do_not_specialize=_UNSPECIALISED)
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
def _map_kernel(M1, P, M2, Q, B, R, OUT, HW, D: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_HW: tl.constexpr,
                HAS_Q: tl.constexpr, HAS_B: tl.constexpr,
                HAS_R: tl.constexpr, RELU: tl.constexpr):
    """Program (ng, j): ``OUT = M1 P (+ M2 Q) (+ B) (+ R)``, then ReLU if
    ``RELU``, for the rows of sample-group ``ng`` and the j-th block of
    positions (``R``: a residual of ``P``'s layout, read in its dtype)."""
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
    if HAS_R:
        acc += tl.load(R + offs, mask=mask, other=0.).to(tl.float32)
    if RELU:  # (NaN stays NaN, as torch.relu)
        acc = tl.where(acc < 0, 0., acc)
    tl.store(OUT + offs, acc.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _group_layout(D: tl.constexpr, BLOCK_D: tl.constexpr):
    """Index helpers of a group's d x d tile: rows, their mask, the
    diagonal, the tile's mask and its row-major offsets."""
    rows = tl.arange(0, BLOCK_D)
    rmask = rows < D
    on_diag = rows[:, None] == rows[None, :]
    mmask = rmask[:, None] & rmask[None, :]
    mat = rows[:, None] * D + rows[None, :]
    return rows, rmask, on_diag, mmask, mat


@triton.jit
def _channel_sums(PQ, PS, NSPLIT, N, g, G, rows, rmask, D: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    """Group g's per-channel sums of z and z^2 over every sample and
    position, from :func:`_stats_kernel`'s partial sums (a BN's batch
    moments)."""
    zsum = tl.zeros((BLOCK_D, ), dtype=tl.float32)
    zsq = tl.zeros((BLOCK_D, ), dtype=tl.float32)
    for n in range(N):
        for s in range(NSPLIT):
            slot = ((n * G + g) * NSPLIT + s).to(tl.int64)
            zsum += tl.load(PS + slot * D + rows, mask=rmask, other=0.)
            zsq += tl.load(PQ + slot * D * D + rows * (D + 1), mask=rmask,
                           other=0.)
    return zsum, zsq


@triton.jit(do_not_specialize=_UNSPECIALISED)
def _bn_sums_kernel(PQ, PS, NSPLIT, N, C, hw, OUT, D: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    """A SyncBN's share of its batch moments, per group g (one program
    each): OUT = [sum z (C), sum z^2 (C), positions], this process's, for
    the all-reduce before :func:`_group_stats_kernel` (GLOBAL_BN)."""
    g = tl.program_id(0)
    rows, rmask, _, _, _ = _group_layout(D, BLOCK_D)
    zsum, zsq = _channel_sums(PQ, PS, NSPLIT, N, g, C // D, rows, rmask, D,
                              BLOCK_D)
    tl.store(OUT + g * D + rows, zsum, mask=rmask)
    tl.store(OUT + C + g * D + rows, zsq, mask=rmask)
    if g == 0:
        tl.store(OUT + 2 * C, (N * hw).to(tl.float32))


@triton.jit(do_not_specialize=_UNSPECIALISED)
def _group_stats_kernel(PQ, PS, NSPLIT, N, C, hw, eps,
                        BN_W, BN_B, BN_MEAN, BN_VAR, bn_eps, ALPHA, BETA,
                        MEAN, VAR, VAR_IN, RAW, VSUM_G, SUMS, COV, WM, ITERS,
                        BATCH_MEAN, BATCH_VAR, BATCH_INVSTD, MEAN_Z, GRAM_Z,
                        BN_MOMENTS, W1, HID_PART, H, D: tl.constexpr,
                        BLOCK_D: tl.constexpr, TRAINING: tl.constexpr,
                        AFFINE: tl.constexpr, HAS_W: tl.constexpr,
                        HAS_B: tl.constexpr, NEWTON: tl.constexpr,
                        NUM_ITERS: tl.constexpr, BATCH_BN: tl.constexpr,
                        BLOCK_HC: tl.constexpr, KEEP: tl.constexpr,
                        GLOBAL_BN: tl.constexpr):
    """Small graph, per group g (one program each): the per-sample means
    and variances of the group's channels from the partial sums of
    :func:`_stats_kernel`, their batch sums, and in training the covariance
    and the Newton iterations (the whitening matrix). With AFFINE (an
    eval-mode BN before CE) the statistics are those of ``alpha x + beta``,
    the BN's map, which is written to ALPHA and BETA. With BATCH_BN (a BN
    with batch statistics before CE in training; the partial sums are of the
    BN's input z) a first pass gives the BN's batch mean, biased variance and
    inverse std of the group's channels (BATCH_*; the variance unbiased, for
    the running statistics) and its map (ALPHA, BETA),
    z's per-sample means and Gram matrices are kept (MEAN_Z, GRAM_Z), and
    the statistics are those of ``X = alpha z + beta`` (``X - m_X =
    diag(alpha) (z - m_z)`` per sample); with GLOBAL_BN (a SyncBN) the BN's
    statistics come from BN_MOMENTS, its per-channel sums of z and z^2 and
    its count of positions summed over its processes, instead of this
    process's partial sums. Without NEWTON (SyncCE) it stops at
    the batch sums, which are all-reduced before
    :func:`_global_whiten_kernel`. Also the group's share of the IR MLP's
    first layer for every sample, ``fc1[:, group] v[n, group]`` (HID_PART,
    (G, N, H)): :func:`_sample_map_kernel` sums the shares instead of
    reading all of fc1 in each of its programs. Without KEEP (eval without
    autograd) MEAN, VAR and VAR_IN, which only the backward reads, are not
    written."""
    g = tl.program_id(0)
    G = C // D
    den = tl.maximum(hw - 1, 1).to(tl.float32)  # unbiased variances
    inv_positions = 1. / (N * hw).to(tl.float32)
    rows, rmask, on_diag, mmask, mat = _group_layout(D, BLOCK_D)
    if BATCH_BN:
        ch = g * D + rows
        if GLOBAL_BN:
            zsum = tl.load(BN_MOMENTS + ch, mask=rmask, other=0.)
            zsq = tl.load(BN_MOMENTS + C + ch, mask=rmask, other=0.)
            bn_inv_positions = 1. / tl.load(BN_MOMENTS + 2 * C)
        else:
            zsum, zsq = _channel_sums(PQ, PS, NSPLIT, N, g, G, rows, rmask,
                                      D, BLOCK_D)
            bn_inv_positions = inv_positions
        bmean = zsum * bn_inv_positions
        bvar = tl.maximum(zsq * bn_inv_positions - bmean * bmean, 0.)
        invstd = 1. / tl.sqrt(bvar + bn_eps)
        alpha = invstd
        if HAS_W:
            alpha = alpha * tl.load(BN_W + ch, mask=rmask, other=0.)
        beta = -bmean * alpha
        if HAS_B:
            beta = beta + tl.load(BN_B + ch, mask=rmask, other=0.)
        tl.store(ALPHA + ch, alpha, mask=rmask)
        tl.store(BETA + ch, beta, mask=rmask)
        tl.store(BATCH_MEAN + ch, bmean, mask=rmask)
        # unbiased, for the running variance
        tl.store(BATCH_VAR + ch, bvar / (1. - bn_inv_positions), mask=rmask)
        tl.store(BATCH_INVSTD + ch, invstd, mask=rmask)
    if AFFINE:
        ch = g * D + rows
        alpha = 1. / tl.sqrt(
            tl.load(BN_VAR + ch, mask=rmask, other=1.) + bn_eps)
        if HAS_W:
            alpha = alpha * tl.load(BN_W + ch, mask=rmask, other=0.)
        beta = -tl.load(BN_MEAN + ch, mask=rmask, other=0.) * alpha
        if HAS_B:
            beta = beta + tl.load(BN_B + ch, mask=rmask, other=0.)
        tl.store(ALPHA + ch, alpha, mask=rmask)
        tl.store(BETA + ch, beta, mask=rmask)
    vacc = tl.zeros((BLOCK_D, ), dtype=tl.float32)
    xacc = tl.zeros((BLOCK_D, ), dtype=tl.float32)
    gacc = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
    for n in range(N):
        psum = tl.zeros((BLOCK_D, ), dtype=tl.float32)
        if TRAINING:
            q = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
        else:
            q = tl.zeros((BLOCK_D, ), dtype=tl.float32)
        for s in range(NSPLIT):
            slot = ((n * G + g) * NSPLIT + s).to(tl.int64)
            psum += tl.load(PS + slot * D + rows, mask=rmask, other=0.)
            if TRAINING:
                q += tl.load(PQ + slot * D * D + mat, mask=mmask, other=0.)
            else:
                q += tl.load(PQ + slot * D + rows, mask=rmask, other=0.)
        if BATCH_BN:  # z's statistics -> X's
            mz = psum / hw
            tl.store(MEAN_Z + n * C + g * D + rows, mz, mask=rmask)
            zslot = (n * G + g).to(tl.int64) * D * D
            tl.store(GRAM_Z + zslot + mat, q, mask=mmask)
            mx = alpha * mz + beta
            q = (q - hw * mz[:, None] * mz[None, :]) * (
                alpha[:, None] * alpha[None, :]) + (
                    hw * mx[:, None] * mx[None, :])
            psum = hw * mx
        mean = psum / hw
        if TRAINING:
            sumsq = tl.sum(tl.where(on_diag, q, 0.), 1)
        else:
            sumsq = q
        raw = (sumsq - hw * mean * mean) / den
        var = tl.maximum(raw, 0.)
        out = n * C + g * D + rows
        if AFFINE:  # statistics of alpha x + beta
            if KEEP:
                tl.store(VAR_IN + out, var, mask=rmask)
            mean = mean * alpha + beta
            var = var * alpha * alpha
        if KEEP:
            tl.store(MEAN + out, mean, mask=rmask)
            tl.store(VAR + out, var, mask=rmask)
        vacc += tl.where(rmask, var, 0.)
        for h0 in range(0, H, BLOCK_HC):  # fc1[:, group] v[n, group]
            hs = h0 + tl.arange(0, BLOCK_HC)
            hmask = hs < H
            w1 = tl.load(W1 + hs[:, None] * C + (g * D + rows)[None, :],
                         mask=hmask[:, None] & rmask[None, :], other=0.)
            tl.store(HID_PART + (g * N + n).to(tl.int64) * H + hs,
                     tl.sum(w1 * var[None, :], 1), mask=hmask)
        if TRAINING:
            tl.store(RAW + out, raw, mask=rmask)
            xacc += psum
            gacc += q
    tl.store(VSUM_G + g, tl.sum(vacc, 0))
    if TRAINING:
        tl.store(SUMS + 3 + g * D + rows, xacc, mask=rmask)
        tl.store(SUMS + 3 + C + g * D * D + mat, gacc, mask=mmask)
        if NEWTON:
            _whiten_group(g, xacc, gacc, inv_positions, eps, COV, WM, ITERS,
                          G, D, BLOCK_D, NUM_ITERS)


@triton.jit
def _k_halves(a, b, M: tl.constexpr, K: tl.constexpr, N: tl.constexpr):
    """``a`` (M, K) and ``b`` (K, N) cut along K: ``a[:, :K/2]``,
    ``a[:, K/2:]``, ``b[:K/2]``, ``b[K/2:]``."""
    a0, a1 = tl.split(tl.permute(tl.reshape(a, (M, 2, K // 2)), (0, 2, 1)))
    b0, b1 = tl.split(tl.permute(tl.reshape(b, (2, K // 2, N)), (1, 2, 0)))
    return a0, a1, b0, b1


@triton.jit
def _mm(a, b, BLOCK: tl.constexpr):
    """``a @ b`` of two (BLOCK, BLOCK) float32 tiles (IEEE). From BLOCK 64
    on, as four products over quarters of K accumulated in turn: one K=64
    product holds whole rows and columns per thread and spills on sm_90
    (the Newton backward: 3-6.7 KB per thread with one product, 0.66 KB
    with four; ``tools/analysis_tools/triton_aot_check.py``)."""
    if BLOCK >= 64:
        a0, a1, b0, b1 = _k_halves(a, b, BLOCK, BLOCK, BLOCK)
        a00, a01, b00, b01 = _k_halves(a0, b0, BLOCK, BLOCK // 2, BLOCK)
        a10, a11, b10, b11 = _k_halves(a1, b1, BLOCK, BLOCK // 2, BLOCK)
        acc = tl.dot(a00, b00, input_precision='ieee')
        acc = tl.dot(a01, b01, acc, input_precision='ieee')
        acc = tl.dot(a10, b10, acc, input_precision='ieee')
        return tl.dot(a11, b11, acc, input_precision='ieee')
    else:
        return tl.dot(a, b, input_precision='ieee')


@triton.jit
def _whiten_group(g, xsum, gram_sum, inv_positions, eps, COV, WM, ITERS, G,
                  D: tl.constexpr, BLOCK_D: tl.constexpr,
                  NUM_ITERS: tl.constexpr):
    """Covariance of group g from the batch sums, and the Newton
    iterations: writes the covariance, W and P_1 ... P_{T-1} (for the
    backward)."""
    rows, rmask, on_diag, mmask, mat = _group_layout(D, BLOCK_D)
    mu = xsum * inv_positions
    eye = tl.where(on_diag & rmask[:, None], 1., 0.)
    cov = gram_sum * inv_positions - mu[:, None] * mu[None, :] + eps * eye
    tl.store(COV + g * D * D + mat, cov, mask=mmask)
    trace = tl.sum(tl.sum(tl.where(on_diag, cov, 0.), 1), 0)
    cov_n = cov / trace
    p = 1.5 * eye - 0.5 * cov_n
    # a loop, not unrolled: fewer live tiles (unrolled, d = 64 spills)
    for k in range(NUM_ITERS - 1):
        tl.store(ITERS + (k * G + g) * D * D + mat, p, mask=mmask)
        p2 = tl.dot(p, p, input_precision='ieee')
        p3 = tl.dot(p2, p, input_precision='ieee')
        p = 1.5 * p - 0.5 * tl.dot(p3, cov_n, input_precision='ieee')
    tl.store(WM + g * D * D + mat, p, mask=mmask)


@triton.jit(do_not_specialize=_UNSPECIALISED)
def _sums_head_kernel(VSUM_G, G, N, hw, SUMS, BLOCK_G: tl.constexpr):
    """SyncCE: the head of the batch sums (sum of variances, samples,
    positions) before they are all-reduced."""
    gs = tl.arange(0, BLOCK_G)
    tl.store(SUMS, tl.sum(tl.load(VSUM_G + gs, mask=gs < G, other=0.), 0))
    tl.store(SUMS + 1, N.to(tl.float32))
    tl.store(SUMS + 2, (N * hw).to(tl.float32))


@triton.jit
def _global_whiten_kernel(SUMS, C, eps, COV, WM, ITERS, D: tl.constexpr,
                          BLOCK_D: tl.constexpr, NUM_ITERS: tl.constexpr):
    """SyncCE: the covariance and Newton iterations of group g from the
    all-reduced batch sums."""
    g = tl.program_id(0)
    rows, rmask, on_diag, mmask, mat = _group_layout(D, BLOCK_D)
    xsum = tl.load(SUMS + 3 + g * D + rows, mask=rmask, other=0.)
    gram_sum = tl.load(SUMS + 3 + C + g * D * D + mat, mask=mmask, other=0.)
    _whiten_group(g, xsum, gram_sum, 1. / tl.load(SUMS + 2), eps, COV, WM,
                  ITERS, C // D, D, BLOCK_D, NUM_ITERS)


@triton.jit(do_not_specialize=_UNSPECIALISED)
def _sample_map_kernel(HID_PART, VSUM_G, C, H, N, GPP, hw, eps, GATE, LNW,
                       LNB, W2, WM, RSCALE, ALPHA, BETA, A, A_IN, BIAS, HID,
                       LN_MEAN, LN_RSTD, POST, Y, LAM, SCALE, SUMS,
                       D: tl.constexpr,
                       BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
                       BLOCK_GH: tl.constexpr, BLOCK_G: tl.constexpr,
                       TRAINING: tl.constexpr, AFFINE: tl.constexpr,
                       GLOBAL_SUMS: tl.constexpr, KEEP: tl.constexpr):
    """Small graph, program (n, s): sample n, groups ``s*GPP ...
    (s+1)*GPP - 1``. The IR scale, the LayerNorm MLP on the sample's
    variances (its first layer from the groups' shares, HID_PART) and the
    block maps ``A[n, g] = sig(a) W_g + (1 - sig(a)) diag(y[n, g] / s)``
    of those groups (with an affine input map also ``A diag(alpha)`` and
    ``A beta``); the per-sample values are written by program (n, 0). With
    GLOBAL_SUMS (SyncCE) the sum of variances and the sample count come from
    the all-reduced sums. Without KEEP (eval without autograd) only the maps
    the apply reads are written: A_IN and BIAS with AFFINE, else A."""
    n = tl.program_id(0)
    s = tl.program_id(1)
    G = C // D
    if TRAINING:
        if GLOBAL_SUMS:
            scale = tl.sqrt(tl.maximum(
                tl.load(SUMS) / (tl.load(SUMS + 1) * C), eps * eps))
        else:
            gs = tl.arange(0, BLOCK_G)
            vsum = tl.sum(tl.load(VSUM_G + gs, mask=gs < G, other=0.), 0)
            scale = tl.sqrt(tl.maximum(vsum / (N * C).to(tl.float32),
                                       eps * eps))
        if n + s == 0:
            tl.store(SCALE, scale)
            if not GLOBAL_SUMS:
                tl.store(SUMS, vsum)
                tl.store(SUMS + 1, N.to(tl.float32))
                tl.store(SUMS + 2, (N * hw).to(tl.float32))
    else:
        scale = tl.maximum(tl.load(RSCALE), eps)
        if KEEP:
            if n + s == 0:
                tl.store(SCALE, scale)
    # hidden = fc1 v, the sum of the groups' shares
    hs = tl.arange(0, BLOCK_H)
    hmask = hs < H
    hid = tl.zeros((BLOCK_H, ), dtype=tl.float32)
    for g0 in range(0, G, BLOCK_GH):
        gp = g0 + tl.arange(0, BLOCK_GH)
        part = tl.load(HID_PART + (gp[:, None] * N + n).to(tl.int64) * H +
                       hs[None, :], mask=(gp < G)[:, None] & hmask[None, :],
                       other=0.)
        hid += tl.sum(part, 0)
    # LayerNorm (biased variance), ReLU
    mean = tl.sum(hid, 0) / H
    xc = tl.where(hmask, hid - mean, 0.)
    rstd = 1. / tl.sqrt(tl.sum(xc * xc, 0) / H + eps)
    lnw = tl.load(LNW + hs, mask=hmask, other=0.)
    lnb = tl.load(LNB + hs, mask=hmask, other=0.)
    post = tl.maximum(xc * rstd * lnw + lnb, 0.)
    post = tl.where(hmask, post, 0.)
    lam = 1. / (1. + tl.exp(-tl.load(GATE)))
    if KEEP:
        if s == 0:
            tl.store(HID + n * H + hs, hid, mask=hmask)
            tl.store(LN_MEAN + n, mean)
            tl.store(LN_RSTD + n, rstd)
            tl.store(POST + n * H + hs, post, mask=hmask)
            if n == 0:
                tl.store(LAM, lam)
    rows, rmask, on_diag, mmask, mat = _group_layout(D, BLOCK_D)
    for g in range(s * GPP, tl.minimum(s * GPP + GPP, G)):
        ch = g * D + rows
        w2 = tl.load(W2 + ch[:, None] * H + hs[None, :],
                     mask=rmask[:, None] & hmask[None, :], other=0.)
        y = 1. / (1. + tl.exp(-tl.sum(w2 * post[None, :], 1)))
        if KEEP:
            tl.store(Y + n * C + ch, y, mask=rmask)
        wm = tl.load(WM + g * D * D + mat, mask=mmask, other=0.)
        a = lam * wm + tl.where(on_diag, ((1. - lam) * y / scale)[:, None],
                                0.)
        out = (n * G + g).to(tl.int64) * D * D + mat
        if KEEP or not AFFINE:
            tl.store(A + out, a, mask=mmask)
        if AFFINE:
            alpha = tl.load(ALPHA + ch, mask=rmask, other=0.)
            beta = tl.load(BETA + ch, mask=rmask, other=0.)
            tl.store(A_IN + out, a * alpha[None, :], mask=mmask)
            tl.store(BIAS + (n * G + g).to(tl.int64) * D + rows,
                     tl.sum(a * beta[None, :], 1), mask=rmask)


@triton.jit(do_not_specialize=_UNSPECIALISED)
def _group_grad_kernel(GZ, GOS, NSPLIT, N, C, ALPHA, BETA, LAM, WM, COV,
                       ITERS, SUMS, GDIAG, LAM_PART, GRAD_SUMS, GZ_OUT,
                       GOS_OUT, D: tl.constexpr,
                       BLOCK_D: tl.constexpr, TRAINING: tl.constexpr,
                       AFFINE: tl.constexpr, KEEP_CROSS: tl.constexpr,
                       NUM_ITERS: tl.constexpr):
    """Backward of the small graph, per group g: dL/dA from the partial
    sums of ``dout kept^T`` and ``dout 1`` (with the affine input map),
    its diagonal, the gate's share ``<sum_n dL/dA, W>``, and in training
    the Newton iterations' backward: dL/d(batch sums of the Gram matrices
    and of the channels), written into GRAD_SUMS (the layout of SUMS)."""
    g = tl.program_id(0)
    G = C // D
    rows, rmask, on_diag, mmask, mat = _group_layout(D, BLOCK_D)
    ch = g * D + rows
    if AFFINE:
        alpha = tl.load(ALPHA + ch, mask=rmask, other=0.)
        beta = tl.load(BETA + ch, mask=rmask, other=0.)
    lam = tl.load(LAM)
    wm = tl.load(WM + g * D * D + mat, mask=mmask, other=0.)
    gsum = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
    for n in range(N):
        gz = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
        gos = tl.zeros((BLOCK_D, ), dtype=tl.float32)
        for s in range(NSPLIT):
            slot = ((n * G + g) * NSPLIT + s).to(tl.int64)
            gz += tl.load(GZ + slot * D * D + mat, mask=mmask, other=0.)
            gos += tl.load(GOS + slot * D + rows, mask=rmask, other=0.)
        ng = (n * G + g).to(tl.int64)
        if KEEP_CROSS:
            tl.store(GZ_OUT + ng * D * D + mat, gz, mask=mmask)
            tl.store(GOS_OUT + ng * D + rows, gos, mask=rmask)
        if AFFINE:
            ga = gz * alpha[None, :] + gos[:, None] * beta[None, :]
        else:
            ga = gz
        tl.store(GDIAG + n * C + ch, tl.sum(tl.where(on_diag, ga, 0.), 1),
                 mask=rmask)
        gsum += ga
    tl.store(LAM_PART + g, tl.sum(tl.sum(gsum * wm, 1), 0))
    if TRAINING:
        inv_positions = 1. / tl.load(SUMS + 2)
        cov = tl.load(COV + g * D * D + mat, mask=mmask, other=0.)
        trace = tl.sum(tl.sum(tl.where(on_diag, cov, 0.), 1), 0)
        cov_n = cov / trace
        grad = lam * gsum  # dL/dW
        grad_sn = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
        for j in range(NUM_ITERS - 1):  # not unrolled: see _whiten_group
            # P_{k+1} = 1.5 P_k - 0.5 P_k^3 S_N, backwards
            p = tl.load(ITERS + ((NUM_ITERS - 2 - j) * G + g) * D * D + mat,
                        mask=mmask, other=0.)
            p2 = _mm(p, p, BLOCK=BLOCK_D)
            p3 = _mm(p2, p, BLOCK=BLOCK_D)
            h = -0.5 * grad
            grad_sn += _mm(tl.trans(p3), h, BLOCK=BLOCK_D)
            g3 = _mm(h, tl.trans(cov_n), BLOCK=BLOCK_D)
            g2 = _mm(g3, tl.trans(p), BLOCK=BLOCK_D)
            grad = 1.5 * grad + _mm(
                tl.trans(p2), g3, BLOCK=BLOCK_D) + _mm(
                    g2, tl.trans(p), BLOCK=BLOCK_D) + _mm(
                        tl.trans(p), g2, BLOCK=BLOCK_D)
        grad_sn += -0.5 * grad  # P_1 = 1.5 I - 0.5 S_N
        inner = tl.sum(tl.sum(grad_sn * cov, 1), 0) / (trace * trace)
        grad_cov = grad_sn / trace - tl.where(on_diag & rmask[:, None],
                                              inner, 0.)
        # cov = Gram sum / P - mu mu^T + eps I, mu = channel sum / P
        tl.store(GRAD_SUMS + 3 + C + g * D * D + mat,
                 grad_cov * inv_positions, mask=mmask)
        mu = tl.load(SUMS + 3 + ch, mask=rmask, other=0.) * inv_positions
        sym = grad_cov + tl.trans(grad_cov)
        tl.store(GRAD_SUMS + 3 + ch,
                 -tl.sum(sym * mu[None, :], 1) * inv_positions, mask=rmask)


@triton.jit
def _fc2_out_grad(GDIAG, Y, ns, ch, mask, C, lam, scale):
    """Samples ``ns``, channels ``ch``: ``(dL/dD * y, dL/d(fc2 output))``
    with ``D = (1 - lam) y / s`` and ``y = sigmoid(fc2 output)``."""
    gd = tl.load(GDIAG + ns[:, None] * C + ch[None, :], mask=mask, other=0.)
    y = tl.load(Y + ns[:, None] * C + ch[None, :], mask=mask, other=0.)
    return gd * y, gd * ((1. - lam) / scale) * y * (1. - y)


@triton.jit(do_not_specialize=_UNSPECIALISED)
def _mlp_grad_samples_kernel(GDIAG, Y, POST, HID, LN_MEAN, LN_RSTD, LAM,
                             SCALE, W1, LNW, W2, N, C, H, GHID, PART, GVAR,
                             D: tl.constexpr, BLOCK_D: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
                             BLOCK_HC: tl.constexpr, BLOCK_C: tl.constexpr):
    """Backward of the small graph's instance branch, per sample (a program
    per block of BLOCK_N samples): through the IR MLP (fc2, ReLU,
    LayerNorm, fc1) to dL/d(variances) (GVAR; the batch-sum share is added
    by :func:`_grad_maps_kernel`). Writes dL/d(fc1 v) (GHID) and the
    block's partial sums ``[sum dL/dD * y, dL/dLN weight (H), dL/dLN bias
    (H)]`` (PART, a row per block) for :func:`_mlp_grad_weights_kernel`."""
    G = C // D
    block = tl.program_id(0)
    lam = tl.load(LAM)
    scale = tl.load(SCALE)
    ns = block * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = ns < N
    hs = tl.arange(0, BLOCK_H)
    hmask = hs < H
    nh = nmask[:, None] & hmask[None, :]
    post = tl.load(POST + ns[:, None] * H + hs[None, :], mask=nh, other=0.)
    rows = tl.arange(0, BLOCK_D)
    rmask = rows < D
    nd = nmask[:, None] & rmask[None, :]
    grad_post = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)
    dys = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for g in range(G):
        ch = g * D + rows
        gd_y, grad_t = _fc2_out_grad(GDIAG, Y, ns, ch, nd, C, lam, scale)
        dys += gd_y
        w2 = tl.load(W2 + ch[:, None] * H + hs[None, :],
                     mask=rmask[:, None] & hmask[None, :], other=0.)
        grad_post += tl.dot(grad_t, w2, input_precision='ieee')
    row = block * (1 + 2 * H)
    tl.store(PART + row, tl.sum(tl.sum(dys, 1), 0))
    # ReLU, LayerNorm
    grad_pre = tl.where(post > 0., grad_post, 0.)
    hid = tl.load(HID + ns[:, None] * H + hs[None, :], mask=nh, other=0.)
    ln_mean = tl.load(LN_MEAN + ns, mask=nmask, other=0.)
    ln_rstd = tl.load(LN_RSTD + ns, mask=nmask, other=0.)
    xhat = tl.where(nh, (hid - ln_mean[:, None]) * ln_rstd[:, None], 0.)
    lnw = tl.load(LNW + hs, mask=hmask, other=0.)
    tl.store(PART + row + 1 + hs, tl.sum(grad_pre * xhat, 0), mask=hmask)
    tl.store(PART + row + 1 + H + hs, tl.sum(grad_pre, 0), mask=hmask)
    dxh = grad_pre * lnw[None, :]
    m1 = tl.sum(dxh, 1) / H
    m2 = tl.sum(dxh * xhat, 1) / H
    grad_hid = tl.where(nh, ln_rstd[:, None] *
                        (dxh - m1[:, None] - xhat * m2[:, None]), 0.)
    tl.store(GHID + ns[:, None] * H + hs[None, :], grad_hid, mask=nh)
    # dL/dv = dL/d(fc1 v) fc1, over slices of H read back from GHID: a
    # product with all of H at once needs 98 KB of shared memory at C=2048
    tl.debug_barrier()  # (this program's GHID stores, visible to it)
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        cmask = cs < C
        gv = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
        for h0 in range(0, H, BLOCK_HC):
            hc = h0 + tl.arange(0, BLOCK_HC)
            hcmask = hc < H
            ghid = tl.load(GHID + ns[:, None] * H + hc[None, :],
                           mask=nmask[:, None] & hcmask[None, :], other=0.)
            w1 = tl.load(W1 + hc[:, None] * C + cs[None, :],
                         mask=hcmask[:, None] & cmask[None, :], other=0.)
            gv = tl.dot(ghid, w1, gv, input_precision='ieee')
        tl.store(GVAR + ns[:, None] * C + cs[None, :], gv,
                 mask=nmask[:, None] & cmask[None, :])


@triton.jit(do_not_specialize=_UNSPECIALISED)
def _mlp_grad_weights_kernel(GDIAG, Y, POST, GHID, VAR, LAM, SCALE,
                             LAM_PART, SUMS, PART, NUM_BLOCKS, N, C, H, eps,
                             DGATE, DFC1, DLNW, DLNB, DFC2, GRAD_SUMS,
                             D: tl.constexpr, BLOCK_D: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
                             BLOCK_HC: tl.constexpr, BLOCK_G: tl.constexpr,
                             TRAINING: tl.constexpr):
    """Backward of the instance branch, the parameters (a program per
    group g): fc2's rows and fc1's columns of the group's channels, summed
    over all samples; program 0 also sums the per-sample blocks' partials
    (:func:`_mlp_grad_samples_kernel`) into the LayerNorm's and the gate's
    gradients and, in training, dL/d(sum of variances) through the scale
    (GRAD_SUMS[0])."""
    g = tl.program_id(0)
    G = C // D
    lam = tl.load(LAM)
    scale = tl.load(SCALE)
    rows = tl.arange(0, BLOCK_D)
    rmask = rows < D
    ch = g * D + rows
    for h0 in range(0, H, BLOCK_HC):  # (slices of H: shared memory)
        hs = h0 + tl.arange(0, BLOCK_HC)
        hmask = hs < H
        dfc2 = tl.zeros((BLOCK_D, BLOCK_HC), dtype=tl.float32)
        dfc1 = tl.zeros((BLOCK_HC, BLOCK_D), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            ns = n0 + tl.arange(0, BLOCK_N)
            nmask = ns < N
            nd = nmask[:, None] & rmask[None, :]
            nh = nmask[:, None] & hmask[None, :]
            _, grad_t = _fc2_out_grad(GDIAG, Y, ns, ch, nd, C, lam, scale)
            post = tl.load(POST + ns[:, None] * H + hs[None, :], mask=nh,
                           other=0.)
            dfc2 = tl.dot(tl.trans(grad_t), post, dfc2,
                          input_precision='ieee')
            ghid = tl.load(GHID + ns[:, None] * H + hs[None, :], mask=nh,
                           other=0.)
            var = tl.load(VAR + ns[:, None] * C + ch[None, :], mask=nd,
                          other=0.)
            dfc1 = tl.dot(tl.trans(ghid), var, dfc1, input_precision='ieee')
        hd = hmask[:, None] & rmask[None, :]
        tl.store(DFC2 + ch[:, None] * H + hs[None, :], dfc2, mask=hd.T)
        tl.store(DFC1 + hs[:, None] * C + ch[None, :], dfc1, mask=hd)
    if g == 0:
        hs = tl.arange(0, BLOCK_H)
        hmask = hs < H
        dy_s = 0.
        dlnw = tl.zeros((BLOCK_H, ), dtype=tl.float32)
        dlnb = tl.zeros((BLOCK_H, ), dtype=tl.float32)
        for b in range(NUM_BLOCKS):
            part = PART + b * (1 + 2 * H)
            dy_s += tl.load(part)
            dlnw += tl.load(part + 1 + hs, mask=hmask, other=0.)
            dlnb += tl.load(part + 1 + H + hs, mask=hmask, other=0.)
        tl.store(DLNW + hs, dlnw, mask=hmask)
        tl.store(DLNB + hs, dlnb, mask=hmask)
        gs = tl.arange(0, BLOCK_G)
        lam_part = tl.sum(tl.load(LAM_PART + gs, mask=gs < G, other=0.), 0)
        tl.store(DGATE, (lam_part - dy_s / scale) * lam * (1. - lam))
        if TRAINING:
            # s = sqrt(max(sum v / (N C), eps^2))
            grad_scale = -dy_s * (1. - lam) / (scale * scale)
            vsum = tl.load(SUMS)
            samples = tl.load(SUMS + 1)
            unclamped = vsum / (samples * C) >= eps * eps
            grad_vsum = tl.where(unclamped,
                                 grad_scale / (2. * scale * samples * C), 0.)
            tl.store(GRAD_SUMS, grad_vsum)
            tl.store(GRAD_SUMS + 1, 0.)
            tl.store(GRAD_SUMS + 2, 0.)


@triton.jit
def _sample_grad_maps(n, g, A, MEAN, GVAR, RAW, C, hw, den, alpha, beta,
                      sym, dxs, grad_vsum, rows, rmask, on_diag, mmask, mat,
                      D: tl.constexpr, TRAINING: tl.constexpr,
                      AFFINE: tl.constexpr):
    """Sample n, group g: ``(A, A^T, S, b, coef)`` with ``dX = A^T dout + S
    kept + b`` (with AFFINE, ``kept = z`` and ``X = alpha z + beta``);
    ``coef`` is the eval diagonal of S before the affine map."""
    G = C // D
    ch = g * D + rows
    ng = (n * G + g).to(tl.int64)
    a = tl.load(A + ng * D * D + mat, mask=mmask, other=0.)
    gv = tl.load(GVAR + n * C + ch, mask=rmask, other=0.)
    mean = tl.load(MEAN + n * C + ch, mask=rmask, other=0.)
    if TRAINING:
        # v = max(raw, 0) enters the sum of variances too;
        # v = (diag(Gram) - hw mean^2) / (hw - 1)
        raw = tl.load(RAW + n * C + ch, mask=rmask, other=0.)
        gv = tl.where(raw >= 0., gv + grad_vsum, 0.) / den
        # S = dQ + dQ^T, dQ = diag(gv) + dL/d(sum of Gram matrices)
        s_mat = tl.where(on_diag, 2. * gv[:, None], 0.) + sym
        b = dxs - 2. * mean * gv
        coef = gv
    else:
        coef = 2. * gv / den
        s_mat = tl.where(on_diag, coef[:, None], 0.)
        b = -coef * mean
    if AFFINE:  # S X = (S diag(alpha)) z + S beta
        b = b + tl.sum(s_mat * beta[None, :], 1)
        s_mat = s_mat * alpha[None, :]
    return a, tl.trans(a), s_mat, b, coef


@triton.jit
def _bn_grad_sums(n, g, a, s_mat, b, coef, alpha, GZ, GOS, VAR_Z, MEAN_Z,
                  GRAM_Z, C, hw, rows, rmask, mmask, mat, D: tl.constexpr,
                  BATCH_BN: tl.constexpr):
    """Sample n's share of a folded BN's per-channel sums ``sum dX`` and
    ``sum dX z`` over the positions, from ``dout z^T`` and ``dout 1`` (GZ,
    GOS) and, with BATCH_BN (S dense), z's means and (symmetric) Gram
    matrix; in eval the variance term of ``sum dX`` is zero and that of
    ``sum dX z`` follows from z's variances."""
    G = C // D
    ng = (n * G + g).to(tl.int64)
    ch = g * D + rows
    gz = tl.load(GZ + ng * D * D + mat, mask=mmask, other=0.)
    gos = tl.load(GOS + ng * D + rows, mask=rmask, other=0.)
    dx = tl.sum(a * gos[:, None], 0)
    dxz = tl.sum(a * gz, 0)
    if BATCH_BN:  # sum_hw (S z + b)_i and (S z + b)_i z_i
        mz = tl.load(MEAN_Z + n * C + ch, mask=rmask, other=0.)
        gram = tl.load(GRAM_Z + ng * D * D + mat, mask=mmask, other=0.)
        dx += hw * (tl.sum(s_mat * mz[None, :], 1) + b)
        dxz += tl.sum(s_mat * gram, 1) + hw * b * mz
    else:
        var_z = tl.load(VAR_Z + n * C + ch, mask=rmask, other=0.)
        dxz += coef * alpha * (hw - 1.) * var_z
    return dx, dxz


@triton.jit(do_not_specialize=_UNSPECIALISED)
def _grad_maps_kernel(A, MEAN, GVAR, RAW, GRAD_SUMS, ALPHA, BETA, GZ, GOS,
                      VAR_Z, BN_MEAN, INVSTD, MEAN_Z, GRAM_Z, N, C, hw, M1,
                      M2, SHIFT, DBN_W, DBN_B, BN_SUMS, BN_COUNT,
                      D: tl.constexpr, BLOCK_D: tl.constexpr,
                      TRAINING: tl.constexpr, AFFINE: tl.constexpr,
                      FOLD: tl.constexpr, BATCH_BN: tl.constexpr,
                      BN_PHASE: tl.constexpr):
    """The input gradient's maps, per group g: ``dX = M1 dout + M2 kept +
    shift`` for every sample, from the block maps and the statistics'
    gradients (in training from GRAD_SUMS, all-reduced with SyncCE); with
    FOLD (an eval-mode BN folded into the op) ``dZ = alpha dX`` and the BN's
    weight and bias gradients. With BATCH_BN (a BN with batch statistics
    folded, training) ``dZ = alpha (dX - mean(dX) - xhat mean(dX xhat))``:
    a first loop over the samples sums ``dX`` and ``dX z`` per channel (from
    ``dout z^T``, ``dout 1`` and z's means and Gram matrices), the second
    writes the maps with the BN's terms (see
    :func:`~ce_mmdet.ops.torch_impl.batch_bn_backward_maps_by`). A SyncBN
    takes two launches (BN_PHASE, else 0: both loops): 1, the first loop,
    writing this process's ``sum dX`` and ``sum dX xhat`` to BN_SUMS and as
    the BN's weight and bias gradients; 2, after BN_SUMS is summed over
    the BN's processes, the second loop with those sums and the count of
    positions at BN_COUNT."""
    g = tl.program_id(0)
    G = C // D
    den = tl.maximum(hw - 1, 1).to(tl.float32)  # unbiased variances
    hw = hw.to(tl.float32)
    rows, rmask, on_diag, mmask, mat = _group_layout(D, BLOCK_D)
    ch = g * D + rows
    alpha = tl.zeros((BLOCK_D, ), dtype=tl.float32)
    beta = tl.zeros((BLOCK_D, ), dtype=tl.float32)
    sym = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
    dxs = tl.zeros((BLOCK_D, ), dtype=tl.float32)
    grad_vsum = 0.
    if AFFINE:
        alpha = tl.load(ALPHA + ch, mask=rmask, other=0.)
        beta = tl.load(BETA + ch, mask=rmask, other=0.)
    if TRAINING:
        grad_cov = tl.load(GRAD_SUMS + 3 + C + g * D * D + mat, mask=mmask,
                           other=0.)
        sym = grad_cov + tl.trans(grad_cov)
        dxs = tl.load(GRAD_SUMS + 3 + ch, mask=rmask, other=0.)
        grad_vsum = tl.load(GRAD_SUMS)
    corr_diag = tl.zeros((BLOCK_D, ), dtype=tl.float32)
    corr_shift = tl.zeros((BLOCK_D, ), dtype=tl.float32)
    sum_dx = tl.zeros((BLOCK_D, ), dtype=tl.float32)
    sum_dxz = tl.zeros((BLOCK_D, ), dtype=tl.float32)
    if FOLD or BATCH_BN:
        bn_mean = tl.load(BN_MEAN + ch, mask=rmask, other=0.)
        invstd = tl.load(INVSTD + ch, mask=rmask, other=0.)
    if BATCH_BN and BN_PHASE != 2:  # its terms in the maps need every
        # sample's sums first
        for n in range(N):
            a, a_t, s_mat, b, coef = _sample_grad_maps(
                n, g, A, MEAN, GVAR, RAW, C, hw, den, alpha, beta, sym, dxs,
                grad_vsum, rows, rmask, on_diag, mmask, mat, D, TRAINING,
                AFFINE)
            dx, dxz = _bn_grad_sums(n, g, a, s_mat, b, coef, alpha, GZ, GOS,
                                    VAR_Z, MEAN_Z, GRAM_Z, C, hw, rows, rmask,
                                    mmask, mat, D, BATCH_BN)
            sum_dx += dx
            sum_dxz += dxz
    if BATCH_BN and BN_PHASE == 1:  # this process's sums, for the SyncBN's
        tl.store(BN_SUMS + ch, sum_dx, mask=rmask)
        tl.store(BN_SUMS + C + ch, (sum_dxz - bn_mean * sum_dx) * invstd,
                 mask=rmask)
    elif BATCH_BN:
        # dz = alpha dX - alpha invstd k z + alpha (invstd mean k - sum dX /
        # P), k = sum(dX xhat) / P
        if BN_PHASE == 2:  # the SyncBN's sums over its processes
            sum_dx = tl.load(BN_SUMS + ch, mask=rmask, other=0.)
            positions = tl.load(BN_COUNT)
            k = tl.load(BN_SUMS + C + ch, mask=rmask, other=0.) / positions
        else:
            positions = (N * hw).to(tl.float32)
            k = (sum_dxz - bn_mean * sum_dx) * invstd / positions
        corr_diag = -alpha * invstd * k
        corr_shift = alpha * (invstd * bn_mean * k - sum_dx / positions)
    if BN_PHASE != 1:  # (phase 1 writes no maps)
        for n in range(N):
            ng = (n * G + g).to(tl.int64)
            a, a_t, s_mat, b, coef = _sample_grad_maps(
                n, g, A, MEAN, GVAR, RAW, C, hw, den, alpha, beta, sym, dxs,
                grad_vsum, rows, rmask, on_diag, mmask, mat, D, TRAINING,
                AFFINE)
            if FOLD:  # (BATCH_BN summed above)
                dx, dxz = _bn_grad_sums(n, g, a, s_mat, b, coef, alpha, GZ,
                                        GOS, VAR_Z, MEAN_Z, GRAM_Z, C, hw,
                                        rows, rmask, mmask, mat, D, BATCH_BN)
                sum_dx += dx
                sum_dxz += dxz
            if FOLD or BATCH_BN:
                a_t = a_t * alpha[:, None]
                s_mat = s_mat * alpha[:, None] + tl.where(
                    on_diag, corr_diag[:, None], 0.)
                b = b * alpha + corr_shift
            tl.store(M1 + ng * D * D + mat, a_t, mask=mmask)
            tl.store(M2 + ng * D * D + mat, s_mat, mask=mmask)
            tl.store(SHIFT + ng * D + rows, b, mask=rmask)
    if (FOLD or BATCH_BN) and BN_PHASE != 2:  # the BN's weight and bias
        # gradients (this process's)
        tl.store(DBN_W + ch, (sum_dxz - bn_mean * sum_dx) * invstd,
                 mask=rmask)
        tl.store(DBN_B + ch, sum_dx, mask=rmask)


_STATS = _Kernel(_stats_kernel, ('OUT_PQ', 'OUT_PS', 'OUT_QS'))
_MAP = _Kernel(_map_kernel, ('OUT', ))
_GROUP_STATS = _Kernel(_group_stats_kernel,
                       ('ALPHA', 'BETA', 'MEAN', 'VAR', 'VAR_IN', 'RAW',
                        'VSUM_G', 'SUMS', 'COV', 'WM', 'ITERS', 'BATCH_MEAN',
                        'BATCH_VAR', 'BATCH_INVSTD', 'MEAN_Z', 'GRAM_Z',
                        'HID_PART'))
_BN_SUMS = _Kernel(_bn_sums_kernel, ('OUT', ))
_SUMS_HEAD = _Kernel(_sums_head_kernel, ('SUMS', ))
_GLOBAL_WHITEN = _Kernel(_global_whiten_kernel, ('COV', 'WM', 'ITERS'))
_SAMPLE_MAP = _Kernel(_sample_map_kernel,
                      ('A', 'A_IN', 'BIAS', 'HID', 'LN_MEAN', 'LN_RSTD',
                       'POST', 'Y', 'LAM', 'SCALE', 'SUMS'))
_GROUP_GRAD = _Kernel(_group_grad_kernel, ('GDIAG', 'LAM_PART', 'GRAD_SUMS',
                                           'GZ_OUT', 'GOS_OUT'))
_MLP_GRAD_SAMPLES = _Kernel(_mlp_grad_samples_kernel,
                            ('GHID', 'PART', 'GVAR'))
_MLP_GRAD_WEIGHTS = _Kernel(_mlp_grad_weights_kernel,
                            ('DGATE', 'DFC1', 'DLNW', 'DLNB', 'DFC2',
                             'GRAD_SUMS'))
_GRAD_MAPS = _Kernel(_grad_maps_kernel, ('M1', 'M2', 'SHIFT', 'DBN_W',
                                         'DBN_B', 'BN_SUMS'))


def _cdiv(a: int, b: int) -> int:
    """``triton.cdiv`` for the host code: Triton 3.9 makes it (and
    ``next_power_of_2``) a constexpr function whose call costs ~3.5 us of
    argument unwrapping, a quarter of an eval layer's host time."""
    return -(-a // b)


def _pow2(n: int) -> int:
    """The smallest power of two >= ``n`` (``n >= 1``), as
    ``triton.next_power_of_2``, for the host code (see :func:`_cdiv`)."""
    return 1 << (n - 1).bit_length()


def _blocks(d: int) -> Tuple[int, int]:
    """(BLOCK_D, BLOCK_HW): ``d`` padded to a power of two >= 16, and a
    position block that keeps a tile at about 2K elements."""
    block_d = max(16, _pow2(d))
    return block_d, max(16, 2048 // block_d)


def _warps(block_d: int) -> int:
    """Warps of a program whose products contract over ``block_d`` (the
    map, the per-group kernels): 4, 8 and 16 for 16, 32 and 64. With 4
    warps a float32 ``tl.dot`` of 32 or 64 rows spills registers on sm_90
    (``tools/analysis_tools/triton_aot_check.py``)."""
    return max(4, block_d // 4)


class LaunchConfig(NamedTuple):
    """How a pass over the feature map is launched: positions per block,
    warps per program and, for the statistics passes, the number of
    programs to aim for (the positions are split to reach it)."""
    block_hw: int
    warps: int
    programs: int = 0


def stats_launch(d: int, full: bool) -> LaunchConfig:
    """The statistics kernel's configuration for groups of ``d`` (``full``:
    the d x d product; else its diagonal): the d x d product takes half the
    tile and 8 warps (a 2K tile spills on sm_90 for float32 rows of H*W not
    a multiple of 16)."""
    block_hw = _blocks(d)[1]
    if full:
        return LaunchConfig(block_hw // 2, 8, _TARGET_PROGRAMS)
    return LaunchConfig(block_hw, 4, _TARGET_PROGRAMS)


def map_launch(d: int) -> LaunchConfig:
    """The map kernel's configuration for groups of ``d``."""
    block_d, block_hw = _blocks(d)
    return LaunchConfig(block_hw, _warps(block_d))


def _check(x: Tensor, name: str) -> None:
    if not x.is_contiguous():
        raise ValueError(f'{name} must be contiguous')


def _partials(p: Tensor, q: Optional[Tensor], group_size: int, full: bool,
              launch: Optional[LaunchConfig] = None):
    """Partial sums over slices of the positions, per sample and group, by
    :func:`_stats_kernel`: ``(pq, ps, qs, split)`` with ``pq`` of shape
    (N*G, split, d, d) (``full``) or (N*G, split, d), ``ps`` and ``qs``
    (N*G, split, d) (``qs`` None without ``q``). ``launch``: the
    configuration (default :func:`stats_launch`; others are for
    ``tools/analysis_tools/benchmark_triton_passes.py``)."""
    n, c, h, w = p.shape
    d, hw = group_size, h * w
    g = c // d
    block_d = _blocks(d)[0]
    block_hw, warps, programs = launch or stats_launch(d, full)
    _check(p, 'P')
    cross = q is not None
    if cross:
        _check(q, 'Q')
    # split the positions so that the launch has enough programs
    split = max(1, min(_cdiv(hw, block_hw), _cdiv(programs, n * g)))
    chunk = _cdiv(_cdiv(hw, split), block_hw) * block_hw
    split = _cdiv(hw, chunk)
    f32 = dict(dtype=torch.float32, device=p.device)
    pq = torch.empty((n * g, split) + ((d, d) if full else (d, )), **f32)
    ps = torch.empty((n * g, split, d), **f32)
    qs = torch.empty((n * g, split, d), **f32) if cross else None
    _launch(
        _STATS, (n * g, split),
        p, q if cross else p, pq, ps, ps if qs is None else qs, hw, chunk,
        split, D=d, BLOCK_D=block_d, BLOCK_HW=block_hw, CROSS=cross,
        FULL=full, num_warps=warps)
    return pq, ps, qs, split


def _statistics(p: Tensor, q: Optional[Tensor], group_size: int,
                full: bool) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """Sums over positions, per sample and group: ``P Q^T`` (N, G, d, d)
    or ``sum(P * Q)`` (N, C), and the row sums of P (N, C) (and Q)."""
    n, c = p.shape[:2]
    d = group_size
    pq, ps, qs, split = _partials(p, q, group_size, full)
    if split > 1:
        pq, ps = pq.sum(1), ps.sum(1)
        qs = None if qs is None else qs.sum(1)
    else:
        pq, ps = pq.squeeze(1), ps.squeeze(1)
        qs = None if qs is None else qs.squeeze(1)
    pq = pq.view(n, c // d, d, d) if full else pq.view(n, c)
    return pq, ps.view(n, c), None if qs is None else qs.view(n, c)


def _setup(t: Tensor, params, config):
    """What both small-graph wrappers start with: sizes (N, C, H*W, G, d),
    contiguous parameters, the hidden width, the group tile and a float32
    allocator on ``t``'s device."""
    n, c, h, w = t.shape
    d = config.group_size
    params = type(params)(*(p.contiguous() for p in params))
    f32 = dict(dtype=torch.float32, device=t.device)

    def new(*shape):
        return torch.empty(shape, **f32)

    return (n, c, h * w, c // d, d, params, params.fc1_weight.shape[0],
            _blocks(d)[0], new)


def _fused_forward_map(x: Tensor, params, state, config, training: bool,
                       affine, reduce_fn=None, batch_bn=None, keep=True,
                       bn_reduce_fn=None):
    """Statistics and the whole small graph in three launches: the
    statistics kernel, one program per group (sums, Newton, shares of fc1
    v), programs per sample and slice of groups (LayerNorm MLP, the block
    maps). With SyncCE (``reduce_fn``, training)
    the batch sums are all-reduced between the per-group sums and the
    Newton iterations (two more launches).

    ``batch_bn`` (``(weight, bias, eps)`` of a BN with batch statistics,
    training only): ``x`` is the BN's input and the BN is folded in (see
    :func:`~ce_mmdet.ops.torch_impl.batch_bn_map_by`); returns ``(MapResult,
    BatchBNStats)`` then, else the MapResult. With ``bn_reduce_fn`` (a
    SyncBN) the BN's per-channel sums and count, from the statistics
    kernel's partial sums (:func:`_bn_sums_kernel`), are summed over its
    processes before the group kernel.

    ``keep`` False (eval without autograd): what only the backward reads is
    neither allocated nor written (the cache, ``a`` where the map applied is
    ``a_in``, ``var_in``, ``scale``: None in the result), 11 of an
    inference call's 19 allocations. Training keeps everything."""
    sync = training and reduce_fn is not None
    keep = keep or training
    n, c, hw, g, d, params, hidden, block_d, new = _setup(x, params, config)
    eps = config.eps
    pq, ps, _, split = _partials(x, None, d, full=training)
    vsum_g = new(g)
    mean, var = (new(n, c), new(n, c)) if keep else (ps, ps)
    var_in = new(n, c) if affine is not None and keep else None
    raw = new(n, c) if training else None
    sums = new(3 + c + g * d * d) if training else None
    cov = new(g, d, d) if training else None
    wm = new(g, d, d) if training else state.running_wm
    iterates = new(max(config.num_iters - 1, 1), g, d, d) if training \
        else None
    hid_part = new(g, n, hidden)  # each group's share of fc1 v
    alpha = beta = bn_stats = None
    bn = affine
    if affine is not None or batch_bn is not None:
        alpha, beta = new(c), new(c)
    bn_moments = None
    if batch_bn is not None:
        bn = BNAffine(batch_bn[0], batch_bn[1], ps, ps, batch_bn[2])
        if bn_reduce_fn is not None:  # a SyncBN: its global batch's sums
            bn_moments = new(2 * c + 1)
            _launch(_BN_SUMS, (g, ), pq, ps, split, n, c, hw, bn_moments,
                    D=d, BLOCK_D=block_d, num_warps=_warps(block_d))
            bn_moments = bn_reduce_fn(bn_moments)
        bn_stats = BatchBNStats(
            new(c), new(c), new(c), new(n, c), new(n, g, d, d),
            None if bn_moments is None else bn_moments[2 * c])
    elif affine is None:  # unused pointers
        bn = BNAffine(None, None, ps, ps, 0.0)
    _launch(
        _GROUP_STATS, (g, ),
        pq, ps, split, n, c, hw, eps,
        ps if bn.weight is None else bn.weight,
        ps if bn.bias is None else bn.bias, bn.mean, bn.var, float(bn.eps),
        ps if alpha is None else alpha, ps if beta is None else beta, mean,
        var, ps if var_in is None else var_in, ps if raw is None else raw,
        vsum_g, ps if sums is None else sums, ps if cov is None else cov, wm,
        ps if iterates is None else iterates,
        *((ps, ) * 5 if bn_stats is None else bn_stats[:5]),
        ps if bn_moments is None else bn_moments, params.fc1_weight,
        hid_part, hidden, D=d, BLOCK_D=block_d, TRAINING=training,
        AFFINE=affine is not None, HAS_W=bn.weight is not None,
        HAS_B=bn.bias is not None, NEWTON=not sync,
        NUM_ITERS=config.num_iters, BATCH_BN=bn_stats is not None,
        BLOCK_HC=max(16, min(_pow2(hidden),
                             2048 // block_d)), KEEP=keep,
        GLOBAL_BN=bn_moments is not None, num_warps=_warps(block_d))
    if sync:
        _launch(_SUMS_HEAD, (1, ), vsum_g, g, n, hw, sums,
                BLOCK_G=_pow2(g))
        sums = reduce_fn(sums)  # SyncCE: the global batch statistics
        _launch(_GLOBAL_WHITEN, (g, ), sums, c, eps, cov, wm,
                iterates, D=d, BLOCK_D=block_d, NUM_ITERS=config.num_iters,
                num_warps=_warps(block_d))
    folds = affine is not None or batch_bn is not None
    a = new(n, g, d, d) if keep or not folds else None
    a_in = new(n, g, d, d) if folds else a
    bias = new(n, g, d, 1) if folds else None
    if keep:
        hid, post, y = new(n, hidden), new(n, hidden), new(n, c)
        ln_mean, ln_rstd, lam, scale = new(n, 1), new(n, 1), new(1), new(1)
    else:  # not written (any pointer will do)
        hid = post = y = ln_mean = ln_rstd = lam = scale = None
    unused = a_in
    block_h = _pow2(hidden)
    # groups split over programs too (a few dozen programs in all: N is 2
    # in detection), each program summing the groups' shares of fc1 v
    per_program = _cdiv(g, max(1, min(g, _SAMPLE_PROGRAMS // n)))
    _launch(
        _SAMPLE_MAP, (n, _cdiv(g, per_program)),
        hid_part, vsum_g, c, hidden, n, per_program, hw, eps, params.gate,
        params.ln_weight, params.ln_bias,
        params.fc2_weight, wm, state.running_scale,
        *(unused if t is None else t
          for t in (alpha, beta, a, a_in, bias, hid, ln_mean, ln_rstd, post,
                    y, lam, scale, sums)),
        D=d, BLOCK_D=block_d, BLOCK_H=block_h,
        BLOCK_GH=min(_pow2(g), max(1, 4096 // block_h)),
        BLOCK_G=_pow2(g), TRAINING=training,
        AFFINE=folds, GLOBAL_SUMS=sync, KEEP=keep, num_warps=8)
    cache = SmallGraphCache(mean, raw, var, sums, hid, ln_mean, ln_rstd, post,
                            y, lam, scale, wm, cov, None, iterates) \
        if keep else None
    result = MapResult(a, a_in, bias, wm, scale, cache, var_in, alpha, beta)
    return result if bn_stats is None else (result, bn_stats)


def _float32(t: Optional[Tensor]) -> Optional[Tensor]:
    """``t`` as a contiguous float32 tensor (itself when it is one: a
    no-op ``.to`` still costs ~1 us of host time)."""
    if t is None or (t.dtype == torch.float32 and t.is_contiguous()):
        return t
    return t.to(torch.float32).contiguous()


def _map(m1: Tensor, p: Tensor, m2: Optional[Tensor], q: Optional[Tensor],
         b: Optional[Tensor], group_size: int, out: Tensor,
         launch: Optional[LaunchConfig] = None,
         residual: Optional[Tensor] = None, relu: bool = False) -> Tensor:
    """``out = m1 P (+ m2 Q) (+ b) (+ residual)``, then ReLU if ``relu``,
    by :func:`_map_kernel`; ``launch``: the configuration (default
    :func:`map_launch`)."""
    n, c, h, w = p.shape
    d, hw = group_size, h * w
    block_d = _blocks(d)[0]
    block_hw, warps, _ = launch or map_launch(d)
    m1, m2, b = _float32(m1), _float32(m2), _float32(b)
    if residual is not None and b is None:
        # a zero bias: ptxas spills the variant with a residual and no bias
        # at d = 64 on sm_90 (~1 KB a thread), not this one
        b = m1.new_zeros(m1.shape[:-1] + (1, ))
    _check(p, 'P')
    if q is not None:
        _check(q, 'Q')
    if residual is not None:
        _check(residual, 'residual')
    grid = (n * (c // d), _cdiv(hw, block_hw))
    _launch(
        _MAP, grid,
        m1, p, m1 if m2 is None else m2, p if q is None else q,
        m1 if b is None else b, p if residual is None else residual, out, hw,
        D=d, BLOCK_D=block_d, BLOCK_HW=block_hw, HAS_Q=q is not None,
        HAS_B=b is not None, HAS_R=residual is not None, RELU=relu,
        num_warps=warps)
    return out


def _fused_backward_maps(grad_out: Tensor, kept: Tensor, a: Tensor, cache,
                         params, config, training: bool, affine, fold,
                         reduce_fn=None, batch_bn=None,
                         bn_reduce_fn=None) -> GradMaps:
    """The backward's small part in five launches: ``dout kept^T`` (the
    statistics kernel), one program per group (dL/dA, the Newton
    iterations' backward), the instance branch in two (a program per 16
    samples: the MLP's backward to the variances; a program per group: the
    MLP's weights, the gate, the scale), one program per group (the input
    gradient's maps, the folded BN's gradients). With SyncCE the gradient
    of the global batch sums is all-reduced before the last one (as
    SyncBN's). ``fold``: an eval-mode
    BN folded in; ``batch_bn`` (:class:`BatchBNStats`): a BN with batch
    statistics folded in (``affine`` is its map); with ``bn_reduce_fn`` (a
    SyncBN) the last kernel runs in two launches, with the BN's gradient
    sums summed over its processes between them."""
    keep_cross = fold is not None or batch_bn is not None
    n, c, hw, g, d, params, hidden, block_d, new = _setup(kept, params,
                                                          config)
    eps = config.eps
    gz_p, gos_p, _, split = _partials(grad_out, kept, d, full=True)
    alpha, beta = affine if affine is not None else (gos_p, gos_p)
    gdiag, lam_part = new(n, c), new(g)
    # dL/d(batch sums), the layout of cache.sums (training)
    grad_sums = new(3 + c + g * d * d) if training else gdiag
    gz = new(n, g, d, d) if keep_cross else None
    gos = new(n, g, d, 1) if keep_cross else None
    sums = gdiag if cache.sums is None else cache.sums
    _launch(
        _GROUP_GRAD, (g, ),
        gz_p, gos_p, split, n, c, alpha, beta, cache.lam, cache.wm,
        gdiag if cache.cov is None else cache.cov,
        gdiag if cache.iterates is None else cache.iterates, sums, gdiag,
        lam_part, grad_sums, gdiag if gz is None else gz,
        gdiag if gos is None else gos, D=d, BLOCK_D=block_d,
        TRAINING=training, AFFINE=affine is not None,
        KEEP_CROSS=keep_cross, NUM_ITERS=config.num_iters,
        num_warps=_warps(block_d))
    d_gate, d_fc1 = new(1), new(hidden, c)
    d_lnw, d_lnb, d_fc2, grad_var = new(hidden), new(hidden), new(
        c, hidden), new(n, c)
    block_h = max(16, _pow2(hidden))
    blocks = _cdiv(n, _MLP_SAMPLES)
    grad_hid, part = new(n, hidden), new(blocks, 1 + 2 * hidden)
    _launch(
        _MLP_GRAD_SAMPLES, (blocks, ),
        gdiag, cache.y, cache.post_relu, cache.hidden, cache.ln_mean,
        cache.ln_rstd, cache.lam, cache.scale, params.fc1_weight,
        params.ln_weight, params.fc2_weight, n, c, hidden, grad_hid, part,
        grad_var, D=d, BLOCK_D=block_d, BLOCK_N=_MLP_SAMPLES,
        BLOCK_H=block_h, BLOCK_HC=min(block_h, 64), BLOCK_C=64,
        num_warps=16)  # with 8 warps C=1024 spills on sm_90
    _launch(
        _MLP_GRAD_WEIGHTS, (g, ),
        gdiag, cache.y, cache.post_relu, grad_hid, cache.var, cache.lam,
        cache.scale, lam_part, sums, part, blocks, n, c, hidden, eps, d_gate,
        d_fc1, d_lnw, d_lnb, d_fc2, grad_sums, D=d, BLOCK_D=block_d,
        BLOCK_N=_MLP_SAMPLES, BLOCK_H=block_h, BLOCK_HC=min(block_h, 128),
        BLOCK_G=_pow2(g), TRAINING=training,
        num_warps=4)  # (8 warps: 16 B spills on sm_90 from C=512 on)
    if training and reduce_fn is not None:
        # every process's loss depends on the global sums: their gradients
        # are summed, as SyncBN's
        grad_sums = reduce_fn(grad_sums)
    m1, m2, shift = new(n, g, d, d), new(n, g, d, d), new(n, g, d, 1)
    bn_mean, invstd, var_z = fold if fold is not None else (None, ) * 3
    mean_z = gram_z = None
    if batch_bn is not None:
        bn_mean, invstd = batch_bn.mean, batch_bn.invstd
        mean_z, gram_z = batch_bn.mean_z, batch_bn.gram_z
    d_bn_w = new(c) if keep_cross else None
    d_bn_b = new(c) if keep_cross else None
    sync_bn = batch_bn is not None and bn_reduce_fn is not None

    def grad_maps(phase: int, bn_sums: Tensor) -> None:
        _launch(
            _GRAD_MAPS, (g, ),
            a, cache.mean, grad_var,
            gdiag if cache.raw_var is None else cache.raw_var, grad_sums,
            alpha, beta, gdiag if gz is None else gz,
            gdiag if gos is None else gos, gdiag if var_z is None else var_z,
            gdiag if bn_mean is None else bn_mean,
            gdiag if invstd is None else invstd,
            gdiag if mean_z is None else mean_z,
            gdiag if gram_z is None else gram_z, n, c, hw, m1, m2, shift,
            gdiag if d_bn_w is None else d_bn_w,
            gdiag if d_bn_b is None else d_bn_b, bn_sums,
            batch_bn.positions if sync_bn else gdiag, D=d,
            BLOCK_D=block_d, TRAINING=training, AFFINE=affine is not None,
            FOLD=fold is not None, BATCH_BN=batch_bn is not None,
            BN_PHASE=phase, num_warps=_warps(block_d))

    if sync_bn:  # this process's BN sums, their sum, then the maps
        local = new(2 * c)
        grad_maps(1, local)
        grad_maps(2, bn_reduce_fn(local))
    else:
        grad_maps(0, gdiag)
    return GradMaps(m1, m2, shift, [d_gate, d_fc1, d_lnw, d_lnb, d_fc2],
                    d_bn_w, d_bn_b)


def _all_float32(*tensors: Optional[Tensor]) -> bool:
    """Whether the fused small-graph kernels (float32 only) can take these
    (None ignored)."""
    return all(t.dtype == torch.float32 for t in tensors if t is not None)


def _fused_cache(cache, params, training: bool) -> bool:
    """Whether the backward kernels can run on this forward cache: written
    by the fused forward (training keeps the Newton iterates there) from
    float32 parameters."""
    return (cache.iterates is not None or not training) and \
        _all_float32(cache.var, *params)


class TritonPasses:
    """The big passes by Triton kernels (same contract as
    :class:`~ce_mmdet.ops.torch_impl.TorchPasses`; compute dtype float32)."""

    name = 'triton'
    #: a BN with batch statistics before CE in training is folded into the
    #: op (the group kernels compute its statistics and its backward)
    fuses_batch_bn = True

    @staticmethod
    def batch_bn_map(z: Tensor, params, state, config, reduce_fn,
                     weight: Optional[Tensor], bias: Optional[Tensor],
                     eps: float,
                     bn_reduce_fn=None) -> Tuple[MapResult, BatchBNStats]:
        """``forward_map`` with a batch-statistics BN folded in (see
        :func:`~ce_mmdet.ops.torch_impl.batch_bn_map_by`): fused kernels,
        or with tensors that are not float32, the statistics kernel and
        the torch small graph."""
        if _all_float32(*params, *state, weight, bias):
            return _fused_forward_map(z, params, state, config, True, None,
                                      reduce_fn, (weight, bias, eps),
                                      bn_reduce_fn=bn_reduce_fn)
        return batch_bn_map_by(TritonPasses, z, params, state, config,
                               reduce_fn, weight, bias, eps, bn_reduce_fn)

    @staticmethod
    def batch_bn_backward_maps(grad_out: Tensor, z: Tensor, a: Tensor,
                               cache, params, config, reduce_fn,
                               alpha: Tensor, beta: Tensor,
                               bn: BatchBNStats,
                               weight: Optional[Tensor],
                               bn_reduce_fn=None) -> GradMaps:
        """``backward_maps`` of :meth:`batch_bn_map`."""
        if _fused_cache(cache, params, True):
            return _fused_backward_maps(grad_out, z, a, cache, params, config,
                                        True, (alpha, beta), None, reduce_fn,
                                        bn, bn_reduce_fn)
        return batch_bn_backward_maps_by(TritonPasses, grad_out, z, a, cache,
                                         params, config, reduce_fn, alpha,
                                         beta, bn, weight, bn_reduce_fn)

    @staticmethod
    def forward_map(x: Tensor, params, state, config, training: bool,
                    reduce_fn, affine=None, keep: bool = True) -> MapResult:
        """Statistics and the small graph: fused kernels
        (:func:`_fused_forward_map`), or with parameters that are not
        float32, the statistics kernel and the torch small graph.
        ``keep``: as ``TorchPasses.forward_map``."""
        if _all_float32(*params, *state, *(affine or ())[:4]):
            return _fused_forward_map(x, params, state, config, training,
                                      affine, reduce_fn, keep=keep)
        return forward_map_by(TritonPasses, x, params, state, config,
                              training, reduce_fn, affine)

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
        var = (sumsq - hw * mean * mean) / unbiased_divisor(hw)
        return mean, var.clamp_min(0)

    @staticmethod
    def cross(go: Tensor, z: Tensor,
              group_size: int) -> Tuple[Tensor, Tensor]:
        n, c = z.shape[:2]
        d = group_size
        gz, go_sum, _ = _statistics(go, z, group_size, full=True)
        return gz, go_sum.view(n, c // d, d, 1)

    @staticmethod
    def backward_maps(grad_out: Tensor, kept: Tensor, a: Tensor, cache,
                      params, config, training: bool, reduce_fn,
                      affine=None, fold=None) -> GradMaps:
        """Fused kernels (:func:`_fused_backward_maps`) after the fused
        forward; with parameters that are not float32, the cross-product
        kernel and the torch small graph."""
        if _fused_cache(cache, params, training):
            return _fused_backward_maps(grad_out, kept, a, cache, params,
                                        config, training, affine, fold,
                                        reduce_fn)
        return backward_maps_by(TritonPasses, grad_out, kept, a, cache,
                                params, config, training, reduce_fn, affine,
                                fold)

    @staticmethod
    def apply(a: Tensor, x: Tensor, group_size: int, inplace: bool,
              bias: Optional[Tensor] = None,
              residual: Optional[Tensor] = None,
              relu: bool = False) -> Tensor:
        out = x if inplace else torch.empty_like(x)
        return _map(a, x, None, None, bias, group_size, out, None, residual,
                    relu)

    @staticmethod
    def apply2(m1: Tensor, p: Tensor, m2: Tensor, q: Tensor, b: Tensor,
               group_size: int) -> Tensor:
        return _map(m1, p, m2, q, b, group_size, torch.empty_like(q))
