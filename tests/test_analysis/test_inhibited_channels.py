import json
import os.path as osp
import sys

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmdet.registry import MODELS

from ce_mmdet.analysis import InhibitedChannelMeter
from ce_mmdet.models import CEResNet
from ce_mmdet.testing.tiny_coco import tiny_coco_config

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))


def load_tool():
    sys.path.insert(0, osp.join(ROOT, 'tools', 'analysis_tools'))
    try:
        import inhibited_channels
    finally:
        sys.path.pop(0)
    return inhibited_channels


@pytest.mark.parametrize('config', [
    'configs/ce_retinanet/retinanet_r50_fpn_1x_coco.py',
    'configs/ce_retinanet/retinanet_r50-ce_fpn_1x_coco.py'
])
def test_tool_on_tiny_coco(config, tiny_coco, tmp_path):
    cfg_path = tmp_path / 'tiny.py'
    cfg_path.write_text(tiny_coco_config(osp.join(ROOT, config), tiny_coco))
    init_default_scope('mmdet')
    torch.manual_seed(0)
    model = MODELS.build(Config.fromfile(str(cfg_path)).model)
    model.init_weights()
    bn = model.backbone.bn1
    with torch.no_grad():
        bn.weight[0], bn.bias[0] = 0.0, -10.0  # dead by construction
        bn.weight[1], bn.bias[1] = 0.0, 10.0  # large activations
    ckpt = tmp_path / 'model.pth'
    torch.save({'state_dict': model.state_dict()}, ckpt)
    summary = load_tool().main([
        str(cfg_path),
        str(ckpt), '--num-images', '3', '--out-dir',
        str(tmp_path / 'out')
    ])
    assert summary['images'] == 3
    layers = summary['layers']
    assert list(layers)[0] == 'stem' and 'layer4.2' in layers
    assert all(0.0 <= row['inhibited'] <= 1.0 for row in layers.values())
    assert 0.0 <= summary['overall'] <= 1.0
    stem = layers['stem']['channel_inhibited']
    if '-ce' not in config:  # BN: the stem ReLU sees bn1 directly
        assert stem[0] == 1.0 and stem[1] == 0.0
    with open(tmp_path / 'out' / 'inhibited_channels.json') as f:
        assert json.load(f)['overall'] == summary['overall']
    assert (tmp_path / 'out' / 'inhibited_channels.png').stat().st_size > 0


def test_meter_counts_constructed_channels_in_ce_model():
    model = CEResNet(depth=18, base_channels=16).eval()
    meter = InhibitedChannelMeter(model, thr=1e-2)
    block = model.layer2[1]
    with torch.no_grad():
        # the block's output channel 0: norm2 -> CE -> + identity -> ReLU;
        # zero the CE mixing into it and push it far negative / positive
        block.norm2.weight.zero_()
        block.norm2.bias.fill_(-1e3)
        block.norm2.bias[5] = 1e3
        model(torch.rand(2, 3, 64, 64))
    fractions = meter.summary()['layers']['layer2.1']['channel_inhibited']
    assert len(fractions) == 32
    assert fractions[5] == 0.0
    assert sum(f == 1.0 for f in fractions) >= 16
    meter.remove()
    relative = InhibitedChannelMeter(model, thr=0.5, relative=True)
    with torch.no_grad():
        model(torch.rand(2, 3, 64, 64))
    assert 0.0 <= relative.summary()['overall'] <= 1.0
    with pytest.raises(ValueError, match='no ResNet blocks'):
        InhibitedChannelMeter(torch.nn.Linear(2, 2))


@pytest.mark.parametrize('kwargs,error,message', [
    (dict(thr=-0.1), ValueError, 'thr must be >= 0, got -0.1'),
    (dict(thr=float('nan')), ValueError, 'thr must be >= 0, got nan'),
    (dict(thr='0.1'), TypeError, "thr must be a number, got '0.1'"),
    (dict(thr=True), TypeError, 'thr must be a number, got True'),
    (dict(relative='yes'), TypeError, "relative must be a bool, got 'yes'"),
])
def test_meter_refuses_bad_arguments(kwargs, error, message):
    with pytest.raises(error) as raised:
        InhibitedChannelMeter(CEResNet(depth=18, base_channels=16),
                              **kwargs)
    assert str(raised.value) == message
