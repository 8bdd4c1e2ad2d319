"""Count the operations that launch work (GPU kernels on a GPU), the cost
that dominates small-batch detection training steps on a GPU.

:class:`LaunchCounter` is a ``TorchDispatchMode``: it sees every aten op
below autograd, forward and backward, and counts those that do work, not
views and metadata ops (``view``, ``reshape``, ``expand``, ``transpose``,
``detach``, ``empty``, ``as_strided`` ...), plus one per Triton kernel launch
of :mod:`ce_mmdet.ops.triton_impl` and one per call of the fused CPU kernels
of :mod:`ce_mmdet.ops.cpu_kernels` (ctypes calls the dispatcher does not
see). The torch ops Triton's interpreter runs
inside a launch (on CPU) are not counted, so a CPU count under
``TRITON_INTERPRET=1`` is what the GPU would launch.

It also counts the host syncs (:attr:`LaunchCounter.host_syncs`): the ops
that, on a GPU, make the host wait for the device. A launch-bound step
only runs at GPU speed while the host queues kernels ahead of the device;
one wait per layer drains that queue every layer. They are visible on a CPU
too, so a CPU test can keep them out: reading a value into Python
(``item()``, ``float(t)``, ``bool(t)``, ``if t > 0``, ``torch.equal``), an
output whose shape depends on values (``nonzero``, masked indexing,
``unique``), and a tensor made from Python data (``torch.tensor([...],
device=...)``: a synchronous host-to-device copy). ``tolist()`` and
``numpy()`` do not pass through the dispatcher and are not seen.
"""
import sys
from collections import Counter

import torch
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


#: aten ops that read values into Python or size their output by values
HOST_READ_OPS = frozenset({
    '_local_scalar_dense', 'equal', 'allclose', 'nonzero', 'masked_select',
    '_unique', '_unique2', 'unique_dim', 'unique_consecutive'
})
#: aten ops that make a tensor from Python data (``torch.tensor``)
HOST_DATA_OPS = frozenset({'lift_fresh', 'lift_fresh_copy'})


def _masks_by_value(func, args) -> bool:
    """``t[mask]`` with a bool/uint8 mask: its output size is a value."""
    if func.overloadpacket.__name__ not in ('index', 'index_put',
                                            'index_put_'):
        return False
    indices = args[1] if len(args) > 1 else ()
    return any(
        i is not None and i.dtype in (torch.bool, torch.uint8)
        for i in indices)


def _triton_stats():
    module = sys.modules.get('ce_mmdet.ops.triton_impl')
    return None if module is None else module.LaunchStats


def _cpu_kernel_calls() -> int:
    module = sys.modules.get('ce_mmdet.ops.cpu_kernels')
    return 0 if module is None else module.KernelStats.calls


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
        >>> with LaunchCounter() as counter:
        ...     positive = bool(x.sum() > 0)  # the host reads a value
        >>> counter.host_syncs
        1
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops = Counter()
        #: host syncs by op name (see the module doc)
        self.syncs = Counter()
        self._triton_start = 0
        self._triton_end = None
        self._cpu_start = 0
        self._cpu_end = None

    def __enter__(self):
        stats = _triton_stats()
        self._triton_start = 0 if stats is None else stats.launches
        self._triton_end = None
        self._cpu_start, self._cpu_end = _cpu_kernel_calls(), None
        return super().__enter__()

    def __exit__(self, *exc):
        stats = _triton_stats()
        self._triton_end = 0 if stats is None else stats.launches
        self._cpu_end = _cpu_kernel_calls()
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        stats = _triton_stats()
        if stats is not None and stats.running:
            return out  # the interpreter's own work inside a launch
        name = func.overloadpacket.__name__
        if name not in NO_WORK_OPS:
            self.ops[name] += 1
        if name in HOST_READ_OPS or name in HOST_DATA_OPS or \
                _masks_by_value(func, args):
            self.syncs[name] += 1
        return out

    @property
    def triton_launches(self) -> int:
        end = self._triton_end
        if end is None:  # still counting
            stats = _triton_stats()
            end = 0 if stats is None else stats.launches
        return end - self._triton_start

    @property
    def cpu_kernel_calls(self) -> int:
        """Calls of :mod:`ce_mmdet.ops.cpu_kernels`' fused kernels."""
        end = _cpu_kernel_calls() if self._cpu_end is None else \
            self._cpu_end
        return end - self._cpu_start

    @property
    def host_syncs(self) -> int:
        """Ops that make a GPU's host wait for the device (module doc)."""
        return sum(self.syncs.values())

    @property
    def total(self) -> int:
        """Working aten ops plus Triton launches and fused CPU kernel
        calls."""
        return sum(self.ops.values()) + self.triton_launches + \
            self.cpu_kernel_calls
