"""CE-FPN: mmdet's FPN with Channel Equilibrium after its normalised convs."""
from typing import Dict, List, Optional, Sequence

from mmcv.cnn import ConvModule
from mmdet.models.necks import FPN
from mmdet.registry import MODELS

from ..backbones.ce_resnet import DEFAULT_CE_CFG, build_ce_layer

CE_POSITIONS = ('lateral', 'output')


class ConvNormCE(ConvModule):
    """mmcv's :class:`ConvModule` with a CE layer after its norm:
    conv -> norm + CE (one op) -> activation.

    Same arguments as ``ConvModule`` in the same order, and ``ce_cfg``
    (keyword-only); the order must be ``('conv', 'norm', 'act')`` and a norm
    is required, because CE follows a norm layer. The children ``conv``,
    the norm (``bn`` for BN) and ``activate`` keep ConvModule's names (and
    state dict keys); the CE layer is ``ce``. ``forward`` calls
    ``self.ce(self.conv(x), bn=self.norm, inplace=True)``: forward hooks on
    the norm do not run (see :class:`ChannelEquilibrium`).

    Example:
        >>> import torch
        >>> from ce_mmdet.models import ConvNormCE
        >>> m = ConvNormCE(8, 16, 3, padding=1, norm_cfg=dict(type='BN'),
        ...                ce_cfg=dict(group_size=8))
        >>> m(torch.rand(2, 8, 6, 6)).shape
        torch.Size([2, 16, 6, 6])
    """

    def __init__(self,
                 in_channels,
                 out_channels,
                 kernel_size,
                 stride=1,
                 padding=0,
                 dilation=1,
                 groups=1,
                 bias='auto',
                 conv_cfg=None,
                 norm_cfg=None,
                 act_cfg=dict(type='ReLU'),
                 inplace=True,
                 with_spectral_norm=False,
                 padding_mode='zeros',
                 order=('conv', 'norm', 'act'),
                 efficient_conv_bn_eval=False,
                 *,
                 ce_cfg: Dict) -> None:
        if norm_cfg is None:
            raise ValueError('CE follows a norm layer; ConvNormCE needs a '
                             'norm_cfg, got None')
        if tuple(order) != ('conv', 'norm', 'act'):
            raise ValueError('ConvNormCE needs the order ("conv", "norm", '
                             f'"act"), got {order}')
        super().__init__(in_channels, out_channels, kernel_size, stride,
                         padding, dilation, groups, bias, conv_cfg, norm_cfg,
                         act_cfg, inplace, with_spectral_norm, padding_mode,
                         order, efficient_conv_bn_eval)
        self.ce = build_ce_layer(ce_cfg, self.conv.out_channels)

    @classmethod
    def from_conv_module(cls, module: ConvModule,
                         ce_cfg: Dict) -> 'ConvNormCE':
        """A ConvNormCE with ``module``'s configuration and weights (a new
        module; ``module`` is left as it is).

        Raises:
            ValueError: if ``module`` has no norm layer, another order, or
                explicit padding.
        """
        if not module.with_norm:
            raise ValueError('CE follows a norm layer; this ConvModule has '
                             'none (set norm_cfg)')
        if module.with_explicit_padding:
            raise ValueError('ConvNormCE.from_conv_module does not copy '
                             'explicit padding layers')
        conv = module.conv
        new = cls(
            module.in_channels, module.out_channels, module.kernel_size,
            module.stride, module.padding, module.dilation, module.groups,
            module.with_bias, module.conv_cfg, module.norm_cfg,
            module.act_cfg, module.inplace, module.with_spectral_norm,
            getattr(conv, 'padding_mode', 'zeros'), tuple(module.order),
            ce_cfg=ce_cfg)
        missing, unexpected = new.load_state_dict(
            module.state_dict(), strict=False)
        if unexpected or any(not k.startswith('ce.') for k in missing):
            raise ValueError(f'could not copy {type(module).__name__}: '
                             f'missing {missing}, unexpected {unexpected}')
        return new

    def forward(self, x, activate: bool = True, norm: bool = True):
        """conv -> norm + CE -> act (``norm=False`` skips both)."""
        x = self.conv(x)
        if norm:  # the conv output is read by nothing else
            x = self.ce(x, bn=self.norm, inplace=True)
        if activate and self.with_activation:
            x = self.activate(x)
        return x


@MODELS.register_module()
class CEFPN(FPN):
    """FPN whose lateral and/or output convolutions are followed by a norm
    layer and Channel Equilibrium: conv -> norm -> CE (-> act).

    A drop-in for mmdet's :class:`~mmdet.models.necks.FPN`: every FPN argument
    keeps its meaning and position (``CEFPN([64, 128], 64, 2, 0)`` means what
    ``FPN([64, 128], 64, 2, 0)`` means), the CE arguments are keyword-only
    after them, and the outputs have the same number and shapes. Each
    convolution with CE becomes a :class:`ConvNormCE` (state dict keys
    unchanged, plus ``.ce``), whose norm + CE run as one op. The
    extra levels RetinaNet adds (``add_extra_convs``) are output convolutions
    and get CE when ``'output'`` is in ``ce_on``.

    Why a norm layer is required: CE is defined on the output of a
    BatchNorm (its decorrelation and instance scale assume normalised,
    zero-mean-ish channels), and mmdet's FPN has no norm by default. So
    ``norm_cfg`` defaults to BN here and must not be None while CE is on;
    ``ce_on=()`` gives exactly ``FPN(norm_cfg=norm_cfg)``. ``out_channels``
    must be a multiple of ``ce_cfg['group_size']``.

    Args:
        in_channels, out_channels, num_outs, start_level, end_level,
            add_extra_convs, relu_before_extra_convs, no_norm_on_lateral,
            conv_cfg, act_cfg, upsample_cfg, init_cfg: as in FPN.
        norm_cfg (dict): norm layer config. Default: ``dict(type='BN',
            requires_grad=True)`` (FPN's default is None: see above).
        ce_cfg (dict): CE layer config. Default: ChannelEquilibrium with
            group_size=16, num_iters=3, reduction=4.
        ce_on (Sequence[str]): any of ``'lateral'``, ``'output'``.
            Default: both.

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
                 start_level: int = 0,
                 end_level: int = -1,
                 add_extra_convs=False,
                 relu_before_extra_convs: bool = False,
                 no_norm_on_lateral: bool = False,
                 conv_cfg: Optional[Dict] = None,
                 norm_cfg: Optional[Dict] = dict(type='BN',
                                                 requires_grad=True),
                 act_cfg: Optional[Dict] = None,
                 upsample_cfg: Dict = dict(mode='nearest'),
                 init_cfg=dict(
                     type='Xavier', layer='Conv2d', distribution='uniform'),
                 *,
                 ce_cfg: Optional[Dict] = None,
                 ce_on: Sequence[str] = CE_POSITIONS) -> None:
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
        if 'lateral' in ce_on and no_norm_on_lateral:
            raise ValueError('ce_on has "lateral" but no_norm_on_lateral=True'
                             ' leaves the lateral convs without a norm layer')
        if ce_cfg is not None and not isinstance(ce_cfg, dict):
            raise TypeError(f'ce_cfg must be a dict, got {type(ce_cfg)}')
        ce_cfg = {**DEFAULT_CE_CFG, **(ce_cfg or {})}
        group_size = ce_cfg.get('group_size')
        if ce_on and isinstance(out_channels, int) and isinstance(
                group_size, int) and group_size > 0 and \
                out_channels % group_size:
            # the CE layers have out_channels channels: say so here, not
            # as the layer's 'in_channels', a name CEFPN uses for its inputs
            raise ValueError(
                f'CEFPN: out_channels ({out_channels}) must be a multiple of '
                f'the CE group_size ({group_size}); set '
                f'ce_cfg=dict(group_size=...) to a divisor of {out_channels}')
        super().__init__(in_channels, out_channels, num_outs, start_level,
                         end_level, add_extra_convs, relu_before_extra_convs,
                         no_norm_on_lateral, conv_cfg, norm_cfg, act_cfg,
                         upsample_cfg, init_cfg)
        self.ce_cfg = ce_cfg
        self.ce_on = ce_on
        for position, convs in (('lateral', self.lateral_convs),
                                ('output', self.fpn_convs)):
            if position in ce_on:
                for i, conv in enumerate(convs):
                    convs[i] = ConvNormCE.from_conv_module(conv, self.ce_cfg)
