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

import ctypes
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

CHUNK = 4
"""Images per OpenVINO call. uint8 pixels, 64 images, 2-core AMX Xeon, ms an image at chunks of 2, 4, 8 and
16: bf16 2.44-2.53, 2.32-2.33, 2.62-2.68, 2.76-2.79; int8 1.98, 1.84, 1.86-1.87, 1.98-1.99 (ONNX Runtime is
fastest at 8-16: `fast.ENCODER_CHUNK`). The Lite2 general model at 288, same machine kind: bf16 4.29, 4.29,
4.42, 4.63; int8 3.52, 3.31, 3.28, 3.22, so 4 stays. Measured by timing `FastEncoder` on a stack of 64 uint8
images with this constant patched; `benchmarks/batch_captioning.py` gives the end-to-end effect."""


def available() -> bool:
    """Whether OpenVINO is installed; looked up without importing it."""
    from importlib.util import find_spec

    return find_spec("openvino") is not None


def runner(model: bytes, precision: str = "bf16", threads: int | None = None,
           pixels: tuple[tuple[float, ...], tuple[float, ...]] | None = None
           ) -> Callable[[torch.Tensor], torch.Tensor]:
    """An OpenVINO CPU model for ONNX `model`: images (b, 3, H, W) -> feature maps (b, D, h, w), float32.

    `pixels` = (mean, std) also accepts uint8 pixels (b, 3, H, W), normalised inside the compiled graph as
    `Preprocess.normalize` does, (x / 255 - mean) / std. The features agree with normalising in PyTorch to
    within float rounding (on the AMX Xeon: identical in bf16, at most 3.6e-7 apart in f32), and on the
    2-core Xeon cost 2.5-2.7 ms an image against 3.1-3.3 ms for normalising each chunk in PyTorch first and
    3.6-4.2 ms for normalising the batch of 64 at once (its float copy, 64 MB, does not stay in the caches).
    uint8's graph is compiled here when `pixels` is given, so that a damaged model fails here; the float graph
    only at its first use (about 0.1 s, under the lock: other callers wait that once), which is why the ONNX
    bytes stay referenced for the runner's lifetime. Without `pixels`, uint8 input is a ValueError.

    The "LATENCY" hint runs one inference stream on all `threads` (default: torch's intra-op threads). The
    "THROUGHPUT" hint splits the cores into one stream per core, which a single caller's synchronous requests
    leave idle: 150 against 298 images/s on the 2-core Xeon above.

    One image at a time (the app, `caption()` of a single photo) runs a model compiled for exactly one image, at
    its first use: OpenVINO's kernels for a static shape took 6.9 against 7.9 ms for one image of the general
    model (Lite2 at 288, bf16, uint8 pixels, 2 threads; medians of 5 rounds on a 2-core Zen 4 EPYC, 2026-12-07).
    """
    import openvino as ov

    core = ov.Core()
    config = {
        "INFERENCE_PRECISION_HINT": precision,
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_NUM_THREADS": threads or torch.get_num_threads(),
        "ENABLE_CPU_PINNING": False,  # the decoder's torch threads run on the same cores right after
    }
    requests: dict[tuple[bool, bool], object] = {}  # (uint8 input, one image) -> its infer request, reused
    lock = threading.Lock()  # callers in several threads take turns

    def request(uint8: bool, one: bool = False):
        if (uint8, one) not in requests:
            graph = core.read_model(model, b"")
            if one:
                shape = graph.input(0).get_partial_shape()
                shape[0] = 1
                graph.reshape({graph.input(0): shape})
            if uint8:
                if pixels is None:
                    raise ValueError("this encoder takes normalised float images, not uint8 pixels")
                graph = _with_normalisation(ov, graph, *pixels)
            with signal_stack_kept():
                requests[uint8, one] = core.compile_model(graph, "CPU", config).create_infer_request()
        return requests[uint8, one]

    request(pixels is not None)

    def run(x: torch.Tensor) -> torch.Tensor:
        uint8 = x.dtype == torch.uint8
        with lock:
            infer = request(uint8, x.size(0) == 1)
            infer.infer({0: (x if uint8 else x.float()).contiguous().numpy()})
            return torch.from_numpy(infer.get_output_tensor(0).data.copy())

    return run


class _SignalStack(ctypes.Structure):
    """`stack_t` of sigaltstack(2) on Linux."""

    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


@contextmanager
def signal_stack_kept() -> Iterator[None]:
    """Run the block, then give the calling thread back the alternate signal stack it had before.

    Why: compiling an OpenVINO model installs an alternate signal stack of its own (11,568 bytes) on the calling
    thread, and freeing the model puts back the one it found. Two models freed in another order than they were
    built (the app's two models, a Captioner collected while another lives) leave the thread on the stack of a
    model already freed. Python runs its signal handlers on the alternate stack (SA_ONSTACK), so the next Ctrl-C
    was a segmentation fault in the handler instead of a KeyboardInterrupt (reproduced on a 2-core Zen 4 EPYC:
    two runners, the first freed first, then SIGINT; `tests/test_openvino.py`). OpenVINO's own handlers then run
    on the thread's stack, which is large enough for them. Linux only; elsewhere, or if libc cannot be asked,
    the block just runs."""
    libc, saved = _libc(), _SignalStack()
    if libc is None or libc.sigaltstack(None, ctypes.byref(saved)) != 0:
        yield
        return
    try:
        yield
    finally:
        libc.sigaltstack(ctypes.byref(saved), None)  # fails harmlessly (EPERM) only while on that stack


def _libc():
    """The C library, for sigaltstack; None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc if hasattr(libc, "sigaltstack") else None
    except OSError:
        return None


def _with_normalisation(ov, graph, mean: tuple[float, ...], std: tuple[float, ...]):
    """`graph` taking uint8 (b, 3, H, W) pixels and normalising them first, in float32."""
    ppp = ov.preprocess.PrePostProcessor(graph)
    ppp.input().tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout("NCHW"))
    ppp.input().model().set_layout(ov.Layout("NCHW"))
    ppp.input().preprocess().convert_element_type(ov.Type.f32).scale(255.0).mean(list(mean)).scale(list(std))
    return ppp.build()
