"""ce_mmdet.analysis.benchmark.alternating_samples: order and counts."""
import torch

from ce_mmdet.analysis.benchmark import alternating_samples


def recording(calls):
    return {k: (lambda k=k: calls.append(k)) for k in ('a', 'b', 'c')}


def test_rounds_alternate_and_warmup_is_not_recorded():
    calls = []
    samples = alternating_samples(recording(calls), 3, 2, torch.device('cpu'))
    assert calls == list('abc') * 5
    assert {k: len(v) for k, v in samples.items()} == dict(a=3, b=3, c=3)
    assert all(t >= 0 for v in samples.values() for t in v)


def test_reverse_flips_the_order_every_round():
    calls = []
    alternating_samples(recording(calls), 2, 1, torch.device('cpu'),
                        reverse=True)
    assert calls == list('abc') + list('cba') + list('abc')
