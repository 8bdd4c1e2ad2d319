from .cpu_distributed import (CPUDistributedDataParallel,
                              enable_cpu_distributed)
from .dist_shutdown import shutdown_distributed
from .hooks import CESyncCheckHook, ce_running_buffers

__all__ = [
    'CESyncCheckHook', 'ce_running_buffers', 'CPUDistributedDataParallel',
    'enable_cpu_distributed', 'shutdown_distributed'
]
