"""``import ce_mmdet`` registers things and changes nothing else."""
import subprocess
import sys

SCRIPT = r'''
import mmengine.analysis.complexity_analysis as ca
import mmengine.dist.utils as dist_utils
import mmengine.runner.runner as runner_module
from mmengine.runner import Runner
import torch
before = dict(test=Runner.test, init=dist_utils._init_dist_pytorch,
              ddp=runner_module.MMDistributedDataParallel,
              flops=dict(ca._DEFAULT_SUPPORTED_FLOP_OPS),
              acts=dict(ca._DEFAULT_SUPPORTED_ACT_OPS))
hooks = (dict(torch.nn.modules.module._global_forward_hooks),
         dict(torch.nn.modules.module._global_forward_pre_hooks))
import ce_mmdet
from mmdet.registry import HOOKS, MODELS
assert Runner.test is before['test']
assert dist_utils._init_dist_pytorch is before['init']
assert runner_module.MMDistributedDataParallel is before['ddp']
assert ca._DEFAULT_SUPPORTED_FLOP_OPS == before['flops']
assert ca._DEFAULT_SUPPORTED_ACT_OPS == before['acts']
assert (dict(torch.nn.modules.module._global_forward_hooks),
        dict(torch.nn.modules.module._global_forward_pre_hooks)) == hooks
for name in ('CEResNet', 'CEFPN', 'ChannelEquilibrium'):
    assert MODELS.get(name) is not None, name
assert HOOKS.get('CESyncCheckHook') is not None
from mmengine.logging.history_buffer import HistoryBuffer
assert any(HistoryBuffer in (e if isinstance(e, tuple) else (e, ))
           for e in torch.serialization.get_safe_globals())
# the tools apply what they need, explicitly
from ce_mmdet.analysis import register_ce_flop_handles
register_ce_flop_handles()
assert 'prim::PythonOp._BNCEFunction' in ca._DEFAULT_SUPPORTED_FLOP_OPS
print('ok')
'''


def test_import_registers_and_patches_nothing():
    proc = subprocess.run([sys.executable, '-c', SCRIPT],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith('ok')
