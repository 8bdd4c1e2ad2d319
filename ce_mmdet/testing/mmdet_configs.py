"""CE-ResNet in mmdet's own detector configs: one smoke check each.

A check takes a config mmdet ships
(``retinanet/retinanet_r50_fpn_1x_coco.py``), writes the config a user would
(it inherits that one, with ``backbone.type='CEResNet'``), writes its
tiny-set config
(:func:`~ce_mmdet.testing.tiny_coco.tiny_coco_config`) and runs
:func:`~ce_mmdet.testing.smoke.smoke_steps` on it. What stops it, and at which
stage, is the answer: ``tools/misc/check_mmdet_configs.py`` runs the checks
(each in its own process) and tabulates them.
"""
import glob
import os
import os.path as osp
import traceback
from typing import Dict, List, Optional

#: the stages of a check, in order
STAGES = ('config', 'tiny config', 'smoke steps')


def mmdet_config_root() -> str:
    """The folder of the configs this mmdet install ships
    (``.mim/configs``)."""
    import mmdet
    root = osp.join(osp.dirname(mmdet.__file__), '.mim', 'configs')
    if not osp.isdir(root):
        raise FileNotFoundError(
            f'{root} not found: this mmdet install has no bundled configs '
            "(.mim). Reinstall mmdet with pip ('pip install mmdet').")
    return root


def config_folders() -> List[str]:
    """mmdet's config folders (``_base_`` left out), sorted."""
    root = mmdet_config_root()
    return sorted(name for name in os.listdir(root)
                  if name != '_base_' and osp.isdir(osp.join(root, name)))


def resnet50_config(folder: str) -> Optional[str]:
    """The config of ``folder`` (mmdet's, by name) to check CE-ResNet in.

    Of those whose name says ``r50`` and whose model's backbone is a ResNet
    of depth 50, the first by: a detector (its model sets ``num_classes``;
    an RPN does not), not reading precomputed proposals (Fast R-CNN's: the
    tiny set has none), a COCO 1x schedule, COCO, the shortest name (the
    plainest variant). None when the folder has none (other backbones,
    trackers...).
    """
    from mmengine.config import Config

    from .tiny_coco import sets_num_classes
    root = mmdet_config_root()
    if not osp.isdir(osp.join(root, folder)):
        raise ValueError(f'mmdet has no config folder {folder!r} (in {root}); '
                         f'it has: {", ".join(config_folders())}')
    ranked = []
    for path in glob.glob(osp.join(root, folder, '*r50*.py')):
        try:
            cfg = Config.fromfile(path)
        except Exception:  # a config this mmdet cannot load: not a candidate
            continue
        backbone = cfg.model.get('backbone', {})
        if (backbone.get('type') in ('ResNet', 'mmdet.ResNet')
                and backbone.get('depth') == 50):
            ranked.append((
                not sets_num_classes(cfg.model.to_dict()),
                'LoadProposals' in str(cfg.get('train_dataloader')),
                '1x_coco' not in path, 'coco' not in path, len(path), path))
    return osp.relpath(min(ranked)[-1], root) if ranked else None


def ce_config_text(base: str, ce: bool = True) -> str:
    """The config a user writes to put CE-ResNet in ``base`` (a path); with
    ``ce=False``, ``base`` as it is (its BN ResNet: the baseline)."""
    text = (f'_base_ = {osp.abspath(base)!r}\n'
            "custom_imports = dict(imports=['ce_mmdet'])\n")
    return text + ("model = dict(backbone=dict(type='CEResNet'))\n"
                   if ce else '')


def check_mmdet_config(config: str, work_dir: str, data_root: str,
                       scale=(128, 128), ce: bool = True) -> Dict:
    """CE-ResNet in one of mmdet's configs: its tiny config's smoke steps.

    Args:
        config (str): the config, relative to :func:`mmdet_config_root`.
        work_dir (str): where the user's and the tiny config are written.
        data_root (str): the tiny set (:func:`make_tiny_coco`'s folder).
        scale (tuple): the tiny config's image scale (w, h).
        ce (bool): False checks the config's own BN ResNet instead (does a
            failure come from CE?).

    Returns:
        dict: ``config``; ``ok`` (bool); with ``ok``, ``loss`` (the training
        step's) and ``detections`` (on the first test image); otherwise
        ``stage`` (one of :data:`STAGES`: where it stopped) and ``error``
        (the exception's type and message).
    """
    from mmengine.config import Config

    from .smoke import smoke_steps
    from .tiny_coco import tiny_coco_config
    os.makedirs(work_dir, exist_ok=True)
    result = dict(config=config)
    stage = STAGES[0]
    try:
        mine = osp.join(work_dir, 'user_config.py')
        with open(mine, 'w') as f:
            f.write(ce_config_text(osp.join(mmdet_config_root(), config), ce))
        user_cfg = Config.fromfile(mine)
        stage = STAGES[1]
        tiny = osp.join(work_dir, 'tiny.py')
        with open(tiny, 'w') as f:
            f.write(tiny_coco_config(user_cfg, data_root, tuple(scale)))
        cfg = Config.fromfile(tiny)
        stage = STAGES[2]
        _, log_vars, predictions = smoke_steps(cfg)
    except Exception as error:  # the answer, not a failure of the check
        with open(osp.join(work_dir, 'traceback.txt'), 'w') as f:
            f.write(traceback.format_exc())
        message = ' '.join(str(error).split())
        result.update(ok=False, stage=stage,
                      error=f'{type(error).__name__}: {message}')
        return result
    result.update(ok=True, loss=round(log_vars['loss'].item(), 4),
                  detections=len(predictions[0].pred_instances))
    return result
