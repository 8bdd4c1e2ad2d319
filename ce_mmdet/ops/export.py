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


def exporting_onnx() -> bool:
    """Whether ``torch.onnx.export`` is tracing this call (the cheap check
    first: ``is_in_onnx_export`` costs ~1 us, ten times ``is_tracing``)."""
    return torch.jit.is_tracing() and torch.onnx.is_in_onnx_export()


def exporting() -> bool:
    """Whether an exporter traces this call: ONNX (:func:`exporting_onnx`)
    or ``torch.export``."""
    return torch.compiler.is_exporting() or exporting_onnx()
