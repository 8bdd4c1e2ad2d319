"""Benchmark the CE layer against its straightforward transcription and BN.

Usage:
    python tools/analysis_tools/benchmark_ce_layer.py [--device cpu|cuda]
        [--repeats 5] [--batch 2] [--image 800 1216] [--dtype float32]

For ResNet-50 stage shapes of a detection input (C=256/512/1024 at 1/4, 1/8,
1/16 of the image), times training forward+backward and eval forward of

* ``bn``: ``nn.BatchNorm2d`` on the same tensor (the unit of the ratios),
* ``ref``: the transcription in :mod:`ce_mmdet.testing.reference`,
* ``ce``: :class:`ChannelEquilibrium` (fused op, recomputing backward),

alternating the three, after a warm-up, and prints medians with the ratios
``ref/ce`` (speed-up) and ``ce/bn`` (cost relative to BN). It also prints the
bytes each saves for backward (distinct storages, as autograd keeps them).
"""
import argparse
import statistics

import torch
import torch.nn as nn

from ce_mmdet.analysis.benchmark import (alternating_samples,
                                         saved_for_backward_bytes)
from ce_mmdet.models import ChannelEquilibrium
from ce_mmdet.testing import ce_reference_module


class Reference(nn.Module):
    """The transcription, with the CE layer's parameters and buffers."""

    def __init__(self, ce):
        super().__init__()
        self.ce = ce

    def forward(self, x):
        out, wm, scale = ce_reference_module(self.ce, x)
        if self.ce.training:
            with torch.no_grad():
                self.ce.running_wm.copy_(wm)
                self.ce.running_scale.copy_(scale)
        return out


def saved_bytes(module, x):
    """Bytes autograd saves for one training forward of ``module``."""
    module.train()
    xi = x.detach().requires_grad_()
    return saved_for_backward_bytes(lambda: module(xi))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--image', type=int, nargs=2, default=(800, 1216))
    parser.add_argument('--dtype', default='float32',
                        choices=['float32', 'float16', 'bfloat16'])
    parser.add_argument('--stages', type=int, nargs='+', default=(1, 2, 3))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    h, w = args.image
    print(f'device={device} dtype={dtype} batch={args.batch} image={h}x{w} '
          f'torch={torch.__version__} threads={torch.get_num_threads()}')
    header = (f'{"case":<26}{"bn ms":>9}{"ref ms":>9}{"ce ms":>9}'
              f'{"ref/ce":>8}{"ce/bn":>8}')
    for stage in args.stages:
        c = 256 * 2**(stage - 1)
        hs, ws = h // 2**(stage + 1), w // 2**(stage + 1)
        torch.manual_seed(0)
        x = torch.randn(args.batch, c, hs, ws, device=device, dtype=dtype)
        ce = ChannelEquilibrium(c).to(device)
        ref = Reference(ChannelEquilibrium(c).to(device))
        bn = nn.BatchNorm2d(c).to(device)
        if dtype != torch.float32:  # params stay fp32 (as under autocast)
            ref = None
        print(f'\nstage {stage}: x = {tuple(x.shape)}')
        print(header)
        for mode in ('train fwd+bwd', 'eval fwd'):
            training = mode.startswith('train')
            mods = {'bn': bn, 'ref': ref, 'ce': ce}
            for m in mods.values():
                if m is not None:
                    m.train(training)

            def step(m):
                if training:
                    xi = x.detach().requires_grad_()
                    m(xi).float().sum().backward()
                else:
                    with torch.no_grad():
                        m(x)

            times = alternating_samples(
                {k: (lambda m=m: step(m))
                 for k, m in mods.items() if m is not None}, args.repeats,
                args.warmup, device)
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            ref_ms = med.get('ref', float('nan'))
            print(f'{mode:<26}{med["bn"]:>9.2f}{ref_ms:>9.2f}'
                  f'{med["ce"]:>9.2f}{ref_ms / med["ce"]:>8.2f}'
                  f'{med["ce"] / med["bn"]:>8.2f}')
        sizes = {
            k: saved_bytes(m, x) / 2**20
            for k, m in (('bn', bn), ('ref', ref), ('ce', ce)) if m is not None
        }
        print('saved for backward (MiB): ' +
              '  '.join(f'{k}={v:.1f}' for k, v in sizes.items()) +
              f'  (input itself: {x.numel() * x.element_size() / 2**20:.1f})')


if __name__ == '__main__':
    main()
