"""``import ce_mmdet`` refuses a torch older than its ops need, with what to
do, instead of a CE layer failing at its first forward."""
import pytest
import torch

from ce_mmdet.utils.torch_version import (MIN_TORCH, MIN_TORCH_COMPILE,
                                          check_torch_version, compiles_ce,
                                          torch_release)


@pytest.mark.parametrize('version, release', [
    ('2.13.0+cpu', (2, 13)), ('2.6.0', (2, 6)), ('2.6.0a0+git1234', (2, 6)),
    ('2.1.2+cu121', (2, 1)), ('10.0', (10, 0))])
def test_torch_release(version, release):
    assert torch_release(version) == release


@pytest.mark.parametrize('version', ['', 'nightly', '2'])
def test_torch_release_rejects_what_is_not_a_version(version):
    with pytest.raises(ValueError, match='not a torch version'):
        torch_release(version)


@pytest.mark.parametrize('version', ['2.7.0', '2.7.1a0+git1234',
                                     '2.13.0+cpu', '3.0.0'])
def test_new_enough_torch_passes(version):
    check_torch_version(version)


@pytest.mark.parametrize('version', ['2.1.2+cu121', '2.6.0', '1.13.1'])
def test_older_torch_is_refused_with_what_to_do(version):
    with pytest.raises(ImportError) as info:
        check_torch_version(version)
    message = str(info.value)
    assert f'found {version}' in message
    assert 'torch >= 2.7' in message
    assert 'pip install --no-build-isolation' in message


def test_the_running_torch_is_new_enough():
    """The check in ``ce_mmdet/__init__.py`` lets this torch through (and
    the minimum is what the ops need: the newest API they call, 2.7's)."""
    assert MIN_TORCH == (2, 7)
    assert torch_release(torch.__version__) >= MIN_TORCH
    assert hasattr(torch.compiler, '_is_exporting_flag')  # (2.7's)


@pytest.mark.parametrize('version, traced', [
    ('2.7.1+cu126', False), ('2.10.0', False), ('2.11.0+cu130', True),
    ('2.13.0+cpu', True), ('3.1.0', True)])
def test_compile_traces_ce_from_the_checked_release(version, traced):
    assert compiles_ce(version) is traced


def test_the_ops_are_traced_or_run_eagerly_as_this_torch_needs():
    """From MIN_TORCH_COMPILE (the pinned torch) the functional ops are the
    plain functions torch.compile traces into (test_compile.py checks the
    traces); on an older torch they are ``torch.compiler.disable``-d
    (test_compile.py checks that a compiled model then matches eager)."""
    from ce_mmdet.ops import batchnorm_channel_equilibrium, \
        channel_equilibrium
    traced = torch_release(torch.__version__) >= MIN_TORCH_COMPILE
    for op in (channel_equilibrium, batchnorm_channel_equilibrium):
        assert bool(getattr(op, '_torchdynamo_disable', False)) is not traced
        assert op.__module__ == 'ce_mmdet.ops.channel_equilibrium'
