"""The arguments of the CE ops, named: parameters, running state and
configuration.

The functional ops (:mod:`ce_mmdet.ops.channel_equilibrium`) take the input
tensor and these small containers, everything else keyword-only, so that no
two adjacent floats or bools can be swapped silently and no caller re-reads
the argument order by index.
"""
import numbers
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch.distributed as dist
import torch.nn as nn
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin


class CEParams(NamedTuple):
    """The learned parameters of a CE layer.

    Attributes:
        gate (Tensor): (1,) gate logit; ``sigmoid(gate)`` weighs the batch
            decorrelation branch.
        fc1_weight (Tensor): (C', C) first linear map of the IR sub-network.
        ln_weight (Tensor): (C',) LayerNorm weight.
        ln_bias (Tensor): (C',) LayerNorm bias.
        fc2_weight (Tensor): (C, C') second linear map.
    """
    gate: Tensor
    fc1_weight: Tensor
    ln_weight: Tensor
    ln_bias: Tensor
    fc2_weight: Tensor


class CEState(NamedTuple):
    """The running state of a CE layer, updated in place in training.

    Attributes:
        running_wm (Tensor): (G, d, d) running whitening matrices.
        running_scale (Tensor): (1,) running IR scale.
    """
    running_wm: Tensor
    running_scale: Tensor


def check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f'{name} must be an int, got {value!r} '
                        f'({type(value).__name__})')
    if value < minimum:
        raise ValueError(f'{name} must be >= {minimum}, got {value}')
    return int(value)


@dataclass(frozen=True)
class CEConfig:
    """The fixed settings of a CE layer (validated on construction).

    Attributes:
        group_size (int): channels per whitening group d (>= 1).
            Default: 16.
        num_iters (int): Newton iterations T (>= 1). Default: 3.
        eps (float): covariance ridge, IR scale floor and LayerNorm eps
            (> 0). Default: 1e-5.
        momentum (float): running-average momentum in [0, 1] (PyTorch's
            convention ``r = (1 - m) r + m x``). Default: 0.1.
    """
    group_size: int = 16
    num_iters: int = 3
    eps: float = 1e-5
    momentum: float = 0.1

    def __post_init__(self) -> None:
        object.__setattr__(self, 'group_size',
                           check_int('group_size', self.group_size, 1))
        object.__setattr__(self, 'num_iters',
                           check_int('num_iters', self.num_iters, 1))
        if isinstance(self.eps, bool) or not isinstance(
                self.eps, numbers.Real) or not self.eps > 0:
            raise ValueError(f'eps must be a positive number, got '
                             f'{self.eps!r}')
        if isinstance(self.momentum, bool) or not isinstance(
                self.momentum, numbers.Real) or not 0 <= self.momentum <= 1:
            raise ValueError(f'momentum must be in [0, 1], got '
                             f'{self.momentum!r}')
        object.__setattr__(self, 'eps', float(self.eps))
        object.__setattr__(self, 'momentum', float(self.momentum))


class BatchNormArgs(NamedTuple):
    """What a BatchNorm call needs, as ``F.batch_norm`` takes it.

    Attributes:
        weight (Tensor, optional): (C,) affine scale.
        bias (Tensor, optional): (C,) affine shift.
        running_mean (Tensor, optional): (C,) running mean, updated in place
            when batch statistics are used.
        running_var (Tensor, optional): (C,) running (unbiased) variance.
        num_batches_tracked (Tensor, optional): () counter, incremented in
            place when batch statistics are used and running stats tracked.
        training (bool): the BN module's mode.
        momentum (float, optional): running-average momentum; None is the
            cumulative average (factor ``1 / num_batches_tracked``).
        eps (float): variance epsilon.
    """
    weight: Optional[Tensor]
    bias: Optional[Tensor]
    running_mean: Optional[Tensor]
    running_var: Optional[Tensor]
    num_batches_tracked: Optional[Tensor]
    training: bool
    momentum: Optional[float]
    eps: float

    @classmethod
    def from_module(cls, bn: nn.modules.batchnorm._BatchNorm
                    ) -> 'BatchNormArgs':
        """The arguments ``bn.forward`` would use (running statistics only
        where ``bn`` tracks them, as ``nn.BatchNorm2d.forward`` does)."""
        track = bn.track_running_stats
        return cls(bn.weight, bn.bias, bn.running_mean if track else None,
                   bn.running_var if track else None,
                   bn.num_batches_tracked if track else None, bn.training,
                   bn.momentum, bn.eps)

    @property
    def uses_batch_stats(self) -> bool:
        """Whether the BN normalises by the batch's statistics (training
        mode, or no running statistics), as ``nn.BatchNorm2d`` decides."""
        return self.training or (self.running_mean is None
                                 and self.running_var is None)


def is_plain_batchnorm(module) -> bool:
    """Whether a call of ``module`` now computes exactly what
    ``nn.BatchNorm2d`` computes, once its ``_check_input_dim`` has accepted
    the input, so a CE op may apply it itself.

    * a ``_BatchNorm`` that keeps ``_BatchNorm.forward``: ``nn.BatchNorm2d``
      and its subclasses without a forward of their own, and mmengine's
      ``_BatchNormXd``, which mmengine's runner makes of every SyncBN in a
      run of one process (``tools/test.py`` on one GPU with a ``*_syncbn``
      config). The classes differ only in that check, which the caller runs
      (``nn.BatchNorm1d`` refuses a 4-D input as it would itself);
    * an ``nn.SyncBatchNorm`` that keeps its forward (mmengine's
      ``SyncBatchNorm``, mmcv's ``SyncBN``, too) and would not synchronise in
      this call (:func:`synchronises`): in eval mode (inference, validation
      and test of a multi-GPU run, ``norm_eval=True``) or outside a process
      group of more than one process, its forward is ``F.batch_norm``, as
      ``nn.BatchNorm2d``'s. In training across processes it sums its
      statistics over its processes and does not qualify (a CE layer in
      training folds it all the same, with that sum:
      :func:`is_sync_batchnorm`).

    GroupNorm, mmcv's ``MMSyncBN``, a lazy BN before its first call (its
    parameters are made by a pre-hook; then it becomes a BatchNorm2d) and
    the rest do not qualify.
    """
    if not isinstance(module, _BatchNorm) or \
            isinstance(module, LazyModuleMixin):
        return False
    if type(module).forward is _BatchNorm.forward:
        return True
    return is_sync_batchnorm(module) and not synchronises(module)


def is_sync_batchnorm(module) -> bool:
    """Whether ``module`` is an ``nn.SyncBatchNorm`` that keeps its forward
    (mmengine's ``SyncBatchNorm``, mmcv's ``SyncBN``, qualifies: it only
    changes the input check), so that a CE op may apply it itself with its
    statistics summed over ``module.process_group``."""
    return isinstance(module, nn.SyncBatchNorm) and \
        type(module).forward is nn.SyncBatchNorm.forward


def synchronises(bn: nn.SyncBatchNorm) -> bool:
    """Whether a call of ``bn`` now all-reduces its batch statistics, as
    ``nn.SyncBatchNorm.forward`` decides: in training mode, under an
    initialised ``torch.distributed`` process group (``bn.process_group``,
    or the default one) of more than one process."""
    if not (bn.training and dist.is_available() and dist.is_initialized()):
        return False
    group = bn.process_group if bn.process_group else dist.group.WORLD
    return dist.get_world_size(group) > 1
