"""What changes while a model is exported: to ONNX (mmdeploy's route:
``torch.onnx.export`` with the TorchScript exporter, which traces) or by
``torch.export`` (AOTInductor's and ExecuTorch's route; its default,
non-strict tracing).

An exported program is a graph of standard ops. While an exporter traces,
the CE ops therefore run without their autograd Function (which the ONNX
exporter would record as an opaque ``prim::PythonOp``, and whose forward
``torch.export`` would inline and then replay with autograd recording),
with the torch implementation (no Triton launch in the graph), never write
into their input and use no ``out=`` variants (the ONNX exporter drops what
they write; autograd cannot record them). For ONNX also only ops ONNX has:
``layer_norm`` instead of ``native_layer_norm``, no ``diag_embed``. The
numbers are the same; a ``torch.export`` program is differentiable through
its ops. Other tracing (mmengine's FLOP analyser, ``torch.compile``) and
eager runs are not affected.
"""
import torch


def torch_exporting() -> bool:
    """Whether ``torch.export`` traces this call: the flag that
    ``torch.compiler.is_exporting()`` returns, read as a flag. Up to torch
    2.11, dynamo answered the call itself with True in every trace,
    ``torch.compile``'s too (``torch/_dynamo/variables/torch.py``,
    ``tracing_state_functions``; 2.12 reads the flag), so a compiled model
    took the export route: CE's ops without their autograd Function, whose
    inlined forward inductor then compiled with wrong input gradients
    (torch 2.7.1 and 2.11.0: 5.8 off in relative error). Dynamo reads the
    flag as the global it is: False under ``torch.compile``, True under
    ``torch.export``, on every torch ce_mmdet runs on."""
    return torch.compiler._is_exporting_flag


def traces_sizes() -> bool:
    """Whether ``torch.jit`` traces this call (the TorchScript ONNX
    exporter, mmengine's FLOP analyser). A size is then a 0-dim tensor, and
    a Python comparison of one is baked into the trace as a constant (a
    ``TracerWarning``). Shape checks are skipped then, so that a
    ``TracerWarning`` from ce_mmdet always means a value the graph would
    not recompute at another input size."""
    return torch.jit.is_tracing()


def exporting_onnx() -> bool:
    """Whether ``torch.onnx.export`` is tracing this call (the cheap check
    first: ``is_in_onnx_export`` costs ~1 us, ten times ``is_tracing``)."""
    return torch.jit.is_tracing() and torch.onnx.is_in_onnx_export()


def exporting() -> bool:
    """Whether an exporter traces this call: ONNX (:func:`exporting_onnx`)
    or ``torch.export``."""
    return torch_exporting() or exporting_onnx()
