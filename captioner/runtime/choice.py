"""Which arithmetic path "auto" runs on this CPU, and what each resolved precision means for the encoder and the
decoder's products.

Why a module of its own: these are decisions from the CPU's feature flags and from measured captions (the
tolerance below), read and changed together, while `captioner.runtime.fast` builds the paths they choose. The
flags are read from /proc/cpuinfo each time; nothing is cached at import.
"""

from __future__ import annotations

from pathlib import Path

import torch

from captioner.runtime import onnx_runtime, openvino_runtime
from captioner.runtime.precisions import PRECISIONS
from captioner.runtime.products import Products

CIDER_TOLERANCE = 0.01
"""How far below fp32's dev CIDEr-D (beam 3; Flickr8k dev, 1,000 images, and coco_small dev, 150) a path may
score, on each, to be chosen by "auto"."""
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
"""/proc/cpuinfo flags of native bf16 arithmetic."""
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
"""/proc/cpuinfo flags of 8-bit dot products."""


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

    - fp32: ONNX Runtime (OpenVINO's fp32 is no faster: 148 against 144 images/s on the AMX Xeon; on an AVX2-only
      Zen 3 EPYC 45.6 against 43.7 images/s and 14.8 against 15.3 ms for one image's encoder, within the noise).
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
