from .ce_resnet import CEBasicBlock, CEResNet

__all__ = ['CEBasicBlock', 'CEResNet']
