"""The Triton kernels (in Triton's interpreter on this CPU machine, see
tests/conftest.py) against the torch implementation and the float64
reference."""
import copy

import pytest
import torch

from ce_mmdet.ops import resolve_impl
from ce_mmdet.ops.impl import triton_device

pytestmark = pytest.mark.skipif(
    triton_device() is None,
    reason='needs triton (and a GPU or TRITON_INTERPRET=1)')
DEVICE = triton_device() or 'cpu'


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def passes():
    from ce_mmdet.ops.torch_impl import TorchPasses
    from ce_mmdet.ops.triton_impl import TritonPasses
    return TorchPasses, TritonPasses


# n, c, h, w, d: N=1, H*W=1, H*W not a multiple of any block, d 8..64
SHAPES = [(2, 32, 5, 7, 16), (1, 16, 1, 1, 8), (1, 64, 9, 13, 32),
          (2, 64, 3, 5, 64), (3, 24, 17, 11, 8), (2, 32, 40, 40, 16)]


@pytest.mark.parametrize('n,c,h,w,d', SHAPES)
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16,
                                   torch.float16])
def test_every_pass_matches_torch(n, c, h, w, d, dtype):
    torch_p, triton_p = passes()
    torch.manual_seed(0)
    x = (torch.randn(n, c, h, w, device=DEVICE) + 0.5).to(dtype)
    y = torch.randn(n, c, h, w, device=DEVICE).to(dtype)
    g = c // d
    a = torch.randn(n, g, d, d, device=DEVICE)
    m2 = torch.randn(n, g, d, d, device=DEVICE)
    b = torch.randn(n, g, d, 1, device=DEVICE)
    # statistics are fp32 sums of the same inputs: fp32 accuracy
    for training in (True, False):
        for u, v in zip(triton_p.stats(x, d, training),
                        torch_p.stats(x, d, training)):
            assert u.dtype == torch.float32 and u.shape == v.shape
            assert rel_err(u, v) < 1e-5
    for u, v in zip(triton_p.cross(y, x, d), torch_p.cross(y, x, d)):
        assert u.shape == v.shape and rel_err(u, v) < 1e-5
    # maps: fp32 accumulation (the torch path rounds half GEMMs more)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    ref = torch.einsum('ngij,ngjp->ngip', a,
                       x.float().view(n, g, d, h * w)) + b
    out = triton_p.apply(a, x, d, False, b)
    assert out.dtype == dtype and rel_err(out, ref.view_as(out)) < tol
    ref2 = ref + torch.einsum('ngij,ngjp->ngip', m2,
                              y.float().view(n, g, d, h * w))
    out = triton_p.apply2(m2, y, a, x, b, d)
    assert out.dtype == dtype and rel_err(out, ref2.view_as(out)) < tol
    # in place: the output is the input tensor
    xc = x.clone()
    out = triton_p.apply(a, xc, d, True)
    assert out.data_ptr() == xc.data_ptr()
    assert rel_err(out, (ref - b).view_as(out)) < tol
    # a residual block's tail in the same pass: + residual, ReLU
    tail = torch.relu(ref.view_as(x) + y.float())
    xc = x.clone()
    out = triton_p.apply(a, xc, d, True, b, y, True)
    assert out.data_ptr() == xc.data_ptr() and out.dtype == dtype
    assert rel_err(out, tail) < tol and (out == 0).any()
    assert rel_err(out, torch_p.apply(a, x.clone(), d, True, b, y, True)) \
        < tol
    out = triton_p.apply(a, x, d, False, b, None, True)  # the stem's ReLU
    assert rel_err(out, torch.relu(ref.view_as(x))) < tol


def make_pair(c, d, bn_training, ce_training, impl):
    from ce_mmdet.models import ChannelEquilibrium
    torch.manual_seed(0)
    ce = ChannelEquilibrium(c, group_size=d, num_iters=3, impl=impl)
    bn = torch.nn.BatchNorm2d(c)
    with torch.no_grad():
        ce.gate.fill_(0.3)
        ce.norm.bias.normal_(0, 0.1)
        ce.running_wm.add_(0.01 * torch.randn_like(ce.running_wm))
        ce.running_scale.fill_(1.3)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_(0, 0.2)
        bn.running_mean.normal_(0, 0.3)
        bn.running_var.uniform_(0.5, 2)
    return ce.train(ce_training).to(DEVICE), bn.train(bn_training).to(
        DEVICE)


@pytest.mark.parametrize('n,c,h,w,d', [(2, 32, 5, 7, 16), (1, 16, 1, 1, 8),
                                       (2, 64, 6, 9, 32)])
@pytest.mark.parametrize('bn_training,ce_training', [(True, True),
                                                     (False, False),
                                                     (True, False),
                                                     (False, True)])
@pytest.mark.parametrize('fused', [True, False])
def test_layer_matches_float64_reference(n, c, h, w, d, bn_training,
                                         ce_training, fused):
    """impl='triton' against the float64 computation: output, input and
    parameter gradients, running buffers (fp32 accuracy)."""
    ce, bn = make_pair(c, d, bn_training, ce_training, 'triton')
    ref_ce, ref_bn = copy.deepcopy(ce).double(), copy.deepcopy(bn).double()
    ref_ce.impl = 'torch'
    torch.manual_seed(1)
    z = (2 * torch.randn(n, c, h, w, device=DEVICE) + 1).requires_grad_()
    zr = z.detach().double().requires_grad_()
    if bn_training and n * h * w == 1:  # as nn.BatchNorm2d
        with pytest.raises(ValueError, match='more than 1 value'):
            ce(z, bn=bn)
        return
    out = ce(z, bn=bn) if fused else ce(bn(z))
    ref = ref_ce(zr, bn=ref_bn)
    assert rel_err(out, ref) < 1e-3
    g = torch.randn_like(out)
    params = [z] + list(bn.parameters()) + list(ce.parameters())
    ref_params = [zr] + list(ref_bn.parameters()) + list(ref_ce.parameters())
    for a, b in zip(torch.autograd.grad(out, params, g),
                    torch.autograd.grad(ref, ref_params, g.double())):
        assert rel_err(a, b) < 1e-3
    for (name, a), b in zip(ce.named_buffers(), ref_ce.buffers()):
        assert rel_err(a, b) < 1e-3, name
    for (name, a), b in zip(bn.named_buffers(), ref_bn.buffers()):
        assert rel_err(a, b) < 1e-3, name


@pytest.mark.parametrize('bn_training,ce_training', [(True, True),
                                                     (False, False),
                                                     (False, True)])
@pytest.mark.parametrize('grad', [True, False])
def test_block_tail_matches_float64_reference(bn_training, ce_training,
                                              grad):
    """``relu(CE(BN(z)) + r)`` with the sum and the ReLU in the map kernel:
    the float64 computation's output and, with autograd, the gradients of
    z, r and the parameters (the ReLU's backward masks dout first)."""
    ce, bn = make_pair(32, 16, bn_training, ce_training, 'triton')
    ref_ce, ref_bn = copy.deepcopy(ce).double(), copy.deepcopy(bn).double()
    ref_ce.impl = 'torch'
    torch.manual_seed(1)
    z = (2 * torch.randn(2, 32, 5, 7, device=DEVICE) + 1)
    r = torch.randn_like(z)
    zr, rr = z.double().requires_grad_(), r.double().requires_grad_()
    ref = torch.relu(ref_ce(zr, bn=ref_bn) + rr)
    z.requires_grad_(grad)
    r.requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        out = ce(z, bn=bn, inplace=True, residual=r, relu=True)
    assert rel_err(out, ref) < 1e-3 and (out == 0).any()
    if grad:
        g = torch.randn_like(out)
        wrt = [z, r] + list(ce.parameters())
        ref_wrt = [zr, rr] + list(ref_ce.parameters())
        for a, b in zip(torch.autograd.grad(out, wrt, g),
                        torch.autograd.grad(ref, ref_wrt, g.double())):
            assert rel_err(a, b) < 1e-3


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_layer_low_precision(dtype):
    ce, bn = make_pair(32, 16, True, True, 'triton')
    ref_ce, ref_bn = copy.deepcopy(ce), copy.deepcopy(bn)
    ref_ce.impl = 'torch'
    z = torch.randn(2, 32, 8, 8, device=DEVICE)
    ref = ref_ce(z, bn=ref_bn)
    zl = z.to(dtype).requires_grad_()
    out = ce(zl, bn=bn)
    assert out.dtype == dtype
    assert rel_err(out, ref) < (2e-2 if dtype == torch.float16 else 6e-2)
    out.float().sum().backward()
    assert zl.grad.dtype == dtype and torch.isfinite(zl.grad).all()


def test_sync_sums_go_through_the_same_kernels():
    """SyncCE with the Triton kernels (sums all-reduced between the
    small-graph kernels, forward and backward) equals SyncCE with the torch
    passes (a reduce function that sums two identical processes)."""
    from ce_mmdet.ops import CEConfig, channel_equilibrium
    ce, _ = make_pair(32, 16, True, True, 'triton')
    ref = copy.deepcopy(ce)

    def two_processes(t):
        return 2 * t

    x = torch.randn(2, 32, 6, 6, device=DEVICE)
    outs = []
    for layer, impl in ((ce, 'triton'), (ref, 'torch')):
        xi = x.clone().requires_grad_()
        out = channel_equilibrium(
            xi, layer.ce_params(), layer.ce_state(),
            config=CEConfig(16, 3), training=True,
            reduce_fn=two_processes, impl=impl)
        out.sum().backward()
        outs.append((out, xi.grad, layer.fc1.weight.grad))
    for a, b in zip(*outs):
        assert rel_err(a, b) < 1e-4


def test_auto_never_picks_the_interpreter():
    x = torch.randn(1, 16, 2, 2)
    assert resolve_impl('auto', x) == 'torch'
    assert resolve_impl('triton', x) == 'triton'
    with pytest.raises(RuntimeError, match='float32, float16 and bfloat16'):
        resolve_impl('triton', x.double())


@pytest.mark.parametrize('n,c,h,w,d,reduction', [(2, 32, 5, 7, 16, 4),
                                                 (1, 48, 3, 1, 8, 4),
                                                 (3, 64, 4, 5, 32, 3),
                                                 (2, 64, 2, 2, 64, 4)])
@pytest.mark.parametrize('training', [True, False])
@pytest.mark.parametrize('affine', [False, True])
def test_fused_small_graph_matches_torch(n, c, h, w, d, reduction, training,
                                         affine):
    """The three-launch forward (statistics, per-group, per-sample kernels)
    against the statistics and small graph in torch: every output and
    every cached tensor the backward reads."""
    from ce_mmdet.models import ChannelEquilibrium
    from ce_mmdet.ops.torch_impl import TorchPasses
    from ce_mmdet.ops.triton_impl import TritonPasses
    if affine and training:
        pytest.skip('the affine input map is an eval-only path')
    torch.manual_seed(0)
    ce = ChannelEquilibrium(c, group_size=d, reduction=reduction,
                            num_iters=4).to(DEVICE)
    with torch.no_grad():
        ce.gate.fill_(-0.2)
        ce.norm.weight.uniform_(0.5, 1.5)
        ce.running_wm.add_(0.05 * torch.randn_like(ce.running_wm))
        ce.running_scale.fill_(0.8)
    x = torch.randn(n, c, h, w, device=DEVICE) * 1.5 + 0.3
    aff = None
    if affine:
        from ce_mmdet.ops.torch_impl import BNAffine
        aff = BNAffine(torch.rand(c, device=DEVICE) + 0.5,
                       torch.randn(c, device=DEVICE),
                       torch.randn(c, device=DEVICE),
                       torch.rand(c, device=DEVICE) + 0.5, 1e-5)
    args = (x, ce.ce_params(), ce.ce_state(), ce.config, training, None, aff)
    got, want = TritonPasses.forward_map(*args), TorchPasses.forward_map(*args)
    for name in ('a', 'a_in', 'bias', 'wm', 'scale', 'var_in', 'alpha',
                 'beta'):
        u, v = getattr(got, name), getattr(want, name)
        assert (u is None) == (v is None), name
        if u is not None:
            assert rel_err(u, v.reshape(u.shape)) < 1e-4, name
    for name in ('mean', 'raw_var', 'var', 'sums', 'hidden', 'ln_mean',
                 'ln_rstd', 'post_relu', 'y', 'lam', 'scale', 'cov'):
        u, v = getattr(got.cache, name), getattr(want.cache, name)
        assert (u is None) == (v is None), name
        if u is not None:
            assert rel_err(u, v.reshape(u.shape)) < 1e-4, name
    # without autograd (keep=False): the maps the apply reads, the same
    # numbers; what only the backward reads is not made (training keeps all)
    lean = TritonPasses.forward_map(*args, keep=False)
    if training:
        assert lean.cache is not None and lean.scale is not None
    else:
        assert lean.cache is None and lean.var_in is None
        assert lean.scale is None and (lean.a is None) == affine
        assert torch.equal(lean.a_in, got.a_in)
        assert (lean.bias is None) == (got.bias is None)
        if affine:
            assert torch.equal(lean.bias, got.bias)


def test_inference_allocates_only_what_the_apply_reads():
    """An inference call (eval BN folded into eval CE, no autograd) on the
    Triton path: 11 fewer allocations than the same call with autograd
    (on a GPU at 2 images per step each is host time; the kernels not
    run here)."""
    from ce_mmdet.analysis.triton_aot import record_launches
    from ce_mmdet.ops import BatchNormArgs, batchnorm_channel_equilibrium
    from torch.utils._python_dispatch import TorchDispatchMode

    class Allocations(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.empty,
                                       torch.ops.aten.empty_strided):
                self.count += 1
            return func(*args, **(kwargs or {}))

    ce = make_ce(64, 16, 4)
    bn = torch.nn.BatchNorm2d(64).to(DEVICE).eval()
    ce.eval()
    counts = {}
    for grad in (True, False):
        z = torch.randn(2, 64, 6, 5, device=DEVICE).requires_grad_(grad)
        with record_launches({}, run=False), Allocations() as allocations, \
                torch.set_grad_enabled(grad):
            batchnorm_channel_equilibrium(
                z, BatchNormArgs.from_module(bn), ce.ce_params(),
                ce.ce_state(), config=ce.config, training=False,
                impl='triton')
        counts[grad] = allocations.count
    assert counts[True] - counts[False] >= 11, counts


# n, c, h, w, d, IR reduction: N = 1 and 17, H*W = 3, d 8..32
# (the last: one group of 64, as CE-ResNet's stem)
#: (N, C, H, W, d, reduction); N = 17 and 40: the MLP backward's sample
#: blocks of 16 (two, three with a partial one); C = 544: its slices of the
#: hidden width (272: 64 and 128 wide, the last partial) and of C
BACKWARD_SHAPES = [(2, 32, 5, 7, 16, 4), (1, 48, 3, 1, 8, 4),
                   (3, 64, 4, 5, 32, 3), (17, 16, 2, 3, 16, 4),
                   (2, 64, 3, 4, 64, 4), (40, 32, 2, 2, 16, 2),
                   (3, 544, 1, 2, 16, 2)]


def make_ce(c, d, reduction):
    """A CE layer with a non-trivial gate, LayerNorm and running W."""
    from ce_mmdet.models import ChannelEquilibrium
    torch.manual_seed(0)
    ce = ChannelEquilibrium(c, group_size=d, reduction=reduction,
                            num_iters=3).to(DEVICE)
    with torch.no_grad():
        ce.gate.fill_(0.3)
        ce.norm.weight.uniform_(0.5, 1.5)
        ce.running_wm.add_(0.05 * torch.randn_like(ce.running_wm))
    return ce


@pytest.mark.parametrize('n,c,h,w,d,reduction', BACKWARD_SHAPES)
@pytest.mark.parametrize('training,affine,fold', [(True, False, False),
                                                  (True, True, False),
                                                  (False, False, False),
                                                  (False, True, True)])
def test_fused_backward_maps_match_torch(n, c, h, w, d, reduction, training,
                                         affine, fold):
    """The five-launch backward (cross products, per-group, instance
    branch per sample block and per group, per-group maps) against the
    torch composition on the same forward cache: the input gradient's maps,
    the CE parameters' and the folded BN's gradients."""
    from ce_mmdet.ops.torch_impl import (TorchPasses,
                                         backward_maps_from_cross)
    from ce_mmdet.ops.triton_impl import TritonPasses, _fused_backward_maps
    ce = make_ce(c, d, reduction)
    x = torch.randn(n, c, h, w, device=DEVICE) * 1.5 + 0.3
    go = torch.randn(n, c, h, w, device=DEVICE)
    result = TritonPasses.forward_map(x, ce.ce_params(), ce.ce_state(),
                                      ce.config, training, None, None)
    aff = (torch.rand(c, device=DEVICE) + 0.5,
           torch.randn(c, device=DEVICE)) if affine else None
    fold_args = None
    if fold:
        fold_args = (torch.randn(c, device=DEVICE),
                     torch.rand(c, device=DEVICE) + 0.5,
                     torch.rand(n, c, device=DEVICE))
    got = _fused_backward_maps(go, x, result.a, result.cache,
                               ce.ce_params(), ce.config, training, aff,
                               fold_args)
    gz, gos = TorchPasses.cross(go, x, d)
    want = backward_maps_from_cross(gz, gos, result.a, result.cache, h * w,
                                    ce.ce_params(), ce.config, training,
                                    None, aff, fold_args)
    m2 = want.m2 if want.m2.dim() == 4 else torch.diag_embed(want.m2)
    for name, u, v in (('m1', got.m1, want.m1), ('m2', got.m2, m2),
                       ('shift', got.shift, want.shift),
                       ('bn_weight', got.bn_weight, want.bn_weight),
                       ('bn_bias', got.bn_bias, want.bn_bias)):
        assert (u is None) == (v is None), name
        if u is not None:
            assert rel_err(u, v) < 1e-4, name
    # (the gate's gradient sums every entry of dL/dA: fp32 rounding)
    for name, u, v in zip(('gate', 'fc1', 'ln_w', 'ln_b', 'fc2'), got.params,
                          want.params):
        assert rel_err(u.reshape(v.shape), v) < 1e-3, name


def test_kernel_write_sets_match_their_source():
    """The parameters each kernel stores to (read from its source, through
    the helpers it calls) are the ones its custom-op launch declares
    mutated: a missing one would let torch.compile reorder or drop a
    write."""
    import inspect
    import re

    from ce_mmdet.ops import triton_impl
    src = inspect.getsource(triton_impl)
    bodies = {
        m.group(1): m.group(0)
        for m in re.finditer(r'def (_\w+)\((?:.|\n)*?(?=\n\n\n)', src)
    }

    def stores(name):
        body = bodies[name]
        found = set(re.findall(r'tl\.store\((\w+)', body))
        for helper in re.findall(r'\b(_\w+)\(', body):
            if helper != name and helper in bodies and \
                    'tl.store' in bodies[helper]:
                found |= stores(helper)  # same parameter names
        return found

    assert len(triton_impl._KERNELS) == 11
    for name, kernel in triton_impl._KERNELS.items():
        assert stores(name) == kernel.writes, name


class OpNames(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the name of every op dispatched."""

    def __enter__(self):
        self.names = []
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize('bn_training,ce_training', [(True, True),
                                                     (False, False)])
def test_launch_through_the_custom_op_equals_direct(monkeypatch, bn_training,
                                                    ce_training):
    """The launch op (what torch.compile records) rebuilds each kernel's
    arguments exactly: a BN + CE step through it equals the direct
    launches bit for bit."""
    from ce_mmdet.models import ChannelEquilibrium
    from ce_mmdet.ops import triton_impl
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(32).to(DEVICE).train(bn_training)
    layer = ChannelEquilibrium(32, impl='triton').to(DEVICE).train(
        ce_training)
    z = torch.randn(2, 32, 5, 7, device=DEVICE)

    def step(via_op):
        monkeypatch.setattr(triton_impl.torch.compiler, 'is_compiling',
                            lambda: via_op)
        b, c = copy.deepcopy(bn), copy.deepcopy(layer)
        zz = z.clone().requires_grad_()
        launches = triton_impl.LaunchStats.launches
        with OpNames() as ops:
            out = c(zz, bn=b)
            out.square().sum().backward()
        launches = triton_impl.LaunchStats.launches - launches
        assert ops.names.count('ce_mmdet.triton_launch.default') == (
            launches if via_op else 0)
        return (launches, out, zz.grad,
                b.weight.grad, c.fc1.weight.grad, c.gate.grad,
                *c.buffers(), *b.buffers())

    direct, via_op = step(False), step(True)
    assert direct[0] == via_op[0] > 0
    for a, b in zip(direct[1:], via_op[1:]):
        assert torch.equal(a, b)


def _other_process(c, n, hw):
    """A SyncBN's sum over two processes in one: adds what another process
    would contribute (the BN's sums of its own batch of ``n * hw``
    positions forward, fixed gradient sums backward)."""
    other = torch.randn(n, c, hw, device=DEVICE) * 1.2 + 0.5
    extra = {
        2 * c + 1:
        torch.cat([other.sum((0, 2)), other.square().sum((0, 2)),
                   torch.full((1, ), n * hw, device=DEVICE)]),
        2 * c:
        torch.randn(2 * c, device=DEVICE)
    }
    return lambda t: t + extra[t.numel()]


@pytest.mark.parametrize('n,c,h,w,d,reduction', BACKWARD_SHAPES)
@pytest.mark.parametrize('sync,sync_bn', [(False, False), (True, False),
                                          (True, True), (False, True)])
@pytest.mark.parametrize('affine_bn', [True, False])
def test_fused_batch_bn_matches_torch(n, c, h, w, d, reduction, sync,
                                      sync_bn, affine_bn):
    """A batch-statistics BN folded into the kernels (BATCH_BN in the
    per-group statistics and maps kernels) against the torch composition
    (:func:`batch_bn_map_by` / :func:`batch_bn_backward_maps_by`): the maps,
    the BN's statistics, z's kept statistics, the input gradient's maps and
    every gradient; with SyncCE sums (a reduction that doubles them, as two
    processes with the same data), with a SyncBN's (GLOBAL_BN and the two
    launches of the maps kernel; another process's sums added) and without
    the BN's affine."""
    from ce_mmdet.ops.torch_impl import TorchPasses
    from ce_mmdet.ops.triton_impl import TritonPasses
    ce = make_ce(c, d, reduction)
    weight = torch.rand(c, device=DEVICE) + 0.5 if affine_bn else None
    bias = torch.randn(c, device=DEVICE) if affine_bn else None
    z = torch.randn(n, c, h, w, device=DEVICE) * 1.5 + 0.7
    go = torch.randn(n, c, h, w, device=DEVICE)
    reduce_fn = (lambda t: 2 * t) if sync else None
    bn_reduce_fn = _other_process(c, 2, 9) if sync_bn else None
    args = (z, ce.ce_params(), ce.ce_state(), ce.config, reduce_fn, weight,
            bias, 1e-5, bn_reduce_fn)
    (got, got_bn), (want, want_bn) = (TritonPasses.batch_bn_map(*args),
                                      TorchPasses.batch_bn_map(*args))
    for name in ('a', 'a_in', 'bias', 'wm', 'scale', 'alpha', 'beta'):
        u, v = getattr(got, name), getattr(want, name)
        assert rel_err(u, v.reshape(u.shape)) < 1e-4, name
    assert (got_bn.positions is None) == (not sync_bn)
    for name, u, v in zip(got_bn._fields, got_bn, want_bn):
        if u is not None:
            assert rel_err(u, v.reshape(u.shape)) < 1e-4, name
    if sync_bn:  # (the other process's batch counted)
        assert float(got_bn.positions) == n * h * w + 18
    back = (go, z, got.a, got.cache, ce.ce_params(), ce.config, reduce_fn,
            got.alpha, got.beta, got_bn, weight, bn_reduce_fn)
    g, t = (TritonPasses.batch_bn_backward_maps(*back),
            TorchPasses.batch_bn_backward_maps(*back))
    for name in ('m1', 'm2', 'shift', 'bn_weight', 'bn_bias'):
        assert rel_err(getattr(g, name), getattr(t, name)) < 1e-4, name
    for name, u, v in zip(('gate', 'fc1', 'ln_w', 'ln_b', 'fc2'), g.params,
                          t.params):
        assert rel_err(u.reshape(v.shape), v) < 1e-3, name


def test_host_helpers_match_triton():
    """The host code's cdiv and next power of two (plain Python: Triton
    3.9's are constexpr functions, ~3.5 us a call) equal Triton's."""
    import triton
    from ce_mmdet.ops.triton_impl import _cdiv, _pow2
    for a in range(1, 1100):
        assert _pow2(a) == triton.next_power_of_2(a)
        for b in (1, 2, 3, 16, 64, 1000):
            assert _cdiv(a, b) == triton.cdiv(a, b)
