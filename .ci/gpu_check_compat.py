"""Adapt the shared GPU check kit's copy (``.gpu-check/gpu_check.py``, made
by ``bash ../shared/gpu-check/prepare.sh``, git-ignored) to this project.

Development only: the kit predates two changes of this project and, as it
is, loses its ``memory``, ``network`` and ``timing`` sections on a lent GPU:

* ``check_memory_and_handoff`` imports
  ``ce_mmdet.models.layers.batchnorm_handoff``, which no longer exists (BN
  and CE are one explicit op); the BN-node lines are dropped, the memory
  measurements kept;
* ``naive_ce`` replaces a CE layer's ``forward`` by ``f(x)``, but blocks
  call ``self.ce(z, bn=norm, inplace=True, residual=identity,
  relu=True)``; the replacement then takes ``bn`` (applied first, as its
  own module), ``inplace`` (ignored) and the block's tail (the residual
  added and the ReLU applied after it, as separate ops).

It also adds pytest's wheels to the kit's (``run.sh`` installs every wheel
it carries), so that the same device run can run the Triton tests on the
GPU, the kernels compiled for it instead of Triton's interpreter
(``tests/conftest.py`` selects the interpreter only without a GPU): races
between programs, memory ordering and resource limits only show there.

Idempotent; fails loudly when the kit's text is not what it expects.

Usage (from the project root)::

    bash ../shared/gpu-check/prepare.sh && python3 .ci/gpu_check_compat.py
    # then one device run, carry [".gpu-check"]: bash .ci/gpu_run.sh
    # (the Triton tests on the GPU and the kit's sections, in priority
    # order within a time budget; see that script)
"""
import pathlib
import subprocess
import sys

KIT = pathlib.Path('.gpu-check/gpu_check.py')

#: (what the kit says, what it should say, what shows the edit is made)
EDITS = [
    (  # the removed BN->CE hand-off
        """    from ce_mmdet.models.layers.batchnorm_handoff import batchnorm_affine
    res['handoff_affine_found'] = batchnorm_affine(m, y) is not None
""", '', 'batchnorm_handoff'),
    (  # the block's call ce(z, bn=norm, inplace=True, residual=identity,
        # relu=True)
        """            def f(x, mod=mod):
                out, wm, sc = ce_reference(""",
        """            def f(x, bn=None, *, inplace=False, residual=None,
                  relu=False, mod=mod):
                x = x if bn is None else bn(x)
                out, wm, sc = ce_reference(""", 'def f(x, mod=mod):'),
    (  # ... and its tail, as separate ops
        """                    mod.eps, mod.momentum, mod.training)
                return out
            mod.forward = f""",
        """                    mod.eps, mod.momentum, mod.training)
                if residual is not None:
                    out = out + residual
                return out.relu() if relu else out
            mod.forward = f""", 'return out\n            mod.forward = f'),
]


#: pytest and what it needs, pure-Python wheels (the versions tested here)
TEST_WHEELS = ('pytest==9.2.0', 'pytest-timeout==2.4.0', 'pluggy==1.7.0',
               'iniconfig==2.3.1', 'packaging==26.4', 'pygments==2.21.0')
#: the GPU machines' Python
GPU_PYTHON = '3.12'


def add_test_wheels(whl: pathlib.Path) -> None:
    """Download :data:`TEST_WHEELS` into ``whl`` unless they are there."""
    have = {p.name.split('-')[0].lower().replace('_', '-')
            for p in whl.glob('*.whl')}
    missing = [w for w in TEST_WHEELS if w.split('==')[0] not in have]
    if missing:
        subprocess.run([
            sys.executable, '-m', 'pip', 'download', '-q', '--no-deps',
            '--only-binary=:all:', '--python-version', GPU_PYTHON, '-d',
            str(whl), *missing
        ], check=True)
    print(f'{whl}: pytest wheels for the GPU run')


def main() -> int:
    if not KIT.exists():
        print(f'{KIT} not found: run bash ../shared/gpu-check/prepare.sh '
              'from the project root first', file=sys.stderr)
        return 1
    text = KIT.read_text()
    for old, new, before in EDITS:
        if old in text:
            text = text.replace(old, new)
        elif before in text:
            print(f'{KIT}: the kit changed; expected to find:\n{old}',
                  file=sys.stderr)
            return 1
    KIT.write_text(text)
    print(f'{KIT}: adapted to this project')
    add_test_wheels(KIT.parent / 'whl')
    return 0


if __name__ == '__main__':
    sys.exit(main())
