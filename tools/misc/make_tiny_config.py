"""Write a config that runs CONFIG on the tiny synthetic COCO set.

Usage:
    python tools/misc/make_tiny_config.py CONFIG OUT.py
        [--data-root data/tiny_coco]
        [--scale 128 128] [--max-iters 4]

Makes the tiny set first if it is missing. The written config inherits
CONFIG (model, optimizer), switches the data to the tiny set (plain
CocoDatasets, COCO's metric), resizes the heads to its 3 classes, drops
pretrained weights, trains for --max-iters iterations (in float32 without a
GPU, also for an AMP config) and evaluates with a test score threshold of 0
(so the young model's boxes are scored): a smoke run of any detection config
on a laptop.
"""
import argparse
import os.path as osp
import sys

sys.path.insert(
    0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))

from ce_mmdet.testing.tiny_coco import (ensure_tiny_coco,  # noqa: E402
                                        tiny_coco_config)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('config')
    parser.add_argument('out')
    parser.add_argument('--data-root', default='data/tiny_coco')
    parser.add_argument('--scale', type=int, nargs=2, default=(128, 128))
    parser.add_argument('--max-iters', type=int, default=4)
    args = parser.parse_args(argv)
    ensure_tiny_coco(args.data_root)
    text = tiny_coco_config(args.config, args.data_root, tuple(args.scale),
                            args.max_iters)
    with open(args.out, 'w') as f:
        f.write(text)
    print(f'wrote {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
