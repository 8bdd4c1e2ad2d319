"""FLOP counting rules for the CE ops in mmengine's complexity analysis.

mmengine's analyser traces the model with ``torch.jit`` and counts the ops it
knows; the CE ops are ``torch.autograd.Function``s and show up as the opaque
nodes ``prim::PythonOp._CEFunction`` (CE) and ``prim::PythonOp._BNCEFunction``
(BatchNorm + CE as one op), which it would skip. The rules below count them,
in mmengine's convention (one multiply-add = one flop), reading the layer's
configuration (group size, Newton iterations, mode) from the op call itself:

* statistics: eval mean and sum of squares, ``2 N C HW``; training mean
  ``N C HW`` plus the per-sample group Gram matrices ``N C d HW``;
* instance reweighting MLP: ``2 N C h`` (fc1 and fc2; h = C / reduction);
* Newton iterations (training): ``3 T G d^3``;
* the block-diagonal map applied to the input: ``N C d HW``;
* for the fused op, the BatchNorm as mmengine counts an affine
  ``aten::batch_norm`` (``5 N C HW`` with batch statistics, ``2 N C HW``
  with running statistics), so a CE model's total is its BN model's plus CE.

Nothing is registered on import: :func:`register_ce_flop_handles` adds the
rules to mmengine's defaults (what ``tools/analysis_tools/get_flops.py``
does), or pass :func:`ce_flop_handles` to ``FlopAnalyzer.set_op_handle``.
"""
from typing import Any, Dict, List

from mmengine.analysis.jit_handles import get_shape

CE_OP_NAME = 'prim::PythonOp._CEFunction'
BNCE_OP_NAME = 'prim::PythonOp._BNCEFunction'


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


def _op_call(outputs: List[Any]):
    """The op's non-tensor argument (``OpCall``) from its traced node."""
    return outputs[0].node().scalar_args()[0]


def _ce_flops(inputs: List[Any], outputs: List[Any]) -> int:
    call = _op_call(outputs)
    n, c, h, w = get_shape(inputs[0])
    # tensor inputs end with (*params, *state): fc2 weight (C, h) is third
    # from the end
    hidden = get_shape(inputs[-3])[1]
    return ce_flop_count(n, c, h * w, call.config.group_size, hidden,
                         call.config.num_iters, call.training)


def ce_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """mmengine jit handle of ``_CEFunction``."""
    return _ce_flops(inputs, outputs)


def bnce_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """mmengine jit handle of ``_BNCEFunction``: BN + CE."""
    n, c, h, w = get_shape(inputs[0])
    bn = n * c * h * w * (5 if _op_call(outputs).bn_batch_stats else 2)
    return bn + _ce_flops(inputs, outputs)


def ce_activation_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """mmengine activation handle: a CE op outputs one tensor of the
    input's size (the traced output is a tuple, which the generic handle
    cannot read)."""
    n, c, h, w = get_shape(inputs[0])
    return n * c * h * w


def ce_flop_handles() -> Dict[str, Any]:
    """``{op name: flop handle}`` for ``FlopAnalyzer.set_op_handle``."""
    return {CE_OP_NAME: ce_flop_jit, BNCE_OP_NAME: bnce_flop_jit}


def ce_activation_handles() -> Dict[str, Any]:
    """``{op name: activation handle}`` for
    ``ActivationAnalyzer.set_op_handle``."""
    return {CE_OP_NAME: ce_activation_jit, BNCE_OP_NAME: ce_activation_jit}


def register_ce_flop_handles() -> None:
    """Add the CE rules to mmengine's default flop and activation handles,
    which ``get_model_complexity_info`` (mmdet's ``get_flops.py``) uses
    (idempotent). Call it from a tool, not on import."""
    from mmengine.analysis import complexity_analysis
    complexity_analysis._DEFAULT_SUPPORTED_FLOP_OPS.update(ce_flop_handles())
    complexity_analysis._DEFAULT_SUPPORTED_ACT_OPS.update(
        ce_activation_handles())
