"""CESyncCheckHook in one process (the two-process run with SyncCE is in
tests/test_tools/test_dist_train.py)."""
import logging

import pytest
import torch
import torch.nn as nn

from ce_mmdet.engine.hooks import CESyncCheckHook
from ce_mmdet.engine.hooks.ce_sync_check_hook import ce_running_buffers
from ce_mmdet.models import ChannelEquilibrium


class FakeRunner:
    """What the hook reads of a Runner: model, logger, iter, work_dir."""

    def __init__(self, model, work_dir, it=0):
        self.model = model
        self.work_dir = str(work_dir)
        self.iter = it
        self.logger = logging.getLogger('test_ce_sync_check_hook')
        self.records = []
        self.logger.handlers = [logging.Handler()]
        self.logger.handlers[0].emit = self.records.append
        self.logger.setLevel(logging.INFO)
        self.logger.propagate = False


def model_with_ce():
    model = nn.Sequential(nn.Conv2d(3, 32, 1), ChannelEquilibrium(32),
                          nn.Sequential(ChannelEquilibrium(16, 8)))
    with torch.no_grad():
        model[1].running_scale.fill_(2.0)
    return model


def test_running_buffers_are_named_by_layer():
    model = model_with_ce()
    buffers = ce_running_buffers(model)
    assert list(buffers) == ['1.running_wm', '1.running_scale',
                             '2.0.running_wm', '2.0.running_scale']
    assert buffers['1.running_scale'] is model[1].running_scale
    wrapped = nn.parallel.DistributedDataParallel.__new__(
        nn.parallel.DistributedDataParallel)
    nn.Module.__init__(wrapped)
    wrapped.module = model
    assert ce_running_buffers(wrapped).keys() == buffers.keys()


def test_logs_every_interval_and_dumps_after_training(tmp_path):
    model = model_with_ce()
    hook = CESyncCheckHook(interval=2, dump=True)
    runner = FakeRunner(model, tmp_path)
    for it in range(4):
        runner.iter = it
        hook.after_train_iter(runner, it)
    lines = [r.getMessage() for r in runner.records]
    assert lines == [
        f'CESyncCheckHook (iter {i}): CE running buffers, largest difference '
        'across 1 processes: 0' for i in (2, 4)
    ]
    hook.after_train(runner)
    assert 'end of training' in runner.records[-1].getMessage()
    saved = torch.load(tmp_path / 'ce_buffers_rank0.pth', weights_only=True)
    assert saved.keys() == ce_running_buffers(model).keys()
    assert torch.equal(saved['1.running_scale'], torch.tensor([2.0]))


def test_a_model_without_ce_logs_nothing(tmp_path):
    runner = FakeRunner(nn.Conv2d(3, 8, 1), tmp_path)
    hook = CESyncCheckHook(interval=1)
    hook.after_train_iter(runner, 0)
    hook.after_train(runner)
    assert runner.records == []
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize('kwargs,error,match', [
    (dict(interval=0), ValueError, 'interval must be >= 1, got 0'),
    (dict(interval=2.0), TypeError, 'interval must be an int, got 2.0'),
    (dict(interval=True), TypeError, 'interval must be an int, got True'),
    (dict(dump='yes'), TypeError, "dump must be a bool, got 'yes'"),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        CESyncCheckHook(**kwargs)
