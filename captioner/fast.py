"""Inference-only fast paths for the CPU, built from the reference modules and checked against them in tests.

- `FastEncoder`: the frozen encoder trunk with its "same" padding made constant for the one input size, run by
  ONNX Runtime (fp32, the default; int8 on request, `captioner.int8`), or with batch norm folded into the
  convolutions, channels-last memory and TorchScript (fp32, or bf16 on request), in micro-batches small enough to
  stay in cache.
- `FusedAttentionDecoder`: the attention decoder's `init`/`step` with the matrix products regrouped: the three
  linear maps of the hidden state are one product, and the embedding's share of the LSTM input is looked up
  from a precomputed (V, 4H) table; the attention's tanh is rewritten as a sigmoid. Same weights, same fp32
  arithmetic up to summation order and rounding.

The reference modules (`Encoder.forward`, `AttentionDecoder.step`) stay the ground truth: `tests/test_speed_paths.py`
checks each fast path against them (feature extraction for training runs the fp32 `FastEncoder`, and
`tests/test_features.py` checks what it caches against `Encoder.forward`). Weights are
copied when a fast path is built, so later changes to the source modules are not seen.
"""

from __future__ import annotations

import copy
import os
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from captioner import int8, onnx_runtime
from captioner.conv_passes import fold_batchnorm, static_same_padding
from captioner.decoder import AttentionDecoder, StepOutput, Tensors

if TYPE_CHECKING:
    from captioner.encoder import Encoder

Precision = Literal["auto", "bf16", "fp32", "int8", "reference"]
PRECISIONS = ("auto", "bf16", "fp32", "int8", "reference")
ENCODER_CHUNK = 8
"""Images per encoder call: larger batches spill the early, wide activations out of the L2 cache."""


def resolve_precision(precision: str, device: torch.device | str = "cpu") -> str:
    """"auto" -> "fp32" (the captions of the reference); off the CPU always "reference"."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if torch.device(device).type != "cpu":
        return "reference"
    return "fp32" if precision == "auto" else precision


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux); empty where /proc/cpuinfo cannot be read."""
    try:
        return set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return set()


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slow."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def cpu_has_vnni() -> bool:
    """Whether this CPU has 8-bit dot products (VNNI); without them int8 weights are quantised to 7 bits."""
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


def export_onnx(encoder: Encoder) -> bytes:
    """The fp32 ONNX graph of `encoder`'s trunk that the onnxruntime backend runs, and that the int8 encoder is
    calibrated and quantised from: a copy with constant "same" padding, exported with a dynamic batch."""
    trunk = copy.deepcopy(encoder.trunk).float().eval()
    static_same_padding(trunk, encoder.preprocess.size)
    return onnx_runtime.export(trunk, encoder.preprocess.size)


class FastEncoder:
    """A frozen encoder prepared for CPU inference: (B, 3, H, W) -> (B, N, D) float32 grid features.

    Backends:
        onnxruntime: fp32, or int8 from a calibration file (`captioner.int8`). The trunk is exported to ONNX in
            memory (TorchScript-based exporter, well under a second) and run by ONNX Runtime, whose
            blocked-layout kernels suit depthwise convolutions.
        torchscript: batch norm folded in fp32, channels-last, fp32 or bf16, traced and frozen.
        auto: onnxruntime for fp32 and int8 when it is installed, else torchscript.

    Carries the same `preprocess`, `feature_dim`, `grid_size` and `name` as the encoder it was built from.
    """

    def __init__(self, encoder: Encoder, precision: str = "auto", *, backend: str = "auto",
                 chunk_size: int = ENCODER_CHUNK, script: bool = True, calibration: str | os.PathLike | None = None):
        """`calibration`: the int8 calibration file (`captioner.int8.calibration_path`), for precision "int8"."""
        self.precision = resolve_precision(precision)
        if self.precision == "reference":
            raise ValueError("FastEncoder needs precision fp32, bf16 or int8 (or auto)")
        if backend == "auto":
            ort = self.precision in ("fp32", "int8") and onnx_runtime.available()
            backend = "onnxruntime" if ort else "torchscript"
        if backend not in ("onnxruntime", "torchscript"):
            raise ValueError(f"unknown backend {backend!r}; choose auto, onnxruntime or torchscript")
        if backend == "onnxruntime" and self.precision == "bf16":
            raise ValueError("the onnxruntime backend runs fp32 and int8, not bf16")
        if self.precision == "int8" and backend != "onnxruntime":
            raise ValueError("the int8 encoder runs on the onnxruntime backend only")
        if self.precision == "int8" and not onnx_runtime.available():
            raise ValueError("the int8 encoder needs ONNX Runtime (pip install onnxruntime onnx)")
        if self.precision == "int8" and calibration is None:
            raise int8.CalibrationError("the int8 encoder needs a calibration file (see captioner.int8)")
        if self.precision == "bf16" and not cpu_has_bf16():
            warnings.warn("this CPU has no native bf16 (AVX512-BF16 or AMX): the bf16 encoder is emulated and "
                          "far slower than fp32 (measured on an AVX2-only CPU: 2.3 against 36 images/s)",
                          RuntimeWarning, stacklevel=2)
        self.name, self.preprocess = encoder.name, encoder.preprocess
        self.feature_dim, self.grid_size = encoder.feature_dim, encoder.grid_size
        self._key = encoder.cache_key()
        self.backend, self.chunk_size = backend, chunk_size
        self.dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32  # int8 takes fp32 images
        size = self.preprocess.size
        if backend == "onnxruntime":
            model = export_onnx(encoder)
            if self.precision == "int8":
                ranges = int8.read_calibration(calibration, self._key)
                try:
                    model = int8.quantize(model, ranges, reduce_range=not cpu_has_vnni())
                except int8.CalibrationError as exc:
                    raise int8.CalibrationError(f"{calibration}: {exc}") from exc
            self._run = onnx_runtime.runner(model)
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

    def cache_key(self) -> str:
        return f"{self._key}|fast-{self.precision}"

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        size = self.preprocess.size
        if images.shape[1:] != (3, size, size):
            raise ValueError(f"expected (B, 3, {size}, {size}) images, got {tuple(images.shape)}")
        grids = [self._run(chunk).flatten(2).transpose(1, 2) for chunk in images.split(self.chunk_size)]
        return torch.cat(grids).float()  # (B, N, D): (b, D, h, w) maps -> (b, h*w, D) grids


class FusedAttentionDecoder:
    """`AttentionDecoder.init`/`step` with fused weights, for inference (dropout off, no gradients).

    Per step: one (H -> A + F + 4H) product for the attention query, the context gate and the LSTM's recurrent
    term; the word's LSTM input term is a row of a precomputed (V, 4H) table, the context's is added in the same
    `addmm`. The attention score's bias is dropped (softmax ignores a constant shift). The memory (projected
    features and attention keys) stays at one row per image and is broadcast over the beams. With the deep output,
    the word's share of the readout (its embedding plus L_h's bias) is a row of a (V, E) table.

    The attention energy `w . tanh(u)` over every beam x grid cell x attention unit is computed as
    `2w . sigmoid(2u)`: tanh(u) = 2 sigmoid(2u) - 1, and the `- w.1` it drops is the same for every grid cell,
    which the softmax ignores. Doubling is exact in floating point, so the keys, the query's weight rows and
    bias, and the score weights are stored doubled.
    PyTorch's CPU tanh is about 10x slower than its sigmoid (2.2 against 0.22 ms for one step's 2M values at
    32 images): the tanh took 17% of the decoder's time, and without it the decoder ran 19% faster in
    `benchmarks/batch_captioning.py` (187 to 223 images/s). All fp32: with
    bf16 products (AMX) it ran faster but changed about one caption in ten of a trained model, so it is not
    offered.
    """

    memory_per_image = True

    def __init__(self, decoder: AttentionDecoder):
        if not isinstance(decoder, AttentionDecoder):
            raise TypeError(f"FusedAttentionDecoder needs an AttentionDecoder, got {type(decoder).__name__}")
        d = decoder
        with torch.no_grad():
            E = d.embed.embedding_dim
            w_ih = d.lstm.weight_ih.float()  # (4H, E + F)
            self.word_gates = torch.addmm(d.lstm.bias_ih.float(), d.embed.weight.float(), w_ih[:, :E].t())  # (V, 4H)
            self.context_w = w_ih[:, E:].t().contiguous()  # (F, 4H)
            hidden = torch.cat([2 * d.att_hidden.weight, d.gate.weight, d.lstm.weight_hh])  # (A + F + 4H, H)
            self.hidden_w = hidden.t().contiguous().float()  # the query doubled, for the sigmoid form
            self.hidden_b = torch.cat([2 * d.att_hidden.bias, d.gate.bias, d.lstm.bias_hh]).float()
            self.score_w = 2 * d.att_score.weight.float().view(-1, 1)  # (A, 1)
            self.out_w = d.out.weight.t().contiguous().float()  # (H, V), or (E, V) with the deep output
            self.out_b = d.out.bias.float()
            self.deep = d.cfg.deep_output
            if self.deep:  # readout = tanh(embed[word] + L_h h + L_z context): a table row and two addmm
                self.readout_words = (d.embed.weight.float() + d.readout_hidden.bias.float()).contiguous()  # (V, E)
                self.readout_hidden_w = d.readout_hidden.weight.t().contiguous().float()  # (H, E)
                self.readout_context_w = d.readout_context.weight.t().contiguous().float()  # (F, E)
        self.split = (d.att_hidden.out_features, d.gate.out_features, 4 * d.lstm.hidden_size)
        self.reference = d

    def init(self, features: torch.Tensor) -> tuple[Tensors, Tensors]:
        with torch.inference_mode():
            memory, state = self.reference.init(features.float())
            # Doubled for the sigmoid form, under a new name: the reference `step` must not be handed them.
            return {"feats": memory["feats"], "doubled_keys": memory["keys"] * 2}, state

    def step(self, tokens: torch.Tensor, memory: Tensors, state: Tensors, return_gates: bool = False) -> StepOutput:
        keys, feats = memory["doubled_keys"], memory["feats"]  # (B, N, A), (B, N, F)
        B, N, A = keys.shape
        R = tokens.size(0)  # B * K rows, image-major
        h, c = state["h"], state["c"]  # (R, H)
        query, gate, recurrent = torch.addmm(self.hidden_b, h, self.hidden_w).split(self.split, dim=1)
        energy = torch.sigmoid_(keys.unsqueeze(1) + query.view(B, R // B, 1, A))  # (B, K, N, A)
        alpha = torch.softmax(torch.matmul(energy, self.score_w).view(B, R // B, N), dim=2)  # (B, K, N)
        context = torch.bmm(alpha, feats).view(R, -1).mul_(torch.sigmoid_(gate))  # (R, F)
        base = self.word_gates.index_select(0, tokens).add_(recurrent)  # (R, 4H)
        z = torch.addmm(base, context, self.context_w)
        i, f, g, o = z.chunk(4, dim=1)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        c_new = torch.addcmul(f * c, i, g)
        h_new = o * torch.tanh(c_new)
        readout = h_new
        if self.deep:
            readout = torch.addmm(self.readout_words.index_select(0, tokens), h_new, self.readout_hidden_w)
            readout = torch.tanh_(torch.addmm(readout, context, self.readout_context_w))  # (R, E)
        logits = torch.addmm(self.out_b, readout, self.out_w)  # (R, V)
        gates = {"input": i, "forget": f, "output": o, "cell": c_new} if return_gates else None
        return StepOutput(logits, {"h": h_new, "c": c_new}, alpha.view(R, N), gates)


class FastPaths:
    """Lazily built, thread-safe holder of a Captioner's fast encoder and decoder (built on first use)."""

    def __init__(self, encoder: Encoder, decoder: nn.Module, precision: str, backend: str = "auto",
                 calibration: str | os.PathLike | None = None):
        self.precision, self.backend, self.calibration = precision, backend, calibration
        self._encoder, self._decoder = encoder, decoder
        self._lock = threading.Lock()
        self._built: tuple[FastEncoder, object] | None = None

    def get(self) -> tuple[FastEncoder, object]:
        if self._built is None:
            with self._lock:
                if self._built is None:
                    decoder = (FusedAttentionDecoder(self._decoder) if isinstance(self._decoder, AttentionDecoder)
                               else self._decoder)
                    encoder = FastEncoder(self._encoder, self.precision, backend=self.backend,
                                          calibration=self.calibration)
                    self._built = (encoder, decoder)
        return self._built
