"""Check that CE running buffers agree across processes (SyncCE)."""
import os.path as osp
from typing import Dict, Optional

import torch
from mmengine.dist import all_gather, get_rank, get_world_size
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmdet.registry import HOOKS

from ...models.layers import ChannelEquilibrium


def ce_running_buffers(model) -> Dict[str, torch.Tensor]:
    """``{'<layer>.running_wm': ..., '<layer>.running_scale': ...}``."""
    if is_model_wrapper(model):
        model = model.module
    return {
        f'{name}.{buf}': getattr(m, buf)
        for name, m in model.named_modules()
        if isinstance(m, ChannelEquilibrium)
        for buf in ('running_wm', 'running_scale')
    }


@HOOKS.register_module()
class CESyncCheckHook(Hook):
    """Log how far CE running buffers differ between processes.

    With SyncCE (``ce_cfg=dict(sync=True)``) every process computes the same
    whitening matrices and scale, so the buffers must be identical; with plain
    CE under DDP they drift apart, and rank 0's are the ones checkpointed.
    Every ``interval`` training iterations and after training, the buffers
    are gathered and one line is logged with the largest difference from
    rank 0. With ``dump=True`` each process also saves its buffers to
    ``work_dir/ce_buffers_rank{rank}.pth`` after training.

    Args:
        interval (int): check every so many iterations. Default: 1000.
        dump (bool): save each process's buffers after training.
            Default: False.

    Example:
        >>> custom_hooks = [dict(type='CESyncCheckHook', interval=500)]
    """

    priority = 'LOW'

    def __init__(self, interval: int = 1000, dump: bool = False) -> None:
        if isinstance(interval, bool) or not isinstance(interval, int):
            raise TypeError(f'interval must be an int, got {interval!r}')
        if interval < 1:
            raise ValueError(f'interval must be >= 1, got {interval!r}')
        if not isinstance(dump, bool):
            raise TypeError(f'dump must be a bool, got {dump!r}')
        self.interval = interval
        self.dump = dump

    def _max_difference(self, runner) -> Optional[float]:
        buffers = ce_running_buffers(runner.model)
        if not buffers:
            return None
        flat = torch.cat([b.detach().reshape(-1).double()
                          for b in buffers.values()])
        if get_world_size() == 1:
            return 0.0
        gathered = all_gather(flat)
        return max(float((g - gathered[0]).abs().max()) for g in gathered)

    def _check(self, runner, when: str) -> None:
        diff = self._max_difference(runner)
        if diff is None:
            return
        runner.logger.info(
            f'CESyncCheckHook ({when}): CE running buffers, largest '
            f'difference across {get_world_size()} processes: {diff:.3g}')

    def after_train_iter(self, runner, batch_idx: int, data_batch=None,
                         outputs=None) -> None:
        if self.every_n_train_iters(runner, self.interval):
            self._check(runner, f'iter {runner.iter + 1}')

    def after_train(self, runner) -> None:
        self._check(runner, 'end of training')
        if self.dump:
            buffers = {
                k: v.detach().cpu()
                for k, v in ce_running_buffers(runner.model).items()
            }
            torch.save(buffers,
                       osp.join(runner.work_dir,
                                f'ce_buffers_rank{get_rank()}.pth'))
