"""ce_mmdet: Channel Equilibrium networks as an MMDetection 3.x plugin.

Importing this package registers things and changes nothing else: every
module goes into mmdet's (and mmengine's) registries, so
``custom_imports=dict(imports=['ce_mmdet'])`` is all a config needs, and the
few types mmengine checkpoints hold are allow-listed with torch's public
``torch.serialization.add_safe_globals``, so ``torch.load(weights_only=True)``
(torch >= 2.6) reads them. What the tools need beyond that (the CE FLOP rule
in mmengine's analyser, distributed launch without a GPU, keeping the
test metrics) is applied by those tools, not here. It needs torch >= 2.7
(:mod:`ce_mmdet.utils.torch_version`; older raises ``ImportError``).
"""
import torch

from .utils.safe_load import register_mmengine_safe_globals
from .utils.torch_version import check_torch_version
from .version import __version__

# below torch 2.7 a CE layer fails at its first forward: say so here instead
check_torch_version(torch.__version__)
register_mmengine_safe_globals()

from . import engine, models, ops  # noqa: E402,F401  (registers)

__all__ = ['__version__', 'register_mmengine_safe_globals']
