"""ONNX Runtime for the encoder trunk: export to ONNX in memory, then run with the project's session options.

The fp32 fast encoder and the opt-in int8 one (`captioner.runtime.int8`) share both halves, so the int8 model is
quantised from exactly the graph that the fp32 path runs.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable

import torch
from torch import nn


def available() -> bool:
    """Whether ONNX Runtime and the `onnx` package (which the exporter needs) are installed; looked up without
    importing them (`import onnx` alone took 0.2-0.4 s, and a cached model needs only onnxruntime)."""
    from importlib.util import find_spec

    return all(find_spec(name) is not None for name in ("onnx", "onnxruntime"))


def export(trunk: nn.Module, size: int) -> bytes:
    """`trunk`, (b, 3, size, size) images -> (b, D, h, w) maps, as an ONNX model with a dynamic batch."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation notice
        torch.onnx.export(trunk, (torch.zeros(1, 3, size, size),), buffer, dynamo=False, input_names=["images"],
                          output_names=["maps"], dynamic_axes={"images": {0: "b"}, "maps": {0: "b"}},
                          opset_version=17)
    return buffer.getvalue()


def runner(model: bytes) -> Callable[[torch.Tensor], torch.Tensor]:
    """An ONNX Runtime session for `model`: images (b, 3, H, W) -> feature maps (b, D, h, w), float32."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    # Idle ORT threads must not spin: the decoder runs right after the encoder on the same cores.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: its notes on unused initialisers are not the user's concern
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {"images": x.float().contiguous().numpy()})[0])

    return run
