"""Every config loads, builds, and runs a training and a test step on the
tiny COCO set (image scale shrunk here, not in the configs)."""
import glob
import math
import os.path as osp

import pytest
import torch
from mmengine.config import Config

from ce_mmdet.models import CEFPN, CEResNet, ChannelEquilibrium
from ce_mmdet.testing import smoke_steps
from ce_mmdet.testing.tiny_coco import tiny_coco_config

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
CONFIGS = sorted(
    osp.relpath(p, ROOT)
    for p in glob.glob(osp.join(ROOT, 'configs', '**', '*.py'), recursive=True)
    if '_base_' not in p)


def test_configs_found():
    assert len(CONFIGS) >= 15


@pytest.mark.parametrize('path', CONFIGS)
def test_config_loads(path):
    cfg = Config.fromfile(osp.join(ROOT, path))
    backbone = cfg.model.backbone
    is_ce = '-ce' in osp.basename(path)
    assert (backbone.type == 'CEResNet') == is_ce
    assert ('ce_mmdet' in cfg.get('custom_imports', {}).get('imports', [])
            ) == is_ce
    if 'fpn-ce' in path:
        assert cfg.model.neck.type == 'CEFPN'
    if 'r101' in path:
        assert backbone.depth == 101


@pytest.mark.parametrize('path', CONFIGS)
def test_config_train_and_test_step(path, tiny_coco, tmp_path):
    if path.startswith(osp.join('configs', 'demo')):
        # already a tiny-set config: point it at this session's copy
        cfg = Config.fromfile(osp.join(ROOT, path))
        for loader in (cfg.train_dataloader, cfg.test_dataloader):
            loader.dataset.data_root = tiny_coco + '/'
    else:
        tiny = tmp_path / 'tiny.py'
        tiny.write_text(tiny_coco_config(osp.join(ROOT, path), tiny_coco))
        cfg = Config.fromfile(str(tiny))
    model, log_vars, results = smoke_steps(cfg)
    if '-ce' in osp.basename(path):
        assert isinstance(model.backbone, CEResNet)
        assert any(isinstance(m, ChannelEquilibrium) for m in model.modules())
    assert isinstance(model.neck, CEFPN) == ('fpn-ce' in path)
    assert math.isfinite(log_vars['loss'].item())
    assert len(results) == 1
    pred = results[0].pred_instances
    assert pred.bboxes.shape[-1] == 4
    if not path.startswith(osp.join('configs', 'demo')):
        # the tiny config's score threshold 0 keeps the young model's boxes
        assert len(pred) > 0
    assert torch.isfinite(pred.scores).all()
    if 'mask' in path:
        assert 'masks' in pred


@pytest.mark.parametrize('folder', ['ce_mask_rcnn', 'ce_retinanet'])
def test_metafile_and_readme_match_files(folder):
    import yaml
    base = osp.join(ROOT, 'configs', folder)
    with open(osp.join(base, 'metafile.yml')) as f:
        meta = yaml.safe_load(f)
    files = {osp.basename(p) for p in glob.glob(osp.join(base, '*.py'))}
    models = meta['Models']
    assert {m['Name'] + '.py' for m in models} == files
    for m in models:
        assert m['Config'] == f'configs/{folder}/{m["Name"]}.py'
        assert m['In Collection'] == meta['Collections'][0]['Name']
    with open(osp.join(base, 'README.md')) as f:
        readme = f.read()
    for name in files:
        assert f'(./{name})' in readme, name
    assert 'tools/dist_train.sh' in readme
