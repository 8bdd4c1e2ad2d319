import copy
import logging

import pytest
import torch
import torch.nn as nn
from mmdet.models import ResNet
from mmengine.logging import MMLogger
from torch.nn.modules.batchnorm import _BatchNorm

from ce_mmdet.models import CEResNet, ChannelEquilibrium
from ce_mmdet.testing import ce_resnet_reference_forward


def all_ce(model):
    return [m for m in model.modules() if isinstance(m, ChannelEquilibrium)]


def randomise(model, seed=0):
    """Non-trivial BN/CE values so that equivalence tests can fail."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
            if isinstance(m, ChannelEquilibrium):
                m.gate.normal_(0, 0.5)
                m.running_wm.add_(0.02 * torch.randn_like(m.running_wm))
                m.running_scale.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize('kwargs,match', [
    (dict(depth=20), 'depth must be one of'),
    (dict(depth=50, num_stages=5), 'num_stages'),
    (dict(depth=50, num_stages=3), 'strides'),
    (dict(depth=50, out_indices=(4, )), 'out_indices'),
    (dict(depth=50, style='tensorflow'), 'style'),
    (dict(depth=50, frozen_stages=7), 'frozen_stages'),
    (dict(depth=50, frozen_stages=1.5), 'frozen_stages'),
    (dict(depth=50, ce_stages=(True, True)), 'ce_stages'),
    (dict(depth=50, ce_stages=(1, 1, 1, 0)), 'ce_stages'),
    (dict(depth=50, ce_cfg=dict(group_size=48)), 'multiple of group_size'),
    (dict(depth=18, base_channels=8),
     r'stage 1 has 8 channels, not a multiple of group_size=16 .* divisor '
     r'of 8,'),
    (dict(depth=50, base_channels=24, ce_cfg=dict(group_size=64)),
     'stage 1 has 96 channels.* divisor of 96,'),
    (dict(depth=50, ce_cfg=dict(in_channels=64)), 'in_channels'),
])
def test_invalid_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CEResNet(**kwargs)


def test_invalid_argument_types():
    with pytest.raises(TypeError, match='stem_ce'):
        CEResNet(depth=18, stem_ce='yes')
    with pytest.raises(TypeError, match='ce_cfg'):
        CEResNet(depth=18, ce_cfg=[('group_size', 16)])


@pytest.mark.parametrize('depth,expansion', [(18, 1), (34, 1), (50, 4),
                                             (101, 4), (152, 4)])
def test_output_shapes_and_ce_placement(depth, expansion):
    model = CEResNet(depth=depth, base_channels=16)
    model.init_weights()
    model.train()
    outs = model(torch.rand(2, 3, 64, 64))
    widths = [16 * 2**i * expansion for i in range(4)]
    assert [tuple(o.shape) for o in outs] == [
        (2, w, 64 // 2**(i + 2), 64 // 2**(i + 2))
        for i, w in enumerate(widths)
    ]
    blocks = dict(ResNet.arch_settings)[depth][1]
    # stem + every block of stages 1-3, none in stage 4
    assert len(all_ce(model)) == 1 + sum(blocks[:3])
    assert model.ce1.num_groups == 1 and model.ce1.group_size == 16
    for i in range(4):
        for block in getattr(model, f'layer{i + 1}'):
            assert hasattr(block, 'ce') == (i < 3)
            if i < 3:
                assert block.ce.group_size == 16


def record_calls(model, names):
    """Forward pre-hooks that log ``(name, bn given to it)``."""
    calls = []
    for name in names:
        module = model.get_submodule(name)
        module.register_forward_pre_hook(
            lambda m, args, kwargs, n=name: calls.append(
                (n, kwargs.get('bn'))),
            with_kwargs=True)
    return calls


def test_bottleneck_order_ce_after_norm3_before_add():
    """conv3, downsample -> CE(bn=norm3, residual=downsample's output,
    relu=True); the stem CE gets norm1 and the ReLU. The fused norms are
    not called as modules (their hooks do not run)."""
    model = CEResNet(depth=50, base_channels=16).train()
    block = model.layer2[0]
    calls = record_calls(model, [
        'conv1', 'norm1', 'ce1', 'layer2.0.conv3', 'layer2.0.norm3',
        'layer2.0.ce', 'layer2.0.downsample'
    ])
    tails = {}
    for name in ('ce1', 'layer2.0.ce'):
        model.get_submodule(name).register_forward_pre_hook(
            lambda m, args, kwargs, n=name: tails.update(
                {n: (kwargs.get('residual'), kwargs.get('relu'))}),
            with_kwargs=True)
    identity = []
    block.downsample.register_forward_hook(
        lambda m, args, out: identity.append(out))
    model(torch.rand(1, 3, 64, 64))
    assert calls == [('conv1', None), ('ce1', model.norm1),
                     ('layer2.0.conv3', None), ('layer2.0.downsample', None),
                     ('layer2.0.ce', block.norm3)]
    assert tails['ce1'] == (None, True)
    assert tails['layer2.0.ce'][0] is identity[0]
    assert tails['layer2.0.ce'][1] is True


def test_basic_block_order_ce_after_norm2():
    model = CEResNet(depth=18, base_channels=16).train()
    block = model.layer1[1]
    calls = record_calls(model,
                         ['layer1.1.conv2', 'layer1.1.norm2', 'layer1.1.ce'])
    model(torch.rand(1, 3, 64, 64))
    assert calls == [('layer1.1.conv2', None), ('layer1.1.ce', block.norm2)]


def test_signature_keeps_resnet_positional_order():
    """mmdet's own test_resnet.py style: positional arguments mean what
    they mean for ResNet, CE arguments are keyword-only after them."""
    import inspect
    ours = inspect.signature(CEResNet).parameters
    theirs = inspect.signature(ResNet).parameters
    assert list(ours)[:len(theirs)] == list(theirs)
    assert all(ours[k].kind is inspect.Parameter.KEYWORD_ONLY
               for k in ('ce_cfg', 'ce_stages', 'stem_ce'))
    for k in theirs:
        assert ours[k].default == theirs[k].default, k
    model = CEResNet(50, 3, 32, 16)  # depth, in_ch, stem_ch, base_ch
    ref = ResNet(50, 3, 32, 16)
    assert model.stem_channels == ref.stem_channels == 32
    assert model.base_channels == ref.base_channels == 16
    x = torch.rand(1, 3, 64, 64)
    assert [o.shape for o in model(x)] == [o.shape for o in ref(x)]
    with pytest.raises(TypeError):
        CEResNet(50, 3, 32, 16, 4, (1, 2, 2, 2), (1, 1, 1, 1), (0, 1, 2, 3),
                 'pytorch', False, False, -1, None, dict(type='BN'), True,
                 None, (False, ) * 4, None, False, True, None, None, {})


@pytest.mark.parametrize('frozen_stages', [-2, -5])
def test_frozen_stages_below_minus_one_freeze_nothing(frozen_stages):
    model = CEResNet(depth=50, base_channels=16,
                     frozen_stages=frozen_stages, norm_eval=False).train()
    assert all(p.requires_grad for p in model.parameters())
    assert all(m.training for m in model.modules())


DCN = dict(dcn=dict(type='DCNv2', deform_groups=1, fallback_on_stride=False),
           stage_with_dcn=(False, True, True, True))


@pytest.mark.parametrize('depth,deep_stem,extra',
                         [(18, False, {}), (50, False, {}), (50, True, {}),
                          (50, False, DCN)])
def test_without_ce_equals_resnet(depth, deep_stem, extra):
    kwargs = dict(depth=depth, base_channels=16, norm_eval=False,
                  deep_stem=deep_stem, **extra)
    ce = CEResNet(ce_stages=(False, ) * 4, stem_ce=False, **kwargs)
    bn = ResNet(**kwargs)
    assert not all_ce(ce)
    randomise(bn)
    ce.load_state_dict(bn.state_dict(), strict=True)
    x = torch.rand(2, 3, 64, 64)
    for mode in (True, False):
        ce.train(mode)
        bn.train(mode)
        for a, b in zip(ce(x), bn(x)):
            assert torch.equal(a, b)


def test_dcn_stages_keep_ce_after_the_deformable_conv():
    """mmdet's DCN settings (``dcn``, ``stage_with_dcn``, as in its
    ``*_dconv_c3-c5`` configs): conv2 of stages 2-4 is the deformable conv,
    CE still ends each block, and gradients reach the offsets and CE."""
    from mmcv.ops import ModulatedDeformConv2dPack
    model = CEResNet(depth=50, base_channels=16, norm_eval=False,
                     **DCN).train()
    assert not isinstance(model.layer1[0].conv2, ModulatedDeformConv2dPack)
    block = model.layer2[0]
    assert isinstance(block.conv2, ModulatedDeformConv2dPack)
    assert isinstance(block.ce, ChannelEquilibrium)
    sum(o.sum() for o in model(torch.rand(2, 3, 64, 64))).backward()
    assert block.conv2.conv_offset.weight.grad.abs().sum() > 0
    assert block.ce.gate.grad.abs().sum() > 0


@pytest.mark.parametrize('frozen_stages', [-1, 0, 1, 2])
def test_frozen_stages_freeze_ce(frozen_stages):
    model = CEResNet(depth=50, base_channels=16, frozen_stages=frozen_stages,
                     norm_eval=False)
    model.init_weights()
    model.train()
    frozen = []
    if frozen_stages >= 0:
        frozen.append(model.ce1)
    for i in range(1, frozen_stages + 1):
        frozen += all_ce(getattr(model, f'layer{i}'))
    frozen_ids = {id(m) for m in frozen}
    for m in all_ce(model):
        is_frozen = id(m) in frozen_ids
        assert m.training == (not is_frozen)
        assert all(p.requires_grad == (not is_frozen)
                   for p in m.parameters())
    # frozen CE keep their running buffers through a training step
    if frozen:
        before = frozen[-1].running_wm.clone()
        model(torch.rand(2, 3, 64, 64))
        assert torch.equal(frozen[-1].running_wm, before)


def test_norm_eval_puts_ce_and_bn_in_eval():
    model = CEResNet(depth=50, base_channels=16, norm_eval=True)
    model.train()
    assert model.training
    for m in model.modules():
        if isinstance(m, (_BatchNorm, ChannelEquilibrium)):
            assert not m.training
    ce = model.layer3[0].ce
    before = ce.running_wm.clone()
    model(torch.rand(2, 3, 64, 64))
    assert torch.equal(ce.running_wm, before)
    model = CEResNet(depth=50, base_channels=16, norm_eval=False).train()
    assert all(m.training for m in all_ce(model))


def test_deep_stem_keeps_bn_indices():
    model = CEResNet(depth=50, base_channels=16, deep_stem=True,
                     avg_down=True)
    assert isinstance(model.stem[8], ChannelEquilibrium)
    assert isinstance(model.stem[7], _BatchNorm)
    ref = ResNet(depth=50, base_channels=16, deep_stem=True, avg_down=True)
    ce_keys = {k for k in model.state_dict() if k.startswith('stem.8.')}
    assert set(model.state_dict()) - ce_keys >= {
        k
        for k in ref.state_dict() if k.startswith('stem.')
    }
    outs = model(torch.rand(1, 3, 64, 64))
    assert outs[0].shape == (1, 64, 16, 16)


@pytest.mark.parametrize('depth', [18, 50])
def test_with_cp_same_outputs_and_gradients(depth):
    torch.manual_seed(0)
    model = CEResNet(depth=depth, base_channels=16, norm_eval=False)
    model.init_weights()
    cp_model = copy.deepcopy(model)
    for m in cp_model.modules():
        if hasattr(m, 'with_cp'):
            m.with_cp = True
    model.train()
    cp_model.train()
    x = torch.rand(2, 3, 64, 64)
    x1 = x.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    out1 = model(x1)
    out2 = cp_model(x2)
    for a, b in zip(out1, out2):
        torch.testing.assert_close(a, b)
    sum(o.sum() for o in out1).backward()
    sum(o.sum() for o in out2).backward()
    torch.testing.assert_close(x1.grad, x2.grad)
    for (name, p1), p2 in zip(model.named_parameters(),
                              cp_model.parameters()):
        if p1.grad is not None:
            torch.testing.assert_close(p1.grad, p2.grad, msg=name)


def test_zero_init_residual():
    for depth, norm in ((18, 'norm2'), (50, 'norm3')):
        model = CEResNet(depth=depth, base_channels=16)
        model.init_weights()
        for layer in (model.layer1, model.layer4):
            for block in layer:
                assert torch.all(getattr(block, norm).weight == 0)


def test_user_plugins_still_work():
    plugins = [
        dict(
            cfg=dict(type='ContextBlock', ratio=1. / 4),
            position='after_conv3',
            stages=(False, True, True, True))
    ]
    model = CEResNet(depth=50, base_channels=16, plugins=plugins)
    block = model.layer2[0]
    assert block.after_conv3_plugin_names == ['context_block']
    assert isinstance(block.ce, ChannelEquilibrium)
    assert not hasattr(model.layer1[0], 'context_block')
    calls = record_calls(model, ['layer2.0.ce', 'layer2.0.context_block'])
    outs = model(torch.rand(1, 3, 64, 64))
    assert [c[0] for c in calls] == ['layer2.0.ce', 'layer2.0.context_block']
    assert outs[3].shape == (1, 512, 2, 2)


@pytest.mark.parametrize('with_ce', [True, False])
def test_basic_block_plugins_run_after_ce_before_the_addition(with_ce):
    """CE-ResNet-18 takes plugins after conv2 (mmdet's BasicBlock takes
    none): conv2 -> norm2 -> CE -> plugin -> + identity -> ReLU, in blocks
    with and without CE (float32, so that it also runs with
    CE_MMDET_IMPL=triton)."""
    plugins = [
        dict(cfg=dict(type='ContextBlock', ratio=1. / 4),
             position='after_conv2', stages=(False, True, False, False))
    ]
    model = randomise(
        CEResNet(depth=18, base_channels=16, plugins=plugins,
                 ce_stages=(True, with_ce, True, False))).eval()
    block = model.layer2[0]
    assert block.after_conv2_plugin_names == ['context_block']
    assert block.with_ce == with_ce
    assert not model.layer1[0].with_plugins
    assert not hasattr(model.layer3[0], 'context_block')
    with torch.no_grad():
        block.context_block.channel_add_conv[-1].weight.normal_(0, 0.1)
    x = torch.randn(2, 16, 16, 16)
    with torch.no_grad():
        out = block.conv2(block.relu(block.norm1(block.conv1(x))))
        out = block.ce(out, bn=block.norm2) if with_ce else block.norm2(out)
        expected = block.relu(
            block.context_block(out) + block.downsample(x))
        got = block(x)
    # the plugin changes the result: its position is what is checked
    assert rel(block.relu(out + block.downsample(x)), expected) > 1e-3
    assert rel(got, expected) < 1e-5


def test_basic_block_refuses_plugins_elsewhere():
    plugins = [
        dict(cfg=dict(type='ContextBlock', ratio=1. / 4),
             position='after_conv3', stages=(True, True, True, True))
    ]
    with pytest.raises(ValueError, match='"after_conv2" only.*after_conv3'):
        CEResNet(depth=18, base_channels=16, plugins=plugins)


@pytest.mark.parametrize('kwargs', [
    dict(depth=50, deep_stem=True),
    dict(depth=18, deep_stem=True),
    dict(depth=50, plugins=[
        dict(cfg=dict(type='ContextBlock', ratio=1. / 4),
             position='after_conv3', stages=(False, True, False, False))
    ]),
])
def test_fused_block_tails_equal_the_blocks_own_order(kwargs, monkeypatch):
    """The deep stem's ReLU and each block's residual addition and ReLU in
    CE's pass (inference without autograd) give what the same model gives
    with autograd recording (CE, then ``out += identity`` and the ReLU, as
    in mmdet); with plugins after conv3 the plugins run between CE and the
    residual addition, as in mmdet."""
    from ce_mmdet.ops import torch_impl
    monkeypatch.setattr(torch_impl, 'INPLACE_CHUNK_BYTES', 4096)
    model = randomise(CEResNet(base_channels=16, **kwargs).double()).eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        fused = model(x)
    unfused = model(x.clone().requires_grad_())
    for a, b in zip(fused, unfused):
        assert rel(a, b.detach()) < 1e-12
        assert (a == 0).any()  # the ReLU is applied


def test_loads_bn_resnet_checkpoint(tmp_path, caplog):
    bn = randomise(ResNet(depth=50, base_channels=16))
    state = dict(bn.state_dict())
    state['fc.weight'] = torch.zeros(10, 1024)
    state['fc.bias'] = torch.zeros(10)
    path = tmp_path / 'resnet50_bn.pth'
    torch.save(dict(state_dict=state), path)
    model = CEResNet(
        depth=50,
        base_channels=16,
        init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    fresh_ce = {
        k: v.clone()
        for k, v in model.state_dict().items() if '.ce.' in k or 'ce1' in k
    }
    logger = MMLogger.get_current_instance()
    messages = []

    class Grab(logging.Handler):

        def emit(self, record):
            messages.append(record.getMessage())

    handler = Grab()
    logger.addHandler(handler)
    try:
        model.init_weights()
    finally:
        logger.removeHandler(handler)
    loaded = model.state_dict()
    for k, v in bn.state_dict().items():
        assert torch.equal(loaded[k], v), k
    for k, v in fresh_ce.items():
        assert torch.equal(loaded[k], v), k
    summary = [m for m in messages if 'CEResNet: loaded' in m]
    assert len(summary) == 1 and '\n' not in summary[0]
    assert f'{len(fresh_ce)} CE tensors' in summary[0]
    assert 'fc.bias' in summary[0]
    assert not any('non-CE tensors' in m for m in messages)


def test_loading_reports_missing_non_ce_tensors():
    """A state dict that lacks backbone (non-CE) tensors loads what it has
    and warns with their names; those tensors keep their values."""
    bn = randomise(ResNet(depth=18, base_channels=16))
    state = dict(bn.state_dict())
    del state['layer1.0.conv1.weight'], state['layer4.1.bn2.bias']
    model = CEResNet(depth=18, base_channels=16)
    kept = model.layer1[0].conv1.weight.clone()
    logger = MMLogger.get_current_instance()
    records = []

    class Grab(logging.Handler):

        def emit(self, record):
            records.append(record)

    handler = Grab()
    logger.addHandler(handler)
    try:
        missing_ce, missing_other = model.load_pretrained_state(
            state, source='bn.pth')
    finally:
        logger.removeHandler(handler)
    assert sorted(missing_other) == ['layer1.0.conv1.weight',
                                     'layer4.1.bn2.bias']
    assert sorted(missing_ce) == sorted(
        k for k in model.state_dict()
        if k.startswith('ce1.') or '.ce.' in k)
    assert torch.equal(model.layer1[0].conv1.weight, kept)
    assert torch.equal(model.layer1[0].conv2.weight,
                       bn.layer1[0].conv2.weight)
    warned = [r for r in records if 'non-CE tensors' in r.getMessage()]
    assert len(warned) == 1 and warned[0].levelno == logging.WARNING
    assert '2 non-CE tensors missing from bn.pth' in warned[0].getMessage()
    assert 'layer4.1.bn2.bias' in warned[0].getMessage()


def test_loads_backbone_of_mmdet_detector_checkpoint(tmp_path):
    bn = randomise(ResNet(depth=18, base_channels=16))
    state = {'backbone.' + k: v for k, v in bn.state_dict().items()}
    state['neck.lateral_convs.0.conv.weight'] = torch.zeros(1)
    path = tmp_path / 'detector.pth'
    torch.save(dict(state_dict=state, meta=dict()), path)
    model = CEResNet(
        depth=18,
        base_channels=16,
        init_cfg=dict(
            type='Pretrained', checkpoint=str(path), prefix='backbone.'))
    model.init_weights()
    loaded = model.state_dict()
    for k, v in bn.state_dict().items():
        assert torch.equal(loaded[k], v), k


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize('depth', [18, 50])
def test_inference_matches_the_published_computation(depth, monkeypatch):
    """Eval mode without autograd (each BN folded into its CE, the residual
    addition and the ReLU in the same pass, the result written into the
    conv output): the outputs of the unfused, published computation."""
    from ce_mmdet.ops import torch_impl
    monkeypatch.setattr(torch_impl, 'INPLACE_CHUNK_BYTES', 4096)
    model = randomise(
        CEResNet(depth=depth, stem_channels=32, base_channels=16).double())
    model.eval()
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        outs = model(x)
        expected = ce_resnet_reference_forward(reference, x)
    for o, e in zip(outs, expected):
        assert rel(o, e) < 1e-12


@pytest.mark.parametrize('norm_eval', [False, True])
def test_training_step_matches_the_published_computation(norm_eval):
    """A whole CE-ResNet-50 training step in float64 against the unfused,
    published computation: outputs, input and parameter gradients, BN and
    CE running buffers and num_batches_tracked, over two steps."""
    model = randomise(
        CEResNet(depth=50, stem_channels=32, base_channels=16,
                 norm_eval=norm_eval).double())
    reference = copy.deepcopy(model)
    model.train()
    reference.train()
    for step in range(2):
        torch.manual_seed(step)
        x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        outs = model(x1)
        expected = ce_resnet_reference_forward(reference, x2)
        for o, e in zip(outs, expected):
            assert rel(o, e) < 1e-8
        weights = [torch.randn_like(o) for o in outs]
        sum((o * w).sum() for o, w in zip(outs, weights)).backward()
        sum((e * w).sum() for e, w in zip(expected, weights)).backward()
        assert rel(x1.grad, x2.grad) < 1e-8
        ref_params = dict(reference.named_parameters())
        for name, p in model.named_parameters():
            q = ref_params[name]
            if q.grad is None:
                assert p.grad is None or not p.grad.any(), name
                continue
            assert rel(p.grad, q.grad) < 1e-8 or (
                p.grad - q.grad).abs().max() < 1e-12, name
        ref_buffers = dict(reference.named_buffers())
        for name, b in model.named_buffers():
            if b.is_floating_point():
                assert (b - ref_buffers[name]).abs().max() <= 1e-8 * \
                    ref_buffers[name].abs().max(), name
            else:
                assert torch.equal(b, ref_buffers[name]), name
        model.zero_grad()
        reference.zero_grad()
    tracked = model.layer1[0].norm3.num_batches_tracked
    assert int(tracked) == (0 if norm_eval else 2)


@pytest.mark.parametrize('norm_eval', [False, True])
def test_no_host_sync_in_a_step_or_inference(norm_eval):
    """A CE-ResNet-50 training step and an inference call make no host
    sync (``LaunchCounter.host_syncs``: on a GPU the host would wait for
    the device), like the ResNet-50 they extend."""
    from ce_mmdet.analysis.launches import LaunchCounter
    model = randomise(CEResNet(depth=50, stem_channels=32, base_channels=16,
                               norm_eval=norm_eval))
    x = torch.randn(2, 3, 64, 64)
    for phase in ('train', 'eval'):
        model.train(phase == 'train')
        for _ in range(2):  # the second call: no first-call work
            with LaunchCounter() as counter:
                if phase == 'train':
                    sum(o.sum() for o in model(x)).backward()
                else:
                    with torch.no_grad():
                        model(x)
        assert counter.host_syncs == 0, (phase, dict(counter.syncs))
        assert counter.total > 100


def test_threads_sharing_a_model_get_their_own_results():
    """The fused ops keep no state between calls: concurrent inference on
    one model gives what each call gives alone."""
    import sys
    import threading
    torch.manual_seed(0)
    model = CEResNet(depth=18, out_indices=(0, )).double().eval()
    inputs = [torch.randn(1, 3, 64, 64, dtype=torch.float64)
              for _ in range(4)]
    with torch.no_grad():
        expected = [model(x)[0] for x in inputs]
    results = {}

    def work(i):
        with torch.no_grad():
            for _ in range(10):
                results[i] = model(inputs[i])[0]

    threads = [threading.Thread(target=work, args=(i, )) for i in range(4)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    for i, e in enumerate(expected):
        assert rel(results[i], e) < 1e-12


def test_fuse_conv_bn_for_testing_keeps_outputs():
    """mmdet's ``tools/test.py --fuse-conv-bn`` folds every BN into its conv
    (mmcv's fuse_conv_bn); the CE layers then follow a conv directly."""
    from mmcv.cnn import fuse_conv_bn
    model = randomise(
        CEResNet(depth=50, stem_channels=32, base_channels=16).double())
    model.eval()
    fused = fuse_conv_bn(copy.deepcopy(model))
    assert isinstance(fused.layer1[0].norm3, nn.Identity)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        for o, e in zip(fused(x), model(x)):
            assert ((o - e).abs().max() / e.abs().max()).item() < 1e-10
