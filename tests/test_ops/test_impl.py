import warnings

import pytest
import torch

from ce_mmdet.models import CEResNet, ChannelEquilibrium
from ce_mmdet.ops import IMPLS, resolve_impl
from ce_mmdet.ops.impl import triton_importable


def test_resolve_impl_values(monkeypatch):
    monkeypatch.delenv('CE_MMDET_IMPL', raising=False)
    x = torch.randn(1, 16, 2, 2)
    assert IMPLS == ('auto', 'torch', 'triton')
    assert resolve_impl('auto', x) == 'torch'  # CPU: never the interpreter
    assert resolve_impl('torch', x) == 'torch'
    assert resolve_impl('auto', x.double()) == 'torch'
    with pytest.raises(ValueError, match=r"one of \('auto', 'torch', "
                       r"'triton'\), got 'cuda'"):
        resolve_impl('cuda', x)


def test_triton_where_it_cannot_run_says_why(monkeypatch):
    monkeypatch.delenv('CE_MMDET_IMPL', raising=False)
    monkeypatch.setenv('TRITON_INTERPRET', '0')
    x = torch.randn(1, 16, 2, 2)
    expected = ('on cpu' if triton_importable() else
                'triton is not installed')
    with pytest.raises(RuntimeError, match=expected):
        resolve_impl('triton', x)


def test_environment_variable_overrides(monkeypatch):
    layer = ChannelEquilibrium(16, impl='triton')
    x = torch.randn(2, 16, 3, 3)
    monkeypatch.setenv('CE_MMDET_IMPL', 'fast')
    with pytest.raises(ValueError, match='CE_MMDET_IMPL must be one of'):
        layer(x)
    monkeypatch.setenv('CE_MMDET_IMPL', 'torch')  # wins over impl='triton'
    monkeypatch.setenv('TRITON_INTERPRET', '0')
    assert layer(x).shape == x.shape
    monkeypatch.setenv('CE_MMDET_IMPL', '')  # empty: not set
    with pytest.raises(RuntimeError, match="impl='triton' cannot run"):
        layer(x)


def test_impl_argument_is_checked_at_construction():
    with pytest.raises(ValueError, match="impl must be one of"):
        ChannelEquilibrium(16, impl='gpu')
    model = CEResNet(18, base_channels=16, ce_cfg=dict(impl='torch'))
    assert {m.impl for m in model.modules()
            if isinstance(m, ChannelEquilibrium)} == {'torch'}
    with pytest.raises(ValueError, match='impl must be one of'):
        CEResNet(18, base_channels=16, ce_cfg=dict(impl='cudnn'))


@pytest.mark.skipif(not triton_importable(), reason='needs triton')
def test_triton_self_check(monkeypatch):
    """The check 'auto' runs before it uses Triton on a CUDA device: it
    passes for the kernels as they are (here in the interpreter, on CPU)
    and fails, with one warning, for a broken kernel."""
    from ce_mmdet.ops import impl, triton_impl
    monkeypatch.setenv('TRITON_INTERPRET', '1')
    impl.triton_self_check.cache_clear()
    cpu = torch.device('cpu')
    with torch.inference_mode():  # a first call from inference code
        assert impl.triton_self_check(cpu)
    # CE-ResNet-50's own layer configurations: the stem (one group of 64),
    # stage 3 (hidden 256), a bf16 input (autocast)
    for layer in ((64, 64, 16, 3, 2, torch.float32),
                  (1024, 16, 256, 3, 2, torch.float32),
                  (256, 16, 64, 3, 1, torch.bfloat16)):
        assert impl.triton_self_check(cpu, layer), layer
    impl.triton_self_check.cache_clear()

    def broken(*args, **kwargs):
        raise RuntimeError('no kernel for this GPU')

    monkeypatch.setattr(triton_impl.TritonPasses, 'apply2',
                        staticmethod(broken))
    with pytest.warns(RuntimeWarning, match='failed their self-check'):
        assert not impl.triton_self_check(torch.device('cpu'))
    impl.triton_self_check.cache_clear()


@pytest.mark.skipif(not triton_importable(), reason='needs triton')
@pytest.mark.parametrize('c,d', [(32, 16), (64, 64)])
def test_triton_self_check_passes_on_every_map_class(c, d, monkeypatch):
    """The check passes for the kernels as they are on every class of map
    size the layers have (1, a multiple of 16, other): on 1x1 maps (a
    CE-ResNet's last stages on small images, an FPN's top levels) it
    compared the input gradient, rounding noise there, and failed by 90%,
    so 'auto' warned and fell back to torch for nothing."""
    from ce_mmdet.ops import impl
    monkeypatch.setenv('TRITON_INTERPRET', '1')
    impl.triton_self_check.cache_clear()
    with warnings.catch_warnings():
        warnings.simplefilter('error', RuntimeWarning)
        for size in impl.MAP_SIZES:
            layer = (c, d, c // 4, 3, 2, torch.float32, size)
            assert impl.triton_self_check(torch.device('cpu'), layer), size
    impl.triton_self_check.cache_clear()


def test_self_check_runs_without_tf32_and_restores_the_setting(monkeypatch):
    """A process that allows TF32 matmuls (set_float32_matmul_precision(
    'high')) would make the self-check's torch side the inaccurate one and
    'auto' fall back to torch on every GPU: the check runs with float32
    CUDA matmuls and gives the process its setting back, also on failure."""
    from ce_mmdet.ops import impl
    matmul = torch.backends.cuda.matmul
    name = 'fp32_precision' if hasattr(matmul, 'fp32_precision') else \
        'allow_tf32'
    ieee, tf32 = (('ieee', 'tf32') if name == 'fp32_precision' else
                  (False, True))
    seen = []

    def pairs(device, layer):
        seen.append(getattr(matmul, name))
        if len(seen) == 2:
            raise RuntimeError('a kernel failed')
        return []

    monkeypatch.setattr(impl, '_check_pairs', pairs)
    saved = getattr(matmul, name)
    try:
        setattr(matmul, name, tf32)
        assert impl.triton_self_check.__wrapped__(torch.device('cpu'))
        with pytest.warns(RuntimeWarning, match='failed their self-check'):
            assert not impl.triton_self_check.__wrapped__(
                torch.device('cpu'))
        assert seen == [ieee, ieee]
        assert getattr(matmul, name) == tf32
    finally:
        setattr(matmul, name, saved)
