"""SyncCE over 2 gloo processes equals single-process CE on the whole batch."""
import copy
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


def run_ranks(splits, tmp_path, momentum=0.1, impl='torch', compiled=False):
    init_file = str(tmp_path / 'dist_init')
    ctx = mp.start_processes(
        worker,
        args=(len(splits), init_file, splits, str(tmp_path), momentum, impl,
              compiled),
        nprocs=len(splits),
        join=False,
        start_method='spawn')
    try:
        while not ctx.join(timeout=120):
            pass
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return [
        torch.load(tmp_path / f'rank{r}.pth', weights_only=True)
        for r in range(len(splits))
    ]


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
    from ce_mmdet.ops.impl import triton_importable, triton_interpreting
    if not triton_importable() or not (torch.cuda.is_available()
                                       or triton_interpreting()):
        pytest.skip('needs triton (and a GPU or TRITON_INTERPRET=1)')
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
