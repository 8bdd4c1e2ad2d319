"""CE-ResNet: mmdet's ResNet with Channel Equilibrium after the last BN of
each block (and after the stem BN), as in the published CE-ResNet."""
import copy
from typing import Dict, List, Optional, Sequence

import torch.nn as nn
import torch.utils.checkpoint as cp
from mmcv.cnn import build_plugin_layer
from mmengine.logging import print_log
from mmengine.runner.checkpoint import _load_checkpoint_with_prefix
from mmengine.runner.checkpoint import _load_checkpoint
from mmdet.models.backbones.resnet import BasicBlock, Bottleneck, ResNet
from mmdet.registry import MODELS

from ..layers import ChannelEquilibrium

DEFAULT_CE_CFG = dict(
    type='ChannelEquilibrium', group_size=16, num_iters=3, reduction=4)


class CEBasicBlock(BasicBlock):
    """mmdet's :class:`BasicBlock` that accepts plugins after ``norm2``.

    mmdet's BasicBlock takes no plugins. This one takes plugins at position
    ``'after_conv2'`` (after ``norm2``, before the residual addition), which
    is where CE-ResNet-18/34 put CE: conv2 -> norm2 -> CE -> (+ identity).

    Args:
        plugins (list[dict], optional): as for mmdet's Bottleneck; only
            position ``'after_conv2'`` is allowed.
        **kwargs: the arguments of mmdet's BasicBlock.
    """

    def __init__(self, inplanes: int, planes: int,
                 plugins: Optional[List[dict]] = None, **kwargs) -> None:
        super().__init__(inplanes, planes, plugins=None, **kwargs)
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

    def forward(self, x):
        """conv1 -> norm1 -> relu -> conv2 -> norm2 -> plugins -> + id ->
        relu."""

        def _inner_forward(x):
            identity = x
            out = self.relu(self.norm1(self.conv1(x)))
            out = self.norm2(self.conv2(out))
            for name in self.after_conv2_plugin_names:
                out = getattr(self, name)(out)
            if self.downsample is not None:
                identity = self.downsample(x)
            return out + identity

        if self.with_cp and x.requires_grad:
            out = cp.checkpoint(_inner_forward, x, use_reentrant=False)
        else:
            out = _inner_forward(x)
        return self.relu(out)


def _check_bools(name: str, value, length: int) -> tuple:
    if not isinstance(value, (list, tuple)) or len(value) != length or \
            not all(isinstance(v, bool) for v in value):
        raise ValueError(f'{name} must be a list/tuple of {length} bools '
                         f'(one per stage), got {value!r}')
    return tuple(value)


@MODELS.register_module()
class CEResNet(ResNet):
    """ResNet with Channel Equilibrium (CE-ResNet), for detection.

    A subclass of mmdet's :class:`~mmdet.models.backbones.ResNet`: every
    ResNet argument keeps its meaning. CE is placed as in the published
    CE-ResNet:

    * stem: conv1 -> norm1 -> CE -> ReLU -> maxpool (the stem CE uses one
      group over all stem channels); with ``deep_stem`` CE follows the last
      stem norm.
    * Bottleneck (depth 50/101/152): conv3 -> norm3 -> CE -> (+ identity) ->
      ReLU, through mmdet's plugin mechanism (``after_conv3``, first in line),
      so the layer is ``layerL.B.ce``.
    * BasicBlock (depth 18/34): conv2 -> norm2 -> CE -> (+ identity).

    Detection semantics: ``norm_eval=True`` also keeps every CE layer in eval
    mode (running statistics frozen, as mmdet does for BN);
    ``frozen_stages`` freezes the CE layers of those stages (and the stem CE
    for ``frozen_stages >= 0``) like their BN. With ``ce_stages`` all False
    and ``stem_ce=False`` the network is mmdet's ResNet.

    Loading a BN ResNet checkpoint through ``init_cfg=dict(type='Pretrained',
    ...)`` works: CE tensors missing from it keep their fresh initialisation
    and the log says so in one line; any other missing key is a warning.

    Args:
        depth (int): 18, 34, 50, 101 or 152.
        ce_cfg (dict): config of the CE layers (``type`` defaults to
            ``'ChannelEquilibrium'``). Default: group_size=16, num_iters=3,
            reduction=4.
        ce_stages (Sequence[bool]): which stages get CE in every block.
            Default: (True, True, True, False), as published.
        stem_ce (bool): CE after the stem norm. Default: True.
        **kwargs: every other argument of mmdet's ResNet.

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
        50: (Bottleneck, (3, 4, 6, 3)),
        101: (Bottleneck, (3, 4, 23, 3)),
        152: (Bottleneck, (3, 8, 36, 3))
    }

    def __init__(self,
                 depth: int,
                 ce_cfg: Optional[Dict] = None,
                 ce_stages: Sequence[bool] = (True, True, True, False),
                 stem_ce: bool = True,
                 plugins: Optional[List[dict]] = None,
                 **kwargs) -> None:
        self._validate_resnet_args(depth, kwargs)
        num_stages = kwargs.get('num_stages', 4)
        ce_stages = _check_bools('ce_stages', ce_stages, num_stages)
        if not isinstance(stem_ce, bool):
            raise TypeError(f'stem_ce must be a bool, got {stem_ce!r}')
        if ce_cfg is not None and not isinstance(ce_cfg, dict):
            raise TypeError(f'ce_cfg must be a dict, got {type(ce_cfg)}')
        ce_cfg = {**DEFAULT_CE_CFG, **(ce_cfg or {})}
        if 'in_channels' in ce_cfg:
            raise ValueError('ce_cfg must not set in_channels; it follows '
                             'the block widths')
        self.ce_cfg = ce_cfg
        self.ce_stages = ce_stages
        self.stem_ce = stem_ce
        block = self.arch_settings[depth][0]
        position = 'after_conv3' if block is Bottleneck else 'after_conv2'
        all_plugins = list(plugins or [])
        if any(ce_stages):
            ce_plugin = dict(
                cfg=copy.deepcopy(ce_cfg), position=position, stages=ce_stages)
            all_plugins.insert(0, ce_plugin)
        super().__init__(depth, plugins=all_plugins or None, **kwargs)
        self.plugins = plugins  # what the user asked for
        self._follow_norms()
        default_init = (kwargs.get('init_cfg') is None
                        and kwargs.get('pretrained') is None)
        if block is CEBasicBlock and self.zero_init_residual and default_init:
            # ResNet only recognises mmdet's own BasicBlock for zero init
            for name in self.res_layers:
                for blk in getattr(self, name):
                    blk.init_cfg = dict(
                        type='Constant', val=0, override=dict(name='norm2'))

    def _follow_norms(self) -> None:
        """Tell each CE layer which BN it follows and in which module's
        forward (memory and speed: see :meth:`ChannelEquilibrium.follow`)."""
        if self.stem_ce:
            if self.deep_stem:
                self.stem[8].follow(self.stem[7], scope=self.stem)
            else:
                self.ce1.follow(self.norm1, scope=self)
        for name in self.res_layers:
            for block in getattr(self, name):
                if isinstance(getattr(block, 'ce', None), ChannelEquilibrium):
                    norm = block.norm3 if isinstance(block,
                                                     Bottleneck) else block.norm2
                    block.ce.follow(norm, scope=block)

    @classmethod
    def _validate_resnet_args(cls, depth, kwargs) -> None:
        """ValueErrors for what mmdet's ResNet only asserts."""
        if depth not in cls.arch_settings:
            raise ValueError(f'depth must be one of '
                             f'{sorted(cls.arch_settings)}, got {depth!r}')
        num_stages = kwargs.get('num_stages', 4)
        if not isinstance(num_stages, int) or not 1 <= num_stages <= 4:
            raise ValueError(
                f'num_stages must be an int in [1, 4], got {num_stages!r}')
        strides = kwargs.get('strides', (1, 2, 2, 2))
        dilations = kwargs.get('dilations', (1, 1, 1, 1))
        if len(strides) != num_stages or len(dilations) != num_stages:
            raise ValueError(
                f'strides ({strides}) and dilations ({dilations}) must have '
                f'num_stages={num_stages} entries')
        out_indices = kwargs.get('out_indices', (0, 1, 2, 3))
        if not out_indices or max(out_indices) >= num_stages:
            raise ValueError(f'out_indices must be non-empty and < '
                             f'num_stages={num_stages}, got {out_indices}')
        style = kwargs.get('style', 'pytorch')
        if style not in ('pytorch', 'caffe'):
            raise ValueError(
                f'style must be "pytorch" or "caffe", got {style!r}')
        frozen = kwargs.get('frozen_stages', -1)
        if not isinstance(frozen, int) or not -1 <= frozen <= num_stages:
            raise ValueError(f'frozen_stages must be an int in '
                             f'[-1, {num_stages}], got {frozen!r}')

    def _pretrained_init(self) -> Optional[dict]:
        cfg = self.init_cfg
        if isinstance(cfg, dict) and cfg.get('type') == 'Pretrained':
            return cfg
        return None

    def _make_stem_layer(self, in_channels: int, stem_channels: int) -> None:
        super()._make_stem_layer(in_channels, stem_channels)
        if not self.stem_ce:
            return
        cfg = dict(self.ce_cfg, group_size=stem_channels)
        name, ce = build_plugin_layer(
            cfg, postfix=1, in_channels=stem_channels)
        if self.deep_stem:
            # conv, bn, relu, conv, bn, relu, conv, bn, [CE], relu: the indices
            # of mmdet's deep stem (and so BN checkpoints) stay as they are.
            layers = list(self.stem)
            self.stem = nn.Sequential(*layers[:-1], ce, layers[-1])
        else:
            self.add_module(name, ce)  # 'ce1', beside 'bn1'

    def _freeze_stages(self) -> None:
        super()._freeze_stages()
        if self.frozen_stages >= 0 and self.stem_ce and not self.deep_stem:
            self.ce1.eval()
            for param in self.ce1.parameters():
                param.requires_grad = False

    def forward(self, x):
        """Stem (with CE) then the residual stages; returns ``out_indices``."""
        if self.deep_stem:
            x = self.stem(x)
        else:
            x = self.norm1(self.conv1(x))
            if self.stem_ce:
                x = self.ce1(x)
            x = self.relu(x)
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
