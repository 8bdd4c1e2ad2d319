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
                 'reduction=4', 'momentum=0.1'):
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
    from ce_mmdet.models.layers import ce_function
    monkeypatch.setattr(ce_function, 'INPLACE_CHUNK_BYTES', 7 * 64 * 8)


@pytest.mark.parametrize('inplace', [True, False])
@pytest.mark.parametrize('bn_training', [True, False])
def test_following_a_batchnorm_saves_its_input_not_ours(
        bn_training, inplace, small_inplace_chunks):
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(32).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_(0, 0.2)
        bn.running_var.uniform_(0.5, 2)
    plain = make_layer(32)
    fused = copy.deepcopy(plain)
    bn_fused = copy.deepcopy(bn)
    assert fused.follow(bn_fused, inplace=inplace)
    bn.train(bn_training)
    bn_fused.train(bn_training)
    z = bn_like_input(2, 32, 6, 5).requires_grad_()
    z2 = z.detach().clone().requires_grad_()
    out1, saved1 = saved_storages(lambda: plain(bn(z)))
    bn_out = []
    handle = bn_fused.register_forward_hook(
        lambda m, i, o: bn_out.append(o.data_ptr()))
    out2, saved2 = saved_storages(lambda: fused(bn_fused(z2)))
    handle.remove()
    # another hook on the BN might keep its output: never in place then
    assert out2.data_ptr() != bn_out[0]
    bn_out = []

    def run():
        bn_out.append(bn_fused(z2))
        return fused(bn_out[-1])

    out3, saved3 = saved_storages(run)
    # written into the BN output
    assert (out3.data_ptr() == bn_out[-1].data_ptr()) == inplace
    assert torch.equal(out1, out2)
    assert rel_err(out3, out1) < 1e-14  # chunked GEMM: equal up to rounding
    # the fused path keeps nothing of CE's input size beyond the BN input
    for saved in (saved1, saved2, saved3):
        big = {k for k, t in saved.items() if t.numel() >= z.numel()}
        assert len(big) == (2 if saved is saved1 else 1)
    assert z2.untyped_storage().data_ptr() in saved3
    g = torch.randn_like(out1)
    grads1 = torch.autograd.grad(out1, [z, bn.weight, bn.bias] +
                                 list(plain.parameters()), g)
    grads3 = torch.autograd.grad(out3, [z2, bn_fused.weight, bn_fused.bias] +
                                 list(fused.parameters()), g)
    for a, b in zip(grads1, grads3):
        assert rel_err(b, a) < 1e-12


@pytest.mark.parametrize('training', [True, False])
def test_inplace_after_batchnorm_reuses_its_output(training,
                                                   small_inplace_chunks):
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(32).double().train(training)
    layer = make_layer(32).train(training)
    reference = copy.deepcopy(layer)
    assert layer.follow(bn)
    z = bn_like_input(2, 32, 6, 5)
    with torch.no_grad():
        expected = reference(bn(z))
        x = bn(z)  # the fresh BN output CE may overwrite
        out = layer(x)
    assert out.data_ptr() == x.data_ptr()
    assert rel_err(out, expected) < 1e-14
    # opted out: a new tensor
    layer2 = copy.deepcopy(reference)
    bn2 = copy.deepcopy(bn)
    assert layer2.follow(bn2, inplace=False)
    with torch.no_grad():
        x = bn2(z)
        out = layer2(x)
    assert out.data_ptr() != x.data_ptr()


def test_apply_inplace_matches_one_gemm():
    from ce_mmdet.models.layers.ce_function import apply_inplace
    torch.manual_seed(0)
    a = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    x = torch.randn(3, 2, 4, 37, dtype=torch.float64)
    expected = a @ x
    for chunk in (8, 3 * 2 * 4 * 8 * 5, 1 << 20):  # 1 column, 5, all
        y = x.clone()
        apply_inplace(a, y, chunk)
        assert rel_err(y, expected) < 1e-14


def test_inplace_without_source_refuses_autograd():
    from ce_mmdet.models.layers.ce_function import channel_equilibrium
    layer = make_layer(16)
    x = torch.randn(2, 16, 3, 3, dtype=torch.float64, requires_grad=True)
    params = (layer.gate, layer.fc1.weight, layer.norm.weight,
              layer.norm.bias, layer.fc2.weight)
    with pytest.raises(ValueError, match='needs a source'):
        channel_equilibrium(x, params, layer.running_wm, layer.running_scale,
                            16, 3, 1e-5, 0.1, True, inplace=True)


def test_follow_ignores_other_norms_and_modified_inputs():
    layer = make_layer(16, dtype=torch.float32)
    assert not layer.follow(torch.nn.GroupNorm(4, 16))
    assert not layer.follow(torch.nn.SyncBatchNorm(16))
    bn = torch.nn.BatchNorm2d(16)
    assert layer.follow(bn)
    z = torch.randn(2, 16, 4, 4, requires_grad=True)
    y = bn(z)
    y2 = y * 2  # not the BN output: CE must save its own input
    _, saved = saved_storages(lambda: layer(y2))
    assert y2.untyped_storage().data_ptr() in saved
    y = bn(z)
    y.mul_(2)  # modified in place: likewise
    _, saved = saved_storages(lambda: layer(y))
    assert y.untyped_storage().data_ptr() in saved


@pytest.mark.parametrize('training', [True, False])
def test_batchnorm_affine_reproduces_its_output(training):
    from ce_mmdet.models.layers.batchnorm_handoff import batchnorm_affine
    bn = torch.nn.BatchNorm2d(8).double().train(training)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
    z = torch.randn(2, 8, 5, 5, dtype=torch.float64, requires_grad=True) + 3
    out = bn(z)
    alpha, beta = batchnorm_affine(bn, out)
    assert not alpha.requires_grad and not beta.requires_grad
    rebuilt = z.detach() * alpha.view(1, 8, 1, 1) + beta.view(1, 8, 1, 1)
    assert rel_err(rebuilt, out.detach()) < 1e-14
    if training:  # batch statistics come from the BN's backward node only
        with torch.no_grad():
            assert batchnorm_affine(bn, bn(z)) is None


class _ConvBNCE(torch.nn.Module):
    """conv -> BN -> CE, the scope of the BN's absorption."""

    def __init__(self, c):
        super().__init__()
        self.conv = torch.nn.Conv2d(c, c, 1).double()
        self.bn = torch.nn.BatchNorm2d(c).double()
        self.ce = make_layer(c)
        with torch.no_grad():
            self.bn.weight.uniform_(0.5, 1.5)
            self.bn.bias.normal_(0, 0.2)
            self.bn.running_mean.normal_(0, 0.3)
            self.bn.running_var.uniform_(0.5, 2)

    def forward(self, x):
        return self.ce(self.bn(self.conv(x)))


@pytest.mark.parametrize('inplace', [True, False])
def test_inference_absorbs_the_batchnorm(inplace, small_inplace_chunks):
    from ce_mmdet.models.layers import BatchNorm2dBeforeCE
    torch.manual_seed(0)
    block = _ConvBNCE(32).eval()
    plain = copy.deepcopy(block)  # never follows: the unfused reference
    assert block.ce.follow(block.bn, inplace=inplace, scope=block)
    assert type(block.bn) is BatchNorm2dBeforeCE
    assert set(block.bn.state_dict()) == set(plain.bn.state_dict())
    x = bn_like_input(2, 32, 6, 5)
    absorbed = []
    block.ce._forward_absorbed = (
        lambda bn, z, f=block.ce._forward_absorbed: absorbed.append(z) or
        f(bn, z))
    with torch.no_grad():
        expected = plain(x)
        out = block(x)
    assert len(absorbed) == 1
    assert rel_err(out, expected) < 1e-13
    # with inplace the result is written into the conv output
    assert (out.data_ptr() == absorbed[0].data_ptr()) == inplace
    # outside the scope, the BN is a BN
    with torch.no_grad():
        z = block.conv(x)
        assert torch.equal(block.bn(z), plain.bn(z))
    # with autograd, in training, or with another hook: no absorption
    out = block(x)
    assert rel_err(out.detach(), expected) < 1e-13 and out.requires_grad
    block.train()
    plain.train()
    with torch.no_grad():
        assert rel_err(block(x), plain(x)) < 1e-12
    block.eval()
    plain.eval()  # running statistics moved: a new reference
    with torch.no_grad():
        expected = plain(x)
    handle = block.bn.register_forward_hook(lambda *a: None)
    with torch.no_grad():
        assert rel_err(block(x), expected) < 1e-13
    handle.remove()
    assert len(absorbed) == 1
    # a deep copy absorbs into its own CE layer
    clone = copy.deepcopy(block)
    assert clone.bn.__dict__['_ce_after'] is clone.ce
    with torch.no_grad():
        assert rel_err(clone(x), expected) < 1e-13
