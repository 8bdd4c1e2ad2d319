"""ce_mmdet.analysis.benchmark.alternating_samples: order and counts."""
import math

import pytest
import torch

from ce_mmdet.analysis.benchmark import (alternating_samples, paired_ratio,
                                         record_samples)


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


def test_paired_ratios_are_the_median_of_each_repeats_ratio():
    """Times: each model's median and fastest call, the ratio within each
    repeat to the baseline and their median (not the ratio of medians);
    other metrics: the ratio of the values, nan where a model lacks one."""
    samples = {'bn': [1.0, 2.0, 4.0], 'ce': [3.0, 2.2, 4.4]}
    results, per_repeat = {'bn': {}, 'ce': {}}, {}
    record_samples(results, per_repeat, 'step (s)', samples, 'bn')
    assert results['ce'] == {'step (s)': 3.0, 'step, best (s)': 2.2}
    assert results['bn'] == {'step (s)': 2.0, 'step, best (s)': 1.0}
    assert list(per_repeat) == [('ce', 'step (s)')]
    assert per_repeat['ce', 'step (s)'] == pytest.approx([3.0, 1.1, 1.1])
    assert paired_ratio(results, per_repeat, 'ce', 'step (s)',
                        'bn') == pytest.approx(1.1)  # the medians' ratio: 1.5
    assert paired_ratio(results, per_repeat, 'ce', 'step, best (s)',
                        'bn') == pytest.approx(2.2)
    results['bn']['syncs'], results['ce']['syncs'] = 0, 0
    assert paired_ratio(results, per_repeat, 'ce', 'syncs', 'bn') == 1.0
    results['bn']['rss'] = 3.0
    assert math.isnan(paired_ratio(results, per_repeat, 'ce', 'rss', 'bn'))
