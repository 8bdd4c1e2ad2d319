"""Helpers for tests, benchmarks and demos: reference transcriptions of the
published computations and a tiny synthetic COCO-format set."""
from .reference import (ce_reference, ce_reference_module,
                        ce_resnet_reference_forward, published_cenet50_eval)
from .tiny_coco import CLASSES as TINY_COCO_CLASSES
from .tiny_coco import make_tiny_coco

__all__ = [
    'ce_reference', 'ce_reference_module', 'ce_resnet_reference_forward',
    'published_cenet50_eval',
    'make_tiny_coco', 'TINY_COCO_CLASSES'
]
