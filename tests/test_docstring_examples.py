"""The examples in ce_mmdet's docstrings run and print what they show, and
what a config or a user's script names directly has one."""
import doctest
import importlib
import pkgutil

import pytest

import ce_mmdet

MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(ce_mmdet.__path__, prefix='ce_mmdet.'))


def examples(obj):
    """The doctests of a module, class or function that have examples (of
    a module: those of the objects it defines)."""
    return [t for t in doctest.DocTestFinder().find(obj) if t.examples]


@pytest.mark.parametrize(
    'name',
    [name for name in MODULES if examples(importlib.import_module(name))])
def test_docstring_examples_run(name):
    """Every example of the module, as ``python -m doctest`` runs them (a
    failing one is printed above the assertion)."""
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in examples(importlib.import_module(name)):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.attempted > 0 and result.failed == 0, result


def test_entry_points_have_examples():
    """The registered modules and hooks, the functional ops and the
    inhibited-channel meter show how they are called."""
    from mmdet.registry import HOOKS, MODELS

    from ce_mmdet.analysis import InhibitedChannelMeter
    from ce_mmdet.ops import (batchnorm_channel_equilibrium,
                              channel_equilibrium)
    registered = [
        obj for registry in (MODELS, HOOKS)
        for obj in registry.module_dict.values()
        if obj.__module__.startswith('ce_mmdet.')
    ]
    assert {obj.__name__
            for obj in registered} >= {
                'CEResNet', 'CEFPN', 'ChannelEquilibrium', 'CESyncCheckHook'
            }
    entry_points = registered + [
        channel_equilibrium, batchnorm_channel_equilibrium,
        InhibitedChannelMeter
    ]
    missing = [obj.__qualname__ for obj in entry_points if not examples(obj)]
    assert not missing, f'no docstring example: {missing}'
