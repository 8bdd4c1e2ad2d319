"""CE-ResNet: mmdet's ResNet with Channel Equilibrium after the last BN of
each block (and after the stem BN), as in the published CE-ResNet.

Every block runs conv -> BN -> CE -> + identity -> ReLU as one explicit
call in its own forward, ``self.ce(self.conv3(out), bn=self.norm3,
inplace=True, residual=identity, relu=True)``, so the CE layer applies the
BN itself and adds the identity and applies the ReLU in the same pass over
the feature map (see :class:`ChannelEquilibrium`).
"""
import copy
import numbers
from typing import Dict, List, Optional, Sequence

import torch.nn as nn
import torch.utils.checkpoint as cp
from mmengine.logging import print_log
from mmengine.runner.checkpoint import _load_checkpoint_with_prefix
from mmengine.runner.checkpoint import _load_checkpoint
from mmdet.models.backbones.resnet import BasicBlock, Bottleneck, ResNet
from mmdet.registry import MODELS

from ..layers import ChannelEquilibrium

DEFAULT_CE_CFG = dict(
    type='ChannelEquilibrium', group_size=16, num_iters=3, reduction=4)


def build_ce_layer(ce_cfg: Dict, channels: int) -> nn.Module:
    """A CE layer of ``channels`` channels from ``ce_cfg`` (its ``type``
    defaults to ``'ChannelEquilibrium'``)."""
    if not isinstance(ce_cfg, dict):
        raise TypeError(f'ce_cfg must be a dict, got {type(ce_cfg)}')
    cfg = {**DEFAULT_CE_CFG, **copy.deepcopy(ce_cfg)}
    if 'in_channels' in cfg:
        raise ValueError('ce_cfg must not set in_channels; it follows '
                         'the layer widths')
    return MODELS.build(dict(cfg, in_channels=channels))


class CEBottleneck(Bottleneck):
    """mmdet's :class:`Bottleneck` with CE after ``norm3``:
    conv3 -> norm3 -> CE -> (plugins after conv3) -> + identity -> ReLU.

    Same arguments as mmdet's Bottleneck, in the same order, and
    ``ce_cfg`` (keyword-only; None: no CE, exactly mmdet's Bottleneck). The
    CE layer is ``self.ce`` (state dict keys ``layerL.B.ce.*``, as
    published); ``norm3`` keeps its keys. ``forward`` calls
    ``self.ce(self.conv3(out), bn=self.norm3, inplace=True,
    residual=identity, relu=True)``: one op for BN + CE + the residual
    addition + ReLU (the identity, ``downsample(x)`` where there is one, is
    computed before it), so forward hooks on ``norm3`` do not run, and
    ``self.relu`` is not called for the block's last ReLU (hook ``ce`` or
    the block instead; replacing ``self.relu`` changes only the first two).
    With plugins after conv3 the residual and ``self.relu`` follow them as
    in mmdet.

    Example:
        >>> import torch
        >>> from ce_mmdet.models import CEBottleneck
        >>> block = CEBottleneck(64, 16, ce_cfg=dict(group_size=16))
        >>> block(torch.rand(2, 64, 8, 8)).shape
        torch.Size([2, 64, 8, 8])
    """

    def __init__(self,
                 inplanes,
                 planes,
                 stride=1,
                 dilation=1,
                 downsample=None,
                 style='pytorch',
                 with_cp=False,
                 conv_cfg=None,
                 norm_cfg=dict(type='BN'),
                 dcn=None,
                 plugins=None,
                 init_cfg=None,
                 *,
                 ce_cfg: Optional[Dict] = None) -> None:
        super().__init__(inplanes, planes, stride, dilation, downsample,
                         style, with_cp, conv_cfg, norm_cfg, dcn, plugins,
                         init_cfg)
        self.with_ce = ce_cfg is not None
        if self.with_ce:
            self.ce = build_ce_layer(ce_cfg, planes * self.expansion)

    def forward(self, x):
        """mmdet's Bottleneck forward, with ``norm3``, CE, the residual
        addition and the ReLU as one op (without plugins after conv3)."""

        def _inner_forward(x):
            identity = x
            out = self.relu(self.norm1(self.conv1(x)))
            if self.with_plugins:
                out = self.forward_plugin(out, self.after_conv1_plugin_names)
            out = self.relu(self.norm2(self.conv2(out)))
            if self.with_plugins:
                out = self.forward_plugin(out, self.after_conv2_plugin_names)
            out = self.conv3(out)
            if self.downsample is not None:
                identity = self.downsample(x)
            if self.with_ce and not (self.with_plugins and
                                     self.after_conv3_plugin_names):
                # conv3's output is read by nothing else
                return self.ce(out, bn=self.norm3, inplace=True,
                               residual=identity, relu=True)
            if self.with_ce:
                out = self.ce(out, bn=self.norm3, inplace=True)
            else:
                out = self.norm3(out)
            if self.with_plugins:
                out = self.forward_plugin(out, self.after_conv3_plugin_names)
            out += identity
            return self.relu(out)

        if self.with_cp and x.requires_grad:
            return cp.checkpoint(_inner_forward, x, use_reentrant=False)
        return _inner_forward(x)


class CEBasicBlock(BasicBlock):
    """mmdet's :class:`BasicBlock` with CE after ``norm2`` (CE-ResNet-18/34):
    conv2 -> norm2 -> CE -> (plugins) -> + identity -> ReLU.

    Same arguments as mmdet's BasicBlock, in the same order, and ``ce_cfg``
    (keyword-only; None: no CE). Unlike mmdet's BasicBlock it takes plugins,
    at position ``'after_conv2'`` only (after CE, before the residual
    addition). ``forward`` calls ``self.ce(self.conv2(out), bn=self.norm2,
    inplace=True, residual=identity, relu=True)`` (without plugins; the
    identity is computed first): forward hooks on ``norm2`` do not run,
    and ``self.relu`` is not called for the last ReLU (it still is after
    conv1, and with plugins after the residual addition, as in mmdet).

    Example:
        >>> import torch
        >>> from ce_mmdet.models import CEBasicBlock
        >>> block = CEBasicBlock(32, 32, ce_cfg=dict(group_size=16))
        >>> block(torch.rand(2, 32, 8, 8)).shape
        torch.Size([2, 32, 8, 8])
    """

    def __init__(self,
                 inplanes,
                 planes,
                 stride=1,
                 dilation=1,
                 downsample=None,
                 style='pytorch',
                 with_cp=False,
                 conv_cfg=None,
                 norm_cfg=dict(type='BN'),
                 dcn=None,
                 plugins=None,
                 init_cfg=None,
                 *,
                 ce_cfg: Optional[Dict] = None) -> None:
        super().__init__(inplanes, planes, stride, dilation, downsample,
                         style, with_cp, conv_cfg, norm_cfg, dcn, None,
                         init_cfg)
        plugins = list(plugins or [])
        for plugin in plugins:
            if plugin.get('position') != 'after_conv2':
                raise ValueError(
                    'CEBasicBlock takes plugins at position "after_conv2" '
                    f'only, got {plugin.get("position")!r}')
        self.with_plugins = bool(plugins)
        # Bottleneck's helper only needs nn.Module.add_module on ``self``.
        self.after_conv2_plugin_names = Bottleneck.make_block_plugins(
            self, planes, [p['cfg'] for p in plugins])
        self.with_ce = ce_cfg is not None
        if self.with_ce:
            self.ce = build_ce_layer(ce_cfg, planes * self.expansion)

    def forward(self, x):
        """conv1 -> norm1 -> relu -> conv2 -> norm2 + CE -> plugins -> + id
        -> relu."""

        def _inner_forward(x):
            identity = x
            out = self.relu(self.norm1(self.conv1(x)))
            out = self.conv2(out)
            if self.downsample is not None:
                identity = self.downsample(x)
            if self.with_ce and not self.after_conv2_plugin_names:
                # conv2's output is read by nothing else
                return self.ce(out, bn=self.norm2, inplace=True,
                               residual=identity, relu=True)
            if self.with_ce:
                out = self.ce(out, bn=self.norm2, inplace=True)
            else:
                out = self.norm2(out)
            for name in self.after_conv2_plugin_names:
                out = getattr(self, name)(out)
            return self.relu(out + identity)

        if self.with_cp and x.requires_grad:
            return cp.checkpoint(_inner_forward, x, use_reentrant=False)
        return _inner_forward(x)


def _check_bools(name: str, value, length: int) -> tuple:
    if not isinstance(value, (list, tuple)) or len(value) != length or \
            not all(isinstance(v, bool) for v in value):
        raise ValueError(f'{name} must be a list/tuple of {length} bools '
                         f'(one per stage), got {value!r}')
    return tuple(value)


@MODELS.register_module()
class CEResNet(ResNet):
    """ResNet with Channel Equilibrium (CE-ResNet), for detection.

    A subclass of mmdet's :class:`~mmdet.models.backbones.ResNet` with the
    same arguments in the same order (``CEResNet(50, 3, 64, 64)`` means what
    ``ResNet(50, 3, 64, 64)`` means), and three keyword-only CE arguments
    after them. CE is placed as in the published CE-ResNet:

    * stem: conv1 -> norm1 + CE -> ReLU -> maxpool (the stem CE uses one
      group over all stem channels); with ``deep_stem`` CE follows the last
      stem norm (``stem.8``; mmdet's stem indices are kept).
    * Bottleneck (depth 50/101/152, :class:`CEBottleneck`): conv3 -> norm3 +
      CE -> (+ identity) -> ReLU; the layer is ``layerL.B.ce``.
    * BasicBlock (depth 18/34, :class:`CEBasicBlock`): conv2 -> norm2 + CE ->
      (+ identity).

    Each norm + CE pair runs as one op (:class:`ChannelEquilibrium` with
    ``bn=``): forward hooks on those norms do not run, and the ReLU that
    follows each pair (the stem's, a block's last) is applied inside that
    op, not by the block's or stem's ``relu`` module.

    Detection semantics: ``norm_eval=True`` also keeps every CE layer in eval
    mode (running statistics frozen, as mmdet does for BN);
    ``frozen_stages`` freezes the CE layers of those stages (and the stem CE
    for ``frozen_stages >= 0``) like their BN; any value below 0 freezes
    nothing, as in mmdet. With ``ce_stages`` all False and ``stem_ce=False``
    the network computes exactly mmdet's ResNet.

    Loading a BN ResNet checkpoint through ``init_cfg=dict(type='Pretrained',
    ...)`` works: CE tensors missing from it keep their fresh initialisation
    and the log says so in one line; any other missing key is a warning.

    Unlike mmdet's ResNet, bad arguments raise ``ValueError`` /
    ``TypeError`` with the value given and what is allowed (mmdet asserts).

    Args:
        depth (int): 18, 34, 50, 101 or 152.
        *args, **kwargs: every other argument of mmdet's ResNet, in its
            order (in_channels, stem_channels, base_channels, num_stages,
            strides, dilations, out_indices, style, deep_stem, avg_down,
            frozen_stages, conv_cfg, norm_cfg, norm_eval, dcn,
            stage_with_dcn, plugins, with_cp, zero_init_residual,
            pretrained, init_cfg).
        ce_cfg (dict): config of the CE layers (``type`` defaults to
            ``'ChannelEquilibrium'``; ``impl`` picks the implementation).
            Default: group_size=16, num_iters=3, reduction=4.
        ce_stages (Sequence[bool]): which stages get CE in every block.
            Default: (True, True, True, False), as published.
        stem_ce (bool): CE after the stem norm. Default: True.

    Example:
        >>> import torch
        >>> from ce_mmdet.models import CEResNet
        >>> model = CEResNet(depth=18, base_channels=16).eval()
        >>> outs = model(torch.rand(1, 3, 64, 64))
        >>> [tuple(o.shape) for o in outs]
        [(1, 16, 16, 16), (1, 32, 8, 8), (1, 64, 4, 4), (1, 128, 2, 2)]
    """

    arch_settings = {
        18: (CEBasicBlock, (2, 2, 2, 2)),
        34: (CEBasicBlock, (3, 4, 6, 3)),
        50: (CEBottleneck, (3, 4, 6, 3)),
        101: (CEBottleneck, (3, 4, 23, 3)),
        152: (CEBottleneck, (3, 8, 36, 3))
    }

    def __init__(self,
                 depth,
                 in_channels=3,
                 stem_channels=None,
                 base_channels=64,
                 num_stages=4,
                 strides=(1, 2, 2, 2),
                 dilations=(1, 1, 1, 1),
                 out_indices=(0, 1, 2, 3),
                 style='pytorch',
                 deep_stem=False,
                 avg_down=False,
                 frozen_stages=-1,
                 conv_cfg=None,
                 norm_cfg=dict(type='BN', requires_grad=True),
                 norm_eval=True,
                 dcn=None,
                 stage_with_dcn=(False, False, False, False),
                 plugins=None,
                 with_cp=False,
                 zero_init_residual=True,
                 pretrained=None,
                 init_cfg=None,
                 *,
                 ce_cfg: Optional[Dict] = None,
                 ce_stages: Sequence[bool] = (True, True, True, False),
                 stem_ce: bool = True) -> None:
        self._validate_resnet_args(depth, num_stages, strides, dilations,
                                   out_indices, style, frozen_stages)
        self.ce_stages = _check_bools('ce_stages', ce_stages, num_stages)
        if not isinstance(stem_ce, bool):
            raise TypeError(f'stem_ce must be a bool, got {stem_ce!r}')
        if ce_cfg is not None and not isinstance(ce_cfg, dict):
            raise TypeError(f'ce_cfg must be a dict, got {type(ce_cfg)}')
        self.ce_cfg = {**DEFAULT_CE_CFG, **copy.deepcopy(ce_cfg or {})}
        self.stem_ce = stem_ce
        super().__init__(depth, in_channels, stem_channels, base_channels,
                         num_stages, strides, dilations, out_indices, style,
                         deep_stem, avg_down, frozen_stages, conv_cfg,
                         norm_cfg, norm_eval, dcn, stage_with_dcn, plugins,
                         with_cp, zero_init_residual, pretrained, init_cfg)
        if zero_init_residual and init_cfg is None and pretrained is None:
            # mmdet's ResNet only recognises its own block classes for the
            # zero init of the last norm of each residual branch
            norm = 'norm3' if self.block is CEBottleneck else 'norm2'
            for name in self.res_layers:
                for blk in getattr(self, name):
                    blk.init_cfg = dict(
                        type='Constant', val=0, override=dict(name=norm))

    def make_res_layer(self, **kwargs) -> nn.Module:
        """mmdet's ResLayer, with ``ce_cfg`` for the blocks of CE stages."""
        # mmdet's ResNet.__init__ builds stage i while res_layers holds i
        # names
        stage = len(self.res_layers)
        if self.ce_stages[stage]:
            self._check_ce_width(stage,
                                 kwargs['planes'] * self.block.expansion)
            kwargs['ce_cfg'] = self.ce_cfg
        return super().make_res_layer(**kwargs)

    def _check_ce_width(self, stage: int, width: int) -> None:
        """A ValueError that names the stage and the settings that would
        fix it where a CE stage's width is not a multiple of the CE group
        size (the layer's own error would name neither). Stage widths
        double, so the first CE stage is the one that fails, and a divisor
        of its width fits every later stage."""
        group_size = self.ce_cfg.get('group_size')
        if not isinstance(group_size, int) or group_size < 1 or \
                width % group_size == 0:
            return  # a bad group_size: the CE layer reports it
        raise ValueError(
            f'CEResNet(depth={self.depth}, '
            f'base_channels={self.base_channels}): stage {stage + 1} has '
            f'{width} channels, not a multiple of group_size={group_size} '
            f'(groups are never shrunk silently); set '
            f'ce_cfg=dict(group_size=...) to a divisor of {width}, change '
            f'base_channels, or leave the stage out with ce_stages')

    @classmethod
    def _validate_resnet_args(cls, depth, num_stages, strides, dilations,
                              out_indices, style, frozen_stages) -> None:
        """ValueErrors for what mmdet's ResNet only asserts."""
        if depth not in cls.arch_settings:
            raise ValueError(f'depth must be one of '
                             f'{sorted(cls.arch_settings)}, got {depth!r}')
        if not isinstance(num_stages, int) or not 1 <= num_stages <= 4:
            raise ValueError(
                f'num_stages must be an int in [1, 4], got {num_stages!r}')
        if len(strides) != num_stages or len(dilations) != num_stages:
            raise ValueError(
                f'strides ({strides}) and dilations ({dilations}) must have '
                f'num_stages={num_stages} entries')
        if not out_indices or max(out_indices) >= num_stages:
            raise ValueError(f'out_indices must be non-empty and < '
                             f'num_stages={num_stages}, got {out_indices}')
        if style not in ('pytorch', 'caffe'):
            raise ValueError(
                f'style must be "pytorch" or "caffe", got {style!r}')
        if isinstance(frozen_stages, bool) or not isinstance(
                frozen_stages, numbers.Integral) or frozen_stages > num_stages:
            raise ValueError(f'frozen_stages must be an int <= '
                             f'num_stages={num_stages} (below 0: nothing '
                             f'frozen), got {frozen_stages!r}')

    def _pretrained_init(self) -> Optional[dict]:
        cfg = self.init_cfg
        if isinstance(cfg, dict) and cfg.get('type') == 'Pretrained':
            return cfg
        return None

    def _make_stem_layer(self, in_channels: int, stem_channels: int) -> None:
        super()._make_stem_layer(in_channels, stem_channels)
        if not self.stem_ce:
            return
        ce = build_ce_layer(dict(self.ce_cfg, group_size=stem_channels),
                            stem_channels)
        if self.deep_stem:
            # conv, bn, relu, conv, bn, relu, conv, bn, [CE], relu: the indices
            # of mmdet's deep stem (and so BN checkpoints) stay as they are.
            layers = list(self.stem)
            self.stem = nn.Sequential(*layers[:-1], ce, layers[-1])
        else:
            self.add_module('ce1', ce)  # beside 'bn1'

    def _freeze_stages(self) -> None:
        super()._freeze_stages()
        if self.frozen_stages >= 0 and self.stem_ce and not self.deep_stem:
            self.ce1.eval()
            for param in self.ce1.parameters():
                param.requires_grad = False

    def forward(self, x):
        """Stem (norm + CE as one op) then the residual stages; returns
        ``out_indices``."""
        if self.deep_stem and self.stem_ce:
            for i in range(6):
                x = self.stem[i](x)
            # stem[9] is the ReLU: applied by the CE op
            x = self.stem[8](self.stem[6](x), bn=self.stem[7], inplace=True,
                             relu=True)
        elif self.deep_stem:
            x = self.stem(x)
        elif self.stem_ce:
            x = self.ce1(self.conv1(x), bn=self.norm1, inplace=True,
                         relu=True)
        else:
            x = self.relu(self.norm1(self.conv1(x)))
        x = self.maxpool(x)
        outs = []
        for i, layer_name in enumerate(self.res_layers):
            x = getattr(self, layer_name)(x)
            if i in self.out_indices:
                outs.append(x)
        return tuple(outs)

    def train(self, mode: bool = True):
        """Training mode, with CE frozen like BN under ``norm_eval``."""
        super().train(mode)
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, ChannelEquilibrium):
                    m.eval()
        return self

    def ce_layer_names(self) -> List[str]:
        """Qualified names of every CE layer, in forward order."""
        return [
            name for name, m in self.named_modules()
            if isinstance(m, ChannelEquilibrium)
        ]

    def init_weights(self) -> None:
        """Default init, or a pretrained (BN or CE) checkpoint.

        A ``Pretrained`` checkpoint is loaded non-strictly; CE tensors it
        lacks keep their fresh initialisation, and one log line says how
        many tensors were loaded, how many CE tensors were not, and which
        unexpected keys (e.g. ``fc.*``) were ignored. Missing non-CE tensors
        are logged as a warning, with their names.
        """
        cfg = self._pretrained_init()
        if cfg is None:
            super().init_weights()
            return
        prefix = cfg.get('prefix')
        map_location = cfg.get('map_location', 'cpu')
        if prefix is None:
            ckpt = _load_checkpoint(cfg['checkpoint'], map_location,
                                    logger='current')
            state = ckpt.get('state_dict', ckpt) if isinstance(ckpt,
                                                               dict) else ckpt
        else:
            state = _load_checkpoint_with_prefix(prefix, cfg['checkpoint'],
                                                 map_location)
        state = {
            (k[len('module.'):] if k.startswith('module.') else k): v
            for k, v in state.items()
        }
        self.load_pretrained_state(state, source=cfg['checkpoint'])
        self._is_init = True

    def load_pretrained_state(self, state: Dict, source: str = 'state dict'):
        """Load a BN or CE ResNet state dict, logging a one-line summary.

        Returns:
            tuple[list[str], list[str]]: missing CE keys, missing other keys.
        """
        result = self.load_state_dict(state, strict=False)
        ce_prefixes = tuple(name + '.' for name in self.ce_layer_names())
        missing_ce = [k for k in result.missing_keys
                      if k.startswith(ce_prefixes)]
        missing_other = [k for k in result.missing_keys
                         if not k.startswith(ce_prefixes)]
        loaded = len(self.state_dict()) - len(result.missing_keys)
        ignored = sorted(result.unexpected_keys)
        shown = ', '.join(ignored[:6]) + (' ...' if len(ignored) > 6 else '')
        msg = (f'{type(self).__name__}: loaded {loaded} tensors from '
               f'{source}; ')
        if missing_ce:
            msg += (f'{len(missing_ce)} CE tensors of '
                    f'{len(self.ce_layer_names())} CE layers are not in it '
                    'and keep their fresh initialisation; ')
        else:
            msg += 'no CE tensor missing; '
        msg += (f'ignored {len(ignored)} unexpected keys ({shown})'
                if ignored else 'no unexpected keys')
        print_log(msg, logger='current')
        if missing_other:
            print_log(
                f'{type(self).__name__}: {len(missing_other)} non-CE tensors '
                f'missing from {source} keep their initialisation: '
                f'{", ".join(missing_other)}',
                logger='current',
                level=30)
        return missing_ce, missing_other
