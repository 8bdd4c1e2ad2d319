"""torch.compile: dynamo traces the CE ops without graph breaks (the torch
implementation, and the Triton one through its custom op
``ce_mmdet::triton_launch``), and the compiled model computes what the eager
one does. Below ``MIN_TORCH_COMPILE`` (torch 2.7 to 2.10) the ops run
eagerly between the compiled graphs instead: the tests of tracing skip
there, those of compiled models' numbers run on every torch."""
import copy
import importlib
import warnings

import pytest
import torch

from ce_mmdet.models import CEResNet, ChannelEquilibrium
from ce_mmdet.ops.impl import triton_device
from ce_mmdet.utils.torch_version import MIN_TORCH_COMPILE, compiles_ce

needs_triton = pytest.mark.skipif(
    triton_device() is None,
    reason='needs triton (and a GPU or TRITON_INTERPRET=1)')
traces_ce = pytest.mark.skipif(
    not compiles_ce(torch.__version__),
    reason=f'torch {torch.__version__} < '
    f'{".".join(map(str, MIN_TORCH_COMPILE))}: torch.compile runs the CE '
    'ops eagerly (ce_mmdet.utils.torch_version)')
DEVICE = triton_device() or 'cpu'


def with_impl(model, impl):
    for m in model.modules():
        if isinstance(m, ChannelEquilibrium):
            m.impl = impl
    return model


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def recording_backend():
    """An AOTAutograd backend (no code generation, fast) that runs the
    graphs as traced and keeps their code, forward and backward."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    graphs = []

    def record(gm, _):
        graphs.append(gm.code)
        return make_boxed_func(gm.forward)

    return aot_autograd(fw_compiler=record, bw_compiler=record), graphs


def assert_step_matches(compiled, fn, shape):
    """``compiled`` computes what ``fn`` does on a random input of
    ``shape``, forward and input gradient."""
    z = torch.randn(*shape, device=DEVICE, requires_grad=True)
    z2 = z.detach().clone().requires_grad_()
    out, ref = compiled(z), fn(z2)
    assert rel_err(out, ref) < 1e-5
    out.square().sum().backward()
    ref.square().sum().backward()
    assert rel_err(z.grad, z2.grad) < 1e-4


def assert_training_step_matches(compiled, model, eager, x=None):
    """A training step of ``compiled`` (``model`` compiled) gives the
    outputs, parameter gradients and buffers of ``eager``'s (a copy of
    ``model``), on ``x`` or a random (2, 3, 32, 32) input."""
    if x is None:
        x = torch.randn(2, 3, 32, 32, device=DEVICE)
    outs, ref = compiled(x), eager(x)
    for o, r in zip(outs, ref):
        assert rel_err(o, r) < 1e-5
    sum(o.sum() for o in outs).backward()
    sum(r.sum() for r in ref).backward()
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        if q.grad is not None:
            assert rel_err(p.grad, q.grad) < 1e-4, name
    for (name, b), c in zip(model.named_buffers(), eager.buffers()):
        if b.is_floating_point():
            assert rel_err(b, c) < 1e-5, name


@traces_ce
@pytest.mark.parametrize('impl', [
    'torch', pytest.param('triton', marks=needs_triton)])
@pytest.mark.parametrize('mode', ['train', 'norm_eval', 'inference'])
def test_dynamo_traces_ce_resnet_without_graph_breaks(mode, impl):
    """No graph break inside CE: the torch implementation, and the Triton
    one with every launch one custom-op node (in inference the op would
    write into its input; under compile it does not)."""
    import torch._dynamo
    torch._dynamo.reset()
    model = with_impl(
        CEResNet(18, base_channels=16, norm_eval=mode == 'norm_eval'),
        impl).to(DEVICE)
    model.train(mode != 'inference')
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    with torch.set_grad_enabled(mode != 'inference'):
        explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


@pytest.mark.parametrize('impl', [
    'torch', pytest.param('triton', marks=needs_triton)])
def test_inductor_compiles_bn_ce(impl):
    """Inductor (C++ on this CPU) on one BN + CE op, forward and backward,
    in a few seconds (the Triton launches stay custom-op calls)."""
    import torch._dynamo
    torch._dynamo.reset()
    torch.manual_seed(0)

    class BNCE(torch.nn.Module):

        def __init__(self):
            super().__init__()
            self.bn = torch.nn.BatchNorm2d(32)
            self.ce = ChannelEquilibrium(32, impl=impl)

        def forward(self, x):
            return self.ce(x, bn=self.bn)

    model = BNCE().train()
    eager = copy.deepcopy(model)
    x = torch.randn(2, 32, 8, 8, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    out, ref = torch.compile(model)(x), eager(x2)
    assert rel_err(out, ref) < 1e-5
    out.square().sum().backward()
    ref.square().sum().backward()
    assert rel_err(x.grad, x2.grad) < 1e-4
    assert rel_err(model.ce.fc1.weight.grad, eager.ce.fc1.weight.grad) < 1e-4


@pytest.mark.parametrize('relu', [False, True])
def test_inductor_compiles_ce_with_dynamic_shapes(relu):
    """Inductor with dynamic shapes (what torch.compile turns to once the
    image size changes, as detection batches do) on conv -> BN + CE ->
    conv, training: the CE output, which the second conv saves for its
    backward, is a graph output. When it was a view of the GEMM's product,
    inductor (torch 2.11 to 2.13) stopped with "cannot determine truth
    value of Relational" (pytorch/pytorch#185510); with and without an
    epilogue (the ReLU) the compiled step now matches eager at two sizes."""
    import torch._dynamo
    torch._dynamo.reset()
    torch.manual_seed(0)

    class Net(torch.nn.Module):

        def __init__(self):
            super().__init__()
            self.conv1 = torch.nn.Conv2d(3, 32, 3, stride=2, padding=1)
            self.bn = torch.nn.BatchNorm2d(32)
            self.ce = ChannelEquilibrium(32, impl='torch')
            self.conv2 = torch.nn.Conv2d(32, 8, 3, padding=1)

        def forward(self, x):
            return self.conv2(self.ce(self.conv1(x), bn=self.bn, relu=relu))

    model = Net().to(DEVICE).train()
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, dynamic=True)
    for size in (16, 20):
        assert_step_matches(compiled, eager, (2, 3, size, size))
    assert rel_err(model.ce.fc1.weight.grad, eager.ce.fc1.weight.grad) < 1e-4


@traces_ce
@pytest.mark.parametrize('impl', [
    'torch', pytest.param('triton', marks=needs_triton)])
def test_compiled_training_step_matches_eager(impl):
    """AOTAutograd (no code generation, fast) through the CE ops' forward
    and hand-written backward: the compiled step gives the eager step's
    outputs, gradients and buffers; with ``impl='triton'`` the forward and
    backward graphs call the kernels as ``ce_mmdet.triton_launch`` nodes."""
    import torch._dynamo
    torch._dynamo.reset()
    backend, graphs = recording_backend()
    torch.manual_seed(0)
    model = with_impl(CEResNet(18, base_channels=16), impl).to(DEVICE)
    model.train()
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    assert_training_step_matches(compiled, model, eager)
    assert len(graphs) == 2
    assert [('ce_mmdet.triton_launch' in code) for code in graphs] == [
        impl == 'triton'] * 2


@pytest.mark.parametrize('impl', [
    'torch', pytest.param('triton', marks=needs_triton)])
def test_ops_run_eagerly_between_graphs_where_dynamo_cannot_trace_them(
        impl, monkeypatch):
    """Below ``MIN_TORCH_COMPILE`` the two CE ops are
    ``torch.compiler.disable``-d at import: a compiled CE-ResNet breaks its
    graph at each CE layer, runs the op eagerly there, and its training
    step gives the eager step's outputs, gradients and buffers. On a torch
    that traces CE, the layers' ops are disabled here as an older torch's
    are, so that this fallback is tested on every torch."""
    import torch._dynamo
    from ce_mmdet.ops import (batchnorm_channel_equilibrium,
                              channel_equilibrium)
    layers = importlib.import_module(
        'ce_mmdet.models.layers.channel_equilibrium')
    for op in (channel_equilibrium, batchnorm_channel_equilibrium):
        assert getattr(layers, op.__name__) is op  # what the layers call
        if compiles_ce(torch.__version__):
            monkeypatch.setattr(layers, op.__name__,
                                torch.compiler.disable(op))
    torch.manual_seed(0)
    model = with_impl(CEResNet(18, base_channels=16), impl).to(DEVICE)
    model.train()
    eager = copy.deepcopy(model)
    torch._dynamo.reset()
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    explained = torch._dynamo.explain(copy.deepcopy(model))(x)
    # (dynamo counts a break again where it resumes a frame that called
    # the op: 10 for the 7 CE layers on torch 2.8 and 2.13)
    n_ce = sum(isinstance(m, ChannelEquilibrium) for m in model.modules())
    assert explained.graph_break_count >= n_ce
    assert explained.break_reasons and all(
        'disable' in r.reason for r in explained.break_reasons)
    torch._dynamo.reset()
    assert_training_step_matches(torch.compile(model, backend='aot_eager'),
                                 model, eager, x)


@traces_ce
@needs_triton
def test_triton_custom_op_with_dynamic_shapes():
    """Detection inputs change size: with ``dynamic=True`` the launches take
    symbolic sizes (grids, position counts) and one compiled graph serves
    every spatial size, equal to eager. (Sizes reached the kernels as floats
    too, ``H*W - 1`` and ``1 / (N*H*W)``, which dynamo guarded on: every new
    size recompiled, and after 8 dynamo gave up compiling the function.)"""
    import torch._dynamo
    torch._dynamo.reset()
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(32).to(DEVICE)
    ce = ChannelEquilibrium(32, impl='triton').to(DEVICE)

    def fn(z):
        return ce(z, bn=bn)

    from torch._dynamo.testing import CompileCounterWithBackend
    counter = CompileCounterWithBackend('aot_eager')
    compiled = torch.compile(fn, backend=counter, dynamic=True,
                             fullgraph=True)
    # (maps of at most one position slice per sample and group: more
    # slices are a second regime of the statistics' partial sums)
    frames = 0
    for h, w in ((5, 7), (9, 4), (6, 6), (7, 7), (3, 11)):
        assert_step_matches(compiled, fn, (2, 32, h, w))
        frames = frames or counter.frame_count
    assert counter.frame_count == frames  # no recompile for a new size


@pytest.fixture
def auto_considers_cpu(monkeypatch):
    """'auto' treating this CPU as it treats a GPU (Triton's interpreter
    runs the kernels), its self-checks recorded: (layer, at trace time).

    Trace time is when dynamo's tracing context is set. A call that
    ``assume_constant_result`` makes while tracing sees it on every torch the
    ops compile on; ``torch.compiler.is_compiling()`` is False there on torch
    2.11, whose torch.compile does not set the flag it reads (2.13 does)."""
    from torch._guards import TracingContext

    from ce_mmdet.ops import impl
    monkeypatch.setattr(impl, '_auto_may_use_triton',
                        lambda tensor: tensor is not None)
    checked = []
    check = impl.triton_self_check  # (cached: each check runs once)
    check.cache_clear()

    def recording(device, layer=impl.DEFAULT_LAYER):
        checked.append((layer, TracingContext.try_get() is not None))
        return check(device, layer)

    monkeypatch.setattr(impl, 'triton_self_check', recording)
    yield checked
    check.cache_clear()


def _compile_bn_ce(dynamic):
    """A BN + CE op with impl='auto' compiled by AOTAutograd, and the code
    of the graphs it makes."""
    import torch._dynamo
    torch._dynamo.reset()
    backend, graphs = recording_backend()
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(32)
    ce = ChannelEquilibrium(32, impl='auto')

    def fn(z):
        return ce(z, bn=bn)

    compiled = torch.compile(fn, fullgraph=True, dynamic=dynamic,
                             backend=backend)
    return compiled, fn, graphs


@traces_ce
@needs_triton
@pytest.mark.parametrize('dynamic', [False, True])
def test_auto_under_compile_checks_at_trace_time_and_uses_triton(
        dynamic, auto_considers_cpu):
    """Under torch.compile 'auto' runs the self-check at trace time, outside
    the graph (torch.compiler.assume_constant_result), for the layer's
    configuration on every class of map size (a compiled graph may serve
    several sizes), and then traces the Triton launches; the compiled op
    computes what the eager op does, forward and backward, also for a
    second spatial size under dynamic shapes; without dynamo's warning that
    it traces through an ``lru_cache`` (triton_importable had one)."""
    import torch._dynamo.utils
    from ce_mmdet.ops import impl
    # (dynamo warns once per process)
    getattr(torch._dynamo.utils, 'warn_once_cache', set()).clear()
    compiled, fn, graphs = _compile_bn_ce(dynamic)
    sizes = ((5, 7), (9, 4)) if dynamic else ((5, 7), )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        for h, w in sizes:
            assert_step_matches(compiled, fn, (2, 32, h, w))
    assert not [w for w in caught if 'lru_cache' in str(w.message)]
    assert len(graphs) == 2  # one forward and one backward graph
    assert all('ce_mmdet.triton_launch' in code for code in graphs)
    at_trace = [layer for layer, traced in auto_considers_cpu
                if traced]
    assert {layer[6] for layer in at_trace} == set(impl.MAP_SIZES)
    assert {layer[:4] + layer[5:6]
            for layer in at_trace} == {(32, 16, 8, 3, torch.float32)}


@traces_ce
@needs_triton
def test_auto_under_compile_keeps_torch_where_the_check_fails(
        auto_considers_cpu, monkeypatch):
    """A failed trace-time check: the graph traces the torch implementation
    (no Triton launch, no graph break)."""
    from ce_mmdet.ops import impl
    monkeypatch.setattr(impl, 'triton_self_check',
                        lambda device, layer=None: False)
    compiled, fn, graphs = _compile_bn_ce(False)
    z = torch.randn(2, 32, 5, 7)
    assert rel_err(compiled(z), fn(z)) < 1e-5
    assert graphs and not any('ce_mmdet.triton_launch' in code
                              for code in graphs)


@traces_ce
@needs_triton
def test_auto_traces_ce_resnet_without_graph_breaks(auto_considers_cpu):
    """The trace-time self-checks of every CE layer of a CE-ResNet add no
    graph break, and the graph launches the kernels."""
    import torch._dynamo
    torch._dynamo.reset()
    model = CEResNet(18, base_channels=16, stem_channels=16).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    assert 'ce_mmdet.triton_launch' in str(explained.graphs[0].graph)
    # the stem and stage 1 (16 channels, one group), stages 2 and 3
    assert {layer[:2] for layer, traced in auto_considers_cpu
            if traced} == {(16, 16), (32, 16), (64, 16)}
