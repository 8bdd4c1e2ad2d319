"""Write the tiny synthetic COCO-format set used by the demo and the tests.

Usage:
    python tools/misc/make_tiny_coco.py OUT_DIR [--num-train 24] [--num-val 8]

Writes OUT_DIR/{train2017,val2017}/*.jpg and
OUT_DIR/annotations/instances_{train,val}2017.json (3 classes: rectangle,
circle, triangle). Deterministic for a given --seed; well under 1 MB.
"""
import argparse
import sys

from ce_mmdet.testing.tiny_coco import CLASSES, make_tiny_coco


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('out_dir')
    parser.add_argument('--num-train', type=int, default=24)
    parser.add_argument('--num-val', type=int, default=8)
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    paths = make_tiny_coco(args.out_dir, args.num_train, args.num_val,
                           args.seed)
    print(f'tiny COCO ({", ".join(CLASSES)}) written: ' +
          ', '.join(f'{k}={v}' for k, v in paths.items()))
    return 0


if __name__ == '__main__':
    sys.exit(main())
