"""Let ``torch.load(weights_only=True)`` read the checkpoints mmengine writes.

Since torch 2.6, ``torch.load`` defaults to ``weights_only=True``: a restricted
unpickler that only builds allow-listed types. mmengine (0.10.x) does not pass
``weights_only``, and its checkpoints hold a few non-tensor objects, so
``tools/test.py`` and ``--resume`` fail with
``Unsupported global: mmengine.logging.history_buffer.HistoryBuffer``.

:func:`register_mmengine_safe_globals` allow-lists exactly what mmengine's own
checkpoints contain (found by listing the pickle's GLOBAL opcodes of a real
Runner checkpoint):

* ``mmengine.logging.history_buffer.HistoryBuffer`` (the message hub's logs);
* numpy arrays, dtypes and scalars (``_reconstruct``, ``ndarray``, ``dtype``,
  ``scalar``), under their numpy 2 (``numpy._core``) and numpy 1
  (``numpy.core``) paths, and numpy 2's dtype classes (``Float64DType``...);
  ``collections.Counter`` and ``_codecs.encode`` are already allowed by
  torch;
* ``builtins.getattr``, **not** the real one: a :func:`_history_buffer_getattr`
  stand-in that only returns the statistics methods of ``HistoryBuffer``.
  ``HistoryBuffer.__getstate__`` stores its ``_statistics_methods`` dict, whose
  values (``HistoryBuffer.min`` ...) pickle as ``getattr(HistoryBuffer,
  'min')``. Allowing the real ``getattr`` would let a checkpoint reach any
  attribute of any allowed object (``getattr(obj, '__globals__')``...), which
  reopens the hole the restricted unpickler closes.

Nothing else is allowed: ``weights_only`` is never turned off, and a
checkpoint that pickles any other callable is still refused.
"""
import inspect

import torch

_REGISTERED = False


def _history_buffer_getattr(obj, name, *default):
    """``getattr`` restricted to HistoryBuffer's statistics methods.

    Raises:
        pickle.UnpicklingError: for any other object or attribute.
    """
    import pickle

    from mmengine.logging.history_buffer import HistoryBuffer
    if default:
        raise pickle.UnpicklingError(
            'getattr with a default is not allowed in a weights_only load')
    if obj is not HistoryBuffer or not isinstance(name, str) or \
            name.startswith('_'):
        raise pickle.UnpicklingError(
            f'getattr({obj!r}, {name!r}) is not allowed in a weights_only '
            'load: only HistoryBuffer statistics methods are')
    attr = inspect.getattr_static(HistoryBuffer, name, None)
    if not inspect.isfunction(attr):
        raise pickle.UnpicklingError(
            f'HistoryBuffer.{name} is not a statistics method')
    return getattr(HistoryBuffer, name)


def mmengine_safe_globals() -> list:
    """The (object, pickle path) pairs that mmengine checkpoints need."""
    import numpy as np
    from mmengine.logging.history_buffer import HistoryBuffer

    try:  # numpy >= 2
        from numpy._core import multiarray
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray
    entries = [
        (HistoryBuffer, 'mmengine.logging.history_buffer.HistoryBuffer'),
        (np.ndarray, 'numpy.ndarray'),
        (np.dtype, 'numpy.dtype'),
        (_history_buffer_getattr, '__builtin__.getattr'),
        (_history_buffer_getattr, 'builtins.getattr'),
    ]
    for core in ('numpy._core.multiarray', 'numpy.core.multiarray'):
        entries.append((multiarray._reconstruct, f'{core}._reconstruct'))
        entries.append((multiarray.scalar, f'{core}.scalar'))
    # np.dtype('f8') is built through numpy.dtype, but torch checks the type of
    # the built object, which in numpy 2 is a DType class (Float64DType ...).
    dtype_classes = getattr(np, 'dtypes', None)
    if dtype_classes is not None:
        for name in dir(dtype_classes):
            cls = getattr(dtype_classes, name)
            if inspect.isclass(cls) and issubclass(cls, np.dtype):
                entries.append((cls, f'numpy.dtypes.{name}'))
    return entries


def register_mmengine_safe_globals() -> None:
    """Allow-list mmengine's checkpoint types for weights_only loading.

    Idempotent. (``add_safe_globals`` is in every torch ce_mmdet imports
    on, 2.7 and newer.)
    """
    global _REGISTERED
    if _REGISTERED:
        return
    torch.serialization.add_safe_globals(mmengine_safe_globals())
    _REGISTERED = True
