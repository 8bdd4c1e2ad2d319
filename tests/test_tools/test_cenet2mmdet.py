import json
import os.path as osp
import subprocess
import sys

import pytest
import torch
from mmengine.runner.checkpoint import load_checkpoint

from ce_mmdet.models import CEResNet
from ce_mmdet.testing import published_cenet50_eval
from ce_mmdet.utils.cenet_convert import convert_cenet, unwrap_state_dict

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
KEYS = osp.join(ROOT, 'tests', 'data', 'cenet_r50_keys.json')


def published_state(seed=0):
    """A random state dict in exactly the published layout (from the key
    list of the authors' file), with BN-like values."""
    with open(KEYS) as f:
        shapes = json.load(f)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if key.endswith('num_batches_tracked'):
            state[key] = torch.tensor(100)
        elif key.endswith('running_var'):
            state[key] = torch.rand(shape, generator=gen) + 0.5
        elif key.endswith('running_wm'):
            g, d, _ = shape
            noise = 0.05 * torch.randn(shape, generator=gen)
            state[key] = torch.eye(d).repeat(g, 1, 1) + noise
        elif key.endswith('running_scale'):
            state[key] = torch.rand(shape, generator=gen) + 0.5
        elif key.endswith('bn1.weight') or key.endswith('bn2.weight') or \
                key.endswith('bn3.weight') or key.endswith('1.weight') and \
                'downsample' in key:
            state[key] = torch.rand(shape, generator=gen) + 0.5
        elif len(shape) == 4:  # conv: fan-in scaled
            fan_in = shape[1] * shape[2] * shape[3]
            state[key] = torch.randn(shape, generator=gen) / fan_in**0.5
        elif key.endswith('x_weight'):
            state[key] = torch.randn(shape, generator=gen)
        else:
            state[key] = 0.1 * torch.randn(shape, generator=gen)
    return state


def test_key_list_is_the_published_layout():
    with open(KEYS) as f:
        keys = json.load(f)
    assert keys['ce1.running_wm'] == [1, 64, 64]
    assert keys['layer1.0.ce.running_wm'] == [16, 16, 16]
    assert keys['layer3.5.ce.AR.fc.0.weight'] == [256, 1024]
    assert not any(k.startswith('layer4') and '.ce.' in k for k in keys)


def test_unwrap_nested_and_prefixed():
    inner = {'module.conv1.weight': torch.zeros(1)}
    assert list(unwrap_state_dict({'state_dict': inner})) == ['conv1.weight']


def test_convert_loads_strictly_and_reproduces(tmp_path):
    src_state = published_state()
    # zero scale: "never updated" -> 1 with a warning
    src_state['layer2.1.ce.AR.running_scale'] = torch.zeros(1)
    src = tmp_path / 'cenet50.pth'
    torch.save({'state_dict': {'module.' + k: v
                               for k, v in src_state.items()}}, src)
    dst = tmp_path / 'converted' / 'cenet50_mmdet.pth'
    proc = subprocess.run([
        sys.executable,
        osp.join(ROOT, 'tools', 'model_converters', 'cenet2mmdet.py'),
        str(src), str(dst)
    ], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert 'never updated' in proc.stderr
    assert 'fc.weight' in proc.stdout and 'running_mean' in proc.stdout

    model = CEResNet(depth=50).double()
    converted = torch.load(dst, weights_only=True)['state_dict']
    result = model.load_state_dict(converted, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    # and through init_cfg, as a config does it
    model2 = CEResNet(
        depth=50, init_cfg=dict(type='Pretrained', checkpoint=str(dst)))
    model2.init_weights()
    for k, v in model2.state_dict().items():
        assert torch.equal(v, converted[k].to(v.dtype)), k

    model.eval()
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    ref_state = {k: v.double() if v.is_floating_point() else v
                 for k, v in src_state.items()}
    expected = published_cenet50_eval(x, ref_state)
    with torch.no_grad():
        outs = model(x)
    for i, (o, e) in enumerate(zip(outs, expected)):
        assert o.shape == e.shape
        err = ((o - e).abs().max() / e.abs().max()).item()
        assert err < 1e-10, (i, err)
    # the fix-up happened: the zero scale was replaced by 1
    assert model.layer2[1].ce.running_scale.item() == 1.0


def test_convert_function_drops_only_unused():
    state = published_state()
    converted, dropped = convert_cenet(state)
    assert set(dropped) == {k for k in state if k.startswith('fc.')} | {
        k for k in state if k.endswith('.running_mean') and 'ce' in k
        and 'bn' not in k and 'downsample' not in k
    }
    assert len(converted) + len(dropped) == len(state)


def test_load_checkpoint_with_mmengine(tmp_path):
    converted, _ = convert_cenet(published_state())
    path = tmp_path / 'c.pth'
    torch.save({'state_dict': converted}, path)
    model = CEResNet(depth=50)
    ckpt = load_checkpoint(model, str(path), strict=True)
    assert 'state_dict' in ckpt


@pytest.mark.parametrize('bad', ['not a dict'])
def test_unwrap_rejects_non_dicts(bad):
    with pytest.raises(TypeError, match='expected a state dict'):
        unwrap_state_dict(bad)
