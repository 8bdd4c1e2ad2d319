"""Count the operations that launch work (GPU kernels on a GPU), the cost
that dominates small-batch detection training steps on a GPU.

:class:`LaunchCounter` is a ``TorchDispatchMode``: it sees every aten op
below autograd, forward and backward, and counts those that do work, not
views and metadata ops (``view``, ``reshape``, ``expand``, ``transpose``,
``detach``, ``empty``, ``as_strided`` ...), plus one per Triton kernel launch
of :mod:`ce_mmdet.ops.triton_impl`. The torch ops Triton's interpreter runs
inside a launch (on CPU) are not counted, so a CPU count under
``TRITON_INTERPRET=1`` is what the GPU would launch.
"""
import sys
from collections import Counter

from torch.utils._python_dispatch import TorchDispatchMode

#: aten ops that only make views, change metadata or allocate
NO_WORK_OPS = frozenset({
    'view', '_unsafe_view', 'reshape', '_reshape_alias', 'expand',
    'expand_as', 'transpose', 't', 'permute', 'detach', 'alias', 'empty',
    'empty_like', 'empty_strided', 'new_empty', 'new_empty_strided',
    'as_strided', 'squeeze', 'unsqueeze', 'select', 'slice', 'diagonal',
    'split', 'split_with_sizes', 'unbind', 'chunk', 'narrow', 'lift_fresh',
    'resize_', 'view_as', 'unflatten', 'flatten', 'movedim', 'set_',
    'is_same_size', 'sym_size', 'sym_stride', 'sym_numel',
    'sym_storage_offset', 'is_nonzero', 'contiguous'
})


def _triton_stats():
    module = sys.modules.get('ce_mmdet.ops.triton_impl')
    return None if module is None else module.LaunchStats


class LaunchCounter(TorchDispatchMode):
    """Count working aten ops and Triton launches while active.

    Example:
        >>> import torch
        >>> from ce_mmdet.analysis.launches import LaunchCounter
        >>> x = torch.randn(4, 4)
        >>> with LaunchCounter() as counter:
        ...     y = (x.t() @ x).relu().view(-1)
        >>> counter.total  # mm, relu; t and view make views
        2
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops = Counter()
        self._triton_start = 0
        self._triton_end = None

    def __enter__(self):
        stats = _triton_stats()
        self._triton_start = 0 if stats is None else stats.launches
        self._triton_end = None
        return super().__enter__()

    def __exit__(self, *exc):
        stats = _triton_stats()
        self._triton_end = 0 if stats is None else stats.launches
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        stats = _triton_stats()
        if stats is not None and stats.running:
            return out  # the interpreter's own work inside a launch
        name = func.overloadpacket.__name__
        if name not in NO_WORK_OPS:
            self.ops[name] += 1
        return out

    @property
    def triton_launches(self) -> int:
        end = self._triton_end
        if end is None:  # still counting
            stats = _triton_stats()
            end = 0 if stats is None else stats.launches
        return end - self._triton_start

    @property
    def total(self) -> int:
        """Working aten ops plus Triton launches."""
        return sum(self.ops.values()) + self.triton_launches
