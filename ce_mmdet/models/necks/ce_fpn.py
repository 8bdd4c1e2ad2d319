"""CE-FPN: mmdet's FPN with Channel Equilibrium after its normalised convs."""
import copy
from typing import Dict, List, Optional, Sequence

from mmcv.cnn import ConvModule, build_plugin_layer
from mmdet.models.necks import FPN
from mmdet.registry import MODELS

CE_POSITIONS = ('lateral', 'output')


class ConvNormCE(ConvModule):
    """A ConvModule whose norm is followed by a CE layer (``self.ce``):
    conv -> norm -> CE -> activation.

    Instances are made from existing ConvModules by :meth:`from_conv_module`,
    which keeps their ``conv`` / ``norm`` children (and so their state dict
    keys) and adds ``ce``.
    """

    @classmethod
    def from_conv_module(cls, module: ConvModule, ce_cfg: Dict) -> 'ConvModule':
        """Turn ``module`` (conv -> norm [-> act]) into a ConvNormCE in place.

        Raises:
            ValueError: if the module has no norm layer or another order.
        """
        if not module.with_norm:
            raise ValueError('CE follows a norm layer; this ConvModule has '
                             'none (set norm_cfg)')
        if tuple(module.order) != ('conv', 'norm', 'act'):
            raise ValueError('CE needs the order ("conv", "norm", "act"), '
                             f'got {module.order}')
        channels = module.conv.out_channels
        _, ce = build_plugin_layer(copy.deepcopy(ce_cfg), in_channels=channels)
        module.__class__ = cls
        module.add_module('ce', ce)
        ce.follow(module.norm, scope=module)
        return module

    def forward(self, x, activate: bool = True, norm: bool = True):
        out = super().forward(x, activate=False, norm=norm)
        if norm:
            out = self.ce(out)
        if activate and self.with_activation:
            out = self.activate(out)
        return out


@MODELS.register_module()
class CEFPN(FPN):
    """FPN whose lateral and/or output convolutions are followed by a norm
    layer and Channel Equilibrium: conv -> norm -> CE (-> act).

    A drop-in for mmdet's :class:`~mmdet.models.necks.FPN`: every FPN argument
    keeps its meaning and the outputs have the same number and shapes. The
    extra levels RetinaNet adds (``add_extra_convs``) are output convolutions
    and get CE when ``'output'`` is in ``ce_on``.

    Why a norm layer is required: CE is defined on the output of a
    BatchNorm (its decorrelation and instance scale assume normalised,
    zero-mean-ish channels), and mmdet's FPN has no norm by default. So
    ``norm_cfg`` defaults to BN here and must not be None while CE is on;
    ``ce_on=()`` gives exactly ``FPN(norm_cfg=norm_cfg)``. ``out_channels``
    must be a multiple of ``ce_cfg['group_size']``.

    Args:
        in_channels (list[int]): as in FPN.
        out_channels (int): as in FPN.
        num_outs (int): as in FPN.
        ce_cfg (dict): CE layer config. Default: ChannelEquilibrium with
            group_size=16, num_iters=3, reduction=4.
        ce_on (Sequence[str]): any of ``'lateral'``, ``'output'``.
            Default: both.
        norm_cfg (dict): norm layer config. Default: ``dict(type='BN')``.
        **kwargs: every other FPN argument.

    Example:
        >>> import torch
        >>> from ce_mmdet.models import CEFPN
        >>> neck = CEFPN([16, 32], 32, num_outs=3, add_extra_convs='on_output')
        >>> feats = [torch.rand(2, 16, 16, 16), torch.rand(2, 32, 8, 8)]
        >>> [tuple(o.shape) for o in neck(feats)]
        [(2, 32, 16, 16), (2, 32, 8, 8), (2, 32, 4, 4)]
    """

    def __init__(self,
                 in_channels: List[int],
                 out_channels: int,
                 num_outs: int,
                 ce_cfg: Optional[Dict] = None,
                 ce_on: Sequence[str] = CE_POSITIONS,
                 norm_cfg: Optional[Dict] = dict(type='BN', requires_grad=True),
                 **kwargs) -> None:
        if isinstance(ce_on, str):
            ce_on = (ce_on, )
        ce_on = tuple(ce_on)
        bad = [p for p in ce_on if p not in CE_POSITIONS]
        if bad:
            raise ValueError(f'ce_on entries must be in {CE_POSITIONS}, '
                             f'got {bad}')
        if ce_on and norm_cfg is None:
            raise ValueError('CEFPN puts CE after a norm layer: norm_cfg must '
                             f'be set while ce_on={ce_on}')
        if 'lateral' in ce_on and kwargs.get('no_norm_on_lateral', False):
            raise ValueError('ce_on has "lateral" but no_norm_on_lateral=True'
                             ' leaves the lateral convs without a norm layer')
        if ce_cfg is not None and not isinstance(ce_cfg, dict):
            raise TypeError(f'ce_cfg must be a dict, got {type(ce_cfg)}')
        ce_cfg = {
            'type': 'ChannelEquilibrium',
            'group_size': 16,
            'num_iters': 3,
            'reduction': 4,
            **(ce_cfg or {})
        }
        super().__init__(
            in_channels, out_channels, num_outs, norm_cfg=norm_cfg, **kwargs)
        self.ce_cfg = ce_cfg
        self.ce_on = ce_on
        if 'lateral' in ce_on:
            for conv in self.lateral_convs:
                ConvNormCE.from_conv_module(conv, ce_cfg)
        if 'output' in ce_on:
            for conv in self.fpn_convs:
                ConvNormCE.from_conv_module(conv, ce_cfg)
