from .ce_function import channel_equilibrium
from .channel_equilibrium import ChannelEquilibrium

__all__ = ['ChannelEquilibrium', 'channel_equilibrium']
