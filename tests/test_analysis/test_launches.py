"""LaunchCounter: working ops, and the host syncs a GPU step must not make."""
import pytest
import torch

from ce_mmdet.analysis.launches import LaunchCounter

X = torch.randn(4, 3)


@pytest.mark.parametrize('read', [
    lambda: X[0, 0].item(),
    lambda: float(X.sum()),
    lambda: bool(X.sum() > 0),
    lambda: 1 if X.max() > 0 else 0,
    lambda: torch.equal(X, X),
    lambda: X.nonzero(),
    lambda: X[X > 0],
    lambda: torch.unique(X),
    lambda: torch.tensor([1.0, 2.0]),  # a host-to-device copy on a GPU
], ids=['item', 'float', 'bool', 'if', 'equal', 'nonzero', 'mask', 'unique',
        'tensor'])
def test_host_syncs_are_counted(read):
    with LaunchCounter() as counter:
        read()
    assert counter.host_syncs == 1, counter.syncs


def test_device_side_work_makes_no_host_sync():
    index = torch.arange(2)
    with LaunchCounter() as counter:
        y = X[index].relu() @ X.t()
        y = torch.where(y > 0, y, X.new_full((1, ), 2.0)).sum(0)
        y = y.clamp_min(0).view(-1)[1:]
    assert counter.host_syncs == 0, counter.syncs
    assert counter.total >= 6  # index, relu, mm, gt, new_full, where...
