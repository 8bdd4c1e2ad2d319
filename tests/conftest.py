import os.path as osp

import pytest

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


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
