"""CE's Triton kernels compile for an H100/H200 (sm_90) with Triton's
compiler and ptxas, on this CPU machine: no compile error, shared memory
within a program's limit, no register spills in the passes over the feature
map and a few bytes at most in the small graph's kernels (but the known
d = 64 Newton kernels), for every kernel and the constexpr branches CE
layers use (train, norm_eval, inference, SyncCE; float32 and half inputs;
group sizes 16 and 64; H*W aligned or not)."""
import dataclasses
import json
import os
import os.path as osp
import subprocess
import sys

import pytest
import torch

from ce_mmdet.analysis.triton_aot import (SHARED_MEMORY_LIMIT, KernelReport,
                                          LaunchRecord, occupancy, problems)
from ce_mmdet.ops.impl import triton_importable

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
TOOL = osp.join(ROOT, 'tools', 'analysis_tools', 'triton_aot_check.py')


def _nvidia_tools():
    if not triton_importable():
        return False
    try:
        from triton import knobs  # triton >= 3.4
        return (osp.exists(knobs.nvidia.ptxas.path)
                and osp.exists(knobs.nvidia.cuobjdump.path))
    except Exception:  # noqa: BLE001  (no NVIDIA backend in this wheel)
        return False


needs_nvidia_tools = pytest.mark.skipif(
    not _nvidia_tools(),
    reason="needs triton >= 3.4 with its NVIDIA backend (ptxas, cuobjdump)")


def record(kernel='_stats_kernel', args=(), **kwargs):
    return LaunchRecord(kernel, tuple(args), tuple(sorted(kwargs.items())))


@pytest.mark.skipif(not triton_importable(), reason='needs triton')
def test_records_compile_apart_where_triton_specialises():
    """Integers equal to 1, divisible by 16 or not, 64-bit or not, and
    pointers aligned to 16 bytes or not compile to different binaries;
    other values of the same class share one."""
    def key(*args):
        return record(args=args, D=16).key()

    assert key(('int', 32)) == key(('int', 64))
    assert key(('int', 33)) == key(('int', 35))
    assert len({key(('int', v)) for v in (1, 32, 33, 2**40)}) == 4
    assert key(('float', 0.5)) == key(('float', 2.0))
    assert key(('tensor', 'float32', True)) != key(('tensor', 'float32',
                                                    False))
    assert key(('tensor', 'float32', True)) != key(('tensor', 'bfloat16',
                                                    True))
    assert record(D=16).key() != record(D=32).key()
    rec = record(args=[('tensor', 'float16', False), ('int', 7)], D=8)
    assert LaunchRecord.from_json(json.loads(json.dumps(
        rec.to_json()))) == rec


@pytest.mark.skipif(not triton_importable(), reason='needs triton')
def test_recording_without_running_the_kernels_records_the_same_launches():
    """What a launch compiles from does not depend on the values computed:
    recording without running the kernels (the tool's default, seconds
    instead of the interpreter's minutes) finds exactly the launches of a
    real run, in every mode, H*W aligned or not, batch 1 or not."""
    from ce_mmdet.analysis.triton_aot import record_scenarios, scenarios
    cases = scenarios([(32, 16)], batches=(1, 2), dtypes=('float32', ))

    def keys(run):
        return [r.key() for r in record_scenarios(cases, run=run)]

    ran = keys(True)
    assert keys(False) == ran
    assert len(ran) > len(cases)  # (the check could fail: many launches)


@pytest.mark.skipif(not triton_importable(), reason='needs triton')
@pytest.mark.parametrize('c,d,n,size', [(256, 16, 2, (200, 304)),
                                        (1024, 16, 2, (50, 76)),
                                        (64, 64, 2, (400, 608)),
                                        (512, 16, 40, (28, 28)),
                                        (256, 16, 1, (7, 9)),
                                        (2048, 16, 2, (1, 1))])
def test_the_self_check_compiles_what_the_real_layer_runs(c, d, n, size):
    """``impl='auto'`` checks a layer on a tiny map before it uses Triton
    for it; a binary the real layer needs beyond the checked ones would
    first compile mid-training (where a failure is an error, not the torch
    fallback). Every launch of a real-size step (detection maps, H*W a
    multiple of 16 or not; batches of 40 and 1; a 1x1 map) must be one the
    layer's check launches (same kernel, constexprs, specialisation)."""
    from ce_mmdet.analysis.triton_aot import (MODES, Scenario,
                                              record_launches,
                                              record_scenarios)
    from ce_mmdet.ops import impl
    real = record_scenarios(
        [Scenario(c, d, n, size, 'float32', mode) for mode in MODES])
    # the layer 'auto' would check: hidden C/4, 3 iterations (the
    # scenario's layer), the real input's batch, dtype and map
    key = impl.self_check_key((c, d, c // 4, 3, n),
                              torch.empty(n, c, *size, device='meta'))
    checked = {}
    with record_launches(checked, run=False):
        impl._check_pairs(torch.device('cpu'), key)
    assert [r.scenario for r in real if r.key() not in checked] == []


def test_problems_name_what_would_fail_on_the_gpu():
    ok = KernelReport(record(), 90, registers=64, local_bytes=0,
                      shared_bytes=SHARED_MEMORY_LIMIT[90], num_warps=4)
    assert problems(ok) == []
    big = dataclasses.replace(ok, shared_bytes=SHARED_MEMORY_LIMIT[90] + 1)
    assert 'shared memory' in problems(big)[0]
    spilled = dataclasses.replace(ok, local_bytes=8)
    assert 'spills' in problems(spilled)[0]
    assert problems(spilled, spills=False) == []
    assert KernelReport.from_json(json.loads(json.dumps(
        spilled.to_json()))) == spilled
    broken = dataclasses.replace(ok, error='CompilationError: at 3:4:\n'
                                 'x = tl.arange(0, 100)\n'
                                 'arange\'s range must be a power of 2')
    assert problems(broken) == [
        'does not compile: CompilationError: at 3:4: ... arange\'s range '
        'must be a power of 2'
    ]


def test_occupancy_follows_the_cuda_occupancy_tables():
    def occ(registers, warps, shared, arch=90):
        return occupancy(KernelReport(record(), arch, registers=registers,
                                      local_bytes=0, shared_bytes=shared,
                                      num_warps=warps))

    assert occ(32, 4, 0) == 1.0  # 16 programs of 4 warps: all 64 warps
    assert occ(128, 8, 0) == 0.25  # 2 programs by registers
    assert occ(33, 4, 0) == 0.75  # 40 registers allocated: 12 programs
    assert occ(32, 4, 100 * 1024) == 0.125  # 2 programs by shared memory
    assert occ(32, 4, 100 * 1024, arch=80) == 0.0625
    # sm_86/89: 48 warps; sm_75: 32 warps, 16 programs, no reserved 1 KiB
    assert occ(64, 8, 0, arch=86) == 4 * 8 / 48  # 4 programs by registers
    assert occ(32, 4, 40 * 1024, arch=89) == 2 * 4 / 48
    assert occ(32, 4, 32 * 1024, arch=75) == 2 * 4 / 32
    assert occ(32, 4, 0, arch=75) == 1.0
    assert occ(32, 4, 0, arch=60) is None


def _run_tool(args, tmp_path):
    out = tmp_path / 'reports.json'
    env = dict(os.environ)
    env.pop('TRITON_INTERPRET', None)
    proc = subprocess.run([sys.executable, TOOL, *args, '--json',
                           str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    reports = json.loads(out.read_text()) if out.exists() else None
    return proc, reports


#: (kernel, d) that still spill on sm_90: the Newton iterations (forward
#: and backward) on 64 x 64 tiles in one program, the stem's single group
#: (one program per step; see docs/benchmark.md, session 5)
KNOWN_SPILLS = {('_group_stats_kernel', 64), ('_group_grad_kernel', 64),
                ('_global_whiten_kernel', 64)}
#: the passes over the feature map: never a spill, at any group size
FEATURE_MAP_PASSES = {'_stats_kernel', '_map_kernel'}
#: local bytes per thread older Tritons give kernels the tests otherwise
#: hold at none: triton 3.5.0 (torch 2.9's) 8 to the apply pass's variant
#: with a bias and a ReLU and no second map (inference) on maps whose H*W
#: is not a multiple of 16; 3.4.0 (torch 2.8's) 8 to the group backward at
#: C = 1024 (d = 16); 3.6.0, 3.7.1 and 3.9.0 none
OLDER_TRITON_LOCAL_BYTES = {'3.5.0': {'_map_kernel': 8},
                            '3.4.0': {'_group_grad_kernel': 8}}


def local_bytes_allowed(kernel: str) -> int:
    """What this Triton may give ``kernel`` where none is the rule."""
    import triton
    return OLDER_TRITON_LOCAL_BYTES.get(triton.__version__, {}).get(kernel, 0)


#: local bytes per thread the other small-graph kernels may have: how the
#: compiler splits their registers moves with its version (triton 3.7.1,
#: torch 2.13's, spills 16 bytes in the d = 64 per-sample map's inference
#: variant and 8 in the MLP backward's per-sample kernel at C = 1024;
#: triton 3.9.0 neither; 3.4.0, torch 2.8's, 8 to 16 in the MLP backward's
#: kernels and the d = 16 group kernels)
SMALL_GRAPH_SPILL_BYTES = 64


@needs_nvidia_tools
def test_every_kernel_compiles_for_sm90(tmp_path):
    from ce_mmdet.ops import triton_impl
    proc, reports = _run_tool([
        '--layers', '32:16', '64:64', '--batches', '2', '--dtypes',
        'float32', 'bfloat16', '--allow-spills'
    ], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # every kernel of the module, in every constexpr branch CE uses
    assert {r['record']['kernel'] for r in reports} == set(
        triton_impl._KERNELS)
    import triton
    assert {r['triton'] for r in reports} == {triton.__version__}
    for flag in ('TRAINING', 'AFFINE', 'BATCH_BN', 'FOLD', 'GLOBAL_SUMS',
                 'CROSS', 'FULL', 'HAS_Q', 'KEEP', 'GLOBAL_BN'):
        values = {
            dict(map(tuple, r['record']['kwargs'])).get(flag)
            for r in reports
        }
        assert {True, False} <= values, flag
    assert {dict(map(tuple, r['record']['kwargs'])).get('BN_PHASE')
            for r in reports} >= {0, 1, 2}
    assert {dict(map(tuple, r['record']['kwargs']))['D']
            for r in reports if r['record']['kernel'] == '_map_kernel'
            } == {16, 64}
    for rep in reports:
        found = problems(KernelReport.from_json(rep), spills=False)
        kernel = rep['record']['kernel']
        d = dict(map(tuple, rep['record']['kwargs'])).get('D')
        assert found == [], (rep['record'], found)
        assert 0 < rep['registers'] <= 255
        # Triton's host time per launch before its C launcher was measured
        assert 0 < rep['binder_us'] < 1e4, rep['binder_us']
        # the passes over the feature map never spill; the small graph's
        # kernels a few bytes at most, but the d = 64 Newton kernels
        if kernel in FEATURE_MAP_PASSES:
            assert rep['local_bytes'] <= local_bytes_allowed(kernel), \
                rep['record']
        elif (kernel, d) not in KNOWN_SPILLS:
            assert rep['local_bytes'] <= SMALL_GRAPH_SPILL_BYTES, rep['record']


@needs_nvidia_tools
def test_resnet50_stage3_layer_compiles_for_sm90(tmp_path):
    """CE-ResNet-50's stage-3 layer (C=1024: 64 groups, hidden 256) has
    block shapes the small layers above never reach (its per-sample kernel
    sums the groups' shares of fc1 v 16 groups at a time; the interpreter
    ran a version that Triton's compiler rejected). Only the MLP
    backward's kernels may spill there, and only a few bytes (older
    Tritons: :data:`OLDER_TRITON_LOCAL_BYTES`)."""
    proc, reports = _run_tool([
        '--layers', '1024:16', '--batches', '2', '--dtypes', 'float32',
        '--modes', 'train', 'inference', '--allow-spills'
    ], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert {r['record']['kernel'] for r in reports} >= {
        '_sample_map_kernel', '_group_stats_kernel',
        '_mlp_grad_samples_kernel', '_mlp_grad_weights_kernel'}
    for rep in reports:
        assert not rep['error'], rep['error'][-500:]
        kernel = rep['record']['kernel']
        limit = 64 if kernel.startswith('_mlp_grad') else local_bytes_allowed(
            kernel)
        assert rep['local_bytes'] <= limit, rep['record']


@needs_nvidia_tools
def test_wide_layers_and_large_batches_fit_a_t4(tmp_path):
    """The GPU with the least shared memory per program Triton targets
    (sm_75, T4: 64 KiB) runs CE-ResNet-50's widest layers (C=1024, and
    C=2048 for CE in the last stage) at any batch size: the MLP backward
    works on 16 samples and slices of the hidden width per program (one
    program holding the whole batch needed 221 KB at a batch of 128)."""
    proc, reports = _run_tool([
        '--arch', '75', '--layers', '1024:16', '2048:16', '--batches', '2',
        '64', '--dtypes', 'float32', '--modes', 'train', '--allow-spills'
    ], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    mlp = [r for r in reports if r['record']['kernel'].startswith('_mlp')]
    # the batch size is not specialised on: a batch of 64 runs the binaries
    # of a batch of 2 (compiled once, recorded with the first)
    assert {tuple(r['record']['scenario'].split()[1:4]) for r in mlp} == {
        ('C=1024', 'd=16', 'N=2'), ('C=2048', 'd=16', 'N=2')}
    assert len(mlp) == 4  # two kernels, two layers
    for rep in reports:
        assert problems(KernelReport.from_json(rep), spills=False) == []
        assert rep['shared_bytes'] <= SHARED_MEMORY_LIMIT[75]


@needs_nvidia_tools
def test_the_check_fails_on_a_kernel_the_gpu_cannot_run(tmp_path):
    """The compile stage reports (not raises) a compile error and a
    program that needs more shared memory than sm_90 has: the ``ok`` rows
    above are a finding, not a default."""
    args = [('tensor', 'float32', True)] * 5 + [
        ('int', 400), ('int', 512), ('int', 1)]
    good = dict(D=16, BLOCK_D=16, BLOCK_HW=128, CROSS=True, FULL=True)
    records = [
        record(args=args, **dict(good, BLOCK_HW=100)),  # not a power of 2
        record(args=args, **dict(good, BLOCK_HW=1024)),  # 256 KiB of tiles
    ]
    src = tmp_path / 'records.json'
    dst = tmp_path / 'out.json'
    src.write_text(json.dumps([r.to_json() for r in records]))
    env = dict(os.environ)
    env.pop('TRITON_INTERPRET', None)
    subprocess.run([
        sys.executable, TOOL, '--stage', 'compile', '--io',
        str(src), str(dst)
    ], cwd=ROOT, env=env, check=True)
    bad_arange, too_big = (problems(KernelReport.from_json(r))
                           for r in json.loads(dst.read_text()))
    assert bad_arange and bad_arange[0].startswith('does not compile')
    assert any('shared memory' in p for p in too_big)
