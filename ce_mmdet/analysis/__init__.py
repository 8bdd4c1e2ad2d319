from .flops import (CE_OP_NAME, ce_flop_count, ce_flop_jit,
                    register_ce_flop_handle)

__all__ = [
    'CE_OP_NAME', 'ce_flop_count', 'ce_flop_jit', 'register_ce_flop_handle'
]
