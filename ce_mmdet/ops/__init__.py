"""CE arithmetic, apart from the modules (mmcv's ``ops`` pattern).

* :func:`channel_equilibrium` and :func:`batchnorm_channel_equilibrium`, the
  functional ops (input, parameters and state positional, the rest
  keyword-only);
* :class:`CEParams`, :class:`CEState`, :class:`CEConfig`,
  :class:`BatchNormArgs`, their arguments; :class:`Epilogue`, the block
  tail (``relu(out + residual)``) split into what the op fuses and the rest;
* :func:`resolve_impl`, the one place that picks the implementation
  (``'auto'``, ``'torch'``, ``'triton'``; environment ``CE_MMDET_IMPL``).
"""
from .channel_equilibrium import (Epilogue, batchnorm_channel_equilibrium,
                                  channel_equilibrium)
from .impl import IMPLS, check_impl, resolve_impl
from .types import (BatchNormArgs, CEConfig, CEParams, CEState,
                    is_plain_batchnorm, is_sync_batchnorm)

__all__ = [
    'BatchNormArgs', 'CEConfig', 'CEParams', 'CEState', 'Epilogue', 'IMPLS',
    'batchnorm_channel_equilibrium', 'channel_equilibrium', 'check_impl',
    'is_plain_batchnorm', 'is_sync_batchnorm', 'resolve_impl'
]
