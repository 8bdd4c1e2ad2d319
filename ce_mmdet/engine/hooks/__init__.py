from .ce_sync_check_hook import CESyncCheckHook, ce_running_buffers

__all__ = ['CESyncCheckHook', 'ce_running_buffers']
