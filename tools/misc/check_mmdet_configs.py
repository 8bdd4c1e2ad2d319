"""Does CE-ResNet drop into mmdet's detectors? One smoke check per config.

Usage:
    python tools/misc/check_mmdet_configs.py [CONFIG_OR_FOLDER ...] [--all]
        [--data-root data/tiny_coco] [--work-dir work_dirs/check_mmdet_configs]
        [--scale 128 128] [--timeout 600] [--json OUT.json]
        [--compare OLD.json] [--baseline]

CONFIG_OR_FOLDER: a config mmdet ships, relative to its configs folder
(``retinanet/retinanet_r50_fpn_1x_coco.py``), or a folder of them
(``retinanet``: its ResNet-50 config, COCO 1x preferred); --all: every folder.
For each, in a process of its own: the config a user writes (it inherits
mmdet's, with ``backbone.type='CEResNet'``), its tiny-set config (as
make_tiny_config.py writes it) and one training and one test step on it
(ce_mmdet.testing.smoke_steps). Prints a markdown table: the result, the
training loss and the detections on the first test image, or the stage that
stopped and the error. Each check writes its user config, tiny config and
(on failure) traceback.txt under WORK_DIR/FOLDER/CONFIG_NAME/.
Makes the tiny set first if it is missing.

--baseline checks the configs as mmdet wrote them, with their BN ResNet: does
a failure come from CE?

Exit status: 0; with --compare, 1 when a config that passed in OLD.json (an
earlier --json) fails now. A failure's cause may lie outside ce_mmdet (an
mmcv op without a CPU kernel, a package or download the config needs): the
table says what stopped it.
"""
import argparse
import json
import os.path as osp
import subprocess
import sys

sys.path.insert(
    0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))

from ce_mmdet.testing.mmdet_configs import (check_mmdet_config,  # noqa: E402
                                            config_folders, resnet50_config)
from ce_mmdet.testing.tiny_coco import ensure_tiny_coco  # noqa: E402

MARK = 'CHECK_RESULT '
STATUS = {True: 'ok', False: 'failed', None: 'no ResNet-50 config'}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('configs', nargs='*', metavar='CONFIG_OR_FOLDER')
    parser.add_argument('--all', action='store_true',
                        help="every folder of mmdet's configs")
    parser.add_argument('--data-root', default='data/tiny_coco')
    parser.add_argument('--work-dir', default='work_dirs/check_mmdet_configs')
    parser.add_argument('--scale', type=int, nargs=2, default=(128, 128))
    parser.add_argument('--timeout', type=float, default=600,
                        help='seconds for one check (default: 600)')
    parser.add_argument('--json', help='write the results here')
    parser.add_argument('--compare', help="an earlier --json's results")
    parser.add_argument('--baseline', action='store_true',
                        help="keep the configs' own BN ResNet")
    parser.add_argument('--one', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one is None and not args.configs and not args.all:
        parser.error('name configs or folders, or pass --all')
    if args.configs and args.all:
        parser.error('--all checks every folder: name no configs with it')
    folders = config_folders()
    unknown = [name for name in args.configs
               if not name.endswith('.py') and name not in folders]
    if unknown:
        parser.error(f"mmdet has no config folder {', '.join(unknown)}; it "
                     f"has: {', '.join(folders)}")
    return args


def configs_to_check(names):
    """``(name, config or None)`` for each name: a config path is itself, a
    folder its :func:`resnet50_config`."""
    return [(name, name if name.endswith('.py') else resnet50_config(name))
            for name in names]


def run_one(config, args):
    """The result of one check, made in a fresh process."""
    # one folder per config: two configs of one mmdet folder keep theirs
    work_dir = osp.join(args.work_dir, osp.splitext(config)[0])
    cmd = [sys.executable, osp.abspath(__file__), '--one', config,
           '--work-dir', work_dir, '--data-root', args.data_root,
           '--scale', *map(str, args.scale)]
    if args.baseline:
        cmd.append('--baseline')
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True,
                              timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return dict(config=config, ok=False, stage='timeout',
                    error=f'no result within {args.timeout:g} s')
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    tail = ' '.join(proc.stderr.split()[-40:])
    return dict(config=config, ok=False, stage='process',
                error=f'exit status {proc.returncode}: ...{tail}')


def table(results):
    """The results as a markdown table."""
    rows = ['| config | result | loss | detections | stopped at: error |',
            '| --- | --- | --- | --- | --- |']
    for r in results:
        if r['ok'] is None:
            rows.append(f"| {r['config']} | {STATUS[None]} | | | |")
        elif r['ok']:
            rows.append(f"| {r['config']} | {STATUS[True]} | {r['loss']:g} | "
                        f"{r['detections']} | |")
        else:
            error = r['error'].replace('|', '\\|')
            rows.append(f"| {r['config']} | {STATUS[False]} | | | "
                        f"{r['stage']}: {error} |")
    return '\n'.join(rows)


def regressions(results, old):
    """Configs that passed in ``old`` and do not pass in ``results``."""
    now = {r['config']: r['ok'] for r in results}
    return [r['config'] for r in old if r['ok'] and now.get(r['config'])
            is False]


def main(argv=None):
    args = parse_args(argv)
    if args.one is not None:
        result = check_mmdet_config(args.one, args.work_dir, args.data_root,
                                    args.scale, ce=not args.baseline)
        print(MARK + json.dumps(result), flush=True)
        return 0
    ensure_tiny_coco(args.data_root)
    names = config_folders() if args.all else args.configs
    results = []
    for name, config in configs_to_check(names):
        if config is None:
            result = dict(config=name, ok=None)
        else:
            result = run_one(config, args)
        print(f"{result['config']}: {STATUS[result['ok']]}", file=sys.stderr,
              flush=True)
        results.append(result)
    print(table(results))
    passed = sum(r['ok'] is True for r in results)
    failed = sum(r['ok'] is False for r in results)
    print(f'\n{passed} passed, {failed} failed, '
          f'{len(results) - passed - failed} without a ResNet-50 config')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(results, f, indent=1)
    if args.compare:
        with open(args.compare) as f:
            lost = regressions(results, json.load(f))
        if lost:
            print(f'passed in {args.compare}, fail now: {", ".join(lost)}')
            return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
