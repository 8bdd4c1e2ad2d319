"""The oldest torch ce_mmdet runs on, checked when the package is imported.

CE's ops use torch APIs that older releases lack: the flag behind
``torch.compiler.is_exporting`` (torch 2.7; read on every forward, to keep
exported graphs to standard ops, :mod:`ce_mmdet.ops.export`),
``torch.is_autocast_enabled(device)`` (2.4) and ``torch.library.custom_op``
(2.4; the Triton launches). Below :data:`MIN_TORCH` a CE layer would fail
at its first forward with an ``AttributeError`` or ``TypeError`` deep
inside the op, so ``import ce_mmdet`` (and with it a config's
``custom_imports``) stops first and says what to install. Between
:data:`MIN_TORCH` and :data:`MIN_TORCH_COMPILE` the ops run eagerly under
``torch.compile`` (:func:`compiles_ce`).

Most mmdet 3.x environments built from mmcv's prebuilt wheels have torch
2.1 or older (mmcv 2.1.0's newest wheels are for torch 2.1); with torch
2.7 or newer, mmcv builds from source (``pip install --no-build-isolation
mmcv==2.1.0``, about 20-30 minutes on 2 cores).
"""
import re
from typing import Tuple

#: the oldest (major, minor) torch ce_mmdet runs on
MIN_TORCH = (2, 7)
#: the oldest (major, minor) torch whose ``torch.compile`` of CE was checked
#: (the suite's compile and export tests; 2.11 is the GPU check's torch):
#: below it the CE ops run eagerly inside a compiled model
#: (:func:`compiles_ce`). torch 2.7.1's dynamo fails with internal errors
#: while it traces the ops' hand-written backward (a NamedTuple sliced or
#: ``_replace``-d); 2.8.0's too, there in the small graph's backward
#: (``VariableTracker.__init__() got an unexpected keyword argument
#: 'dynamic_attributes'``). 2.9.0's and 2.10.0's trace them, but a
#: property of a NamedTuple (``BatchNormArgs.uses_batch_stats``) breaks
#: their graph, and with ``dynamic=True`` 2.10.0's and 2.9.0's rebuild the
#: ops' frozen config dataclass from symbolic floats, running its
#: ``__post_init__`` checks on proxies (InternalTorchDynamoError). With the
#: property read inline, 2.9.0's inductor also fails once the image size
#: changes (automatic dynamic shapes, torch.compile's default): "cannot
#: determine truth value of Relational" ordering symbolic strides
#: (``ir.get_stride_order``), in a conv -> BN + CE -> conv training step
MIN_TORCH_COMPILE = (2, 11)


def torch_release(version: str) -> Tuple[int, int]:
    """``(major, minor)`` of a torch version string such as
    ``'2.13.0+cpu'`` or ``'2.6.0a0+git1234'``.

    Raises:
        ValueError: for a string that does not start with ``major.minor``.
    """
    match = re.match(r'(\d+)\.(\d+)', str(version))
    if match is None:
        raise ValueError(f'not a torch version: {version!r} (expected '
                         "'major.minor...', e.g. '2.13.0+cpu')")
    return int(match.group(1)), int(match.group(2))


def check_torch_version(version: str) -> None:
    """Raise ``ImportError`` when torch ``version`` is older than
    :data:`MIN_TORCH`, with what to do about it.

    Example:
        >>> check_torch_version('2.13.0+cpu')
        >>> check_torch_version('2.1.2+cu121')  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ImportError: ce_mmdet needs torch >= 2.7, found 2.1.2+cu121 ...
    """
    if torch_release(version) < MIN_TORCH:
        need = '.'.join(map(str, MIN_TORCH))
        raise ImportError(
            f'ce_mmdet needs torch >= {need}, found {version} (it uses '
            'torch.compiler.is_exporting, torch.is_autocast_enabled(device) '
            f'and torch.library.custom_op). Install torch >= {need} and '
            'build mmcv against it: pip install --no-build-isolation '
            '"mmcv>=2.0.0rc4,<2.2.0" (mmcv has no prebuilt wheels for it).')


def compiles_ce(version: str) -> bool:
    """Whether ``torch.compile`` traces into the CE ops on torch
    ``version`` (:data:`MIN_TORCH_COMPILE` or newer). Where it does not,
    they are ``torch.compiler.disable``-d: a compiled model breaks its graph
    around each CE op and runs the op eagerly, with eager's numbers."""
    return torch_release(version) >= MIN_TORCH_COMPILE
