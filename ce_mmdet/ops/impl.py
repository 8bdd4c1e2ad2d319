"""The one place that picks the implementation of the CE ops.

``impl`` is ``'auto'`` (default), ``'torch'`` or ``'triton'``; it comes from
``ChannelEquilibrium(impl=...)`` / ``ce_cfg=dict(impl=...)`` and is overridden
for the whole process by the environment variable ``CE_MMDET_IMPL`` (set it
to compare implementations without touching a config).

* ``'torch'``: PyTorch ops only; runs everywhere (CPU, CUDA, any dtype).
* ``'triton'``: Triton kernels for the passes over the feature map. Not
  available yet: asking for it raises ``NotImplementedError``.
* ``'auto'``: the fastest implementation available for the tensor's device
  and dtype; today always ``'torch'``.
"""
import os
from typing import Optional

import torch

IMPLS = ('auto', 'torch', 'triton')
ENV_VAR = 'CE_MMDET_IMPL'


def check_impl(impl: str, source: str = 'impl') -> str:
    """``impl`` if it is one of :data:`IMPLS`, else a ValueError naming
    them (``source`` says where the value came from)."""
    if not isinstance(impl, str) or impl not in IMPLS:
        raise ValueError(f'{source} must be one of {IMPLS}, got {impl!r}')
    return impl


def resolve_impl(impl: str = 'auto',
                 tensor: Optional[torch.Tensor] = None) -> str:
    """The implementation that runs a CE op on ``tensor``.

    Args:
        impl (str): the requested one (:data:`IMPLS`); the environment
            variable ``CE_MMDET_IMPL``, when set and not empty, wins.
        tensor (Tensor, optional): the op's input (device and dtype decide
            what ``'auto'`` means).

    Returns:
        str: ``'torch'`` (the only concrete implementation today).

    Raises:
        ValueError: for a value not in :data:`IMPLS`.
        NotImplementedError: for ``'triton'``.
    """
    env = os.environ.get(ENV_VAR, '')
    if env:
        impl = check_impl(env, f'the environment variable {ENV_VAR}')
    else:
        impl = check_impl(impl)
    if impl == 'triton':
        raise NotImplementedError(
            "impl='triton' is not available in this version of ce_mmdet; "
            "use impl='torch' or 'auto' (or unset "
            f'{ENV_VAR})')
    return 'torch'
