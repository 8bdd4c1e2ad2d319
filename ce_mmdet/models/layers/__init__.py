from .batchnorm_handoff import BatchNorm2dBeforeCE
from .ce_function import channel_equilibrium
from .channel_equilibrium import ChannelEquilibrium

__all__ = ['BatchNorm2dBeforeCE', 'ChannelEquilibrium', 'channel_equilibrium']
