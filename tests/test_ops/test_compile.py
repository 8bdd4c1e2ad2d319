"""torch.compile: dynamo traces the CE ops without graph breaks, and the
compiled model computes what the eager one does."""
import copy

import pytest
import torch

from ce_mmdet.models import CEResNet, ChannelEquilibrium


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize('mode', ['train', 'norm_eval', 'inference'])
def test_dynamo_traces_ce_resnet_without_graph_breaks(mode):
    import torch._dynamo
    torch._dynamo.reset()
    model = CEResNet(18, base_channels=16, norm_eval=mode == 'norm_eval')
    model.train(mode != 'inference')
    x = torch.randn(2, 3, 64, 64)
    with torch.set_grad_enabled(mode != 'inference'):
        explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_compiled_training_step_matches_eager():
    """aot_eager: dynamo + AOTAutograd through the CE ops' forward and
    hand-written backward, no code generation (fast)."""
    import torch._dynamo
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = CEResNet(18, base_channels=16, norm_eval=False).train()
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend='aot_eager')
    x = torch.randn(2, 3, 64, 64)
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


def test_inductor_compiles_bn_ce():
    """Inductor (C++ on this CPU) on one BN + CE op, forward and backward,
    in a few seconds."""
    import torch._dynamo
    torch._dynamo.reset()
    torch.manual_seed(0)

    class BNCE(torch.nn.Module):

        def __init__(self):
            super().__init__()
            self.bn = torch.nn.BatchNorm2d(32)
            self.ce = ChannelEquilibrium(32)

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
