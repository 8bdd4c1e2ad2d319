"""Convert the authors' ImageNet CE-ResNet state dict to CEResNet's keys.

The published layout names a CE layer's tensors ``x_weight`` (the gate),
``running_wm``, ``running_mean`` (stored, unused), ``AR.running_scale``,
``AR.fc.0.weight`` (fc1), ``AR.fc.1.{weight,bias}`` (the LayerNorm) and
``AR.fc.3.weight`` (fc2). Convolution, BatchNorm and downsample keys already
match mmdet's ResNet (``conv1``, ``bn1``, ``layerL.B.conv{1,2,3}``,
``layerL.B.bn{1,2,3}``, ``layerL.0.downsample.{0,1}``).
"""
import warnings
from collections import OrderedDict
from typing import Dict, List, Tuple

import torch

#: published CE sub-key -> ChannelEquilibrium sub-key (None: dropped)
CE_KEY_MAP = {
    'x_weight': 'gate',
    'running_wm': 'running_wm',
    'running_mean': None,
    'AR.running_scale': 'running_scale',
    'AR.fc.0.weight': 'fc1.weight',
    'AR.fc.1.weight': 'norm.weight',
    'AR.fc.1.bias': 'norm.bias',
    'AR.fc.3.weight': 'fc2.weight',
}


def unwrap_state_dict(obj) -> Dict[str, torch.Tensor]:
    """The state dict inside a checkpoint (``state_dict`` nesting and a
    ``module.`` prefix removed)."""
    if isinstance(obj, dict) and 'state_dict' in obj and isinstance(
            obj['state_dict'], dict):
        obj = obj['state_dict']
    if not isinstance(obj, dict):
        raise TypeError(f'expected a state dict, got {type(obj).__name__}')
    return OrderedDict(
        (k[len('module.'):] if k.startswith('module.') else k, v)
        for k, v in obj.items())


def _split_ce_key(key: str) -> Tuple[str, str]:
    """('layer1.0.ce.', 'AR.fc.0.weight') for a CE key, else ('', '')."""
    for sub in CE_KEY_MAP:
        for owner in ('ce1.', '.ce.'):
            marker = owner + sub
            if key.endswith(marker) and (owner == '.ce.'
                                         or key == marker):
                return key[:-len(sub)], sub
    return '', ''


def convert_cenet(state: Dict[str, torch.Tensor]
                  ) -> Tuple['OrderedDict[str, torch.Tensor]', List[str]]:
    """Map a published CE-ResNet state dict onto CEResNet keys.

    Args:
        state (dict): the authors' state dict (see :func:`unwrap_state_dict`).

    Returns:
        tuple: the converted state dict and the list of dropped keys
        (classifier, unused running means).
    """
    out = OrderedDict()
    dropped = []
    for key, value in state.items():
        prefix, sub = _split_ce_key(key)
        if sub:
            new_sub = CE_KEY_MAP[sub]
            if new_sub is None:
                dropped.append(key)
                continue
            if new_sub == 'running_scale' and value.numel() == 1 and float(
                    value.reshape(-1)[0]) == 0.0:
                warnings.warn(
                    f'{key} is 0 (never updated): converted to 1, the value '
                    'a fresh layer starts with')
                value = torch.ones_like(value)
            out[prefix + new_sub] = value
        elif key.startswith('fc.'):
            dropped.append(key)
        else:
            out[key] = value
    return out, dropped
