"""torch.load(weights_only=True) reads mmengine checkpoints, and nothing
more."""
import os
import pickle

import pytest
import torch
import torch.nn as nn
from mmengine.logging.history_buffer import HistoryBuffer
from mmengine.model import BaseModel
from mmengine.runner import Runner
from torch.utils.data import Dataset

import ce_mmdet  # noqa: F401  (registers the safe globals)
from ce_mmdet.utils.safe_load import _history_buffer_getattr


class ToyModel(BaseModel):

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 1)

    def forward(self, x, mode='loss'):
        out = self.linear(torch.stack(x))
        if mode == 'loss':
            return dict(loss=(out**2).mean())
        return out


class ToyData(Dataset):
    metainfo = dict(classes=('a', 'b'), palette=[(1, 2, 3)])

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return dict(x=torch.full((2, ), float(i)))


def make_runner(work_dir, max_iters, resume=False):
    return Runner(
        model=ToyModel(),
        work_dir=str(work_dir),
        train_dataloader=dict(
            dataset=ToyData(),
            sampler=dict(type='DefaultSampler', shuffle=True),
            batch_size=2),
        optim_wrapper=dict(
            optimizer=dict(type='SGD', lr=0.01, momentum=0.9)),
        train_cfg=dict(by_epoch=False, max_iters=max_iters),
        param_scheduler=[
            dict(type='LinearLR', start_factor=0.1, by_epoch=False, end=2)
        ],
        default_hooks=dict(
            checkpoint=dict(type='CheckpointHook', interval=2,
                            by_epoch=False)),
        resume=resume,
        randomness=dict(seed=0),
        experiment_name=f'exp_{max_iters}_{resume}')


def test_runner_checkpoint_loads_weights_only_and_resumes(tmp_path):
    make_runner(tmp_path, 4).train()
    ckpt = torch.load(tmp_path / 'iter_4.pth', weights_only=True)
    hub = ckpt['message_hub']['log_scalars']
    assert isinstance(hub['train/loss'], HistoryBuffer)
    assert hub['train/loss'].mean() > 0
    assert ckpt['meta']['iter'] == 4
    # resume: mmengine's own torch.load (weights_only by default) succeeds
    runner = make_runner(tmp_path, 6, resume=True)
    runner.train()
    assert runner.iter == 6
    assert os.path.exists(tmp_path / 'iter_6.pth')


class _Exec:

    def __reduce__(self):
        return (os.system, ('touch PWNED',))


class _GetattrEscape:
    # getattr is allow-listed by path, but only for HistoryBuffer methods

    def __reduce__(self):
        return (getattr, (HistoryBuffer, '__init__'))


class _GetattrOther:

    def __reduce__(self):
        return (getattr, (torch.Tensor, 'add'))


@pytest.mark.parametrize('payload', [_Exec(), _GetattrEscape(),
                                     _GetattrOther()])
def test_malicious_pickles_are_refused(tmp_path, payload, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / 'evil.pth'
    torch.save({'state_dict': {}, 'x': payload}, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    assert not (tmp_path / 'PWNED').exists()


def test_restricted_getattr_contract():
    assert _history_buffer_getattr(HistoryBuffer, 'mean') is \
        HistoryBuffer.mean
    for obj, name in ((HistoryBuffer, '_statistics_methods'),
                      (HistoryBuffer, '__class__'), (dict, 'items')):
        with pytest.raises(pickle.UnpicklingError):
            _history_buffer_getattr(obj, name)
    with pytest.raises(pickle.UnpicklingError):
        _history_buffer_getattr(HistoryBuffer, 'mean', None)
    # public, but not plain functions: a property and a classmethod
    for name in ('data', 'register_statistics'):
        with pytest.raises(pickle.UnpicklingError,
                           match='is not a statistics method'):
            _history_buffer_getattr(HistoryBuffer, name)
