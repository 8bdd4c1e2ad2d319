"""Compile CE's Triton kernels for an NVIDIA GPU, without a GPU.

Usage:
    python tools/analysis_tools/triton_aot_check.py [--arch 90]
        [--depth 50] [--group-size 16] [--layers C:d ...] [--batches 2 16]
        [--dtypes float32 bfloat16] [--modes train norm_eval ...]
        [--json OUT.json] [--allow-spills] [--triton-path DIR]

Runs CE-ResNet's CE layers (or ``--layers``) in every mode, batch size and
dtype given with ``impl='triton'`` under Triton's interpreter (the kernels
themselves are not run: seconds), records every distinct launch (kernel,
constexprs, argument specialisation), then
compiles each with Triton's compiler and ``ptxas`` for ``sm_<arch>`` (90:
H100/H200, 80: A100, 86: A10/A40/RTX 30xx, 89: L4/L40S/RTX 40xx, 75: T4,
70: V100, 100: B200) and reads the cubin's resource usage
(:mod:`ce_mmdet.analysis.triton_aot`). Prints one row per compiled kernel:
registers per thread, local memory (spills), shared memory per program,
warps, the occupancy they allow (resident warps per SM over the maximum),
the host microseconds each launch spends in Triton's Python before its C
launcher (argument binder and cache key, on this CPU: what a launch-bound
step pays per kernel beside ``benchmark_host.py``'s op time) and the
problems found. Exits with status 1 when a
kernel does not compile, needs more shared memory than a program may have
on that GPU, or spills (unless ``--allow-spills``).

The two steps run in child processes: the interpreter is chosen when the
kernels are defined, so recording (``TRITON_INTERPRET=1``) and compiling
(no interpreter) cannot share one. Needs the ``triton`` wheel (its NVIDIA
backend ships ``ptxas`` and ``cuobjdump``), no GPU and no CUDA install.
``--triton-path DIR`` compiles with another Triton (3.4 or newer),
installed there with ``pip install --no-deps --target DIR triton==X`` (the
one a cluster's torch pins: 3.4.0 for torch 2.8, 3.5.0 for 2.9, 3.6.0 for
2.10 and 2.11); recording keeps this environment's.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import defaultdict

#: constexprs shown in the table (the rest are in the JSON)
_SHOWN = ('D', 'BLOCK_D', 'BLOCK_HW', 'BLOCK_N', 'BLOCK_H', 'BLOCK_G',
          'TRAINING', 'AFFINE', 'BATCH_BN', 'FOLD', 'FULL', 'CROSS', 'HAS_Q')


def parse_args(argv=None):
    from ce_mmdet.analysis.triton_aot import MODES
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--arch', type=int, default=90,
                        help='compute capability x 10 (90: H100/H200, '
                        '80: A100, 86: A10/A40/RTX 30xx, 89: L4/L40S/RTX '
                        '40xx, 75: T4, 70: V100, 100: B200)')
    parser.add_argument('--depth', type=int, default=50)
    parser.add_argument('--group-size', type=int, default=16)
    parser.add_argument('--layers', nargs='+', metavar='C:d',
                        help='CE layers as channels:group_size (instead of '
                        'CE-ResNet-<depth>\'s)')
    parser.add_argument('--batches', type=int, nargs='+', default=[2, 16])
    parser.add_argument('--dtypes', nargs='+',
                        default=['float32', 'bfloat16'],
                        choices=['float32', 'float16', 'bfloat16'])
    parser.add_argument('--modes', nargs='+', default=list(MODES),
                        choices=list(MODES))
    parser.add_argument('--json', help='write every report here')
    parser.add_argument('--allow-spills', action='store_true',
                        help='report spills without failing')
    parser.add_argument('--triton-path', metavar='DIR',
                        help='compile with the triton installed in DIR '
                        '(pip install --target DIR)')
    parser.add_argument('--stage', choices=['record', 'compile'],
                        help=argparse.SUPPRESS)
    parser.add_argument('--io', nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.layers:
        try:
            args.layers = [tuple(int(v) for v in layer.split(':'))
                           for layer in args.layers]
        except ValueError:
            parser.error(f'--layers takes channels:group_size pairs, got '
                         f'{args.layers}')
        if any(len(layer) != 2 for layer in args.layers):
            parser.error(f'--layers takes channels:group_size pairs, got '
                         f'{args.layers}')
    return args


def stage_record(args, out_path):
    from ce_mmdet.analysis import triton_aot
    layers = args.layers or triton_aot.resnet_layers(args.depth,
                                                     args.group_size)
    records = triton_aot.record_scenarios(
        triton_aot.scenarios(layers, args.batches, args.dtypes, args.modes))
    with open(out_path, 'w') as f:
        json.dump([r.to_json() for r in records], f)


def stage_compile(args, in_path, out_path):
    from ce_mmdet.analysis import triton_aot
    with open(in_path) as f:
        records = [triton_aot.LaunchRecord.from_json(o) for o in json.load(f)]
    reports = [triton_aot.compile_launch(r, args.arch) for r in records]
    with open(out_path, 'w') as f:
        json.dump([r.to_json() for r in reports], f)


def child(argv, stage, paths, interpret, triton_path=None):
    env = dict(os.environ)
    env.pop('TRITON_INTERPRET', None)
    if interpret:
        env['TRITON_INTERPRET'] = '1'
    if triton_path:
        env['PYTHONPATH'] = os.pathsep.join(
            [os.path.abspath(triton_path)] +
            [p for p in env.get('PYTHONPATH', '').split(os.pathsep) if p])
    subprocess.run([sys.executable, __file__, *argv, '--stage', stage,
                    '--io', *paths], env=env, check=True)


def table(reports, allow_spills):
    from ce_mmdet.analysis.triton_aot import (KernelReport, occupancy,
                                              problems)
    reports = [KernelReport.from_json(r) for r in reports]
    occs = [occupancy(r) for r in reports]
    failed = 0
    print(f'{"kernel":22s} {"regs":>4s} {"local":>5s} {"shared":>7s} '
          f'{"warps":>5s} {"occ":>4s} {"bind":>5s}  constexprs / problems')
    for rep, occ in zip(reports, occs):
        shown = ' '.join(f'{k}={int(v) if isinstance(v, bool) else v}'
                         for k, v in rep.record.kwargs if k in _SHOWN)
        found = problems(rep, spills=not allow_spills)
        failed += bool(found)
        print(f'{rep.record.kernel:22s} {rep.registers:4d} '
              f'{rep.local_bytes:5d} {rep.shared_bytes:7d} '
              f'{rep.num_warps:5d} {"   -" if occ is None else f"{occ:4.0%}"}'
              f' {rep.binder_us:5.1f}  {shown}  [{"; ".join(found) or "ok"}]')
    per_kernel = defaultdict(list)
    for rep, occ in zip(reports, occs):
        per_kernel[rep.record.kernel].append((rep, occ))
    print('\nper kernel: variants, max registers, max shared memory (bytes), '
          'min occupancy, max host us per launch in Triton\'s binder')
    for kernel, pairs in sorted(per_kernel.items()):
        known = [o for _, o in pairs if o is not None]
        print(f'  {kernel:22s} {len(pairs):3d} '
              f'{max(r.registers for r, _ in pairs):4d} '
              f'{max(r.shared_bytes for r, _ in pairs):7d} '
              + (f'{min(known):5.0%}' if known else '    -')
              + f' {max(r.binder_us for r, _ in pairs):6.1f}')
    return failed


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.stage == 'record':
        return stage_record(args, args.io[0])
    if args.stage == 'compile':
        return stage_compile(args, *args.io)
    with tempfile.TemporaryDirectory() as tmp:
        records = os.path.join(tmp, 'records.json')
        reports = os.path.join(tmp, 'reports.json')
        child(argv, 'record', [records, records], interpret=True)
        child(argv, 'compile', [records, reports], interpret=False,
              triton_path=args.triton_path)
        with open(reports) as f:
            reports = json.load(f)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(reports, f, indent=1)
    failed = table(reports, args.allow_spills)
    versions = sorted({r.get('triton', '') for r in reports})
    print(f'\n{len(reports)} kernel variants compiled for sm_{args.arch} '
          f'by triton {", ".join(versions)}; {failed} with problems')
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
