"""Inference-only fast paths for the CPU, built from the reference modules and checked against them in tests.

- `FastEncoder`: the frozen encoder trunk with its "same" padding made constant for the one input size, exported
  to ONNX and run by ONNX Runtime (fp32; int8 on request, `captioner.runtime.int8`) or by OpenVINO (bf16 and int8
  where the CPU has them natively), or with batch norm folded into the convolutions, channels-last memory and
  TorchScript (fp32 or bf16), in micro-batches small enough to stay in cache.
- `FusedAttentionDecoder` (`captioner.runtime.fused_decoder`): the attention decoder's `init`/`step` with the matrix
  products regrouped, in fp32 or with bf16 products (precisions "bf16", "bf16-decoder", and "int8" on CPUs with
  native bf16; "bf16-encoder" keeps the step's in fp32 and runs the per-image projection alone in bf16).

"auto" (the default) picks one of these per CPU from its feature flags (`auto_precision`): "bf16" (OpenVINO bf16
encoder, bf16 decoder products) with AMX and OpenVINO, "bf16-encoder" (OpenVINO bf16 encoder, fp32 decoder
step products) with AVX512-BF16 but no AMX, "bf16-decoder" (fp32 encoder, bf16 decoder products) on CPUs with native
bf16 but no OpenVINO, fp32 elsewhere.

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
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from captioner.models.conv_passes import fold_batchnorm, static_same_padding
from captioner.models.decoder import AttentionDecoder
from captioner.runtime import cache, int8, onnx_runtime, openvino_runtime
from captioner.runtime.fused_decoder import FusedAttentionDecoder
from captioner.runtime.precisions import PRECISIONS, Precision  # noqa: F401 (re-exported)
from captioner.runtime.products import Products

if TYPE_CHECKING:
    from captioner.models.encoder import Encoder

CIDER_TOLERANCE = 0.01
"""How far below fp32's dev CIDEr-D (beam 3; Flickr8k dev, 1,000 images, and coco_small dev, 150) a path may
score, on each, to be chosen by "auto"."""
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
"""/proc/cpuinfo flags of native bf16 arithmetic."""
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
"""/proc/cpuinfo flags of 8-bit dot products."""
BACKENDS: tuple[str, ...] = ("onnxruntime", "openvino", "torchscript")
"""The encoder's runtimes (`FastEncoder`)."""
ENCODER_CHUNK = 8
"""Images per encoder call (ONNX Runtime, TorchScript): larger batches spill the early, wide activations out
of the L2 cache. OpenVINO's chunk is `openvino_runtime.CHUNK`."""


def auto_precision(flags: set[str] | frozenset[str], openvino: bool | None = None) -> str:
    """What precision "auto" runs on a CPU with these /proc/cpuinfo feature `flags`: the fastest path whose
    captions stay within `CIDER_TOLERANCE` of fp32's dev CIDEr-D and that needs nothing beyond the checkpoint.
    `openvino`: whether OpenVINO is installed (default: looked up).

    - AMX (amx_bf16) with OpenVINO: "bf16", a bf16 encoder in OpenVINO and bf16 decoder products. General
      model (Lite2), beam 3, on a 2-core AMX Xeon (2026-12-04): CIDEr-D 0.5574 against fp32's 0.5561 on
      Flickr8k dev and 0.7092 against 0.7138 on coco_small dev, 2.0x fp32's speed (153.8 against 75.9 images/s
      in one run of benchmarks/batch_captioning.py). The int8 encoder (0.5409 and 0.7007) falls 0.015 below
      fp32 on Flickr8k.
    - AVX512-BF16 without AMX, with OpenVINO: "bf16-encoder", the OpenVINO bf16 encoder and fp32 decoder
      step products: 0.5559 and 0.7121 against fp32's 0.5561 and 0.7138 on a 2-core Zen 4 EPYC without AMX
      (2026-12-06, the same on 2026-12-07); with the per-image projection in bf16 as well (since 2026-12-07,
      `projection_products`) 0.5557 and 0.7121. There "bf16" (0.5596 and 0.7009) falls outside the tolerance on
      coco_small. On that EPYC (2026-12-07, after the fp32 decoder products moved to oneDNN's linear) it ran
      at 67.4 against "bf16-decoder"'s 57.3 images/s in one run of benchmarks/batch_captioning.py, and one
      image at a time at a p50 of 35.8 against 37.2 ms (100 photos, the two alternating).
    - other native bf16 (AMX without OpenVINO, or AVX512-BF16 without it): "bf16-decoder", an fp32 encoder and
      bf16 decoder products: 0.5546 and 0.7146 on the Zen 4 EPYC, 0.5528 and 0.7164 on the AMX Xeon. Without
      OpenVINO the bf16 encoder would run in TorchScript, which was not scored.
    - otherwise (VNNI, or AVX2 alone): "fp32". bf16 is emulated there, far slower; int8 needs a calibration
      file, changes a third of the captions, and without VNNI has only 7-bit weights.
    """
    if not flags & BF16_FLAGS:
        return "fp32"
    if not (openvino_usable() if openvino is None else openvino):
        return "bf16-decoder"
    return "bf16" if "amx_bf16" in flags else "bf16-encoder"


def resolve_precision(precision: str, device: torch.device | str = "cpu", flags: set[str] | None = None) -> str:
    """"auto" -> `auto_precision` of this CPU's flags (or of `flags`); off the CPU always "reference"."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if torch.device(device).type != "cpu":
        return "reference"
    if precision == "auto":
        return auto_precision(cpu_flags() if flags is None else flags)
    return precision


def encoder_precision(precision: str) -> str:
    """The encoder's half of a resolved precision: "bf16-decoder" runs an fp32 encoder, "bf16-encoder" a bf16 one."""
    return {"bf16-decoder": "fp32", "bf16-encoder": "bf16"}.get(precision, precision)


def openvino_usable() -> bool:
    """Whether the OpenVINO encoder can be built: OpenVINO runs the graph that the ONNX exporter writes."""
    return openvino_runtime.available() and onnx_runtime.available()


def default_backend(precision: str, flags: set[str] | None = None) -> str:
    """The encoder backend "auto" picks for an encoder `precision` (fp32, bf16 or int8) on this CPU (or `flags`).

    - fp32: ONNX Runtime (OpenVINO's fp32 is no faster: 148 against 144 images/s on the AMX Xeon).
    - bf16: OpenVINO where bf16 is native, else TorchScript (ONNX Runtime has no bf16 convolutions).
    - int8: OpenVINO where the CPU has 8-bit dot products (VNNI or AMX: 395 against ONNX Runtime's 278 images/s on
      the AMX Xeon), else ONNX Runtime, whose 7-bit weights on AVX2 are what was measured there.
    Each choice falls back to ONNX Runtime (fp32, int8) or TorchScript (bf16) where OpenVINO or ONNX Runtime is
    not installed.
    """
    flags = cpu_flags() if flags is None else flags
    openvino = openvino_usable()
    if precision == "bf16":
        return "openvino" if openvino and flags & BF16_FLAGS else "torchscript"
    if precision == "int8" and openvino and flags & VNNI_FLAGS:
        return "openvino"
    return "onnxruntime" if onnx_runtime.available() else "torchscript"


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux); empty where /proc/cpuinfo cannot be read."""
    try:
        return set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return set()


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slow."""
    return bool(cpu_flags() & BF16_FLAGS)


def cpu_has_vnni() -> bool:
    """Whether this CPU has 8-bit dot products (VNNI); without them int8 weights are quantised to 7 bits."""
    return bool(cpu_flags() & VNNI_FLAGS)


def decoder_products(precision: str) -> Products:
    """The arithmetic of the decoder's matrix products for a resolved precision: "bf16" for "bf16" and
    "bf16-decoder", and for "int8" where the CPU has native bf16 (elsewhere bf16 is emulated, far slower than
    fp32); otherwise "fp32" ("bf16-encoder" among them)."""
    if precision in ("bf16", "bf16-decoder") or (precision == "int8" and cpu_has_bf16()):
        return "bf16"
    return "fp32"


def projection_products(precision: str) -> Products:
    """The arithmetic of the decoder's per-image projection (`FusedAttentionDecoder`'s `projection`): that of its
    products, except under "bf16-encoder" on CPUs with native bf16, where the projection alone runs in bf16
    (its six changed captions of 1,150 and its speed: `FusedAttentionDecoder`)."""
    if precision == "bf16-encoder" and cpu_has_bf16():
        return "bf16"
    return decoder_products(precision)


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
