from .flops import (CE_OP_NAME, ce_activation_jit, ce_flop_count, ce_flop_jit,
                    register_ce_flop_handle)
from .inhibited import InhibitedChannelMeter

__all__ = [
    'CE_OP_NAME', 'ce_activation_jit', 'ce_flop_count', 'ce_flop_jit',
    'register_ce_flop_handle', 'InhibitedChannelMeter'
]
