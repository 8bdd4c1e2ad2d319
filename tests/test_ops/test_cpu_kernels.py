"""The fused CPU kernels (ce_mmdet.ops.cpu_kernels): against a float64
reference, against the PyTorch ops they replace, and where they must not
run (other dtypes, tracing, a failed build)."""
import os
import subprocess

import pytest
import torch
import torch.nn as nn

from ce_mmdet.analysis.launches import LaunchCounter
from ce_mmdet.models import ChannelEquilibrium
from ce_mmdet.ops import CEConfig, CEParams, CEState, cpu_kernels, torch_impl
from ce_mmdet.ops.torch_impl import BNAffine

needs_kernels = pytest.mark.skipif(
    cpu_kernels.library() is None,
    reason='the CPU kernels do not build or run here (no AVX2 or no C '
    'compiler with OpenMP)')


def rel_err(got, want):
    return ((got.double() - want).abs().max() /
            want.abs().max().clamp_min(1e-30)).item()


def reference_map(a, x, bias, residual, relu):
    n, g, d, _ = a.shape
    h, w = x.shape[2:]
    want = a.double() @ x.double().reshape(n, g, d, h * w)
    if bias is not None:
        want = want + bias.double()
    want = want.reshape(x.shape)
    if residual is not None:
        want = want + residual.double()
    return want.relu() if relu else want


# H*W: 1; 49 and 169 (whole tiles, then columns one at a time); 1600
# (whole tiles only); 51 (a 32-column tile, a 16-column one, 3 columns)
SHAPES = [(1, 1, 1, 1), (2, 3, 7, 7), (1, 2, 13, 13), (2, 1, 40, 40),
          (3, 1, 3, 17)]
# the tiles this CPU runs: AVX2, and AVX-512 where it has it
RUNNABLE_ISAS = ['avx2'] + (
    ['avx512'] if torch.backends.cpu.get_cpu_capability() == 'AVX512' else [])


@needs_kernels
@pytest.mark.parametrize('isa', RUNNABLE_ISAS)
@pytest.mark.parametrize('d', [4, 8, 16, 32, 64])
@pytest.mark.parametrize('shape', SHAPES)
def test_map_matches_float64_reference(d, shape, isa):
    """Every epilogue (bias, residual, ReLU), in place and into a new
    tensor; N = 1, H*W = 1 and H*W not a multiple of the tiles' widths."""
    torch.manual_seed(0)
    n, g, h, w = shape
    x = torch.randn(n, g * d, h, w)
    a = torch.randn(n, g, d, d) / d**0.5
    b = torch.randn(n, g, d, 1)
    r = torch.randn_like(x)
    for bias in (None, b):
        for residual in (None, r):
            for relu in (False, True):
                want = reference_map(a, x, bias, residual, relu)
                out = torch.empty_like(x)
                before = x.clone()
                cpu_kernels.apply_map(a, x, d, out, bias, residual, relu,
                                      isa=isa)
                assert torch.equal(x, before)
                assert rel_err(out, want) < 1e-6
                y = x.clone()
                cpu_kernels.apply_map(a, y, d, y, bias, residual, relu,
                                      isa=isa)
                assert torch.equal(y, out)
    y = x.clone()  # the residual may be the input itself
    cpu_kernels.apply_map(a, y, d, y, b, y, True, isa=isa)
    assert rel_err(y, reference_map(a, x, b, x, True)) < 1e-6


@needs_kernels
@pytest.mark.skipif(len(RUNNABLE_ISAS) < 2, reason='no AVX-512 on this CPU')
@pytest.mark.parametrize('d', [16, 64])
def test_avx512_tile_gives_the_avx2_tiles_bits(d):
    """The same operations in the same order per element: equal bits, with
    every epilogue, at CE-ResNet-like maps (20x20: a 16-column tail)."""
    torch.manual_seed(0)
    for shape in ((2, 4 * d, 20, 20), (1, d, 160, 160), (2, 2 * d, 3, 17)):
        x = torch.randn(shape)
        n, c = shape[:2]
        a = torch.randn(n, c // d, d, d) / d**0.5
        b = torch.randn(n, c // d, d, 1)
        r = torch.randn_like(x)
        outs = [cpu_kernels.apply_map(a, x, d, torch.empty_like(x), b, r, True,
                                      isa=isa) for isa in ('avx2', 'avx512')]
        assert torch.equal(outs[0], outs[1])
        assert rel_err(outs[1], reference_map(a, x, b, r, True)) < 1e-6


def test_default_isa_follows_torchs_cpu_dispatch(monkeypatch):
    for capability, isa in (('AVX512', 'avx512'), ('AVX2', 'avx2'),
                            ('DEFAULT', 'avx2')):
        monkeypatch.setattr(torch.backends.cpu, 'get_cpu_capability',
                            lambda capability=capability: capability)
        assert cpu_kernels.default_isa() == isa


@needs_kernels
@pytest.mark.parametrize('shape', SHAPES + [(2, 4, 80, 80)])
def test_moments_match_float64_reference(shape):
    torch.manual_seed(0)
    n, c, h, w = shape
    x = torch.randn(n, c * 16, h, w) * 2 + 3
    mean, var = cpu_kernels.moments(x)
    want_mean = x.double().mean((2, 3))
    want_var = x.double().flatten(2).var(-1) if h * w > 1 else \
        torch.zeros_like(want_mean)
    assert mean.dtype == var.dtype == torch.float32
    assert mean.shape == var.shape == (n, c * 16)
    assert (mean.double() - want_mean).abs().max() < 1e-5
    if h * w == 1:
        assert torch.equal(var, torch.zeros_like(var))
    else:
        assert rel_err(var, want_var) < 1e-5


@needs_kernels
def test_relu_keeps_nan_as_torch_does():
    torch.manual_seed(0)
    a = torch.randn(1, 2, 4, 4)
    for hw in (16, 3):  # the vector tile and the narrow last tile
        x = torch.randn(1, 8, 1, hw)
        x[0, 5, 0, 1] = float('nan')  # a NaN in group 1 at position 1
        out = cpu_kernels.apply_map(a, x, 4, torch.empty_like(x), relu=True)
        want = torch.relu(a @ x.view(1, 2, 4, hw)).view(x.shape)
        assert out.isnan().sum() == 4
        assert torch.equal(out.isnan(), want.isnan())
        assert rel_err(out.nan_to_num(), want.nan_to_num().double()) < 1e-6


@needs_kernels
def test_same_result_on_any_thread_count():
    torch.manual_seed(0)
    x = torch.randn(1, 64, 37, 41)  # one block: split by columns
    a = torch.randn(1, 1, 64, 64)
    threads = torch.get_num_threads()
    outs = []
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            outs.append((cpu_kernels.apply_map(a, x, 64, torch.empty_like(x)),
                         *cpu_kernels.moments(x)))
    finally:
        torch.set_num_threads(threads)
    for other in outs[1:]:
        assert all(torch.equal(p, q) for p, q in zip(outs[0], other))


@needs_kernels
def test_in_place_bumps_autograd_version():
    x = torch.randn(1, 16, 4, 4)
    version = x._version
    cpu_kernels.apply_map(torch.randn(1, 1, 16, 16), x, 16, x)
    assert x._version > version


@needs_kernels
def test_bad_operands_raise_before_the_kernel_runs():
    """The kernel works through raw pointers: a wrong shape, dtype or
    device of any operand is a ValueError that names it, not a read out of
    bounds."""
    x = torch.randn(1, 16, 4, 4)
    a = torch.randn(1, 1, 16, 16)
    out = torch.empty_like(x)
    calls = cpu_kernels.KernelStats.calls
    with pytest.raises(ValueError, match=r'out must be a float32 contiguous '
                       r'CPU tensor of shape \(1, 16, 4, 4\), got '
                       r'torch.float64'):
        cpu_kernels.apply_map(a, x, 16, x.double())
    x6 = torch.randn(1, 6, 4, 4)
    with pytest.raises(ValueError, match='multiple of 4 from 4 to 64 that '
                       'divides C = 6, got 6'):
        cpu_kernels.apply_map(torch.randn(1, 1, 6, 6), x6, 6,
                              torch.empty_like(x6))
    with pytest.raises(ValueError, match='divides C = 16, got 12'):
        cpu_kernels.apply_map(a, x, 12, out)
    with pytest.raises(ValueError, match=r'a must be a CPU tensor of shape '
                       r'\(1, 1, 16, 16\), got torch.float32 \(1, 2, 8, 8\)'):
        cpu_kernels.apply_map(torch.randn(1, 2, 8, 8), x, 16, out)
    with pytest.raises(ValueError, match=r'bias must .* \(1, 1, 16, 1\)'):
        cpu_kernels.apply_map(a, x, 16, out, torch.randn(1, 1, 16))
    with pytest.raises(ValueError, match=r'residual must .* got torch.float32 '
                       r'\(1, 16, 2, 2\)'):
        cpu_kernels.apply_map(a, x, 16, out, residual=torch.randn(1, 16, 2, 2))
    with pytest.raises(ValueError, match=r'residual must be a float32 '
                       'contiguous'):
        cpu_kernels.apply_map(a, x, 16, out,
                              residual=torch.randn(1, 4, 4, 16).permute(
                                  0, 3, 1, 2))
    with pytest.raises(ValueError, match=r'x must be \(N, C, H, W\)'):
        cpu_kernels.apply_map(a, x[0], 16, out)
    with pytest.raises(ValueError, match=r"isa must be one of \('avx2', "
                       r"'avx512'\), got 'sse'"):
        cpu_kernels.apply_map(a, x, 16, out, isa='sse')
    with pytest.raises(ValueError, match='x must be a float32 contiguous'):
        cpu_kernels.moments(x.transpose(2, 3))
    assert cpu_kernels.KernelStats.calls == calls  # no kernel ran


def trained_layer(c, d, seed=0):
    torch.manual_seed(seed)
    layer = ChannelEquilibrium(c, group_size=d)
    bn = nn.BatchNorm2d(c)
    for p in (layer.gate, bn.weight, bn.bias):
        p.data.normal_()
    layer.train()
    for _ in range(2):  # running whitening matrices away from identity
        layer(torch.randn(4, c, 6, 6) * 2 + 1)
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2)
    return layer.eval(), bn.eval()


@needs_kernels
@pytest.mark.parametrize('d,hw', [(16, 9), (16, 40), (64, 25)])
def test_layer_eval_matches_pytorch_ops(monkeypatch, d, hw):
    """An eval CE layer, alone and as BN + CE with the block tail, with the
    kernels and without them (the PyTorch ops): the same numbers to float32
    rounding, and the kernels ran (three calls per layer: the moments, the
    small graph, the map)."""
    layer, bn = trained_layer(64, d)
    torch.manual_seed(1)
    z = torch.randn(2, 64, hw, hw) * 3 + 1
    res = torch.randn_like(z)
    calls = (lambda: layer(z), lambda: layer(z, bn, residual=res, relu=True))
    with torch.no_grad():
        monkeypatch.setenv(cpu_kernels.ENV_VAR, '0')
        want = [f() for f in calls]
        monkeypatch.delenv(cpu_kernels.ENV_VAR)
        for f, expected in zip(calls, want):
            with LaunchCounter() as counter:
                got = f()
            assert counter.cpu_kernel_calls == 3
            assert rel_err(got, expected.double()) < 1e-5


def random_ce_tensors(n, c, d, hidden, dtype=torch.float32, seed=0):
    """Variances, CEParams and CEState with values away from their
    initial ones."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    var = randn(n, c).abs() * 2 + 0.1
    params = CEParams(randn(1), randn(hidden, c) / c**0.5, randn(hidden),
                      randn(hidden), randn(c, hidden) / hidden**0.5)
    state = CEState(
        torch.eye(d, dtype=dtype) + 0.1 * randn(c // d, d, d),
        torch.tensor([1.3], dtype=dtype))
    return var, params, state


def bn_affine_of(c, weight, bias, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return BNAffine(
        torch.randn(c, generator=g, dtype=dtype) if weight else None,
        torch.randn(c, generator=g, dtype=dtype) if bias else None,
        torch.randn(c, generator=g, dtype=dtype),
        torch.rand(c, generator=g, dtype=dtype) + 0.5, 1e-3)


@needs_kernels
@pytest.mark.parametrize('n,c,d,hidden', [(2, 64, 64, 16), (1, 64, 16, 16),
                                          (3, 48, 16, 12), (2, 1024, 16, 256),
                                          (2, 40, 4, 5)])
@pytest.mark.parametrize('bn', ['none', 'affine', 'plain'])
def test_eval_small_graph_matches_float64_reference(n, c, d, hidden, bn):
    """The kernel's (a_in, bias) against the PyTorch small graph and BN
    fold (map_from_stats) in float64, with a BN (with and without its
    weight and bias) and without one."""
    var, params, state = random_ce_tensors(n, c, d, hidden)
    affine = None if bn == 'none' else \
        bn_affine_of(c, bn == 'affine', bn == 'affine')
    config = CEConfig(group_size=d, eps=1e-4)
    a_in, bias = cpu_kernels.eval_small_graph(var, params, state, config.eps,
                                              d, affine)
    dbl = [t.double() for t in (var, *params, *state)]
    daffine = None if affine is None else BNAffine(
        *(None if t is None else t.double() for t in affine[:4]), affine.eps)
    want = torch_impl.map_from_stats(
        torch.zeros(n, c, dtype=torch.float64), dbl[0], 7,
        CEParams(*dbl[1:6]), CEState(*dbl[6:]), config, False, None, daffine)
    assert a_in.shape == (n, c // d, d, d) and a_in.dtype == torch.float32
    assert rel_err(a_in, want.a_in) < 1e-5
    if affine is None:
        assert bias is None
    else:
        assert bias.shape == (n, c // d, d, 1)
        assert rel_err(bias, want.bias) < 1e-5


@needs_kernels
def test_eval_small_graph_checks_its_operands():
    var, params, state = random_ce_tensors(2, 32, 16, 8)
    calls = cpu_kernels.KernelStats.calls
    bad = [
        (var.double(), params, state, None, 'var must be a float32'),
        (var[:, :30], params, state, None, 'multiple of group_size 16'),
        (var, params._replace(fc1_weight=params.fc1_weight.double()), state,
         None, r'fc1_weight must .* shape \(8, 32\), got torch.float64'),
        (var, params._replace(fc2_weight=params.fc2_weight.t()), state, None,
         r'fc2_weight must be a float32 contiguous'),
        (var, params, state._replace(running_wm=state.running_wm[:1]), None,
         r'running_wm must .* \(2, 16, 16\), got torch.float32 '
         r'\(1, 16, 16\)'),
        (var, params, state, bn_affine_of(32, True, True)._replace(var=None),
         'bn running_var must be .* got None'),
        (var, params, state, bn_affine_of(16, True, True),
         r'bn weight must .* shape \(32,\)'),
    ]
    for v, p, st, affine, message in bad:
        with pytest.raises(ValueError, match=message):
            cpu_kernels.eval_small_graph(v, p, st, 1e-5, 16, affine)
    assert cpu_kernels.KernelStats.calls == calls  # no kernel ran
    assert cpu_kernels.takes_eval_small(params, state,
                                        bn_affine_of(32, False, True))
    assert not cpu_kernels.takes_eval_small(
        params._replace(gate=params.gate.double()), state)
    assert not cpu_kernels.takes_eval_small(
        params, state, bn_affine_of(32, True, True, torch.float16))


@needs_kernels
def test_not_used_where_they_cannot_run():
    """float64, a group size the kernels do not take (2) and torch.jit
    tracing take the PyTorch ops (the call count does not move); the traced
    graph gives the eager result."""
    layer, bn = trained_layer(32, 16)
    small, _ = trained_layer(32, 2)
    z = torch.randn(2, 32, 8, 8)
    start = cpu_kernels.KernelStats.calls
    with torch.no_grad():
        layer.double()(z.double())
        layer.float()
        small(z)
        traced = torch.jit.trace(layer, (z, ), check_trace=False)
    assert cpu_kernels.KernelStats.calls == start
    with torch.no_grad():
        assert rel_err(traced(z), layer(z).double()) < 1e-5


def test_failed_build_warns_once_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_kernels, '_LIBRARY', [])
    monkeypatch.setenv(cpu_kernels.CACHE_ENV_VAR, str(tmp_path))
    monkeypatch.setenv('CC', 'no-such-compiler-ce')
    monkeypatch.delenv(cpu_kernels.ENV_VAR, raising=False)
    monkeypatch.setattr(cpu_kernels, 'cpu_supported', lambda: True)
    x = torch.randn(1, 16, 5, 5)
    with pytest.warns(UserWarning, match="no C compiler 'no-such-compiler-ce'"
                      ".*PyTorch ops"):
        assert not cpu_kernels.usable(x, 16)
    assert not cpu_kernels.usable(x, 16)  # warned once, then quiet
    a = torch.randn(1, 1, 16, 16)
    out = torch_impl.apply_map(a, x, 16, False)
    assert rel_err(out, reference_map(a, x, None, None, False)) < 1e-6


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv(cpu_kernels.ENV_VAR, '0')
    assert cpu_kernels.library() is None
    assert not cpu_kernels.usable(torch.randn(1, 16, 2, 2), 16)


def test_switched_off_restores_the_environment(monkeypatch):
    monkeypatch.delenv(cpu_kernels.ENV_VAR, raising=False)
    with cpu_kernels.switched_off():
        assert not cpu_kernels.enabled()
    assert cpu_kernels.ENV_VAR not in os.environ
    monkeypatch.setenv(cpu_kernels.ENV_VAR, 'yes')
    with pytest.raises(KeyError):
        with cpu_kernels.switched_off():
            assert cpu_kernels.library() is None
            raise KeyError('inside')
    assert os.environ[cpu_kernels.ENV_VAR] == 'yes'


def test_build_is_cached_by_source_and_flags(monkeypatch, tmp_path):
    if subprocess.run(['sh', '-c', 'command -v "${CC:-cc}"'],
                      capture_output=True).returncode:
        pytest.skip('no C compiler')
    path = cpu_kernels.build(str(tmp_path))
    assert path.startswith(str(tmp_path)) and path.endswith('.so')

    def no_compiler(*args, **kwargs):
        raise AssertionError('rebuilt')

    monkeypatch.setattr(subprocess, 'run', no_compiler)
    assert cpu_kernels.build(str(tmp_path)) == path
    monkeypatch.setattr(cpu_kernels, 'FLAGS', cpu_kernels.FLAGS + ('-g', ))
    with pytest.raises(AssertionError, match='rebuilt'):
        cpu_kernels.build(str(tmp_path))
    assert [p.name for p in tmp_path.iterdir()] == [path.split('/')[-1]]


def test_not_tried_off_linux(monkeypatch, recwarn):
    """macOS's clang has no -fopenmp: off Linux no build is tried and no
    warning is given."""
    monkeypatch.setattr(cpu_kernels, '_LIBRARY', [])
    monkeypatch.setattr(cpu_kernels.sys, 'platform', 'darwin')
    monkeypatch.delenv(cpu_kernels.ENV_VAR, raising=False)

    def no_build(*args, **kwargs):
        raise AssertionError('a build was tried')

    monkeypatch.setattr(cpu_kernels, 'build', no_build)
    assert not cpu_kernels.cpu_supported()
    assert not cpu_kernels.usable(torch.randn(1, 16, 2, 2), 16)
    assert cpu_kernels._LIBRARY == [] and len(recwarn) == 0
