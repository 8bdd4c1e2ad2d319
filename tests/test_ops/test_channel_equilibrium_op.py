"""The functional ops: their signatures, argument checks and numerics (the
float64 comparisons against the reference are in the layer's tests, which
go through these ops)."""
import inspect

import pytest
import torch

from ce_mmdet.ops import (BatchNormArgs, CEConfig, CEParams, CEState,
                          batchnorm_channel_equilibrium, channel_equilibrium)
from ce_mmdet.testing import ce_reference


def positional_parameters(fn):
    return [
        p for p in inspect.signature(fn).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]


def test_ops_take_at_most_four_positional_parameters():
    assert len(positional_parameters(channel_equilibrium)) <= 4
    assert len(positional_parameters(batchnorm_channel_equilibrium)) <= 4


def make(c=32, d=16, dtype=torch.float64):
    torch.manual_seed(0)
    h = c // 4
    params = CEParams(
        torch.full((1, ), 0.2, dtype=dtype),
        0.3 * torch.randn(h, c, dtype=dtype),
        1 + 0.1 * torch.randn(h, dtype=dtype),
        0.1 * torch.randn(h, dtype=dtype),
        0.3 * torch.randn(c, h, dtype=dtype))
    state = CEState(torch.eye(d, dtype=dtype).repeat(c // d, 1, 1),
                    torch.ones(1, dtype=dtype))
    return params, state


@pytest.mark.parametrize('training', [True, False])
def test_functional_op_matches_reference(training):
    params, state = make()
    config = CEConfig(group_size=16, num_iters=4, momentum=0.3)
    x = torch.randn(2, 32, 4, 5, dtype=torch.float64)
    ref, ref_wm, ref_scale = ce_reference(x, *params, *state, 16, 4, 1e-5,
                                          0.3, training)
    out = channel_equilibrium(x, params, state, config=config,
                              training=training)
    assert torch.allclose(out, ref, rtol=1e-10, atol=1e-12)
    assert torch.allclose(state.running_wm, ref_wm, rtol=1e-10, atol=1e-12)
    assert torch.allclose(state.running_scale, ref_scale, rtol=1e-10)


def test_keyword_only_arguments():
    params, state = make()
    x = torch.randn(2, 32, 4, 5, dtype=torch.float64)
    with pytest.raises(TypeError):
        channel_equilibrium(x, params, state, CEConfig(), True)
    with pytest.raises(TypeError, match='BatchNormArgs'):
        batchnorm_channel_equilibrium(x, torch.nn.BatchNorm2d(32), params,
                                      state, config=CEConfig(),
                                      training=True)


@pytest.mark.parametrize('kwargs,error,match', [
    (dict(group_size=0), ValueError, 'group_size must be >= 1'),
    (dict(group_size=2.0), TypeError, 'group_size must be an int'),
    (dict(num_iters=0), ValueError, 'num_iters must be >= 1'),
    (dict(eps=-1.0), ValueError, 'eps must be a positive'),
    (dict(momentum=2), ValueError, r'momentum must be in \[0, 1\]'),
])
def test_config_is_validated(kwargs, error, match):
    with pytest.raises(error, match=match):
        CEConfig(**kwargs)


def test_input_checks_name_the_problem():
    params, state = make()
    config = CEConfig(group_size=16)
    with pytest.raises(ValueError, match='need 32'):
        channel_equilibrium(torch.randn(2, 48, 3, 3, dtype=torch.float64),
                            params, state, config=config, training=True)
    with pytest.raises(ValueError, match='contiguous 4-D'):
        channel_equilibrium(
            torch.randn(2, 32, 3, 6, dtype=torch.float64)[..., ::2], params,
            state, config=config, training=True)
    bn = BatchNormArgs.from_module(torch.nn.BatchNorm2d(16).double())
    with pytest.raises(ValueError, match=r'BN weight has shape \(16,\)'):
        batchnorm_channel_equilibrium(
            torch.randn(2, 32, 3, 3, dtype=torch.float64), bn, params, state,
            config=config, training=True)


def test_sync_bn_reduce_needs_batch_statistics_in_bn_and_ce():
    """``bn_reduce_fn`` (a SyncBN across processes) is taken only where the
    op folds a batch-statistics BN; in one process (the sum over one
    process: a copy) it gives the plain BN's result, and a one-position
    batch is allowed (the count is every process's)."""
    params, state = make()
    z = torch.randn(2, 32, 3, 4, dtype=torch.float64) + 0.4
    bn = torch.nn.BatchNorm2d(32).double()
    for bn_training, training in ((False, True), (True, False)):
        with pytest.raises(ValueError, match='needs batch statistics in the '
                           'BN and CE'):
            batchnorm_channel_equilibrium(
                z, BatchNormArgs.from_module(bn.train(bn_training)), params,
                state, config=CEConfig(group_size=16), training=training,
                bn_reduce_fn=torch.clone)
    results = []
    for reduce in (None, torch.clone):
        bn = torch.nn.BatchNorm2d(32).double()
        zr = z.clone().requires_grad_()
        out = batchnorm_channel_equilibrium(
            zr, BatchNormArgs.from_module(bn), *make(), config=CEConfig(),
            training=True, bn_reduce_fn=reduce, impl='torch')
        out.square().sum().backward()
        results.append((out, zr.grad, bn.running_var))
    for got, want in zip(*results):
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)
    one = batchnorm_channel_equilibrium(
        z[:1, :, :1, :1].contiguous(), BatchNormArgs.from_module(bn),
        *make(), config=CEConfig(), training=True, bn_reduce_fn=torch.clone)
    assert one.shape == (1, 32, 1, 1) and torch.isfinite(one).all()


def test_batchnorm_args_follow_the_module():
    bn = torch.nn.BatchNorm2d(8, momentum=None, track_running_stats=False)
    args = BatchNormArgs.from_module(bn.eval())
    assert args.running_mean is None and args.num_batches_tracked is None
    assert args.uses_batch_stats  # no running stats: batch stats in eval
    bn = torch.nn.BatchNorm2d(8).eval()
    args = BatchNormArgs.from_module(bn)
    assert args.running_var is bn.running_var and not args.uses_batch_stats


def _bn_ce_step(dtype, offset, fold, monkeypatch):
    """One training step of CE(BN(z)) through the op (BN and CE with batch
    statistics); ``fold`` picks the torch implementation's folded BN or the
    BN's own pass (``native_batch_norm``, the path the Triton implementation
    takes)."""
    from ce_mmdet.ops import torch_impl
    monkeypatch.setattr(torch_impl.TorchPasses, 'fuses_batch_bn', fold)
    params, state = make(dtype=torch.float64)
    params = CEParams(*(p.to(dtype).requires_grad_() for p in params))
    state = CEState(*(s.to(dtype) for s in state))
    torch.manual_seed(5)
    bn = torch.nn.BatchNorm2d(32, momentum=0.3).double()
    with torch.no_grad():  # (drawn in float64: the same values for all)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_(0, 0.3)
        bn.running_mean.normal_(0, 0.3)
    bn = bn.to(dtype)
    z = torch.randn(3, 32, 5, 7, dtype=torch.float64) * 2 + offset
    z = z.to(dtype).requires_grad_()
    out = batchnorm_channel_equilibrium(
        z, BatchNormArgs.from_module(bn), params, state,
        config=CEConfig(group_size=16, num_iters=4, momentum=0.3),
        training=True)
    g = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator(
    ).manual_seed(6)).to(dtype)
    grads = torch.autograd.grad(out, [z, bn.weight, bn.bias, *params], g)
    return [out, *grads, bn.running_mean, bn.running_var, *state]


@pytest.mark.parametrize('dtype,offset,tol', [
    (torch.float64, 0.0, 1e-12),
    (torch.float32, 0.0, 1e-5),
    # channel means 10x their std: the BN variance from E[z^2] - E[z]^2
    (torch.float32, 20.0, 1e-3),
])
def test_folded_batch_bn_matches_the_bn_pass(dtype, offset, tol, monkeypatch):
    """The torch implementation folds a batch-statistics BN into the op (its
    statistics from z's Gram matrices, its backward into the input
    gradient's maps): output, every gradient and the running buffers equal
    the computation with the BN's own pass, in float64; float32 stays within
    ``tol`` of float64."""
    ref = _bn_ce_step(torch.float64, offset, False, monkeypatch)
    got = _bn_ce_step(dtype, offset, True, monkeypatch)
    names = ['out', 'z', 'bn.weight', 'bn.bias', *CEParams._fields,
             'bn.running_mean', 'bn.running_var', *CEState._fields]
    for name, a, b in zip(names, got, ref, strict=True):
        err = ((a.double() - b).abs().max() / b.abs().max()).item()
        assert err < tol, (name, err)


def _impls():
    from ce_mmdet.ops.impl import triton_device
    return ['torch'] + (['triton'] if triton_device() == 'cpu' else [])


@pytest.mark.parametrize('impl', _impls())
@pytest.mark.parametrize(
    'with_bn,bn_training,training,sync,grad,sync_bn',
    [
        (False, False, True, False, True, False),  # CE alone, training
        (False, False, False, False, True, False),  # CE alone, eval
        (True, False, False, False, False, False),  # inference (BN folded)
        (True, False, False, False, True, False),  # norm_eval training
        (True, False, True, False, True, False),  # eval BN, CE in training
        (True, True, True, False, True, False),  # batch-statistics BN, CE
        (True, True, True, True, True, False),  # the same, SyncCE
        (True, True, True, True, True, True),  # SyncBN and SyncCE
    ])
def test_no_host_sync_in_any_mode(impl, with_bn, bn_training, training, sync,
                                  grad, sync_bn):
    """Neither forward nor backward makes a GPU's host wait for the device
    (no value read into Python, no tensor made from Python data): a
    launch-bound step runs at the GPU's speed only while the host queues
    kernels ahead of it (``LaunchCounter.host_syncs``, seen on the CPU)."""
    from ce_mmdet.analysis.launches import LaunchCounter
    params, state = make(c=32, d=16, dtype=torch.float32)
    params = CEParams(*(p.requires_grad_(grad) for p in params))
    bn = torch.nn.BatchNorm2d(32).train(bn_training)
    z = (torch.randn(2, 32, 4, 6) + 0.5).requires_grad_(grad)
    kwargs = dict(config=CEConfig(group_size=16), training=training,
                  reduce_fn=torch.clone if sync else None, impl=impl)
    for _ in range(2):  # the second call: no first-call work ('auto')
        with LaunchCounter() as counter:
            if with_bn:
                out = batchnorm_channel_equilibrium(
                    z, BatchNormArgs.from_module(bn), params, state,
                    bn_reduce_fn=torch.clone if sync_bn else None, **kwargs)
            else:
                out = channel_equilibrium(z, params, state, **kwargs)
            if grad:
                out.backward(torch.ones_like(out))
    assert counter.host_syncs == 0, dict(counter.syncs)
    assert counter.total > 0


@pytest.mark.parametrize('impl', _impls())
@pytest.mark.parametrize('with_bn', [False, True])
def test_without_autograd_the_op_skips_the_function(impl, with_bn,
                                                    monkeypatch):
    """Where autograd has nothing to record (inference, frozen stages) the
    op runs its forward body without an autograd Function (~10% of an
    inference layer's host time): the same output as with autograd, the
    statistics outputs empty, and an input written in place has its
    version moved, as ``mark_dirty`` would."""
    from ce_mmdet.ops import functions
    from ce_mmdet.ops.impl import passes_for
    params, state = make(c=32, d=16, dtype=torch.float32)
    bn = torch.nn.BatchNorm2d(32).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-0.3, 0.3)
        bn.running_var.uniform_(0.5, 1.5)
    z = torch.randn(2, 32, 5, 7) + 0.5
    kwargs = dict(config=CEConfig(group_size=16), training=False, impl=impl)

    def run(z, params, inplace=False):
        if with_bn:
            return batchnorm_channel_equilibrium(
                z, BatchNormArgs.from_module(bn), params, state,
                inplace=inplace, **kwargs)
        return channel_equilibrium(z, params, state, inplace=inplace,
                                   **kwargs)

    want = run(z.clone().requires_grad_(),
               CEParams(*(p.clone().requires_grad_() for p in params)))
    assert want.grad_fn is not None

    def no_function(*args):
        raise AssertionError('an autograd Function ran without autograd')

    monkeypatch.setattr(functions._CEFunction, 'apply', no_function)
    monkeypatch.setattr(functions._BNCEFunction, 'apply', no_function)
    bn.requires_grad_(False)
    got = run(z.clone(), params)  # nothing requires grad (a frozen stage)
    assert got.grad_fn is None
    torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-5)
    mine = z.clone()
    version = mine._version
    with torch.no_grad():
        got = run(mine.requires_grad_(), params, inplace=True)
    torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-5)
    if got is mine:
        assert mine._version > version
    with torch.inference_mode():  # (inference tensors have no version)
        got = run(z.clone(), params, inplace=True)
    torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-5)
    # the op's own entry: the statistics outputs of an eval call are empty
    call = functions.OpCall(config=kwargs['config'], training=False,
                            passes=passes_for(impl, z))
    outs = functions.channel_equilibrium(z.clone(), params, state, call)
    assert [t.numel() for t in outs[1:]] == [0, 0]


@pytest.mark.parametrize('impl', _impls())
@pytest.mark.parametrize('bn_training', [True, False])
def test_training_mode_without_autograd_updates_the_same_state(impl,
                                                               bn_training):
    """CE in training mode under ``torch.no_grad`` (statistics
    recalibration, EMA-style evaluation in train mode): the op runs without
    its autograd Function and gives the output and the running-state
    updates (CE's and the BN's) of the same call with autograd."""
    results = []
    for grad in (True, False):
        params, state = make(c=32, d=16, dtype=torch.float32)
        params = CEParams(*(p.requires_grad_(grad) for p in params))
        torch.manual_seed(1)
        bn = torch.nn.BatchNorm2d(32).train(bn_training)
        with torch.no_grad():
            bn.running_var.uniform_(0.5, 1.5)
        z = torch.randn(2, 32, 5, 7) + 0.5
        with torch.set_grad_enabled(grad):
            out = batchnorm_channel_equilibrium(
                z.requires_grad_(grad), BatchNormArgs.from_module(bn), params,
                state, config=CEConfig(group_size=16), training=True,
                impl=impl)
        assert (out.grad_fn is not None) == grad
        results.append([out.detach(), *state, bn.running_mean.clone(),
                        bn.running_var.clone(), bn.num_batches_tracked])
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('impl', _impls())
@pytest.mark.parametrize(
    'with_bn,bn_training,training,relu',
    [
        (False, False, True, False),  # CE alone, training
        (False, False, False, True),  # CE alone, eval, the block tail
        (True, True, True, True),  # batch-statistics BN folded, tail
        (True, False, True, False),  # eval BN, CE in training
        (True, False, False, False),  # norm_eval training (BN folded)
    ])
def test_second_derivative_raises_instead_of_leaving_out_ce(
        impl, with_bn, bn_training, training, relu):
    """The backward is derived by hand and is not differentiable: with
    ``create_graph=True`` the first derivatives are the usual ones, and a
    second derivative that reaches them raises, through the incoming
    gradient or the op's inputs, by ``autograd.grad`` (which would skip an
    unjoined node) or ``backward`` (before, an autograd.grad Hessian-vector
    product of CE in training was off by 11% with no error)."""
    dtype = torch.float64 if impl == 'torch' else torch.float32
    params, state = make(c=32, d=16, dtype=dtype)
    config = CEConfig(group_size=16, momentum=0.0)
    torch.manual_seed(1)
    bn = torch.nn.BatchNorm2d(32).to(dtype).train(bn_training)
    z0 = torch.randn(2, 32, 4, 6, dtype=dtype) + 0.5
    residual = torch.randn_like(z0) if relu else None

    def grads(create_graph):
        z = z0.clone().requires_grad_()
        ps = CEParams(*(p.detach().clone().requires_grad_() for p in params))
        kwargs = dict(config=config, training=training, impl=impl,
                      residual=residual, relu=relu)
        if with_bn:
            out = batchnorm_channel_equilibrium(
                z, BatchNormArgs.from_module(bn), ps, state, **kwargs)
        else:
            out = channel_equilibrium(z, ps, state, **kwargs)
        bn_params = tuple(bn.parameters()) if with_bn else ()
        inputs = (z, ps.fc1_weight, *bn_params)
        got = torch.autograd.grad((out**2).sum(), inputs,
                                  create_graph=create_graph)
        return inputs, got

    _, plain = grads(create_graph=False)
    inputs, first = grads(create_graph=True)
    for got, want in zip(first, plain):
        assert got.requires_grad
        torch.testing.assert_close(got.detach(), want, rtol=0, atol=0)
    for wrt in inputs[:2]:
        with pytest.raises(RuntimeError, match='second derivative'):
            torch.autograd.grad((first[0]**2).sum(), wrt)
    with pytest.raises(RuntimeError, match='second derivative'):
        (first[1]**2).sum().backward()


def test_second_derivative_of_a_weight_before_ce_raises():
    """The case ``once_differentiable`` gets silently wrong: conv -> CE,
    ``g = dL/dx`` with ``create_graph=True``, then ``d|g|^2/d(conv
    weight)`` by ``autograd.grad``, which also has a path that does not
    pass through CE's backward (with ``once_differentiable`` it returned
    that path's terms alone, 57% off the float64 reference, and no
    error)."""
    params, state = make(c=16, d=8)
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 16, 3, padding=1).double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    out = channel_equilibrium(conv(x), params, state,
                              config=CEConfig(group_size=8, momentum=0.0),
                              training=True)
    g, = torch.autograd.grad((out**2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match='second derivative'):
        torch.autograd.grad((g**2).sum(), conv.weight)
