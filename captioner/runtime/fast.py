"""Inference-only fast paths for the CPU, built from the reference modules and checked against them in tests.

- `FastEncoder`: the frozen encoder trunk with its "same" padding made constant for the one input size, exported
  to ONNX and run by ONNX Runtime (fp32; int8 on request, `captioner.runtime.int8`) or by OpenVINO (bf16 and int8
  where the CPU has them natively), or with batch norm folded into the convolutions, channels-last memory and
  TorchScript (fp32 or bf16), in micro-batches small enough to stay in cache.
- `FusedAttentionDecoder` (`captioner.runtime.fused_decoder`): the attention decoder's `init`/`step` with the matrix
  products regrouped, in fp32 or with bf16 products (precisions "bf16", "bf16-decoder", and "int8" on CPUs with
  native bf16; "bf16-encoder" keeps the step's in fp32 and runs the per-image projection alone in bf16).

"auto" (the default) picks one of these per CPU from its feature flags (`captioner.runtime.choice`): "bf16"
(OpenVINO bf16 encoder, bf16 decoder products) with AMX and OpenVINO, "bf16-encoder" (OpenVINO bf16 encoder, fp32
decoder step products) with AVX512-BF16 but no AMX, "bf16-decoder" (fp32 encoder, bf16 decoder products) on CPUs
with native bf16 but no OpenVINO, fp32 elsewhere.

The reference modules (`Encoder.forward`, `AttentionDecoder.step`) stay the ground truth: `tests/test_speed_paths.py`
checks each fast path against them (feature extraction for training runs the fp32 `FastEncoder`, and
`tests/test_features.py` checks what it caches against `Encoder.forward`). Weights are
copied when a fast path is built, so later changes to the source modules are not seen.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import threading
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from captioner.models.conv_passes import fold_batchnorm, static_same_padding
from captioner.models.decoder import AttentionDecoder
from captioner.runtime import cache, int8, onnx_runtime, openvino_runtime
from captioner.runtime.choice import (
    cpu_flags,
    cpu_has_bf16,
    cpu_has_vnni,
    decoder_products,
    default_backend,
    encoder_precision,
    projection_products,
    resolve_precision,
)
from captioner.runtime.fused_decoder import FusedAttentionDecoder

if TYPE_CHECKING:
    from captioner.models.encoder import Encoder

BACKENDS: tuple[str, ...] = ("onnxruntime", "openvino", "torchscript")
"""The encoder's runtimes (`FastEncoder`)."""
ENCODER_CHUNK = 8
"""Images per encoder call (ONNX Runtime, TorchScript): larger batches spill the early, wide activations out
of the L2 cache. OpenVINO's chunk is `openvino_runtime.CHUNK`."""


def export_onnx(encoder: Encoder) -> bytes:
    """The fp32 ONNX graph of `encoder`'s trunk that the onnxruntime backend runs, and that the int8 encoder is
    calibrated and quantised from: a copy with constant "same" padding, exported with a dynamic batch."""
    trunk = copy.deepcopy(encoder.trunk).float().eval()
    static_same_padding(trunk, encoder.preprocess.size)
    return onnx_runtime.export(trunk, encoder.preprocess.size)


class FastEncoder:
    """A frozen encoder prepared for CPU inference: (B, 3, H, W) -> (B, N, D) float32 grid features.

    Backends:
        onnxruntime: fp32, or int8 from a calibration file (`captioner.runtime.int8`). The trunk is exported to ONNX
            (TorchScript-based exporter, about a second, then kept in the disk cache) and run by ONNX Runtime,
            whose blocked-layout kernels suit depthwise convolutions.
        openvino: the same ONNX graph (and int8 model) run by OpenVINO, in bf16 or int8, on CPUs where those are
            native (`captioner.runtime.openvino_runtime`): 2x ONNX Runtime's fp32 speed in bf16 with AMX.
        torchscript: batch norm folded in fp32, channels-last, fp32 or bf16, traced and frozen.
        auto: `default_backend`.

    Carries the same `preprocess`, `feature_dim`, `grid_size` and `name` as the encoder it was built from.
    """

    def __init__(self, encoder: Encoder, precision: str = "auto", *, backend: str = "auto",
                 chunk_size: int | None = None, script: bool = True,
                 calibration: str | os.PathLike | None = None, disk_cache: bool = True):
        """`calibration`: the int8 calibration file (`captioner.runtime.int8.calibration_path`), for precision "int8".
        `chunk_size`: images per call (default `ENCODER_CHUNK`, or `openvino_runtime.CHUNK` for OpenVINO).
        `disk_cache`: keep the exported ONNX model on disk and reuse it at the next start
        (`captioner.runtime.cache`)."""
        self.precision = encoder_precision(resolve_precision(precision))
        if self.precision == "reference":
            raise ValueError("FastEncoder needs precision fp32, bf16 or int8 (or auto)")
        if backend == "auto":
            backend = default_backend(self.precision)
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose auto, {', '.join(BACKENDS)}")
        if backend == "onnxruntime" and self.precision == "bf16":
            raise ValueError("the onnxruntime backend runs fp32 and int8, not bf16")
        if self.precision == "int8" and backend == "torchscript":
            raise ValueError("the int8 encoder runs on the onnxruntime or openvino backend only")
        if backend != "torchscript" and not onnx_runtime.available():
            raise ValueError(f"the {backend} encoder needs the ONNX exporter and ONNX Runtime "
                             "(pip install onnxruntime onnx)")
        if backend == "openvino" and not openvino_runtime.available():
            raise ValueError("the openvino encoder needs OpenVINO (pip install openvino)")
        if self.precision == "int8" and calibration is None:
            raise int8.CalibrationError("the int8 encoder needs a calibration file (see captioner.runtime.int8)")
        if self.precision == "bf16" and not cpu_has_bf16() and backend == "torchscript":
            warnings.warn("this CPU has no native bf16 (AVX512-BF16 or AMX): the bf16 encoder and decoder "
                          "products are emulated and far slower than fp32 (measured on an AVX2-only CPU, the "
                          "encoder: 2.3 against 36 images/s)", RuntimeWarning, stacklevel=2)
        self.name, self.preprocess = encoder.name, encoder.preprocess
        self.feature_dim, self.grid_size = encoder.feature_dim, encoder.grid_size
        self._key = encoder.cache_key()
        self.backend = backend
        if chunk_size is None:
            chunk_size = openvino_runtime.CHUNK if backend == "openvino" else ENCODER_CHUNK
        self.chunk_size = chunk_size
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        self.dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32  # int8 takes fp32 images
        # uint8 pixels: normalised one chunk at a time, while it is in the caches. Timed with the OpenVINO
        # bf16 encoder on the 2-core Xeon (64 images): 3.1-3.3 ms an image against 3.6-4.2 for the batch at
        # once (docs/performance.md); not timed on its own for ONNX Runtime or TorchScript.
        self._run_pixels = lambda x: self._run(self.preprocess.normalize(x))
        size = self.preprocess.size
        if backend == "openvino":
            inference = "bf16" if self.precision == "bf16" else "f32"
            pixels = (self.preprocess.mean, self.preprocess.std)
            build = functools.partial(openvino_runtime.runner, precision=inference, pixels=pixels)
            self._run = self._onnx_runner(encoder, calibration, disk_cache, build)
            self._run_pixels = self._run  # normalises uint8 pixels inside its graph
            return
        if backend == "onnxruntime":
            self._run = self._onnx_runner(encoder, calibration, disk_cache, onnx_runtime.runner)
            return
        trunk = copy.deepcopy(encoder.trunk).float().eval()
        self.folded = fold_batchnorm(trunk)  # in fp32, before any rounding to bf16
        static_same_padding(trunk, size)
        trunk = trunk.to(memory_format=torch.channels_last, dtype=self.dtype)
        if script:
            example = torch.zeros(1, 3, size, size, dtype=self.dtype).contiguous(memory_format=torch.channels_last)
            with torch.inference_mode(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.jit's deprecation notice
                trunk = torch.jit.freeze(torch.jit.trace(trunk, example, check_trace=False))
        self._trunk = trunk
        self._run = lambda x: trunk(x.to(self.dtype).contiguous(memory_format=torch.channels_last))

    def _onnx_runner(self, encoder: Encoder, calibration: str | os.PathLike | None, use_cache: bool,
                     make: Callable[[bytes], Callable[[torch.Tensor], torch.Tensor]]):
        """`make(model)` for the exported fp32 ONNX trunk (fp32 and bf16), or its int8 QDQ version, read from
        the disk cache (`captioner.runtime.cache`) when it holds one built from the same weights, versions and
        CPU; a cached model that `make` rejects is built again."""
        ranges = int8.read_calibration(calibration, self._key) if self.precision == "int8" else None
        reduce_range = not cpu_has_vnni()
        graph = "int8" if ranges is not None else "fp32"  # bf16 runs the fp32 graph

        def build() -> bytes:
            model = export_onnx(encoder)
            if ranges is not None:
                try:
                    model = int8.quantize(model, ranges, reduce_range=reduce_range)
                except int8.CalibrationError as exc:
                    raise int8.CalibrationError(f"{calibration}: {exc}") from exc
            return model

        if not use_cache:
            return make(build())
        parts = [encoder.cache_key(), cache.weights_digest(encoder.trunk), encoder.preprocess.size, graph]
        if ranges is not None:
            parts += [json.dumps(ranges, sort_keys=True), f"reduce_range={reduce_range}"]
        parts.append(" ".join(sorted(cpu_flags())))
        return cache.load_or_build(f"encoder-{graph}", cache.key(*parts), build, make)

    def cache_key(self) -> str:
        return f"{self._key}|fast-{self.precision}-{self.backend}"  # backends round differently

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images, normalised floats or uint8 pixels (`Preprocess.to_uint8`, normalised here) ->
        (B, N, D) float32 grids."""
        size = self.preprocess.size
        if images.shape[1:] != (3, size, size):
            raise ValueError(f"expected (B, 3, {size}, {size}) images, got {tuple(images.shape)}")
        run = self._run_pixels if images.dtype == torch.uint8 else self._run
        grids = [run(chunk).flatten(2).transpose(1, 2) for chunk in images.split(self.chunk_size)]
        return torch.cat(grids).float()  # (B, N, D): (b, D, h, w) maps -> (b, h*w, D) grids


SMALL_JOB = 16
"""Images a Captioner with precision "auto" captions on the reference modules before it builds the fast paths.

Building them takes 0.3 s when the encoder's graph is in the disk cache and 1.5 s when it must be exported
(OpenVINO bf16, 2-core AMX Xeon, docs/performance.md), and saves about 20 ms per image (one image at a time: 42 ms
reference, 20 ms fast), so a job of one photo or a few is done sooner without them. After 16 images the
reference path has cost at most 0.35 s more than the fast one would have, and the paths are built."""


class FastPaths:
    """Lazily built, thread-safe holder of a Captioner's fast encoder and decoder (built on first use, or, with
    `defer_images`, once that many images have been captioned without them)."""

    def __init__(self, encoder: Encoder, decoder: nn.Module, precision: str, backend: str = "auto",
                 calibration: str | os.PathLike | None = None, defer_images: int = 0):
        self.precision, self.backend, self.calibration = precision, backend, calibration
        self._encoder, self._decoder = encoder, decoder
        self._lock = threading.Lock()
        self._built: tuple[FastEncoder, object] | None = None
        self._deferred_left = defer_images

    @property
    def built(self) -> bool:
        return self._built is not None

    def for_batch(self, images: int) -> tuple[FastEncoder, object] | None:
        """The fast paths for a batch of `images`, or None: run this batch on the reference modules, because the
        job so far is too small for building them to pay off (`defer_images`; see SMALL_JOB)."""
        if self._built is None and self._deferred_left:
            with self._lock:
                if self._built is None and images <= self._deferred_left:
                    self._deferred_left -= images
                    return None
                self._deferred_left = 0  # a batch that does not fit: build now, for good
        return self.get()

    def get(self) -> tuple[FastEncoder, object]:
        if self._built is None:
            with self._lock:
                if self._built is None:
                    decoder = self._decoder
                    if isinstance(decoder, AttentionDecoder):
                        decoder = FusedAttentionDecoder(decoder, decoder_products(self.precision),
                                                        projection_products(self.precision))
                    encoder = FastEncoder(self._encoder, self.precision, backend=self.backend,
                                          calibration=self.calibration)
                    self._built = (encoder, decoder)
        return self._built
