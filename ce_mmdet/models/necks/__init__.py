from .ce_fpn import CEFPN, ConvNormCE

__all__ = ['CEFPN', 'ConvNormCE']
