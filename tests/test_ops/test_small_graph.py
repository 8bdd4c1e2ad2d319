"""The small graph's hand-derived backward against autograd through its
forward, in float64 (the forward itself is checked against the published
computation by the layer's tests)."""
import pytest
import torch

from ce_mmdet.ops import CEConfig, CEParams, CEState
from ce_mmdet.ops import small_graph


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def setup(n, c, d, hw, seed=0):
    torch.manual_seed(seed)
    dt = torch.float64
    h = max(1, c // 4)
    x = torch.randn(n, c // d, d, hw, dtype=dt) * 2 + 0.5
    mean = x.mean(-1).reshape(n, c)
    gram = x @ x.transpose(-1, -2)
    var = x.var(-1).reshape(n, c) if hw > 1 else torch.zeros(n, c, dtype=dt)
    params = CEParams(torch.full((1, ), 0.4, dtype=dt),
                      0.3 * torch.randn(h, c, dtype=dt),
                      1 + 0.2 * torch.randn(h, dtype=dt),
                      0.1 * torch.randn(h, dtype=dt),
                      0.3 * torch.randn(c, h, dtype=dt))
    state = CEState(
        torch.eye(d, dtype=dt).repeat(c // d, 1, 1) +
        0.05 * torch.randn(c // d, d, d, dtype=dt),
        torch.full((1, ), 1.3, dtype=dt))
    return mean, gram, var, params, state


@pytest.mark.parametrize('n,c,d,hw,iters', [(2, 32, 16, 35, 3),
                                            (1, 16, 8, 1, 1),
                                            (3, 64, 32, 9, 5),
                                            (2, 16, 16, 4, 2)])
@pytest.mark.parametrize('training', [True, False])
@pytest.mark.parametrize('synced', [False, True])
def test_hand_backward_matches_autograd(n, c, d, hw, iters, training,
                                        synced):
    mean, gram, var, params, state = setup(n, c, d, hw)
    config = CEConfig(group_size=d, num_iters=iters)
    second = gram if training else var
    # SyncCE as if a second process had the same batch
    reduce_fn = (lambda t: 2 * t) if synced and training else None
    a, wm, scale, cache = small_graph.forward(mean, second, hw, params,
                                              state, config, training,
                                              reduce_fn)
    leaves = [mean.clone().requires_grad_(),
              second.clone().requires_grad_()] + [
                  p.clone().requires_grad_() for p in params]
    a_ref = small_graph.forward(leaves[0], leaves[1], hw,
                                CEParams(*leaves[2:]), state, config,
                                training, reduce_fn)[0]
    assert torch.equal(a, a_ref.detach())
    grad_a = torch.randn_like(a)
    ref = torch.autograd.grad(a_ref, leaves, grad_a, allow_unused=True)
    d_mean, d_second, d_params = small_graph.backward(
        grad_a, cache, hw, params, config, training, reduce_fn)
    names = ['mean', 'second'] + list(CEParams._fields)
    for name, got, want in zip(names, [d_mean, d_second] + d_params, ref):
        if want is None:  # eval: the means do not enter A
            assert not got.any(), name
        else:
            assert got.shape == want.shape, name
            assert rel_err(got, want) < 1e-10, name


def test_unbiased_divisor_is_recomputed_at_every_traced_size():
    """``H*W - 1``, and 1 at ``H*W = 1``, also in a ``torch.jit`` trace
    made at another size (a size is a 0-dim tensor there, and a Python
    ``max`` would keep the traced size's branch)."""
    divisor = small_graph.unbiased_divisor
    assert [divisor(hw) for hw in (1, 2, 5)] == [1, 1, 4]
    traced = torch.jit.trace(lambda x: x.sum(-1) / divisor(x.shape[-1]),
                             torch.ones(1, 5))
    assert traced(torch.ones(1, 5)).item() == 1.25
    assert traced(torch.ones(1, 1)).item() == 1.0
