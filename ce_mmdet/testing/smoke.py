"""One training step and one test step of a detector config, no runner.

What a smoke test of a config checks in seconds: the model builds, a training
step on a real batch of its train dataloader gives a finite loss, and the
trained model predicts on the first batch of its test dataloader.
"""
import math
import uuid
from typing import Dict, List, NamedTuple

import torch


class SmokeSteps(NamedTuple):
    """What :func:`smoke_steps` ran and got.

    Attributes:
        model (torch.nn.Module): the built detector, after its training step
            and in eval mode.
        log_vars (dict): the training step's losses (``log_vars['loss']`` is
            their finite sum).
        predictions (list): the test step's ``DetDataSample`` s, one per
            image of the first test batch.
    """
    model: torch.nn.Module
    log_vars: Dict[str, torch.Tensor]
    predictions: List


def smoke_steps(cfg, seed: int = 0) -> SmokeSteps:
    r"""Build ``cfg.model``, train it one step, test it on one batch.

    Python's, numpy's and torch's random generators are seeded (mmengine's
    ``set_random_seed``: the data transforms draw from numpy's), so the same
    ``seed`` gives the same steps. The model is built in mmdet's scope and
    ``init_weights()`` runs; outside a process group its SyncBN layers
    become BN, as mmengine's runner does for a non-distributed run. As at a
    runner's first iteration, a new current ``MessageHub`` holds ``epoch``
    and ``iter`` 0 (TOOD's head and mmdet's batch-resizing preprocessor
    read them). The training step takes the first batch of
    ``cfg.train_dataloader`` with the optimizer of ``cfg.optim_wrapper``; the
    test step, under ``no_grad``, the first batch of
    ``cfg.test_dataloader``. Use it on the text of
    :func:`~ce_mmdet.testing.tiny_coco.tiny_coco_config` (the tiny set's
    data loads offline in seconds).

    Args:
        cfg (mmengine.Config): a full detector config (model, dataloaders,
            optim_wrapper).
        seed (int): seeds the random generators before the model is built,
            and the train dataloader (its sampler and workers).

    Returns:
        SmokeSteps: the model, the training step's losses and the test
        step's predictions.

    Raises:
        RuntimeError: the training step's loss is not finite.

    Example:
        >>> import contextlib, io, os.path as osp, tempfile
        >>> from mmengine.config import Config
        >>> from ce_mmdet.testing import make_tiny_coco, smoke_steps
        >>> from ce_mmdet.testing.tiny_coco import tiny_coco_config
        >>> root = tempfile.mkdtemp()
        >>> _ = make_tiny_coco(osp.join(root, 'data'), num_train=2, num_val=1)
        >>> mine = osp.join(root, 'my_config.py')  # a user's CE RetinaNet
        >>> with open(mine, 'w') as f:
        ...     _ = f.write(
        ...         "_base_ = "
        ...         "'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py'\n"
        ...         "custom_imports = dict(imports=['ce_mmdet'])\n"
        ...         "model = dict(backbone=dict(type='CEResNet'))\n")
        >>> tiny = osp.join(root, 'tiny.py')
        >>> with open(tiny, 'w') as f:
        ...     _ = f.write(tiny_coco_config(mine, osp.join(root, 'data')))
        >>> with contextlib.redirect_stdout(io.StringIO()):  # pycocotools'
        ...     steps = smoke_steps(Config.fromfile(tiny))
        >>> pred = steps.predictions[0].pred_instances
        >>> len(steps.predictions), pred.bboxes.shape[-1], len(pred) > 0
        (1, 4, True)
    """
    from mmdet.registry import MODELS
    from mmengine.dist import is_distributed
    from mmengine.logging import MessageHub
    from mmengine.model import revert_sync_batchnorm
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import init_default_scope
    from mmengine.runner import Runner
    from mmengine.runner.utils import set_random_seed

    init_default_scope('mmdet')
    set_random_seed(seed)
    hub = MessageHub.get_instance(f'ce_mmdet.smoke_steps.{uuid.uuid4().hex}')
    hub.update_info('epoch', 0)
    hub.update_info('iter', 0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    if not is_distributed():
        model = revert_sync_batchnorm(model)
    batch = next(iter(Runner.build_dataloader(cfg.train_dataloader,
                                              seed=seed)))
    optim = build_optim_wrapper(model, cfg.optim_wrapper)
    log_vars = model.train().train_step(batch, optim)
    loss = torch.as_tensor(log_vars['loss']).item()
    if not math.isfinite(loss):
        raise RuntimeError(f'the training step\'s loss is {loss}: '
                           f'{dict(log_vars)}')
    test_batch = next(iter(Runner.build_dataloader(cfg.test_dataloader)))
    with torch.no_grad():
        predictions = model.eval().test_step(test_batch)
    return SmokeSteps(model, log_vars, predictions)
