"""SyncCE over 2 gloo processes equals single-process CE on the whole batch;
which SyncBNs before CE are fused in a run of several processes."""
import copy
import functools
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ce_mmdet.models import ChannelEquilibrium
from ce_mmdet.utils.torch_version import compiles_ce

TOL = 1e-10


def make_layer():
    torch.manual_seed(0)
    layer = ChannelEquilibrium(16, group_size=8, num_iters=3).double()
    with torch.no_grad():
        layer.gate.fill_(0.4)
        layer.norm.bias.normal_(0, 0.1)
    return layer


def make_data(n):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 16, 5, 6, generator=gen, dtype=torch.float64)
    x = x * torch.rand(1, 16, 1, 1, generator=gen, dtype=torch.float64) + 0.3
    grad = torch.randn(n, 16, 5, 6, generator=gen, dtype=torch.float64)
    return x, grad


def single_process(n):
    layer = make_layer().train()
    layer.sync = True  # no process group: plain CE
    x, grad = make_data(n)
    x.requires_grad_()
    out = layer(x)
    out.backward(grad)
    return dict(
        out=out.detach(),
        grad_x=x.grad,
        grads={k: p.grad.clone()
               for k, p in layer.named_parameters()},
        buffers={k: b.clone()
                 for k, b in layer.named_buffers()})


def rank_data(rank, splits):
    """This rank's input and output gradient: a slice of the global batch,
    or (``splits`` given as shapes) its own tensor of its own size."""
    if isinstance(splits[0], tuple):
        gen = torch.Generator().manual_seed(10 + rank)
        x = torch.randn(splits[rank], generator=gen, dtype=torch.float64)
        return 0.7 * x + 0.2, torch.randn(
            splits[rank], generator=gen, dtype=torch.float64)
    x, grad = make_data(sum(splits))
    start = sum(splits[:rank])
    sl = slice(start, start + splits[rank])
    return x[sl], grad[sl]


def worker(rank, world, init_file, splits, result_dir, momentum=0.1,
           impl='torch', compiled=False):
    dist.init_process_group(
        'gloo', init_method=f'file://{init_file}', rank=rank,
        world_size=world)
    try:
        layer = make_layer().train()
        layer.sync = True
        layer.momentum = momentum
        x, grad = rank_data(rank, splits)
        if impl == 'triton':  # float32 kernels (interpreter on CPU)
            layer, x, grad = layer.float(), x.float(), grad.float()
            layer.impl = impl
        forward = layer
        if compiled:  # mmengine's compile=True; the all-reduce in the graph
            # (where the torch traces CE: below, the op runs eagerly)
            forward = torch.compile(layer, backend='aot_eager',
                                    fullgraph=compiles_ce(torch.__version__))
        xr = x.clone().requires_grad_()
        out = forward(xr)
        out.backward(grad)
        torch.save(
            dict(
                out=out.detach(),
                grad_x=xr.grad,
                grads={k: p.grad
                       for k, p in layer.named_parameters()},
                buffers={k: b
                         for k, b in layer.named_buffers()}),
            os.path.join(result_dir, f'rank{rank}.pth'))
    finally:
        dist.destroy_process_group()


def spawn(fn, nprocs, *args):
    """``fn(rank, *args)`` in ``nprocs`` spawned processes; raises what a
    process raised."""
    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False,
                             start_method='spawn')
    try:
        while not ctx.join(timeout=120):
            pass
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


def run_ranks(splits, tmp_path, momentum=0.1, impl='torch', compiled=False):
    spawn(worker, len(splits), len(splits), str(tmp_path / 'dist_init'),
          splits, str(tmp_path), momentum, impl, compiled)
    return [
        torch.load(tmp_path / f'rank{r}.pth', weights_only=True)
        for r in range(len(splits))
    ]


def skip_without_triton():
    from ce_mmdet.ops.impl import triton_importable, triton_interpreting
    if not triton_importable() or not (torch.cuda.is_available()
                                       or triton_interpreting()):
        pytest.skip('needs triton (and a GPU or TRITON_INTERPRET=1)')


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


@pytest.mark.timeout(300)
@pytest.mark.parametrize('splits,compiled', [((2, 2), False),
                                             ((3, 1), False),
                                             ((3, 1), True)])
def test_sync_ce_equals_global_batch(splits, compiled, tmp_path):
    """Also under torch.compile (fullgraph: dynamo traces the all-reduce
    of the batch sums, forward and backward, without a graph break; below
    MIN_TORCH_COMPILE the op, all-reduce included, runs eagerly)."""
    ref = single_process(sum(splits))
    ranks = run_ranks(list(splits), tmp_path, compiled=compiled)
    out = torch.cat([r['out'] for r in ranks])
    grad_x = torch.cat([r['grad_x'] for r in ranks])
    assert rel(out, ref['out']) < TOL
    assert rel(grad_x, ref['grad_x']) < TOL
    for name, g in ref['grads'].items():
        # DDP would sum/average these; the sum over ranks is the global grad
        total = sum(r['grads'][name] for r in ranks)
        assert rel(total, g) < TOL, name
    for name, b in ref['buffers'].items():
        for r in ranks:
            assert rel(r['buffers'][name], b) < TOL, name
    # and it differs from what each rank would compute alone
    alone = make_layer().train()
    x, _ = make_data(sum(splits))
    assert rel(alone(x[:splits[0]]), ranks[0]['out']) > 1e-6


@pytest.mark.timeout(300)
def test_sync_ce_triton_equals_global_batch(tmp_path):
    """SyncCE with the Triton kernels (the batch sums and their gradient
    all-reduced between the small-graph kernels): the float64
    single-process result to fp32 accuracy."""
    skip_without_triton()
    ref = single_process(4)
    ranks = run_ranks([3, 1], tmp_path, impl='triton')
    out = torch.cat([r['out'] for r in ranks])
    assert rel(out.double(), ref['out']) < 1e-3
    grad_x = torch.cat([r['grad_x'] for r in ranks])
    assert rel(grad_x.double(), ref['grad_x']) < 1e-3
    for name, g in ref['grads'].items():
        total = sum(r['grads'][name] for r in ranks)
        assert rel(total.double(), g) < 1e-3, name
    for name, b in ref['buffers'].items():
        for r in ranks:
            assert rel(r['buffers'][name].double(), b) < 1e-3, name


@pytest.mark.timeout(300)
def test_sync_ce_with_different_spatial_sizes(tmp_path):
    """Detection pads each process's batch to its own size: the whitening
    uses every position of every process, the IR scale every sample."""
    from ce_mmdet.testing import ce_reference
    shapes = [(2, 16, 5, 6), (1, 16, 4, 7)]
    ranks = run_ranks(shapes, tmp_path, momentum=1.0)
    xs = [rank_data(r, shapes)[0] for r in range(2)]
    layer = make_layer()
    # W of the pooled positions: the transcription on a (1, C, 1, M) tensor
    pooled = torch.cat([x.transpose(0, 1).reshape(16, -1) for x in xs], 1)
    _, wm, _ = ce_reference(
        pooled[None, :, None], layer.gate, layer.fc1.weight, layer.norm.weight,
        layer.norm.bias, layer.fc2.weight, layer.running_wm,
        layer.running_scale, 8, 3, layer.eps, 1.0, True)
    scale = torch.cat([x.var(dim=(2, 3)).reshape(-1) for x in xs]).mean()
    scale = scale.sqrt().reshape(1)
    for r, x in enumerate(xs):
        assert rel(ranks[r]['buffers']['running_wm'], wm) < TOL
        assert rel(ranks[r]['buffers']['running_scale'], scale) < TOL
        # the training output is the eval formula with those statistics
        expected, _, _ = ce_reference(
            x, layer.gate, layer.fc1.weight, layer.norm.weight,
            layer.norm.bias, layer.fc2.weight, wm, scale, 8, 3, layer.eps,
            0.0, False)
        assert rel(ranks[r]['out'], expected.detach()) < TOL


def test_sync_flag_in_configs_and_eval_is_plain():
    layer = ChannelEquilibrium(16, group_size=8, sync=True).eval()
    plain = copy.deepcopy(layer)
    plain.sync = False
    x = torch.randn(2, 16, 4, 4)
    assert torch.equal(layer(x), plain(x))
    assert 'sync=True' in repr(layer)
    with pytest.raises(TypeError, match='sync must be a bool'):
        ChannelEquilibrium(16, sync=1)


def sync_bn_worker(rank, init_file, result_dir):
    """With a process group of 2: a SyncBN in eval mode, or in training
    with a process group of its own process only, does not synchronise and
    is fused (bitwise nn.BatchNorm2d's result, no hook runs); one in
    training across both processes before a CE layer in eval mode is
    called as a module (the fold of a SyncBN needs CE's batch
    statistics)."""
    from ce_mmdet.ops import is_plain_batchnorm
    dist.init_process_group('gloo', init_method=f'file://{init_file}',
                            rank=rank, world_size=2)
    try:
        # every process makes every group; each SyncBN gets its own
        own_group = [dist.new_group([r]) for r in range(2)][rank]
        x, _ = rank_data(rank, [2, 2])
        found = {}
        for key, bn_training, ce_training, group in [
                ('eval', False, False, None),
                ('train, own group', True, True, own_group),
                ('train, CE in eval', True, False, None)]:
            bn2d, sync = make_bns()
            bn2d.train(bn_training)
            sync.train(bn_training)
            sync.process_group = group
            calls = []
            sync.register_forward_pre_hook(lambda *a: calls.append(1))
            layer = make_layer().train(ce_training)
            if is_plain_batchnorm(sync):
                out = copy.deepcopy(layer)(x, bn=sync)
                same = torch.equal(out, layer(x, bn=bn2d)) and all(
                    torch.equal(sync.state_dict()[k], v)
                    for k, v in bn2d.state_dict().items())
                found[key] = ('fused', calls, same)
            else:
                try:  # torch's SyncBN takes GPU tensors only
                    layer(x, bn=sync)
                    error = ''
                except ValueError as e:
                    error = str(e)
                found[key] = ('called', calls, error)
        torch.save(found, os.path.join(result_dir, f'bn{rank}.pth'))
    finally:
        dist.destroy_process_group()


def make_bns():
    """A BatchNorm2d and a SyncBatchNorm with the same state (float64)."""
    torch.manual_seed(3)
    bn2d = torch.nn.BatchNorm2d(16).double()
    with torch.no_grad():
        bn2d.weight.uniform_(0.5, 1.5)
        bn2d.bias.normal_(0, 0.2)
        bn2d.running_mean.normal_(0, 0.3)
        bn2d.running_var.uniform_(0.5, 2)
    sync = torch.nn.SyncBatchNorm(16).double()
    sync.load_state_dict(bn2d.state_dict())
    return bn2d, sync


def bn_ce_results(layer, bn, out, x):
    """What a rank (or the reference) reports of a BN + CE step."""
    return dict(out=out.detach(), grad_x=x.grad,
                grads={k: p.grad.clone() for k, p in layer.named_parameters()},
                bn_grads={k: p.grad.clone() for k, p in bn.named_parameters()},
                buffers={k: b.clone() for k, b in layer.named_buffers()},
                bn_buffers={k: b.clone() for k, b in bn.named_buffers()})


def sync_bn_train_worker(rank, init_file, result_dir, splits, ce_sync,
                         impl, compiled=False):
    dist.init_process_group('gloo', init_method=f'file://{init_file}',
                            rank=rank, world_size=len(splits))
    try:
        layer = make_layer().train()
        layer.sync = ce_sync
        _, sync = make_bns()
        x, grad = rank_data(rank, splits)
        if impl == 'triton':  # float32 kernels (interpreter on CPU)
            layer, sync = layer.float(), sync.float()
            x, grad = x.float(), grad.float()
            layer.impl = impl
        calls = []
        sync.register_forward_pre_hook(lambda *a: calls.append(1))
        x.requires_grad_()
        forward = functools.partial(layer, bn=sync, relu=True)
        if compiled:  # both all-reduces in the graph, forward and backward
            forward = torch.compile(forward, backend='aot_eager',
                                    fullgraph=compiles_ce(torch.__version__))
        out = forward(x)
        out.backward(grad)
        found = bn_ce_results(layer, sync, out, x)
        found['calls'] = calls
        torch.save(found, os.path.join(result_dir, f'train{rank}.pth'))
    finally:
        dist.destroy_process_group()


def bn_ce_reference(splits, ce_sync):
    """One process: BN on the global batch, then CE on it (SyncCE) or on
    each rank's part (a CE layer of its own each)."""
    x, grad = make_data(sum(splits))
    bn2d, _ = make_bns()
    x.requires_grad_()
    layer = make_layer().train()
    if ce_sync:
        out = layer(x, bn=bn2d, relu=True)
        out.backward(grad)
        return [bn_ce_results(layer, bn2d, out, x)]
    y = bn2d(x)
    parts, start = [], 0
    layers = [copy.deepcopy(layer) for _ in splits]
    for part, n in zip(layers, splits):
        parts.append(part(y[start:start + n], relu=True))
        start += n
    out = torch.cat(parts)
    out.backward(grad)
    return [bn_ce_results(part, bn2d, out, x) for part in layers]


@pytest.mark.timeout(300)
@pytest.mark.parametrize('splits,ce_sync,compiled', [((2, 2), True, False),
                                                     ((3, 1), False, False),
                                                     ((3, 1), True, True)])
def test_sync_bn_in_training_is_fused_and_equals_global_batch(
        splits, ce_sync, compiled, tmp_path):
    """A SyncBN across processes before CE in training is folded into the
    op, its statistics summed over the processes: each rank's output, its
    input gradient, the BN's running statistics are those of one process's
    BN on the global batch (with SyncCE, CE's too), and the BN's and CE's
    parameter gradients sum over the ranks to the global ones (DDP sums
    them). torch's own SyncBN takes no CPU tensors; this one does. Also
    under torch.compile (fullgraph where the torch traces CE)."""
    spawn(sync_bn_train_worker, len(splits), str(tmp_path / 'dist_init'),
          str(tmp_path), list(splits), ce_sync, 'torch', compiled)
    ranks = [torch.load(tmp_path / f'train{r}.pth', weights_only=True)
             for r in range(len(splits))]
    refs = bn_ce_reference(splits, ce_sync)
    ref = refs[0]
    assert all(r['calls'] == [] for r in ranks)  # fused
    assert rel(torch.cat([r['out'] for r in ranks]), ref['out']) < TOL
    assert rel(torch.cat([r['grad_x'] for r in ranks]), ref['grad_x']) < TOL
    for name, g in ref['bn_grads'].items():
        assert rel(sum(r['bn_grads'][name] for r in ranks), g) < TOL, name
    for name, b in ref['bn_buffers'].items():
        for r in ranks:
            assert rel(r['bn_buffers'][name].double(), b.double()) < TOL, name
    if ce_sync:
        for name, g in ref['grads'].items():
            assert rel(sum(r['grads'][name] for r in ranks), g) < TOL, name
        for name, b in ref['buffers'].items():
            for r in ranks:
                assert rel(r['buffers'][name], b) < TOL, name
    else:  # CE on each rank's own batch
        for r, part in zip(ranks, refs):
            for name, g in part['grads'].items():
                assert rel(r['grads'][name], g) < TOL, name
            for name, b in part['buffers'].items():
                assert rel(r['buffers'][name], b) < TOL, name
    # and the BN's statistics differ from each rank's own batch's
    alone = make_bns()[0]
    alone(make_data(sum(splits))[0][:splits[0]])
    assert rel(alone.running_var, ref['bn_buffers']['running_var']) > 1e-6


@pytest.mark.timeout(600)
def test_sync_bn_in_training_triton_equals_global_batch(tmp_path):
    """The same with the Triton kernels (the BN's sums all-reduced between
    the statistics and group kernels, and between the two launches of the
    input gradient's maps), with SyncCE: the float64 single-process result
    to fp32 accuracy."""
    skip_without_triton()
    splits = [3, 1]
    spawn(sync_bn_train_worker, 2, str(tmp_path / 'dist_init'),
          str(tmp_path), splits, True, 'triton')
    ranks = [torch.load(tmp_path / f'train{r}.pth', weights_only=True)
             for r in range(2)]
    ref = bn_ce_reference(splits, True)[0]
    assert all(r['calls'] == [] for r in ranks)
    for key in ('out', 'grad_x'):
        got = torch.cat([r[key] for r in ranks]).double()
        assert rel(got, ref[key]) < 1e-3, key
    for kind in ('grads', 'bn_grads'):
        for name, g in ref[kind].items():
            total = sum(r[kind][name] for r in ranks).double()
            assert rel(total, g) < 1e-3, name
    for kind in ('buffers', 'bn_buffers'):
        for name, b in ref[kind].items():
            for r in ranks:
                assert rel(r[kind][name].double(), b.double()) < 1e-3, name


@pytest.mark.timeout(300)
def test_sync_bn_fused_where_it_does_not_synchronise(tmp_path):
    """Validation and test of a multi-GPU run of a ``*_syncbn`` config put
    its SyncBNs in eval mode: fused like nn.BatchNorm2d. A SyncBN in
    training across processes before CE in eval mode is called as a
    module (on CPU torch then refuses it: it needs GPU tensors)."""
    spawn(sync_bn_worker, 2, str(tmp_path / 'dist_init'), str(tmp_path))
    for rank in range(2):
        found = torch.load(tmp_path / f'bn{rank}.pth', weights_only=True)
        assert found['eval'] == ('fused', [], True)
        assert found['train, own group'] == ('fused', [], True)
        how, calls, error = found['train, CE in eval']
        assert (how, calls) == ('called', [1])
        assert error == '' or 'expected input tensor to be on GPU' in error
