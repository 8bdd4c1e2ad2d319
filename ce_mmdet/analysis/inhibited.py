"""Inhibited-channel statistics of a ResNet-style backbone (CE or BN).

A channel is *inhibited* on an image when its mean activation after the ReLU
that follows a normalisation (and, for CE models, CE) is below a threshold:
absolute (``thr``), or relative to the layer's mean channel magnitude on that
image (``relative=True``: below ``thr * mean_c(mean activation)``).

Measured places, the same in CE and BN models so the two compare:

* ``stem``: the stem's ReLU output (input of the max-pool);
* ``layerL.B``: the output of each residual block, i.e. the ReLU after the
  block's last norm (+ CE) and the identity.
"""
import numbers
from collections import OrderedDict
from typing import Dict, List

import torch
import torch.nn as nn
from mmdet.models.backbones.resnet import BasicBlock, Bottleneck


class InhibitedChannelMeter:
    """Hooks a backbone and accumulates per-layer inhibited fractions.

    Args:
        backbone (nn.Module): a ResNet-like backbone (mmdet ResNet, CEResNet).
        thr (float): the threshold. Default: 1e-2.
        relative (bool): threshold relative to the layer's mean channel
            magnitude per image. Default: False.

    Example:
        >>> import torch
        >>> from mmdet.models.backbones import ResNet
        >>> from ce_mmdet.analysis import InhibitedChannelMeter
        >>> backbone = ResNet(depth=18)
        >>> backbone.eval()  # mmdet's ResNet.train returns None
        >>> meter = InhibitedChannelMeter(backbone, thr=1e-2)
        >>> with torch.no_grad():
        ...     _ = backbone(torch.rand(2, 3, 64, 64))
        >>> meter.remove()  # the hooks off; the counts stay
        >>> summary = meter.summary()
        >>> list(summary['layers'])[:3]
        ['stem', 'layer1.0', 'layer1.1']
        >>> last = summary['layers']['layer4.1']
        >>> last['channels'], last['images']
        (512, 2)
        >>> 0 <= summary['overall'] <= 1
        True
    """

    def __init__(self, backbone: nn.Module, thr: float = 1e-2,
                 relative: bool = False) -> None:
        if isinstance(thr, bool) or not isinstance(thr, numbers.Real):
            raise TypeError(f'thr must be a number, got {thr!r}')
        if not thr >= 0:
            raise ValueError(f'thr must be >= 0, got {thr!r}')
        if not isinstance(relative, bool):
            raise TypeError(f'relative must be a bool, got {relative!r}')
        self.thr = float(thr)
        self.relative = relative
        self.counts: Dict[str, List[float]] = OrderedDict()
        self.channels: Dict[str, int] = OrderedDict()
        self.per_channel: Dict[str, torch.Tensor] = OrderedDict()
        self._handles = []
        maxpool = getattr(backbone, 'maxpool', None)
        if isinstance(maxpool, nn.Module):
            self._handles.append(
                maxpool.register_forward_pre_hook(
                    lambda m, inputs: self._record('stem', inputs[0])))
        for name, module in backbone.named_modules():
            if isinstance(module, (BasicBlock, Bottleneck)):
                self._handles.append(
                    module.register_forward_hook(
                        lambda m, i, out, name=name: self._record(name, out)))
        if not self._handles:
            raise ValueError(
                f'{type(backbone).__name__} has no ResNet blocks to measure')

    @torch.no_grad()
    def _record(self, name: str, act: torch.Tensor) -> None:
        # per image and channel: mean activation over positions
        means = act.detach().float().mean(dim=(2, 3))  # (N, C)
        limit = self.thr
        if self.relative:
            limit = self.thr * means.mean(dim=1, keepdim=True)
        inhibited = (means < limit).float()
        frac = inhibited.mean(dim=1)  # per image
        self.counts.setdefault(name, []).extend(frac.tolist())
        self.channels[name] = act.shape[1]
        per_channel = inhibited.sum(dim=0).cpu()
        if name in self.per_channel:
            per_channel += self.per_channel[name]
        self.per_channel[name] = per_channel

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def summary(self) -> Dict:
        """Per-layer and overall (channel-weighted) inhibited fractions,
        averaged over the images seen."""
        layers = OrderedDict()
        total, weight = 0.0, 0
        for name, fracs in self.counts.items():
            value = sum(fracs) / len(fracs)
            layers[name] = dict(
                inhibited=value,
                channels=self.channels[name],
                images=len(fracs),
                # per channel: the fraction of images it is inhibited on
                channel_inhibited=(self.per_channel[name] /
                                   len(fracs)).tolist())
            total += value * self.channels[name]
            weight += self.channels[name]
        return dict(
            thr=self.thr,
            relative=self.relative,
            overall=total / weight if weight else float('nan'),
            layers=layers)
