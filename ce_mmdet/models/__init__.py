from .backbones import CEBasicBlock, CEBottleneck, CEResNet
from .layers import ChannelEquilibrium
from .necks import CEFPN, ConvNormCE

__all__ = [
    'CEBasicBlock', 'CEBottleneck', 'CEResNet', 'ChannelEquilibrium',
    'CEFPN', 'ConvNormCE'
]
