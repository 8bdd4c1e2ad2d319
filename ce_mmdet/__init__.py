"""ce_mmdet: Channel Equilibrium networks as an MMDetection 3.x plugin.

Importing this package registers every module (``custom_imports=dict(
imports=['ce_mmdet'])`` is all a config needs) and allow-lists the types that
mmengine checkpoints hold, so ``torch.load(weights_only=True)`` (torch >= 2.6)
reads them. On a CPU-only torch build it also lets mmengine's ``pytorch``
launcher run with the gloo backend (see ``ce_mmdet.engine.cpu_distributed``).
"""
from .utils.safe_load import register_mmengine_safe_globals
from .version import __version__

register_mmengine_safe_globals()

from . import analysis, engine, models  # noqa: E402,F401  (registers)

analysis.register_ce_flop_handle()
# CPU-only torch builds: let mmengine's pytorch launcher run with gloo
engine.enable_cpu_distributed()

__all__ = ['__version__', 'register_mmengine_safe_globals']
