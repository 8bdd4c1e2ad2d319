import pytest
import torch
from mmdet.models.necks import FPN

from ce_mmdet.models import CEFPN, ChannelEquilibrium, ConvNormCE

IN_CHANNELS = [16, 32, 64, 128]


def feats(n=2, size=32):
    torch.manual_seed(0)
    return [
        torch.rand(n, c, size // 2**i, size // 2**i)
        for i, c in enumerate(IN_CHANNELS)
    ]


@pytest.mark.parametrize('extra', [False, 'on_input', 'on_output'])
@pytest.mark.parametrize('start_level', [0, 1])
def test_shapes_match_fpn(extra, start_level):
    kwargs = dict(
        in_channels=IN_CHANNELS,
        out_channels=32,
        num_outs=5,
        start_level=start_level,
        add_extra_convs=extra)
    neck = CEFPN(**kwargs).train()
    ref = FPN(**kwargs, norm_cfg=dict(type='BN'))
    outs = neck(feats())
    ref_outs = ref(feats())
    assert [o.shape for o in outs] == [o.shape for o in ref_outs]
    n_ce = sum(isinstance(m, ChannelEquilibrium) for m in neck.modules())
    assert n_ce == len(neck.lateral_convs) + len(neck.fpn_convs)
    if extra:  # RetinaNet's extra levels are outputs: they get CE too
        assert len(neck.fpn_convs) > len(neck.lateral_convs)
        assert all(isinstance(c, ConvNormCE) for c in neck.fpn_convs)


def test_without_ce_equals_fpn_with_norm():
    kwargs = dict(
        in_channels=IN_CHANNELS,
        out_channels=32,
        num_outs=5,
        add_extra_convs='on_input')
    neck = CEFPN(ce_on=(), **kwargs)
    ref = FPN(norm_cfg=dict(type='BN', requires_grad=True), **kwargs)
    assert set(neck.state_dict()) == set(ref.state_dict())
    neck.load_state_dict(ref.state_dict())
    for mode in (True, False):
        neck.train(mode)
        ref.train(mode)
        for a, b in zip(neck(feats()), ref(feats())):
            assert torch.equal(a, b)


def test_ce_after_norm_before_activation_and_keys_kept():
    neck = CEFPN(
        IN_CHANNELS,
        32,
        num_outs=4,
        ce_on=('output', ),
        act_cfg=dict(type='ReLU'))
    conv = neck.fpn_convs[0]
    assert isinstance(conv, ConvNormCE)
    assert not isinstance(neck.lateral_convs[0], ConvNormCE)
    order = []
    conv.conv.register_forward_hook(lambda *a: order.append('conv'))
    conv.norm.register_forward_hook(lambda *a: order.append('norm'))
    conv.ce.register_forward_pre_hook(
        lambda m, args, kwargs: order.append(('ce', kwargs['bn'])),
        with_kwargs=True)
    conv.activate.register_forward_hook(lambda *a: order.append('act'))
    neck(feats())
    # the norm runs inside CE's fused op (its own hooks do not fire)
    assert order == ['conv', ('ce', conv.norm), 'act']
    keys = set(neck.state_dict())
    assert 'fpn_convs.0.conv.weight' in keys
    assert 'fpn_convs.0.bn.weight' in keys
    assert 'fpn_convs.0.ce.running_wm' in keys
    assert 'lateral_convs.0.ce.gate' not in keys


def test_signature_keeps_fpn_positional_order():
    """mmdet's test_necks.py style: ``CEFPN([64, 128], 64, 2, 0)``."""
    import inspect
    ours = inspect.signature(CEFPN).parameters
    theirs = inspect.signature(FPN).parameters
    assert list(ours)[:len(theirs)] == list(theirs)
    assert ours['ce_cfg'].kind is inspect.Parameter.KEYWORD_ONLY
    neck = CEFPN([64, 128], 64, 2, 0)
    ref = FPN([64, 128], 64, 2, 0, norm_cfg=dict(type='BN'))
    x = [torch.rand(1, 64, 8, 8), torch.rand(1, 128, 4, 4)]
    assert [o.shape for o in neck(x)] == [o.shape for o in ref(x)]
    assert neck.start_level == ref.start_level == 0


def test_conv_norm_ce_copies_a_conv_module():
    from mmcv.cnn import ConvModule
    torch.manual_seed(0)
    module = ConvModule(16, 32, 3, padding=1, norm_cfg=dict(type='BN'),
                        act_cfg=dict(type='ReLU'))
    new = ConvNormCE.from_conv_module(module, dict(group_size=16))
    assert new is not module and type(module) is ConvModule
    for k, v in module.state_dict().items():
        assert torch.equal(new.state_dict()[k], v), k
    with pytest.raises(ValueError, match='needs a norm_cfg'):
        ConvNormCE(16, 32, 3, ce_cfg=dict(group_size=16))
    with pytest.raises(ValueError, match=r'has none \(set norm_cfg\)'):
        ConvNormCE.from_conv_module(ConvModule(16, 32, 3),
                                    dict(group_size=16))
    reflect = ConvModule(16, 32, 3, padding=1, padding_mode='reflect',
                         norm_cfg=dict(type='BN'))
    with pytest.raises(ValueError, match='explicit padding'):
        ConvNormCE.from_conv_module(reflect, dict(group_size=16))
    with pytest.raises(ValueError, match='order'):
        ConvNormCE(16, 32, 3, norm_cfg=dict(type='BN'),
                   order=('norm', 'conv', 'act'), ce_cfg=dict(group_size=16))


def test_ce_on_both_changes_the_output():
    kwargs = dict(in_channels=IN_CHANNELS, out_channels=32, num_outs=4)
    neck = CEFPN(**kwargs).eval()
    ref = FPN(norm_cfg=dict(type='BN', requires_grad=True), **kwargs).eval()
    ref.load_state_dict(neck.state_dict(), strict=False)
    with torch.no_grad():
        for m in neck.modules():
            if isinstance(m, ChannelEquilibrium):
                m.gate.fill_(2.0)
                m.running_wm.mul_(0.5)
    outs = neck(feats())
    assert not torch.allclose(outs[0], ref(feats())[0])


@pytest.mark.parametrize('kwargs,match', [
    (dict(ce_on=('middle', )), 'ce_on entries'),
    (dict(norm_cfg=None), 'norm_cfg must be set'),
    (dict(no_norm_on_lateral=True), 'no_norm_on_lateral'),
    (dict(ce_cfg=dict(group_size=24)),
     r'out_channels \(32\) must be a multiple of the CE group_size \(24\)'),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CEFPN(IN_CHANNELS, 32, num_outs=4, **kwargs)


def test_ce_on_one_position_as_a_string():
    from mmcv.cnn import ConvModule
    neck = CEFPN(IN_CHANNELS, 32, num_outs=4, ce_on='output')
    assert neck.ce_on == ('output', )
    assert all(type(m) is ConvModule for m in neck.lateral_convs)
    assert all(isinstance(m, ConvNormCE) for m in neck.fpn_convs)


def test_ce_cfg_of_another_type_raises_type_error():
    with pytest.raises(TypeError, match="ce_cfg must be a dict, got <class "
                       "'list'>"):
        CEFPN(IN_CHANNELS, 32, num_outs=4, ce_cfg=[('group_size', 16)])


def test_gradients_flow_to_ce():
    neck = CEFPN(IN_CHANNELS, 32, num_outs=4).train()
    sum(o.sum() for o in neck(feats())).backward()
    ce = neck.lateral_convs[0].ce
    assert ce.gate.grad is not None and torch.isfinite(ce.gate.grad).all()
