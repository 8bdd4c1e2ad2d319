from .flops import (BNCE_OP_NAME, CE_OP_NAME, ce_activation_handles,
                    ce_flop_count, ce_flop_handles, register_ce_flop_handles)
from .inhibited import InhibitedChannelMeter

__all__ = [
    'BNCE_OP_NAME', 'CE_OP_NAME', 'ce_activation_handles', 'ce_flop_count',
    'ce_flop_handles', 'register_ce_flop_handles', 'InhibitedChannelMeter'
]
