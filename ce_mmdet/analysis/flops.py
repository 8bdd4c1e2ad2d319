"""FLOP counting rule for the CE operator in mmengine's complexity analysis.

mmengine's analyser traces the model with ``torch.jit`` and counts the ops it
knows; the fused CE op is a ``torch.autograd.Function`` and shows up as the
opaque node ``prim::PythonOp._CEFunction``, which it would skip. The rule below
counts it, in mmengine's convention (one multiply-add = one flop):

* statistics: eval mean and sum of squares, ``2 N C HW``; training mean
  ``N C HW`` plus the per-sample group Gram matrices ``N C d HW``;
* instance reweighting MLP: ``2 N C h`` (fc1 and fc2; h = C / reduction);
* Newton iterations (training): ``3 T G d^3``;
* the block-diagonal map applied to the input: ``N C d HW``.
"""
from typing import Any, List

from mmengine.analysis import complexity_analysis
from mmengine.analysis.jit_handles import get_shape

CE_OP_NAME = 'prim::PythonOp._CEFunction'


def ce_flop_count(n: int, c: int, hw: int, d: int, hidden: int,
                  num_iters: int, training: bool) -> int:
    """Flops (multiply-adds) of one CE forward, by the rule above."""
    flops = n * c * d * hw + 2 * n * c * hidden
    if training:
        g = c // d
        flops += n * c * hw + n * c * d * hw + 3 * num_iters * g * d**3
    else:
        flops += 2 * n * c * hw
    return flops


def ce_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """mmengine jit handle. Inputs: x (N, C, H, W), running W (G, d, d) in
    eval or a (G, d, 0) placeholder in training, running scale, gate, fc1
    weight (h, C), LN weight, LN bias, fc2 weight."""
    n, c, h, w = get_shape(inputs[0])
    _, d, k = get_shape(inputs[1])
    hidden = get_shape(inputs[4])[0]
    # Newton iterations are not visible in the shapes: count the default 3
    return ce_flop_count(n, c, h * w, d, hidden, 3, training=k == 0)


def ce_activation_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """mmengine activation handle: CE outputs one tensor of the input's size
    (the op's traced output is a tuple, which the generic handle cannot
    read)."""
    n, c, h, w = get_shape(inputs[0])
    return n * c * h * w


def register_ce_flop_handle() -> None:
    """Add the CE rules to mmengine's default flop and activation handles
    (idempotent)."""
    complexity_analysis._DEFAULT_SUPPORTED_FLOP_OPS[CE_OP_NAME] = ce_flop_jit
    complexity_analysis._DEFAULT_SUPPORTED_ACT_OPS[CE_OP_NAME] = \
        ce_activation_jit
