"""Convert the published ImageNet CE-ResNet-50 weights for ``CEResNet``.

Usage:
    python tools/model_converters/cenet2mmdet.py SRC DST

SRC is the authors' PyTorch state dict (optionally nested under
``state_dict`` and/or prefixed with ``module.``). DST loads with
``init_cfg=dict(type='Pretrained', checkpoint=DST)`` into
``CEResNet(depth=50)`` with no missing or unexpected backbone keys.
"""
import argparse
import os
import os.path as osp
import sys

import torch

from ce_mmdet.utils.cenet_convert import convert_cenet, unwrap_state_dict


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Convert published CE-ResNet weights to CEResNet keys')
    parser.add_argument('src', help='the published checkpoint')
    parser.add_argument('dst', help='where to write the converted one')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    # The published file is a plain state dict: the safe loader reads it.
    ckpt = torch.load(args.src, map_location='cpu', weights_only=True)
    state, dropped = convert_cenet(unwrap_state_dict(ckpt))
    if osp.dirname(args.dst):
        os.makedirs(osp.dirname(args.dst), exist_ok=True)
    torch.save(
        dict(state_dict=state, meta=dict(converted_from=osp.basename(
            args.src), converter='cenet2mmdet')), args.dst)
    print(f'wrote {len(state)} tensors to {args.dst}')
    print(f'dropped {len(dropped)} keys: ' + ', '.join(dropped))
    return 0


if __name__ == '__main__':
    sys.exit(main())
