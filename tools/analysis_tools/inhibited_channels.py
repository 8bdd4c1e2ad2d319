"""Fraction of inhibited channels per layer of a detector's backbone.

Usage:
    python tools/analysis_tools/inhibited_channels.py CONFIG CHECKPOINT
        [--num-images 50] [--thr 1e-2] [--relative] [--out-dir DIR]
        [--device cpu] [--cfg-options ...]

Runs the backbone over --num-images images of the config's test set (test
pipeline) and, at the stem ReLU and at every residual block's output (the
ReLU after the block's last norm, and CE in CE models), counts a channel as
inhibited on an image when its mean activation is below --thr (absolute; with
--relative, below --thr times the layer's mean channel magnitude on that
image). Prints a table per layer and overall, and writes
OUT_DIR/inhibited_channels.json and OUT_DIR/inhibited_channels.png. Works for
BN baselines too, so the two compare side by side (run it on both).
"""
import argparse
import json
import os
import os.path as osp
import sys

sys.path.insert(
    0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))

import torch  # noqa: E402
from mmengine.config import Config, DictAction  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402
from mmengine.runner import Runner, load_checkpoint  # noqa: E402

import ce_mmdet  # noqa: E402,F401
from ce_mmdet.analysis import InhibitedChannelMeter  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('config')
    parser.add_argument('checkpoint')
    parser.add_argument('--num-images', type=int, default=50)
    parser.add_argument('--thr', type=float, default=1e-2)
    parser.add_argument('--relative', action='store_true')
    parser.add_argument('--out-dir', default='work_dirs/inhibited_channels')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    return parser.parse_args(argv)


def plot(summary, path, title):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    names = list(summary['layers'])
    values = [summary['layers'][n]['inhibited'] for n in names]
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(names)), 4))
    ax.bar(range(len(names)), values, color='tab:blue')
    ax.axhline(summary['overall'], color='tab:red', ls='--',
               label=f'overall {summary["overall"]:.3f}')
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=90, fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel('inhibited channels (fraction)')
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    from mmdet.registry import MODELS
    if 'init_cfg' in cfg.model.get('backbone', {}):
        cfg.model.backbone.init_cfg = None  # the checkpoint has the weights
    model = MODELS.build(cfg.model)
    load_checkpoint(model, args.checkpoint, map_location='cpu')
    model.to(args.device).eval()
    loader_cfg = cfg.test_dataloader.copy()
    loader_cfg.update(batch_size=1, num_workers=0, persistent_workers=False)
    loader = Runner.build_dataloader(loader_cfg)
    meter = InhibitedChannelMeter(model.backbone, args.thr, args.relative)
    seen = 0
    with torch.no_grad():
        for batch in loader:
            if seen >= args.num_images:
                break
            data = model.data_preprocessor(batch, False)
            model.backbone(data['inputs'])
            seen += data['inputs'].shape[0]
    meter.remove()
    summary = meter.summary()
    summary.update(
        config=args.config, checkpoint=args.checkpoint, images=seen,
        backbone=type(model.backbone).__name__)
    kind = 'relative to the layer mean' if args.relative else 'absolute'
    print(f'{summary["backbone"]}: inhibited channels over {seen} images '
          f'(mean activation < {args.thr}, {kind})')
    print(f'{"layer":<14}{"channels":>10}{"inhibited":>11}')
    for name, row in summary['layers'].items():
        print(f'{name:<14}{row["channels"]:>10}{row["inhibited"]:>11.4f}')
    print(f'{"overall":<14}{"":>10}{summary["overall"]:>11.4f}')
    os.makedirs(args.out_dir, exist_ok=True)
    with open(osp.join(args.out_dir, 'inhibited_channels.json'), 'w') as f:
        json.dump(summary, f)
    plot(summary, osp.join(args.out_dir, 'inhibited_channels.png'),
         f'{summary["backbone"]} {osp.basename(args.config)} ({kind})')
    return summary


if __name__ == '__main__':
    main()
