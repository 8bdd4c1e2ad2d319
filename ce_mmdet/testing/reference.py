"""Straightforward transcriptions of the published computations.

These are the references the fast code is tested against (in float64) and the
baselines the benchmarks time. They follow the issue text line by line, with
full-tensor transposes and copies, and favour obviousness over speed. Never use
them in a model.
"""
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


def ce_reference(x: Tensor, gate: Tensor, fc1_weight: Tensor,
                 ln_weight: Tensor, ln_bias: Tensor, fc2_weight: Tensor,
                 running_wm: Tensor, running_scale: Tensor, group_size: int,
                 num_iters: int, eps: float, momentum: float,
                 training: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """Channel Equilibrium, transcribed.

    Returns:
        tuple: output, new running_wm, new running_scale (the inputs are not
        modified; in eval the running values are returned unchanged).
    """
    n, c, h, w = x.shape
    g, d = c // group_size, group_size
    # instance reweighting
    v = x.var(dim=(2, 3), unbiased=True)
    hidden = F.linear(v, fc1_weight)
    hidden = F.layer_norm(hidden, (hidden.shape[-1], ), ln_weight, ln_bias,
                          eps)
    y = torch.sigmoid(F.linear(F.relu(hidden), fc2_weight))
    if training:
        s = torch.sqrt(v.mean())
    else:
        s = running_scale.reshape(())
    ir = x * y[:, :, None, None] / s
    # batch decorrelation
    xg = x.transpose(0, 1).reshape(g, d, n * h * w)
    if training:
        mu = xg.mean(dim=2, keepdim=True)
        xc = xg - mu
        eye = torch.eye(d, dtype=x.dtype, device=x.device)
        cov = eps * eye + xc @ xc.transpose(1, 2) / (n * h * w)
        trace = torch.diagonal(cov, dim1=1, dim2=2).sum(1)
        cov_n = cov / trace[:, None, None]
        p = eye.expand(g, d, d)
        for _ in range(num_iters):
            p = 1.5 * p - 0.5 * (p @ p @ p) @ cov_n
        wm = p
    else:
        wm = running_wm
    bd = (wm @ xg).reshape(c, n, h, w).transpose(0, 1)
    lam = torch.sigmoid(gate)
    out = lam * bd + (1 - lam) * ir
    if training:
        new_wm = (1 - momentum) * running_wm + momentum * wm.detach()
        new_scale = (1 - momentum) * running_scale + momentum * s.detach()
    else:
        new_wm, new_scale = running_wm, running_scale
    return out, new_wm, new_scale


def ce_reference_module(module, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """:func:`ce_reference` with the parameters of a ChannelEquilibrium."""
    return ce_reference(x, module.gate, module.fc1.weight, module.norm.weight,
                        module.norm.bias, module.fc2.weight, module.running_wm,
                        module.running_scale, module.group_size,
                        module.num_iters, module.eps, module.momentum,
                        module.training)


def _bn(x: Tensor, sd: Dict[str, Tensor], prefix: str) -> Tensor:
    return F.batch_norm(x, sd[prefix + 'running_mean'],
                        sd[prefix + 'running_var'], sd[prefix + 'weight'],
                        sd[prefix + 'bias'], False, 0.0, 1e-5)


def _published_ce_eval(x: Tensor, sd: Dict[str, Tensor], prefix: str,
                       group_size: int) -> Tensor:
    scale = sd[prefix + 'AR.running_scale']
    if float(scale.reshape(-1)[0]) == 0:
        scale = torch.ones_like(scale)
    out, _, _ = ce_reference(
        x, sd[prefix + 'x_weight'], sd[prefix + 'AR.fc.0.weight'],
        sd[prefix + 'AR.fc.1.weight'], sd[prefix + 'AR.fc.1.bias'],
        sd[prefix + 'AR.fc.3.weight'], sd[prefix + 'running_wm'], scale,
        group_size, 3, 1e-5, 0.0, False)
    return out


def published_cenet50_eval(x: Tensor, sd: Dict[str, Tensor]):
    """Eval forward of the published ImageNet CE-ResNet-50, from its keys.

    ``sd`` is the authors' state dict layout (``conv1``, ``bn1``, ``ce1``,
    ``layerL.B.{conv,bn}{1,2,3}``, ``layerL.B.ce``, ``downsample.{0,1}``),
    already stripped of any ``module.`` prefix. The stride sits on the 3x3
    convolution. Returns the four stage outputs.
    """
    out = F.conv2d(x, sd['conv1.weight'], stride=2, padding=3)
    out = _bn(out, sd, 'bn1.')
    out = _published_ce_eval(out, sd, 'ce1.', out.shape[1])
    out = F.max_pool2d(F.relu(out), 3, 2, 1)
    feats = []
    for layer, blocks in enumerate((3, 4, 6, 3), start=1):
        for b in range(blocks):
            p = f'layer{layer}.{b}.'
            stride = 2 if (b == 0 and layer > 1) else 1
            identity = out
            y = F.relu(_bn(F.conv2d(out, sd[p + 'conv1.weight']), sd,
                           p + 'bn1.'))
            y = F.relu(_bn(F.conv2d(y, sd[p + 'conv2.weight'], stride=stride,
                                    padding=1), sd, p + 'bn2.'))
            y = _bn(F.conv2d(y, sd[p + 'conv3.weight']), sd, p + 'bn3.')
            if p + 'ce.x_weight' in sd:
                y = _published_ce_eval(y, sd, p + 'ce.', 16)
            if b == 0:
                identity = _bn(
                    F.conv2d(out, sd[p + 'downsample.0.weight'],
                             stride=stride), sd, p + 'downsample.1.')
            out = F.relu(y + identity)
        feats.append(out)
    return tuple(feats)


def _ce_reference_call(layer, x: Tensor) -> Tensor:
    """``layer(x)`` by :func:`ce_reference`, writing the new running buffers
    back in training (as the layer does)."""
    out, wm, scale = ce_reference_module(layer, x)
    if layer.training:
        with torch.no_grad():
            layer.running_wm.copy_(wm)
            layer.running_scale.copy_(scale)
    return out


def ce_resnet_reference_forward(model, x: Tensor) -> Tuple[Tensor, ...]:
    """A (non deep-stem) CEResNet's forward, transcribed: every norm is
    called as a module (``nn.BatchNorm2d`` updates its own running
    statistics) and every CE layer computed by :func:`ce_reference` on the
    norm's output. The model's own CE code is never used, so a copy of a
    model run through this is the unfused, published computation."""
    out = model.norm1(model.conv1(x))
    if model.stem_ce:
        out = _ce_reference_call(model.ce1, out)
    out = model.maxpool(model.relu(out))
    outs = []
    for i, name in enumerate(model.res_layers):
        for block in getattr(model, name):
            identity = out
            y = block.relu(block.norm1(block.conv1(out)))
            if hasattr(block, 'conv3'):
                y = block.relu(block.norm2(block.conv2(y)))
                y = block.norm3(block.conv3(y))
            else:
                y = block.norm2(block.conv2(y))
            if getattr(block, 'with_ce', False):
                y = _ce_reference_call(block.ce, y)
            if block.downsample is not None:
                identity = block.downsample(out)
            out = block.relu(y + identity)
        if i in model.out_indices:
            outs.append(out)
    return tuple(outs)
