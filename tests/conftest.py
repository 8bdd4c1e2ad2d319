import os

import pytest
import torch

# Without a GPU, Triton kernels are tested in Triton's interpreter, which must
# be chosen before triton is first imported (ce_mmdet imports it lazily).
if not torch.cuda.is_available():
    os.environ.setdefault('TRITON_INTERPRET', '1')


def pytest_configure(config):
    """Stop before collecting, saying what to install, where Triton's
    interpreter cannot run the kernels' tests. Before triton 3.7 it converts
    one-element arrays with ``int()``, which numpy 2.4 refuses, so every
    Triton test would fail with that ``TypeError``. Checked: triton 3.3.1
    (torch 2.7's), 3.4.0 (2.8's), 3.5.0 (2.9's) and 3.6.0 (2.10's and
    2.11's) run with numpy 2.3.5 and fail with 2.4.6; triton 3.7.1 runs
    with numpy 2.5.5."""
    from ce_mmdet.ops.impl import triton_device
    if triton_device() != 'cpu':  # a GPU, or no triton (those tests skip)
        return
    import numpy
    import triton
    import triton.language as tl

    @triton.jit
    def fill(x_ptr, n, BLOCK: tl.constexpr):  # a loop from a tensor start
        for off in range(tl.program_id(0) * BLOCK, n, BLOCK):
            tl.store(x_ptr + off + tl.arange(0, BLOCK), 1.0)

    try:
        fill[(1, )](torch.zeros(8), 8, BLOCK=8)
    except Exception as error:  # (triton's InterpreterError)
        raise pytest.UsageError(
            f"triton {triton.__version__}'s interpreter, which runs the "
            "Triton kernels' tests without a GPU, fails with numpy "
            f'{numpy.__version__}: {error}. Install numpy<2.4 or '
            'triton>=3.7.')


@pytest.fixture(scope='session')
def tiny_coco(tmp_path_factory):
    """The tiny synthetic COCO set, made once per test session."""
    from ce_mmdet.testing import make_tiny_coco
    root = tmp_path_factory.mktemp('tiny_coco')
    make_tiny_coco(str(root))
    return str(root)
