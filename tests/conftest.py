import os
import os.path as osp

import pytest
import torch

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))

# Without a GPU, Triton kernels are tested in Triton's interpreter, which must
# be chosen before triton is first imported (ce_mmdet imports it lazily).
if not torch.cuda.is_available():
    os.environ.setdefault('TRITON_INTERPRET', '1')


@pytest.fixture(scope='session')
def repo_root():
    return ROOT


@pytest.fixture(scope='session')
def tiny_coco(tmp_path_factory):
    """The tiny synthetic COCO set, made once per test session."""
    from ce_mmdet.testing import make_tiny_coco
    root = tmp_path_factory.mktemp('tiny_coco')
    make_tiny_coco(str(root))
    return str(root)
