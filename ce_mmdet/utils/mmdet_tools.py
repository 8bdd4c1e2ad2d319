"""Run mmdet's own ``tools/train.py`` / ``tools/test.py`` with ce_mmdet loaded.

mmdet ships its tools inside the package (``mmdet/.mim/tools``). Ours import
``ce_mmdet`` first (module registration, safe checkpoint loading), check what
mmdet would only discover late, and then hand over to mmdet's ``main()``, so
the command line is exactly mmdet's.
"""
import contextlib
import importlib.util
import os.path as osp
from types import ModuleType
from typing import Dict, Iterator, List, Tuple

PRETRAINED_HELP = """\
The backbone's pretrained checkpoint {path!r} does not exist.

To start from the published ImageNet CE-ResNet-50 (78.2% top-1):
  1. get the authors' weights from https://github.com/Tangshitao/CENet
  2. python tools/model_converters/cenet2mmdet.py SRC.pth {path}

Or start from torchvision's BN ResNet (the CE layers then start fresh):
  --cfg-options model.backbone.init_cfg.checkpoint=torchvision://resnet{depth}
"""


def mmdet_tool_path(name: str) -> str:
    """Path of mmdet's bundled ``tools/NAME.py``."""
    import mmdet
    path = osp.join(osp.dirname(mmdet.__file__), '.mim', 'tools', name + '.py')
    if not osp.isfile(path):
        raise FileNotFoundError(
            f'mmdet tool {path} not found: this mmdet install has no bundled '
            "tools (.mim). Reinstall mmdet with pip ('pip install mmdet') or "
            "'pip install -e .' in the mmdetection repository.")
    return path


def load_mmdet_tool(name: str) -> ModuleType:
    """Import mmdet's ``tools/NAME.py`` as a module (its ``main`` not run)."""
    path = mmdet_tool_path(name)
    spec = importlib.util.spec_from_file_location(f'_mmdet_tools_{name}', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tool_config(args):
    """The config a tool's parsed command line names, with its
    ``--cfg-options`` merged: what mmdet's tool builds the runner from."""
    from mmengine.config import Config
    cfg = Config.fromfile(args.config)
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    return cfg


def config_dicts(node, path: str = 'model') -> Iterator[Tuple[str, Dict]]:
    """Every dict in a config tree (``node`` and what it nests, through
    dicts, lists and tuples), depth first, with its path from ``path``
    (e.g. ``'model.roi_head.mask_head'``)."""
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            yield from config_dicts(value, f'{path}.{key}')
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from config_dicts(value, f'{path}[{i}]')


def mask_head_paths(model_cfg) -> List[str]:
    """Where ``model_cfg`` sets a mask head (``'model.roi_head.mask_head'``
    ...), in :func:`config_dicts`'s order: the model predicts masks."""
    return [
        f'{path}.mask_head' for path, node in config_dicts(model_cfg)
        if node.get('mask_head')
    ]


def missing_pretrained(model_cfg) -> List[Dict]:
    """Pretrained init_cfgs of ``model_cfg`` whose local file is missing."""
    found = []
    for _, node in config_dicts(model_cfg):
        init_cfg = node.get('init_cfg')
        for item in (init_cfg if isinstance(init_cfg, list) else [init_cfg]):
            if isinstance(item, dict) and item.get('type') == 'Pretrained':
                found.append(dict(item, _depth=node.get('depth', 50)))
    return [
        cfg for cfg in found if isinstance(cfg.get('checkpoint'), str)
        and '://' not in cfg['checkpoint']
        and not osp.isfile(cfg['checkpoint'])
    ]


def check_pretrained(cfg) -> None:
    """Stop with instructions if a local pretrained checkpoint is missing.

    Raises:
        SystemExit: naming the file, how to convert the published weights
            and how to start from torchvision BN weights instead.
    """
    missing = missing_pretrained(cfg.get('model', {}))
    if missing:
        raise SystemExit(
            PRETRAINED_HELP.format(
                path=missing[0]['checkpoint'], depth=missing[0]['_depth']))


TTA_MASKS_HELP = """\
--tta cannot test {config}:
its model predicts masks ({where}),
and mmdet 3.3's test-time augmentation (DetTTAModel) merges boxes only:
it would stop at the first batch with "TTA of instance segmentation does
not support now".

Test it without --tta, or use --tta with a box detector, e.g. CE RetinaNet:
  python tools/test.py \\
      configs/ce_retinanet/retinanet_r50-ce_fpn_1x_coco.py CKPT --tta
"""


def check_tta(cfg, config_path: str) -> None:
    """Stop before the runner is built where ``--tta`` cannot work: the
    model predicts masks (a ``mask_head`` anywhere in ``cfg.model``) and
    the TTA wrapper is mmdet's ``DetTTAModel`` (the config's
    ``tta_model``, or the one mmdet's ``tools/test.py`` adds), which
    asserts on masks only after the model, the checkpoint and the data are
    loaded.

    Raises:
        SystemExit: naming the mask head and what to run instead.
    """
    tta_type = cfg.get('tta_model', {}).get('type', 'DetTTAModel')
    if tta_type not in ('DetTTAModel', 'mmdet.DetTTAModel'):
        return
    found = mask_head_paths(cfg.get('model', {}))
    if found:
        raise SystemExit(
            TTA_MASKS_HELP.format(config=config_path, where=found[0]))


@contextlib.contextmanager
def keep_test_metrics() -> Iterator[Dict]:
    """Collect the metrics ``Runner.test()`` returns while in the block.

    mmdet's ``tools/test.py`` logs the metrics and drops them; this keeps
    them for callers of our ``tools/test.py``'s ``main()``.
    """
    from mmengine.runner import Runner
    metrics: Dict = {}
    original = Runner.test

    def test(self):
        result = original(self)
        metrics.update(result or {})
        return result

    Runner.test = test
    try:
        yield metrics
    finally:
        Runner.test = original
