import copy

import pytest
import torch
from mmcv.cnn import build_plugin_layer
from mmdet.models import ResNet
from mmdet.registry import MODELS

from ce_mmdet.models import ChannelEquilibrium
from ce_mmdet.testing import ce_reference_module

TOL = 1e-10


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def make_layer(c, dtype=torch.float64, seed=0, **kwargs):
    """A CE layer with non-trivial parameters and running buffers."""
    torch.manual_seed(seed)
    layer = ChannelEquilibrium(c, **kwargs).to(dtype)
    with torch.no_grad():
        layer.gate.fill_(0.3)
        layer.norm.weight.add_(0.1 * torch.randn_like(layer.norm.weight))
        layer.norm.bias.normal_(0, 0.1)
        layer.running_wm.add_(0.01 * torch.randn_like(layer.running_wm))
        layer.running_scale.fill_(1.7)
    return layer


def bn_like_input(n, c, h, w, dtype=torch.float64, seed=1):
    torch.manual_seed(seed)
    gamma = torch.rand(1, c, 1, 1, dtype=dtype) * 2
    beta = torch.randn(1, c, 1, 1, dtype=dtype) * 0.5
    mix = torch.randn(c, c, dtype=dtype) * 0.3 + torch.eye(c, dtype=dtype)
    x = torch.randn(n, c, h, w, dtype=dtype)
    x = torch.einsum('dc,nchw->ndhw', mix, x)  # correlated channels
    return x * gamma + beta


CASES = [
    # n, c, h, w, group_size, num_iters
    (2, 32, 5, 7, 16, 3),
    (3, 16, 4, 4, 4, 1),
    (1, 64, 3, 3, 64, 5),
    (4, 48, 6, 2, 8, 2),
]


@pytest.mark.parametrize('training', [True, False])
@pytest.mark.parametrize('n,c,h,w,gs,iters', CASES)
def test_matches_float64_reference(n, c, h, w, gs, iters, training):
    layer = make_layer(c, group_size=gs, num_iters=iters).train(training)
    ref_layer = copy.deepcopy(layer)
    x = bn_like_input(n, c, h, w).requires_grad_()
    out = layer(x)
    ref, ref_wm, ref_scale = ce_reference_module(ref_layer, x)
    assert out.dtype == x.dtype and out.shape == x.shape
    assert rel_err(out, ref) < TOL
    assert rel_err(layer.running_wm, ref_wm) < TOL
    assert rel_err(layer.running_scale, ref_scale) < TOL
    if training:  # the buffers did move
        assert not torch.allclose(layer.running_wm, ref_layer.running_wm)
    grad_out = torch.randn_like(out)
    params = list(layer.parameters())
    ref_params = list(ref_layer.parameters())
    grads = torch.autograd.grad(out, [x] + params, grad_out)
    ref_grads = torch.autograd.grad(ref, [x] + ref_params, grad_out)
    names = ['input'] + [name for name, _ in layer.named_parameters()]
    for name, g, rg in zip(names, grads, ref_grads):
        assert rel_err(g, rg) < TOL, name


def test_gradcheck_float64():
    layer = make_layer(8, group_size=4, num_iters=2)
    x = bn_like_input(2, 8, 3, 3).requires_grad_()
    for training in (True, False):
        layer.train(training)
        layer.momentum = 0.0  # keep buffers fixed across gradcheck's calls
        params = tuple(layer.parameters())

        names = [name for name, _ in layer.named_parameters()]

        def fn(x, *ps, layer=layer, names=names):
            return torch.func.functional_call(layer, dict(zip(names, ps)),
                                              (x, ))

        inputs = (x, ) + tuple(p.detach().clone().requires_grad_()
                               for p in params)
        assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


def test_running_buffers_update_only_in_training_without_history():
    layer = make_layer(32, dtype=torch.float32)
    x = bn_like_input(2, 32, 4, 4, dtype=torch.float32).requires_grad_()
    wm0, s0 = layer.running_wm.clone(), layer.running_scale.clone()
    layer.eval()
    layer(x).sum().backward()
    assert torch.equal(layer.running_wm, wm0)
    assert torch.equal(layer.running_scale, s0)
    layer.train()
    layer(x).sum().backward()
    assert not torch.equal(layer.running_wm, wm0)
    assert not torch.equal(layer.running_scale, s0)
    for buf in (layer.running_wm, layer.running_scale):
        assert buf.grad_fn is None and not buf.requires_grad
    # two forwards before one backward (as under gradient checkpointing)
    loss = layer(x).sum() + layer(x).sum()
    loss.backward()
    assert torch.isfinite(x.grad).all()


def test_reset_running_stats_restores_the_fresh_buffers():
    layer = make_layer(32, dtype=torch.float32).train()
    fresh = ChannelEquilibrium(32, group_size=16)
    layer(bn_like_input(2, 32, 4, 4, dtype=torch.float32))
    assert not torch.equal(layer.running_wm, fresh.running_wm)
    assert not torch.equal(layer.running_scale, fresh.running_scale)
    wm, scale = layer.running_wm, layer.running_scale
    layer.reset_running_stats()
    assert layer.running_wm is wm and layer.running_scale is scale
    assert torch.equal(layer.running_wm, fresh.running_wm)
    assert torch.equal(layer.running_scale, fresh.running_scale)


def test_fresh_layer_is_finite_in_eval():
    layer = ChannelEquilibrium(16, group_size=8).eval()
    assert torch.equal(layer.running_scale, torch.ones(1))
    assert torch.equal(layer.running_wm, torch.eye(8).repeat(2, 1, 1))
    out = layer(torch.randn(2, 16, 5, 5))
    assert torch.isfinite(out).all()


def test_eval_output_does_not_depend_on_batch():
    layer = make_layer(32).eval()
    x = bn_like_input(4, 32, 5, 5)
    full = layer(x)
    for i in range(4):
        alone = layer(x[i:i + 1])
        assert rel_err(alone[0], full[i]) < TOL
    other = torch.cat([x[:1], 10 * bn_like_input(3, 32, 5, 5, seed=9)])
    assert rel_err(layer(other)[0], full[0]) < TOL


@pytest.mark.parametrize('kwargs,match', [
    (dict(in_channels=30, group_size=16), 'multiple of group_size'),
    (dict(in_channels=16, reduction=32), 'hidden units'),
    (dict(in_channels=16, num_iters=0), 'num_iters must be >= 1'),
    (dict(in_channels=0), 'in_channels must be >= 1'),
    (dict(in_channels=16, eps=0.0), 'eps must be a positive'),
    (dict(in_channels=16, momentum=1.5), 'momentum must be in'),
])
def test_bad_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ChannelEquilibrium(**kwargs)


def test_bad_argument_types_raise_type_error():
    with pytest.raises(TypeError, match='group_size must be an int'):
        ChannelEquilibrium(16, group_size=4.0)
    with pytest.raises(TypeError, match='in_channels must be an int'):
        ChannelEquilibrium(True)


def test_bad_inputs_raise():
    layer = ChannelEquilibrium(16)
    with pytest.raises(TypeError, match='expected a Tensor, got ndarray'):
        layer(torch.randn(2, 16, 4, 4).numpy())
    with pytest.raises(ValueError, match='4-D'):
        layer(torch.randn(2, 16, 4))
    with pytest.raises(ValueError, match='expected 16 channels, got 32'):
        layer(torch.randn(2, 32, 4, 4))
    with pytest.raises(TypeError, match='floating point'):
        layer(torch.ones(2, 16, 4, 4, dtype=torch.long))


@pytest.mark.parametrize('training', [True, False])
def test_undefined_cases_are_finite(training):
    layer = ChannelEquilibrium(16, group_size=8).train(training)
    cases = {
        'hw1': torch.randn(4, 16, 1, 1),
        'constant': torch.full((2, 16, 4, 4), 3.0),
        'zeros': torch.zeros(2, 16, 4, 4),
        'n1_hw1': torch.randn(1, 16, 1, 1),
        'n1': torch.randn(1, 16, 3, 3),
    }
    for name, x in cases.items():
        x = x.clone().requires_grad_()
        out = layer(x)
        out.sum().backward()
        assert torch.isfinite(out).all(), name
        assert torch.isfinite(x.grad).all(), name
        for p in layer.parameters():
            assert p.grad is None or torch.isfinite(p.grad).all(), name
        assert torch.isfinite(layer.running_wm).all(), name
        assert torch.isfinite(layer.running_scale).all(), name


def test_clamping_does_not_change_defined_results():
    # tiny but non-zero spread: s is above eps, so the formula applies as is
    layer = make_layer(16, group_size=8)
    x = 1e-3 * bn_like_input(2, 16, 4, 4)
    ref, _, _ = ce_reference_module(copy.deepcopy(layer), x)
    assert rel_err(layer(x), ref) < TOL


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_low_precision_inputs(dtype):
    layer = make_layer(32, dtype=torch.float32)
    x = bn_like_input(2, 32, 8, 8, dtype=torch.float32)
    ref = copy.deepcopy(layer)(x)
    xl = x.to(dtype).requires_grad_()
    out = layer(xl)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    tol = 2e-2 if dtype == torch.float16 else 6e-2
    assert rel_err(out.float(), ref) < tol
    out.float().sum().backward()
    assert xl.grad.dtype == dtype and torch.isfinite(xl.grad).all()


def test_autocast_bfloat16_cpu():
    layer = make_layer(32, dtype=torch.float32)
    conv = torch.nn.Conv2d(32, 32, 1).float()
    x = bn_like_input(2, 32, 8, 8, dtype=torch.float32)
    ref = copy.deepcopy(layer)(conv(x))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = conv(x)
        assert y.dtype == torch.bfloat16
        out = layer(y)
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    assert rel_err(out.float(), ref) < 6e-2


def test_channels_last_and_non_contiguous():
    layer = make_layer(32)
    x = bn_like_input(2, 32, 6, 5)
    expected = copy.deepcopy(layer)(x)
    xcl = x.contiguous(memory_format=torch.channels_last)
    out = copy.deepcopy(layer)(xcl)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(out, expected) < TOL
    wide = bn_like_input(2, 32, 6, 10)
    strided = wide[:, :, :, ::2]
    assert not strided.is_contiguous()
    out = copy.deepcopy(layer)(strided)
    assert rel_err(out, copy.deepcopy(layer)(strided.contiguous())) < TOL


def test_state_dict_round_trip():
    layer = make_layer(32, dtype=torch.float32)
    x = bn_like_input(2, 32, 5, 5, dtype=torch.float32)
    layer.train()
    layer(x)  # move the running buffers
    layer.eval()
    expected = layer(x)
    state = layer.state_dict()
    assert set(state) == {
        'gate', 'fc1.weight', 'norm.weight', 'norm.bias', 'fc2.weight',
        'running_wm', 'running_scale'
    }
    assert state._metadata['']['version'] == ChannelEquilibrium._version
    fresh = ChannelEquilibrium(32).eval()
    assert not torch.allclose(fresh(x), expected)
    fresh.load_state_dict(state)
    assert torch.equal(fresh(x), expected)


def test_extra_repr_shows_settings():
    text = repr(ChannelEquilibrium(64, group_size=32, num_iters=4))
    for part in ('64', 'group_size=32', 'num_groups=2', 'num_iters=4',
                 'reduction=4', 'momentum=0.1', "impl='auto'"):
        assert part in text


def test_registry_and_plugin_builders():
    layer = MODELS.build(dict(type='ChannelEquilibrium', in_channels=32))
    assert isinstance(layer, ChannelEquilibrium) and layer.in_channels == 32
    name, layer = build_plugin_layer(
        dict(type='ChannelEquilibrium', group_size=8), in_channels=64)
    assert name == 'ce'
    assert isinstance(layer, ChannelEquilibrium)
    assert layer.num_groups == 8


def test_as_mmdet_resnet_plugin():
    model = ResNet(
        depth=50,
        base_channels=16,
        plugins=[
            dict(
                cfg=dict(type='ChannelEquilibrium'),
                position='after_conv3',
                stages=(True, True, True, False))
        ])
    for i, blocks in enumerate((3, 4, 6, 3), start=1):
        layer = getattr(model, f'layer{i}')
        for block in layer:
            has_ce = hasattr(block, 'ce')
            assert has_ce == (i < 4)
            if has_ce:
                assert block.after_conv3_plugin_names == ['ce']
                assert block.ce.in_channels == block.norm3.num_features
    # CE sits right after norm3: hook the order of calls
    calls = []
    block = model.layer1[0]
    block.norm3.register_forward_hook(lambda *a: calls.append('norm3'))
    block.ce.register_forward_hook(lambda *a: calls.append('ce'))
    model.train()
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    outs = model(x)
    assert calls == ['norm3', 'ce']
    sum(o.sum() for o in outs).backward()
    assert block.ce.fc1.weight.grad is not None
    assert torch.isfinite(x.grad).all()


def saved_storages(fn):
    """Distinct storages autograd saves while ``fn`` runs."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, storages


@pytest.fixture
def small_inplace_chunks(monkeypatch):
    """Let the in-place apply work on test-sized tensors, in several chunks
    that do not divide H*W."""
    from ce_mmdet.ops import torch_impl
    monkeypatch.setattr(torch_impl, 'INPLACE_CHUNK_BYTES', 7 * 64 * 8)


def make_bn(c, training, momentum=0.1, affine=True, track=True, seed=3):
    torch.manual_seed(seed)
    bn = torch.nn.BatchNorm2d(c, momentum=momentum, affine=affine,
                              track_running_stats=track).double()
    with torch.no_grad():
        if affine:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0, 0.2)
        if track:
            bn.running_mean.normal_(0, 0.3)
            bn.running_var.uniform_(0.5, 2)
    return bn.train(training)


BN_CASES = [
    # bn mode, CE mode, BN momentum, affine, track_running_stats
    (True, True, 0.1, True, True),
    (True, False, 0.1, True, True),
    (False, True, 0.1, True, True),
    (False, False, 0.1, True, True),  # inference / norm_eval training
    (True, True, None, True, True),  # cumulative average
    (True, True, 0.1, False, True),  # no affine
    (False, False, 0.1, True, False),  # no running stats: batch stats
]


@pytest.mark.parametrize('bn_training,ce_training,momentum,affine,track',
                         BN_CASES)
def test_bn_fused_matches_unfused_float64(bn_training, ce_training, momentum,
                                          affine, track):
    """ce(z, bn=bn) == CE(bn(z)) by the reference: output, gradients of the
    input and every parameter, the BN's running statistics and
    num_batches_tracked, CE's running buffers (two steps)."""
    layer = make_layer(32).train(ce_training)
    ref_layer = copy.deepcopy(layer)
    bn = make_bn(32, bn_training, momentum, affine, track)
    ref_bn = copy.deepcopy(bn)
    for step in range(2):
        z = (2 * bn_like_input(2, 32, 5, 7, seed=step) + 1).requires_grad_()
        z_ref = z.detach().clone().requires_grad_()
        out = layer(z, bn=bn)
        ref, ref_wm, ref_scale = ce_reference_module(ref_layer, ref_bn(z_ref))
        if ce_training:  # the reference returns the new buffers
            with torch.no_grad():
                ref_layer.running_wm.copy_(ref_wm)
                ref_layer.running_scale.copy_(ref_scale)
        assert rel_err(out, ref) < TOL
        for name, buf in bn.named_buffers():
            assert torch.allclose(buf, dict(ref_bn.named_buffers())[name],
                                  rtol=1e-12, atol=0), name
        for name, buf in layer.named_buffers():
            assert rel_err(buf, dict(ref_layer.named_buffers())[name]) < TOL
        g = torch.randn_like(out)
        wrt = [z] + list(bn.parameters()) + list(layer.parameters())
        ref_wrt = [z_ref] + list(ref_bn.parameters()) + list(
            ref_layer.parameters())
        names = ['input'] + [n for n, _ in bn.named_parameters()] + [
            n for n, _ in layer.named_parameters()
        ]
        for name, a, b in zip(names, torch.autograd.grad(out, wrt, g),
                              torch.autograd.grad(ref, ref_wrt, g)):
            assert rel_err(a, b) < TOL, name
    if bn_training and track:
        assert int(bn.num_batches_tracked) == 2


@pytest.mark.parametrize('bn_training,ce_training', [(True, True),
                                                     (False, False)])
def test_bn_fused_gradcheck_float64(bn_training, ce_training):
    layer = make_layer(8, group_size=4, num_iters=2).train(ce_training)
    layer.momentum = 0.0  # keep buffers fixed across gradcheck's calls
    bn = make_bn(8, bn_training, momentum=0.0)

    class Pair(torch.nn.Module):

        def __init__(self):
            super().__init__()
            self.bn, self.ce = bn, layer

        def forward(self, z):
            return self.ce(z, bn=self.bn)

    pair = Pair()
    names = [n for n, _ in pair.named_parameters()]

    def fn(z, *ps):
        return torch.func.functional_call(pair, dict(zip(names, ps)), (z, ))

    z = bn_like_input(2, 8, 3, 3).requires_grad_()
    inputs = (z, ) + tuple(p.detach().clone().requires_grad_()
                           for p in pair.parameters())
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


def test_bn_fused_saves_only_the_bn_input():
    """Backward keeps z (what a BN keeps anyway) and small tensors."""
    layer = make_layer(32)
    for bn_training, ce_training in ((True, True), (False, False),
                                     (False, True)):
        bn = make_bn(32, bn_training)
        layer.train(ce_training)
        z = bn_like_input(2, 32, 6, 5).contiguous().requires_grad_()
        _, saved = saved_storages(lambda: layer(z, bn=bn))
        big = [t for t in saved.values() if t.numel() >= z.numel()]
        assert len(big) == 1 and big[0].data_ptr() == z.data_ptr()
        _, saved_plain = saved_storages(lambda: layer(bn(z)))
        assert len([t for t in saved_plain.values()
                    if t.numel() >= z.numel()]) == 2


@pytest.mark.parametrize('bn_training', [True, False])
def test_bn_fused_inference_may_write_into_its_input(bn_training,
                                                     small_inplace_chunks):
    layer = make_layer(32).eval()
    bn = make_bn(32, bn_training)
    z = bn_like_input(2, 32, 6, 5).contiguous()
    expected, _, _ = ce_reference_module(copy.deepcopy(layer),
                                         copy.deepcopy(bn)(z))
    with torch.no_grad():
        zc = z.clone()
        out = layer(zc, bn=copy.deepcopy(bn), inplace=True)
        # with running statistics the BN pass is folded: written into z;
        # with batch statistics into the BN's own temporary
        assert (out.data_ptr() == zc.data_ptr()) == (not bn_training)
        assert rel_err(out, expected) < TOL
        zc = z.clone()
        out = layer(zc, bn=copy.deepcopy(bn))  # no permission
        assert out.data_ptr() != zc.data_ptr()
        assert torch.equal(zc, z)
    zc = z.clone().requires_grad_()  # autograd needs z: never overwritten
    out = layer(zc, bn=copy.deepcopy(bn), inplace=True)
    assert out.data_ptr() != zc.data_ptr() and torch.equal(zc.detach(), z)


def test_plain_inplace_is_a_permission(small_inplace_chunks):
    layer = make_layer(32).eval()
    x = bn_like_input(2, 32, 6, 5).contiguous()
    expected = layer(x)
    xc = x.clone()
    with torch.no_grad():
        out = layer(xc, inplace=True)
    assert out.data_ptr() == xc.data_ptr() and rel_err(out, expected) < TOL
    xg = x.clone().requires_grad_()
    out = layer(xg, inplace=True)  # backward reads x: not overwritten
    assert out.data_ptr() != xg.data_ptr()
    assert torch.equal(xg.detach(), x)
    grad, = torch.autograd.grad(out.sum(), xg)
    ref_x = x.clone().requires_grad_()
    ref_grad, = torch.autograd.grad(layer(ref_x).sum(), ref_x)
    assert rel_err(grad, ref_grad) < TOL


class _HookedForwardBN(torch.nn.BatchNorm2d):
    """A BN subclass with its own forward: CE must call it as a module."""

    def forward(self, x):
        return super().forward(x) * 2


def test_other_norms_are_called_as_modules():
    layer = make_layer(16, dtype=torch.float32)
    z = torch.randn(2, 16, 4, 4)
    for norm in (torch.nn.GroupNorm(4, 16), _HookedForwardBN(16),
                 torch.nn.Identity()):
        calls = []
        handle = norm.register_forward_hook(lambda *a: calls.append(1))
        out = layer(z, bn=norm)
        handle.remove()
        assert calls == [1]
        assert torch.equal(out, layer(norm(z)))


def test_hooks_on_a_fused_bn_do_not_run():
    layer = make_layer(16, dtype=torch.float32)
    bn = torch.nn.BatchNorm2d(16)
    calls = []
    bn.register_forward_hook(lambda *a: calls.append('hook'))
    bn.register_forward_pre_hook(lambda *a: calls.append('pre'))
    z = torch.randn(2, 16, 4, 4)
    out = layer(z, bn=bn)
    assert calls == []
    assert int(bn.num_batches_tracked) == 1  # the BN did run
    assert torch.allclose(out, layer(torch.nn.BatchNorm2d(16)(z)), atol=1e-5)


def _sync_bn_as(kind, state, training):
    """A SyncBN with ``state`` as mmdet builds one (``SyncBN``: mmengine's
    subclass of nn.SyncBatchNorm), reverted by mmengine's runner (one
    process) or kept (outside a process group it does not synchronise)."""
    from mmcv.cnn import build_norm_layer
    from mmengine.model import revert_sync_batchnorm
    sync = build_norm_layer(dict(type='SyncBN'), 16)[1].train(training)
    assert isinstance(sync, torch.nn.SyncBatchNorm)
    sync.load_state_dict(state)
    if kind == 'reverted':
        sync = revert_sync_batchnorm(sync)
        assert type(sync).__name__ == '_BatchNormXd'
    return sync


@pytest.mark.parametrize('kind', ['reverted', 'sync'])
@pytest.mark.parametrize('training', [True, False])
def test_sync_bn_in_one_process_is_fused_like_batchnorm2d(kind, training):
    """A SyncBN that does not synchronise (no process group here), and the
    ``_BatchNormXd`` mmengine's runner reverts it to in a run of one
    process: CE fuses it as it fuses nn.BatchNorm2d (its hooks do not run),
    with the same bits, running statistics included."""
    layer = make_layer(16, dtype=torch.float32).train(training)
    bn2d = make_bn(16, training).float()
    norm = _sync_bn_as(kind, bn2d.state_dict(), training)
    calls = []
    norm.register_forward_hook(lambda *a: calls.append(1))
    z = bn_like_input(2, 16, 5, 6, dtype=torch.float32)
    zx, z2 = z.clone().requires_grad_(), z.clone().requires_grad_()
    out = copy.deepcopy(layer)(zx, bn=norm)
    expected = copy.deepcopy(layer)(z2, bn=bn2d)
    assert calls == []  # fused, not called as a module
    assert torch.equal(out, expected)
    for key, value in bn2d.state_dict().items():
        assert torch.equal(norm.state_dict()[key], value), key
    out.square().sum().backward()
    expected.square().sum().backward()
    assert torch.equal(zx.grad, z2.grad)
    assert torch.equal(norm.weight.grad, bn2d.weight.grad)


def test_fused_bn_keeps_its_class_input_check():
    """A _BatchNorm without a forward of its own is fused, and its class's
    input check still runs: BatchNorm1d refuses a 4-D map, as it would."""
    layer = make_layer(16, dtype=torch.float32)
    with pytest.raises(ValueError, match='expected 2D or 3D input'):
        layer(torch.randn(2, 16, 4, 4), bn=torch.nn.BatchNorm1d(16))


def test_lazy_bn_is_called_until_it_has_parameters():
    """A LazyBatchNorm2d makes its parameters in a pre-hook on its first
    call (and becomes a BatchNorm2d): CE calls it, then fuses it."""
    layer = make_layer(16, dtype=torch.float32)
    bn = torch.nn.LazyBatchNorm2d()
    z = torch.randn(2, 16, 4, 4)
    first = layer(z, bn=bn)
    assert type(bn) is torch.nn.BatchNorm2d
    assert int(bn.num_batches_tracked) == 1
    reference = copy.deepcopy(layer)(torch.nn.BatchNorm2d(16)(z))
    assert torch.allclose(first, reference, atol=1e-5)
    calls = []
    bn.register_forward_hook(lambda *a: calls.append(1))
    layer(z, bn=bn)
    assert calls == [] and int(bn.num_batches_tracked) == 2


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
@pytest.mark.parametrize('training', [True, False])
def test_bn_fused_low_precision(dtype, training):
    layer = make_layer(32, dtype=torch.float32).train(training)
    bn = make_bn(32, training).float()
    z = bn_like_input(2, 32, 8, 8, dtype=torch.float32)
    ref = copy.deepcopy(layer)(copy.deepcopy(bn)(z))
    zl = z.to(dtype).requires_grad_()
    out = layer(zl, bn=bn)
    assert out.dtype == dtype and torch.isfinite(out).all()
    tol = 2e-2 if dtype == torch.float16 else 6e-2
    assert rel_err(out.float(), ref) < tol
    out.float().sum().backward()
    assert zl.grad.dtype == dtype and torch.isfinite(zl.grad).all()
    assert bn.weight.grad.dtype == torch.float32
    assert torch.isfinite(bn.weight.grad).all()


def test_bn_fused_channels_last():
    layer = make_layer(32)
    bn = make_bn(32, True)
    z = bn_like_input(2, 32, 6, 5)
    expected = copy.deepcopy(layer)(z, bn=copy.deepcopy(bn))
    out = layer(z.contiguous(memory_format=torch.channels_last), bn=bn)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(out, expected) < TOL


@pytest.mark.parametrize('bn_training,ce_training', [(False, False),
                                                     (True, True),
                                                     (False, True)])
@pytest.mark.parametrize('grad', [False, True])
@pytest.mark.parametrize('with_residual,relu', [(True, True), (True, False),
                                                (False, True)])
def test_residual_and_relu_are_the_block_tail_float64(
        bn_training, ce_training, grad, with_residual, relu,
        small_inplace_chunks):
    """``layer(z, bn=bn, residual=r, relu=True)`` is ``relu(CE(bn(z)) +
    r)`` by the reference: in the map's pass without autograd (written into
    z with the permission, in chunks), after the op with autograd, whose
    gradients (z, r, every parameter) are those of the reference."""
    layer = make_layer(32).train(ce_training)
    bn = make_bn(32, bn_training)
    z = bn_like_input(2, 32, 6, 5).contiguous()
    r = torch.randn_like(z) if with_residual else None
    ref_z = z.clone().requires_grad_(grad)
    ref_r = None if r is None else r.clone().requires_grad_(grad)
    ref_layer, ref_bn = copy.deepcopy(layer), copy.deepcopy(bn)
    with torch.set_grad_enabled(grad):
        expected = ce_reference_module(ref_layer, ref_bn(ref_z))[0]
        if r is not None:
            expected = expected + ref_r
        if relu:
            expected = torch.relu(expected)
        zc = z.clone().requires_grad_(grad)
        rc = None if r is None else r.clone().requires_grad_(grad)
        out = layer(zc, bn=bn, inplace=True, residual=rc, relu=relu)
    assert rel_err(out, expected) < TOL
    if relu:
        assert (out == 0).any() and (out > 0).any()  # (the ReLU mattered)
    # in place where allowed: a folded BN without autograd writes into z
    # (an eval BN before CE in training into the BN's own output)
    assert (out.data_ptr() == zc.data_ptr()) == (
        not grad and bn_training == ce_training)
    if r is not None:
        assert torch.equal(rc.detach(), r)  # the residual is only read
    if grad:
        g = torch.randn_like(out)
        wrt = [zc] + ([rc] if r is not None else []) + list(layer.parameters())
        ref_wrt = [ref_z] + ([ref_r] if r is not None else []) + list(
            ref_layer.parameters())
        for a, b in zip(torch.autograd.grad(out, wrt, g),
                        torch.autograd.grad(expected, ref_wrt, g)):
            assert rel_err(a, b) < TOL


@pytest.mark.parametrize('bn_training,ce_training', [(True, True),
                                                     (False, False)])
def test_block_tail_gradcheck_float64(bn_training, ce_training):
    """The tail's hand-written backward (the ReLU's mask, then CE's) by
    gradcheck, through z, the residual and every parameter."""
    layer = make_layer(8, group_size=4, num_iters=2).train(ce_training)
    layer.momentum = 0.0  # keep buffers fixed across gradcheck's calls
    bn = make_bn(8, bn_training, momentum=0.0)
    names = [n for n, _ in layer.named_parameters()]

    def fn(z, r, *ps):
        return torch.func.functional_call(
            layer, dict(zip(names, ps)), (z, ),
            dict(bn=bn, residual=r, relu=True))

    z = bn_like_input(2, 8, 3, 3).requires_grad_()
    r = torch.randn_like(z).requires_grad_()
    inputs = (z, r) + tuple(p.detach().clone().requires_grad_()
                            for p in layer.parameters())
    assert (fn(*inputs) == 0).any()  # (the mask is exercised)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


def test_block_tail_saves_what_the_relu_would():
    """With the tail, backward keeps z and the output (the tensor the ReLU
    after CE would keep), nothing else of the feature map's size."""
    layer = make_layer(32).train()
    bn = make_bn(32, True)
    z = bn_like_input(2, 32, 6, 5).contiguous().requires_grad_()
    r = torch.randn_like(z).requires_grad_()
    out, saved = saved_storages(
        lambda: layer(z, bn=bn, residual=r, relu=True))
    big = {t.data_ptr() for t in saved.values() if t.numel() >= z.numel()}
    assert big == {z.data_ptr(), out.data_ptr()}


def test_residual_of_another_dtype_or_layout_is_added_after_the_op():
    """A residual the op cannot read in its pass (another dtype, not
    NCHW-contiguous) is added as ``out += residual`` would add it."""
    layer = make_layer(32).eval()
    bn = make_bn(32, False)
    z = bn_like_input(2, 32, 6, 5).contiguous()
    with torch.no_grad():
        base = layer(z, bn=bn)
        for r in (torch.randn(2, 32, 6, 5, dtype=torch.float32),
                  torch.randn(2, 32, 5, 6, dtype=torch.float64).transpose(
                      2, 3)):
            out = layer(z.clone(), bn=bn, inplace=True, residual=r,
                        relu=True)
            expected = base.clone()
            expected += r
            assert torch.equal(out, expected.relu_())


def test_bad_residual_or_relu_raises():
    layer = make_layer(32).eval()
    z = bn_like_input(2, 32, 6, 5).contiguous()
    with pytest.raises(ValueError, match=r'residual must have the shape'):
        layer(z, residual=z[:, :, :5])
    with pytest.raises(TypeError, match='residual must be a Tensor'):
        layer(z, residual=1.0)
    with pytest.raises(TypeError, match='relu must be a bool'):
        layer(z, relu=1)


@pytest.mark.parametrize('training', [False, True])
def test_empty_input_gets_the_same_tail_and_checks(training):
    """No sample (an empty batch, as a detector's RoI branch can see): no
    statistics, the norm's output plus the tail, and the same checks."""
    layer = make_layer(32).train(training)
    bn = torch.nn.BatchNorm2d(32).to(torch.float64).train(training)
    z = torch.randn(0, 32, 6, 5, dtype=torch.float64)
    identity = torch.randn(0, 32, 6, 5, dtype=torch.float64)
    before = layer.running_wm.clone()
    out = layer(z, bn=bn, residual=identity, relu=True)
    assert out.shape == z.shape and out.dtype == z.dtype
    assert torch.equal(layer.running_wm, before)
    with pytest.raises(ValueError, match=r'residual must have the shape'):
        layer(z, bn=bn, residual=identity[:, :, :5])
    with pytest.raises(TypeError, match='relu must be a bool'):
        layer(z, relu='yes')


# (N, G) and chunk sizes in bytes: one block is 4 x 37 float64 = 1184 bytes;
# below that, runs of columns (1 column, 5 columns of every block); from
# there, runs of whole blocks (2 of 6, 3 of 7 with a last run of 1, all)
@pytest.mark.parametrize('ng,chunk', [((3, 2), 8), ((3, 2), 3 * 2 * 4 * 8 * 5),
                                      ((3, 2), 2 * 1184), ((1, 7), 3 * 1184),
                                      ((3, 2), 1 << 20)])
def test_apply_inplace_matches_one_gemm(ng, chunk):
    from ce_mmdet.ops.torch_impl import apply_inplace
    torch.manual_seed(0)
    a = torch.randn(*ng, 4, 4, dtype=torch.float64)
    x = torch.randn(*ng, 4, 37, dtype=torch.float64)
    expected = a @ x
    bias = torch.randn(*ng, 4, 1, dtype=torch.float64)
    residual = torch.randn_like(x)
    y = x.clone()
    apply_inplace(a, y, chunk)
    assert rel_err(y, expected) < 1e-14
    # the block tail: bias, residual and ReLU in the same chunks
    for b, r in ((bias, residual), (None, residual), (bias, None)):
        want = expected + (0 if b is None else b)
        want = want + (0 if r is None else r)
        y = x.clone()
        apply_inplace(a, y, chunk, b, r, relu=True)
        assert rel_err(y, want.relu()) < 1e-14
    y = x.clone()  # the bias alone, no ReLU: written back from the buffer
    apply_inplace(a, y, chunk, bias)
    assert rel_err(y, expected + bias) < 1e-14
    y = x.clone()  # the residual may be the input itself
    apply_inplace(a, y, chunk, bias, y)
    assert rel_err(y, expected + bias + x) < 1e-14


@pytest.mark.parametrize('with_bias,with_residual,relu',
                         [(b, r, u) for b in (False, True)
                          for r in (False, True) for u in (False, True)])
def test_apply_map_new_tensor_matches_reference(with_bias, with_residual,
                                                relu):
    """The out-of-place map (a new tensor: inplace=False, or a tensor
    smaller than one chunk): the GEMM onto the bias and/or the residual,
    then the ReLU, against the float64 products."""
    from ce_mmdet.ops.torch_impl import apply_map
    torch.manual_seed(0)
    n, g, d, h, w = 2, 3, 4, 5, 7
    a = torch.randn(n, g, d, d, dtype=torch.float64)
    x = torch.randn(n, g * d, h, w, dtype=torch.float64)
    bias = torch.randn(n, g, d, 1, dtype=torch.float64) if with_bias \
        else None
    residual = torch.randn_like(x) if with_residual else None
    want = a @ x.view(n, g, d, h * w)
    if bias is not None:
        want = want + bias
    want = want.reshape(x.shape)
    if residual is not None:
        want = want + residual
    if relu:
        want = want.relu()
    before = x.clone()
    out = apply_map(a, x, d, False, bias, residual, relu)
    assert out.data_ptr() != x.data_ptr() and torch.equal(x, before)
    assert rel_err(out, want) < 1e-14
