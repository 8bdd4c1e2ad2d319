"""Adapt the shared GPU check kit's copy (``.gpu-check/gpu_check.py``, made
by ``bash ../shared/gpu-check/prepare.sh``, git-ignored) to this project.

Development only: the kit predates two changes of this project and, as it
is, loses its ``memory``, ``network`` and ``timing`` sections on a lent GPU:

* ``check_memory_and_handoff`` imports
  ``ce_mmdet.models.layers.batchnorm_handoff``, which no longer exists (BN
  and CE are one explicit op); the BN-node lines are dropped, the memory
  measurements kept;
* ``naive_ce`` replaces a CE layer's ``forward`` by ``f(x)``, but blocks
  call ``self.ce(z, bn=norm, inplace=True)``; the replacement then takes
  ``bn`` (applied first, as its own module) and ``inplace`` (ignored).

Idempotent; fails loudly when the kit's text is not what it expects.

Usage (from the project root)::

    bash ../shared/gpu-check/prepare.sh && python3 .ci/gpu_check_compat.py
    # then one device run: bash .gpu-check/run.sh, carry [".gpu-check"]
"""
import pathlib
import sys

KIT = pathlib.Path('.gpu-check/gpu_check.py')

#: (what the kit says, what it should say, what shows the edit is made)
EDITS = [
    (  # the removed BN->CE hand-off
        """    from ce_mmdet.models.layers.batchnorm_handoff import batchnorm_affine
    res['handoff_affine_found'] = batchnorm_affine(m, y) is not None
""", '', 'batchnorm_handoff'),
    (  # the block's call ce(z, bn=norm, inplace=True)
        """            def f(x, mod=mod):
                out, wm, sc = ce_reference(""",
        """            def f(x, bn=None, *, inplace=False, mod=mod):
                x = x if bn is None else bn(x)
                out, wm, sc = ce_reference(""", 'def f(x, mod=mod):'),
]


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
    return 0


if __name__ == '__main__':
    sys.exit(main())
