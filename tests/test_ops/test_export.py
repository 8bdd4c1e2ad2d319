"""Export for deployment: ``torch.onnx.export`` (mmdeploy's route, the
TorchScript exporter) of a CE-ResNet and a CE-FPN in eval mode, run by
onnxruntime at input sizes other than the traced one, against eager
PyTorch; ``torch.export`` (AOTInductor's and ExecuTorch's route) in eval
and training mode, its program against eager outputs, running statistics
and gradients, and compiled by AOTInductor; and what other tracing keeps
(the FLOP analyser's one node per op)."""
import copy
import io
import shutil
import warnings

import pytest
import torch

from ce_mmdet.models import CEFPN, CEResNet, ChannelEquilibrium
from ce_mmdet.ops.export import exporting
from ce_mmdet.utils.torch_version import compiles_ce

try:
    import onnx
    import onnxruntime as ort
except ImportError:  # (the torch.export tests still run)
    onnx = ort = None
needs_onnx = pytest.mark.skipif(onnx is None,
                                reason='needs onnx and onnxruntime')
# torch.export traces non-strict here, torch's default from 2.8 (2.7's is
# strict); strict tracing is dynamo's, which traces CE from torch 2.11
# (ce_mmdet.utils.torch_version: below, it meets the ops' compiler.disable)
strict_traces_ce = pytest.mark.skipif(
    not compiles_ce(torch.__version__),
    reason=f'torch {torch.__version__}: dynamo (strict export) runs the CE '
    'ops from torch 2.11')


def randomised(model):
    """Non-trivial running state (a fresh CE layer's whitening matrix is the
    identity and its BN statistics are 0 and 1)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, ChannelEquilibrium):
                m.running_wm.add_(0.05 * torch.randn_like(m.running_wm))
                m.running_scale.fill_(0.7)
                m.gate.fill_(0.3)
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def export(model, inputs, names):
    """The TorchScript exporter (mmdeploy's route), chosen on purpose: its
    deprecation warnings (its own and its internals') are not shown.

    A ``TracerWarning`` from ce_mmdet's code fails the export: it means a
    value computed in Python from a traced size, which the graph keeps as
    the traced call's constant (ce_mmdet skips its shape checks while
    tracing)."""
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', 'You are using the legacy '
                                'TorchScript-based ONNX export',
                                DeprecationWarning)
        warnings.filterwarnings('ignore', category=DeprecationWarning,
                                module=r'torch\.onnx\.')
        warnings.filterwarnings('error', category=torch.jit.TracerWarning,
                                module=r'ce_mmdet\.')
        torch.onnx.export(model, inputs, f, dynamo=False, opset_version=17,
                          input_names=names,
                          dynamic_axes={n: {0: 'n', 2: 'h', 3: 'w'}
                                        for n in names})
    return f.getvalue()


def rel_err(got, want):
    got = torch.from_numpy(got).double()
    return ((got - want.double()).abs().max() /
            want.double().abs().max()).item()


@needs_onnx
@pytest.mark.parametrize('grad', [False, True])
def test_ce_resnet_exports_to_onnx(grad):
    """With or without ``torch.no_grad`` around the export: standard ops
    only (no ``PythonOp``: the op runs without its autograd Function), the
    same numbers as eager at the traced size and at others (dynamic axes:
    sizes are not baked into the graph: no ``TracerWarning`` from
    ce_mmdet, see :func:`export`), also where a CE layer's maps are 1 x 1
    and were not in the trace (an instance variance's divisor)."""
    model = randomised(CEResNet(depth=18))
    with torch.set_grad_enabled(grad):
        blob = export(model, (torch.randn(1, 3, 64, 64), ), ['x'])
    graph = onnx.load_from_string(blob).graph
    assert not [n.op_type for n in graph.node
                if n.domain not in ('', 'ai.onnx')]
    session = ort.InferenceSession(blob)
    # (32 x 32: the last stage's maps are 1 x 1; 16 x 16: the last two
    # stages', which divided by H*W - 1 = 0 when max(H*W - 1, 1) was traced)
    for shape in [(1, 3, 64, 64), (2, 3, 96, 80), (1, 3, 32, 32),
                  (1, 3, 16, 16)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            want = model(x)
        got = session.run(None, {'x': x.numpy()})
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g.shape == tuple(w.shape)
            assert rel_err(g, w) < 1e-5


@needs_onnx
def test_ce_resnet_exports_with_the_dynamo_exporter():
    """``torch.onnx.export``'s default exporter in torch >= 2.9 (through
    ``torch.export``, so the CE ops run as plain ops, as below): batch and
    image sizes dynamic (traced with a batch of 2: torch.export specialises
    a dimension of size 1)."""
    pytest.importorskip('onnxscript')
    model = randomised(CEResNet(depth=18))
    auto = torch.export.Dim.AUTO
    program = torch.onnx.export(model, (torch.randn(2, 3, 64, 64), ),
                                dynamo=True, verbose=False,
                                dynamic_shapes=({0: auto, 2: auto,
                                                 3: auto}, ))
    session = ort.InferenceSession(program.model_proto.SerializeToString())
    name = session.get_inputs()[0].name
    for shape in [(2, 3, 64, 64), (3, 3, 96, 80), (1, 3, 32, 32)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            want = model(x)
        got = session.run(None, {name: x.numpy()})
        for g, w in zip(got, want):
            assert g.shape == tuple(w.shape)
            assert rel_err(g, w) < 1e-5


@needs_onnx
def test_ce_fpn_exports_to_onnx():
    neck = randomised(CEFPN(in_channels=[32, 64], out_channels=32,
                            num_outs=3))
    feats = (torch.randn(1, 32, 16, 12), torch.randn(1, 64, 8, 6))
    blob = export(neck, (feats, ), ['c2', 'c3'])
    session = ort.InferenceSession(blob)
    feats = (torch.randn(2, 32, 20, 16), torch.randn(2, 64, 10, 8))
    with torch.no_grad():
        want = neck(feats)
    got = session.run(None, {'c2': feats[0].numpy(), 'c3': feats[1].numpy()})
    assert [g.shape for g in got] == [tuple(w.shape) for w in want]
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-5


def test_other_tracing_keeps_one_node_per_op():
    """Outside an export, torch.jit tracing (mmengine's FLOP analyser) sees
    each CE op as its Function's node, also where nothing requires grad (a
    frozen stage), so that the FLOP rules apply to every layer."""
    model = randomised(CEResNet(depth=18)).requires_grad_(False)
    with torch.no_grad():
        traced = torch.jit.trace(model, torch.randn(1, 3, 64, 64),
                                 check_trace=False)
    kinds = [node.kind() for node in traced.inlined_graph.nodes()]
    assert kinds.count('prim::PythonOp') == sum(
        isinstance(m, ChannelEquilibrium) for m in model.modules())


class _ExportingOrNot(torch.nn.Module):
    """+1 where :func:`exporting` says an exporter traces, -1 elsewhere."""

    def forward(self, x):
        return x + 1 if exporting() else x - 1


# (torch.export is called on a module that calls torch.compile: on purpose)
@pytest.mark.filterwarnings('ignore:torch.compile is ignored when called '
                            'inside torch.export region')
def test_compile_is_not_an_export_even_where_dynamo_says_so(monkeypatch):
    """Dynamo up to torch 2.11 answered ``torch.compiler.is_exporting()``
    with True in every trace (``ce_mmdet.ops.export.torch_exporting``),
    simulated here by patching the call to say True, which this dynamo
    then traces: ``exporting`` is still False under ``torch.compile`` and
    in eager runs, and True under ``torch.export``."""
    import torch._dynamo
    from ce_mmdet.ops.export import torch_exporting
    monkeypatch.setattr(torch.compiler, 'is_exporting', lambda: True)
    torch._dynamo.reset()
    x = torch.zeros(2)
    assert not exporting() and not torch_exporting()
    assert torch.equal(
        torch.compile(_ExportingOrNot(), backend='eager', fullgraph=True)(x),
        x - 1)
    program = torch.export.export(_ExportingOrNot(), (x, ), strict=False)
    assert torch.equal(program.module()(x), x + 1)
    torch._dynamo.reset()


def _sum_backward(outputs):
    sum(o.square().sum() for o in outputs).backward()


@pytest.mark.parametrize('strict', [False, pytest.param(
    True, marks=strict_traces_ce)])
@pytest.mark.parametrize('training', [False, True])
def test_torch_export_program_matches_eager(training, strict):
    """``torch.export.export`` without ``torch.no_grad`` (as its examples
    call it), non-strict and strict: the program has no Triton launch, no
    ``out=`` op and no autograd Function of ours (their forward would be
    replayed with autograd recording, which rejects ``out=``); it gives
    eager's outputs, moves the running statistics as eager does (training)
    and, trained through its own ops, eager's gradients (the hand-written
    backward)."""
    # (norm_eval=False: BN and CE in training mode, batch statistics)
    model = randomised(CEResNet(depth=18, norm_eval=False)).train(training)
    eager = copy.deepcopy(model)
    start = model.ce1.running_wm.clone()
    x = torch.randn(2, 3, 64, 64)
    program = torch.export.export(model, (x, ), strict=strict)
    targets = [str(n.target) for n in program.graph.nodes
               if n.op == 'call_function']
    assert not [t for t in targets if 'triton' in t or '.out' in t]
    exported = program.module()
    got, want = exported(x), eager(x)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert ((g - w).abs().max() / w.abs().max()).item() < 1e-6
    buffers = dict(exported.named_buffers())
    for name, b in eager.named_buffers():
        if name.endswith(('running_wm', 'running_scale', 'running_mean')):
            assert torch.allclose(buffers[name], b, rtol=1e-6, atol=1e-7), \
                name
    # the statistics moved in training only
    assert torch.equal(buffers['ce1.running_wm'], start) is not training
    _sum_backward(got)
    _sum_backward(want)
    params = dict(exported.named_parameters())
    checked = 0
    for name, p in eager.named_parameters():
        if p.grad is None:
            continue
        grad = params[name].grad
        assert grad is not None, name
        scale = p.grad.abs().max().clamp_min(1e-30)
        assert ((grad - p.grad).abs().max() / scale).item() < 1e-4, name
        checked += name.endswith(('gate', 'fc1.weight'))
    assert checked == 2 * sum(isinstance(m, ChannelEquilibrium)
                              for m in eager.modules())


def test_torch_export_with_dynamic_sizes():
    """Batch and image sizes dynamic: one program for other sizes, eager's
    outputs (not down to a 1 x 1 last stage: torch.export specialises that
    size in mmdet's ResNet alone)."""
    model = randomised(CEResNet(depth=18))
    auto = torch.export.Dim.AUTO
    program = torch.export.export(
        model, (torch.randn(2, 3, 64, 64), ),
        dynamic_shapes=({0: auto, 2: auto, 3: auto}, ), strict=False)
    for shape in [(3, 3, 96, 80), (2, 3, 160, 128)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            got, want = program.module()(x), model(x)
        for g, w in zip(got, want):
            assert g.shape == w.shape
            assert ((g - w).abs().max() / w.abs().max()).item() < 1e-6


@pytest.mark.skipif(not (shutil.which('c++') or shutil.which('g++')),
                    reason='AOTInductor needs a C++ compiler')
def test_torch_export_program_compiles_with_aotinductor(tmp_path):
    """The deployment route after ``torch.export``: AOTInductor compiles the
    program into a package (C++ on this CPU) that gives eager's outputs."""
    model = randomised(CEResNet(depth=18))
    x = torch.randn(2, 3, 64, 64)
    program = torch.export.export(model, (x, ), strict=False)
    package = torch._inductor.aoti_compile_and_package(
        program, package_path=str(tmp_path / 'ce_resnet18.pt2'))
    got = torch._inductor.aoti_load_package(package)(x)
    with torch.no_grad():
        want = model(x)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert ((g - w).abs().max() / w.abs().max()).item() < 1e-5
