"""Distributed training without a GPU (gloo), for mmengine 0.10.

mmengine 0.10's ``pytorch`` launcher calls ``torch.cuda.set_device`` and its
runner wraps the model in DDP with ``device_ids=[LOCAL_RANK]`` whatever the
device. Without a usable GPU the first raises (a CPU-only torch build:
``AttributeError: module 'torch._C' has no attribute '_cuda_setDevice'``; a
CUDA build, PyPI's default on Linux, on a machine without a GPU or driver:
``RuntimeError: Found no NVIDIA driver``) and the second makes DDP refuse a
CPU module, so ``torchrun tools/train.py --launcher pytorch`` cannot run on a
laptop or in CPU CI, even with ``env_cfg.dist_cfg.backend=gloo``.

:func:`enable_cpu_distributed` fixes both, and does nothing where CUDA is
available (where the original code paths are right). It is not applied on
``import ce_mmdet``: ``tools/train.py`` and ``tools/test.py`` call it.

* the launcher initialises the process group without touching CUDA;
* the runner's default DDP wrapper passes no ``device_ids`` for a CPU module.
"""
import torch
import torch.distributed as torch_dist
from mmengine.model import MMDistributedDataParallel


class CPUDistributedDataParallel(MMDistributedDataParallel):
    """MMDistributedDataParallel that drops ``device_ids`` for CPU modules
    (DDP only accepts them for GPU modules)."""

    def __init__(self, module, device_ids=None, **kwargs):
        params = list(module.parameters())
        if params and params[0].device.type == 'cpu':
            device_ids = None
        super().__init__(module=module, device_ids=device_ids, **kwargs)


def _init_dist_pytorch_cpu(backend, init_backend='torch', **kwargs) -> None:
    """mmengine's pytorch launcher without ``torch.cuda.set_device``."""
    if init_backend != 'torch':
        raise ValueError(f'init_backend={init_backend!r} needs a CUDA build '
                         'of torch; on CPU only "torch" (gloo) works')
    torch_dist.init_process_group(backend=backend, **kwargs)


def enable_cpu_distributed() -> bool:
    """Patch mmengine where no GPU can be used (a CPU-only torch build, or
    a CUDA build without a GPU or driver); returns whether it did."""
    if torch.cuda.is_available():
        return False
    import mmengine.dist.utils as dist_utils
    import mmengine.runner.runner as runner_module
    dist_utils._init_dist_pytorch = _init_dist_pytorch_cpu
    runner_module.MMDistributedDataParallel = CPUDistributedDataParallel
    return True
