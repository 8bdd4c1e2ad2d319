from .backbones import CEBasicBlock, CEResNet
from .layers import ChannelEquilibrium, channel_equilibrium
from .necks import CEFPN, ConvNormCE

__all__ = [
    'CEBasicBlock', 'CEResNet', 'ChannelEquilibrium', 'channel_equilibrium',
    'CEFPN', 'ConvNormCE'
]
