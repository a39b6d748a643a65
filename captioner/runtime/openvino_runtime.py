"""OpenVINO for the encoder trunk on CPUs with native bf16: the same ONNX graph, run with oneDNN's AMX kernels.

Why a second runtime: ONNX Runtime's CPU kernels have no bf16 convolutions, and PyTorch's bf16 convolutions
(TorchScript, channels-last) spend their time in layout changes between the depthwise and pointwise layers. On a
2-core Xeon with AMX (2026-12-02, EfficientNet-Lite0 at 288, 64 images, chunks of 8), images per second:
ONNX Runtime fp32 144, TorchScript bf16 123, OpenVINO bf16 298; for the int8 QDQ model ONNX Runtime 278 and
OpenVINO 395. OpenVINO reads the exported ONNX bytes directly (about 0.03 s) and compiles them in about 0.13 s,
so nothing is cached beyond the ONNX file `captioner.runtime.cache` keeps already.

`precision` is OpenVINO's inference precision: "bf16" rounds every layer's activations to bf16 (relative L2
distance of the features from fp32 about 0.07), "f32" keeps fp32 (the int8 model's non-quantised layers).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch


def available() -> bool:
    """Whether OpenVINO is installed; looked up without importing it."""
    from importlib.util import find_spec

    return find_spec("openvino") is not None


def runner(model: bytes, precision: str = "bf16", threads: int | None = None
           ) -> Callable[[torch.Tensor], torch.Tensor]:
    """An OpenVINO CPU model for ONNX `model`: images (b, 3, H, W) -> feature maps (b, D, h, w), float32.

    The "LATENCY" hint runs one inference stream on all `threads` (default: torch's intra-op threads). The
    "THROUGHPUT" hint splits the cores into one stream per core, which a single caller's synchronous requests
    leave idle: 150 against 298 images/s on the 2-core Xeon above.
    """
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(model, b""), "CPU", {
        "INFERENCE_PRECISION_HINT": precision,
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_NUM_THREADS": threads or torch.get_num_threads(),
        "ENABLE_CPU_PINNING": False,  # the decoder's torch threads run on the same cores right after
    })
    request = compiled.create_infer_request()
    lock = threading.Lock()  # one request, reused: callers in several threads take turns

    def run(x: torch.Tensor) -> torch.Tensor:
        with lock:
            request.infer({0: x.float().contiguous().numpy()})
            return torch.from_numpy(request.get_output_tensor(0).data.copy())

    return run
