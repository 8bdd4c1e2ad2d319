"""Helpers for tests, benchmarks and demos: reference transcriptions of the
published computations, a tiny synthetic COCO-format set and a detector
config's smoke steps."""
from .reference import (ce_reference, ce_reference_module,
                        ce_resnet_reference_forward, published_cenet50_eval)
from .smoke import SmokeSteps, smoke_steps
from .tiny_coco import CLASSES as TINY_COCO_CLASSES
from .tiny_coco import make_tiny_coco

__all__ = [
    'ce_reference', 'ce_reference_module', 'ce_resnet_reference_forward',
    'published_cenet50_eval',
    'make_tiny_coco', 'TINY_COCO_CLASSES', 'smoke_steps', 'SmokeSteps'
]
