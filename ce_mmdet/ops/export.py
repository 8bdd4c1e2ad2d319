"""What changes while a model is exported to ONNX (mmdeploy's route:
``torch.onnx.export`` with the TorchScript exporter, which traces).

An exported graph is an inference graph of standard ops. While the exporter
traces, the CE ops therefore run without an autograd Function (which it
would record as an opaque ``prim::PythonOp``), never write into their input
and use only ops ONNX has (no ``out=`` variants, ``layer_norm`` instead of
``native_layer_norm``, no ``diag_embed``); the numbers are the same. Other
tracing (mmengine's FLOP analyser) and eager or compiled runs are not
affected.
"""
import torch


def exporting_onnx() -> bool:
    """Whether ``torch.onnx.export`` is tracing this call (the cheap check
    first: ``is_in_onnx_export`` costs ~1 us, ten times ``is_tracing``)."""
    return torch.jit.is_tracing() and torch.onnx.is_in_onnx_export()
