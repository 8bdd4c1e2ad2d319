"""Compare whole detectors (CE against its BN baseline), side by side.

Usage:
    python tools/analysis_tools/benchmark_detector.py BASELINE CONFIG
        [CONFIG ...] [--device cpu|cuda] [--batch-size 2]
        [--scale 1333 800] [--repeats 5] [--warmup 2] [--amp] [--no-counts]
        [--data-root DIR] [--json OUT.json]

    # CE Mask R-CNN against mmdet's, at COCO size, on a GPU
    python tools/analysis_tools/benchmark_detector.py \\
        configs/ce_mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py \\
        configs/ce_mask_rcnn/mask-rcnn_r50-ce_fpn_1x_coco.py --device cuda

Every config is run on the same batch of the tiny synthetic COCO set (made in
a temporary directory unless ``--data-root`` names one), through the
baseline config's pipelines, its images resized to ``--scale`` (keep ratio:
the tiny set's 4:3 images become 1067x800 at 1333x800). Models are randomly
initialised from one seed (no download) and every model gets the baseline's
tensors wherever the name and shape match (heads, neck, the shared backbone
weights), so they differ only where their configs do. The heads are resized
to the tiny set's 3 classes.

Timed, alternately (every repeat runs each model once, the order flipping
each repeat) after ``--warmup`` unrecorded repeats:

* train step: ``model.train_step`` as mmengine's loop runs it (data
  preprocessor, forward, losses, backward, the config's optimizer wrapper
  with its gradient clipping and step), data loading excluded. The learning
  rate is set to 0, so every repeat times the same weights (the optimizer
  does the same work);
* inference: ``model.test_step`` under ``torch.no_grad`` (preprocessor,
  forward, post-processing: NMS, masks pasted at the image size).

Ratios are to the first config (BASELINE); for times, the median over
repeats of the ratio within each repeat, with its spread below the table.
Also: parameters, detections per image in the timed inference (the
post-processing's work, which depends on the weights), CUDA peak memory of a
training step, and unless ``--no-counts`` the working aten ops (plus Triton
launches and fused CPU kernel calls) and host syncs per call
(:class:`ce_mmdet.analysis.launches.LaunchCounter`): what bounds a
2-images-per-GPU step.
"""
import argparse
import copy
import json
import os.path as osp
import sys
import tempfile

import torch

sys.path.insert(
    0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))

from ce_mmdet.analysis.benchmark import (  # noqa: E402
    alternating_samples, cuda_peak_bytes, init_log_quiet, paired_ratio,
    record_samples, spread_summary)
from ce_mmdet.analysis.launches import LaunchCounter  # noqa: E402
from ce_mmdet.testing.tiny_coco import (ensure_tiny_coco,  # noqa: E402
                                        tiny_coco_config)


def load_config(path, data_root, scale, workdir):
    """``path`` switched to the tiny set (:func:`tiny_coco_config`), with a
    learning rate of 0, no pretrained weights and the config's own test
    score threshold (the inference workload of the earlier readings)."""
    from mmengine.config import Config
    text = tiny_coco_config(path, data_root, scale, max_iters=1,
                            score_thr=None)
    out = osp.join(workdir, osp.basename(path))
    with open(out, 'w') as f:
        f.write(text)
    cfg = Config.fromfile(out)
    cfg.optim_wrapper.optimizer.lr = 0.0
    return cfg


def build_models(cfgs, device):
    """The detectors of ``cfgs``, each from seed 0, each after the first
    given the first one's tensors where name and shape match; returns the
    models and, per model, how many tensors it took from the first."""
    from mmdet.registry import MODELS
    models, shared = [], []
    for cfg in cfgs:
        torch.manual_seed(0)
        model = MODELS.build(copy.deepcopy(cfg.model))
        with init_log_quiet():
            model.init_weights()
        if models:
            own = model.state_dict()
            take = {
                k: v
                for k, v in models[0].state_dict().items()
                if k in own and own[k].shape == v.shape
            }
            model.load_state_dict(take, strict=False)
            shared.append(len(take))
        else:
            shared.append(len(model.state_dict()))
        models.append(model.to(device))
    return models, shared


def one_batch(cfg, split, batch_size):
    """The first ``batch_size`` items of the config's ``split`` dataloader's
    dataset, through its pipeline, collated as mmengine's loops do."""
    from mmdet.registry import DATASETS
    from mmengine.dataset import pseudo_collate
    dataset = DATASETS.build(copy.deepcopy(cfg[f'{split}_dataloader'].dataset))
    if len(dataset) < batch_size:
        raise ValueError(f'--batch-size {batch_size}: the tiny set has only '
                         f'{len(dataset)} {split} images')
    torch.manual_seed(0)  # the pipeline's random flip
    return pseudo_collate([dataset[i] for i in range(batch_size)])


def train_call(model, wrapper, data):
    """One training iteration as mmengine's loop runs it, in training mode
    (the model's own ``train()``: frozen stages and ``norm_eval`` stay
    frozen)."""

    def call():
        model.train()
        return model.train_step(data, wrapper)

    return call


def inference_call(model, data):
    """One test iteration as mmengine's loop runs it: eval mode, no
    autograd."""

    def call():
        model.eval()
        with torch.no_grad():
            return model.test_step(data)

    return call


def count(fn):
    """Working ops and host syncs of one call of ``fn`` after a warm-up."""
    fn()
    with LaunchCounter() as counter:
        fn()
    return counter.total, counter.host_syncs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('baseline', help='the config ratios are taken to')
    parser.add_argument('configs', nargs='+', help='configs to compare')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--batch-size', type=int, default=2)
    parser.add_argument('--scale', type=int, nargs=2, default=(1333, 800),
                        metavar=('W', 'H'),
                        help='the Resize scale (keep ratio)')
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--amp', action='store_true',
                        help='mixed precision training steps, as '
                        'tools/train.py --amp (AmpOptimWrapper; CUDA only)')
    parser.add_argument('--no-counts', action='store_true',
                        help='skip the op and host-sync counts')
    parser.add_argument('--data-root',
                        help='the tiny COCO set (made there if missing; '
                        'default: a temporary directory)')
    parser.add_argument('--json', help='write the results here')
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.amp and device.type != 'cuda':
        parser.error(f'--amp needs a CUDA device (mmengine\'s AmpOptimWrapper '
                     f'runs on GPUs), got --device {args.device}')
    if args.batch_size < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error(f'--batch-size and --repeats must be >= 1 and --warmup '
                     f'>= 0, got {args.batch_size}, {args.repeats}, '
                     f'{args.warmup}')
    from mmdet.utils import register_all_modules
    from mmengine.optim import build_optim_wrapper
    register_all_modules()

    paths = [args.baseline, *args.configs]
    names = [osp.splitext(osp.basename(p))[0] for p in paths]
    with tempfile.TemporaryDirectory() as workdir:
        data_root = ensure_tiny_coco(args.data_root
                                     or osp.join(workdir, 'tiny_coco'))
        cfgs = [
            load_config(p, data_root, tuple(args.scale), workdir)
            for p in paths
        ]
        train_data = one_batch(cfgs[0], 'train', args.batch_size)
        test_data = one_batch(cfgs[0], 'test', args.batch_size)
    models, shared = build_models(cfgs, device)
    wrappers = []
    for cfg, model in zip(cfgs, models):
        wrapper_cfg = copy.deepcopy(cfg.optim_wrapper)
        if args.amp:  # what tools/train.py --amp does
            wrapper_cfg.type = 'AmpOptimWrapper'
            wrapper_cfg.loss_scale = 'dynamic'
        wrappers.append(build_optim_wrapper(model, wrapper_cfg))

    keys = [str(i) for i in range(len(models))]
    calls = {
        'train step (s)': {
            k: train_call(m, w, train_data)
            for k, m, w in zip(keys, models, wrappers)
        },
        'inference (s)':
        {k: inference_call(m, test_data)
         for k, m in zip(keys, models)},
    }
    results = {k: {} for k in keys}
    per_repeat = {}
    for metric, fns in calls.items():
        samples = alternating_samples(fns, args.repeats, args.warmup, device,
                                      reverse=True)
        record_samples(results, per_repeat, metric, samples, '0')
    for k, m, w in zip(keys, models, wrappers):
        outputs = calls['inference (s)'][k]()
        results[k]['detections per image'] = sum(
            len(o.pred_instances) for o in outputs) / len(outputs)
        results[k]['params (M)'] = sum(p.numel()
                                       for p in m.parameters()) / 1e6
        peak = cuda_peak_bytes(calls['train step (s)'][k], device)
        if peak is not None:
            results[k]['CUDA peak, train step (MiB)'] = peak / 2**20
        if not args.no_counts:
            for metric, call in (('train step', 'train step (s)'),
                                 ('inference', 'inference (s)')):
                ops, syncs = count(calls[call][k])
                results[k][f'ops per {metric}'] = ops
                results[k][f'host syncs per {metric}'] = syncs

    print(f'detectors on one tiny-COCO batch: device={device}, '
          f'batch={args.batch_size}, scale={args.scale[0]}x{args.scale[1]} '
          f'(keep ratio), amp={args.amp}, repeats={args.repeats} (median), '
          f'torch {torch.__version__}, {torch.get_num_threads()} threads')
    for k, name, n in zip(keys, names, shared):
        note = 'baseline' if k == '0' else f'{n} tensors from [0]'
        print(f'  [{k}] {name} ({note})')
    others = keys[1:]
    print(f'{"metric":<30}' + ''.join(f'{"[" + k + "]":>12}' for k in keys) +
          ''.join(f'{"[" + k + "]/[0]":>12}' for k in others))
    ratios = {k: {} for k in others}
    for metric in results['0']:
        row = f'{metric:<30}' + ''.join(f'{results[k][metric]:>12.4g}'
                                        for k in keys)
        for k in others:
            ratios[k][metric] = paired_ratio(results, per_repeat, k, metric,
                                             '0')
            row += f'{ratios[k][metric]:>12.3f}'
        print(row)
    for (k, metric), values in per_repeat.items():
        print(f'[{k}]/[0] per repeat, {metric.replace(" (s)", "")}: '
              f'{spread_summary(values)}')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(
                dict(args=vars(args),
                     configs=dict(zip(keys, paths)),
                     tensors_from_baseline=dict(zip(keys, shared)),
                     results=results,
                     ratios=ratios,
                     paired_per_repeat={
                         f'[{k}]/[0] {metric}': values
                         for (k, metric), values in per_repeat.items()
                     }),
                f,
                indent=2)
    return results, ratios


if __name__ == '__main__':
    main()
