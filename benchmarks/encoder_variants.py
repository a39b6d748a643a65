"""Which encoder inference path is fastest on this CPU: every variant timed in the same run, interleaved.

    .venv/bin/python benchmarks/encoder_variants.py [--rounds 7] [--batch-sizes 1 8 32] [--image-size 288]
        [--compile] [--onnx]

The encoder is EfficientNet-Lite0 as the shipped model runs it: 288x288 inputs (`--image-size`), without its last
1x1 convolution (the decoder runs that). Variants: the reference module (fp32, NCHW), then with batch norm
folded, channels-last, bf16 weights, TorchScript trace + freeze (`FastEncoder`, which also makes the TF-style "same"
padding constant), bf16 autocast, and optionally torch.compile (inductor, freezing) and ONNX Runtime: exported as
`build_encoder` builds the model (padding worked out at run time) and as `FastEncoder` exports it (constant
padding), and int8 from the shipped model's calibration (at the shipped model's size only).
Each round times every variant once per batch size, so load from other
processes hits all variants alike; the table gives the median and best images/s over rounds, the set-up time
(trace, compile, session) and the largest feature difference from the reference.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from captioner.api import default_model_path
from captioner.models.conv_passes import fold_batchnorm
from captioner.models.encoder import build_encoder
from captioner.runtime.fast import FastEncoder
from captioner.runtime.int8 import CalibrationError, calibration_path

CL = torch.channels_last


def variants(args: argparse.Namespace) -> dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], float]]:
    """name -> (images (B, 3, S, S) fp32 -> features, set-up seconds)."""
    size = args.image_size
    encoder = build_encoder("efficientnet_lite0", image_size=size, headless=True)
    out: dict[str, tuple[Callable, float]] = {"reference fp32 NCHW": (encoder, 0.0)}

    def folded(dtype: torch.dtype) -> torch.nn.Module:
        trunk = copy.deepcopy(encoder.trunk)
        fold_batchnorm(trunk)
        return trunk.to(memory_format=CL, dtype=dtype)

    def grid(fmap: torch.Tensor) -> torch.Tensor:
        return fmap.flatten(2).transpose(1, 2).float()

    cl = copy.deepcopy(encoder.trunk).to(memory_format=CL)
    out["channels-last fp32"] = (lambda x: grid(cl(x.contiguous(memory_format=CL))), 0.0)
    f32 = folded(torch.float32)
    out["folded + channels-last fp32"] = (lambda x: grid(f32(x.contiguous(memory_format=CL))), 0.0)
    auto = folded(torch.float32)

    def autocast(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return grid(auto(x.contiguous(memory_format=CL)))

    out["folded + channels-last + bf16 autocast"] = (autocast, 0.0)
    b16 = folded(torch.bfloat16)
    out["folded + channels-last + bf16 weights"] = (
        lambda x: grid(b16(x.to(torch.bfloat16).contiguous(memory_format=CL))), 0.0)
    for precision in ("fp32", "bf16"):
        t = time.perf_counter()
        fast = FastEncoder(encoder, precision, backend="torchscript", chunk_size=10_000)
        out[f"+ TorchScript freeze ({precision}), whole batch"] = (fast, time.perf_counter() - t)
        t = time.perf_counter()
        fast8 = FastEncoder(encoder, precision, backend="torchscript", chunk_size=8)
        out[f"+ TorchScript freeze ({precision}), chunks of 8 = FastEncoder"] = (fast8, time.perf_counter() - t)
    if args.compile:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
        for dtype in (torch.float32, torch.bfloat16):
            module = torch.compile(folded(dtype), dynamic=False)

            def run(x: torch.Tensor, module=module, dtype=dtype) -> torch.Tensor:
                return grid(module(x.to(dtype).contiguous(memory_format=CL)))

            t = time.perf_counter()
            with torch.inference_mode():
                for b in args.batch_sizes:  # compile time for every batch shape counts
                    run(torch.zeros(b, 3, size, size))
            name = "bf16" if dtype == torch.bfloat16 else "fp32"
            out[f"folded + channels-last + torch.compile freezing ({name})"] = (run, time.perf_counter() - t)
    if args.onnx:
        import onnxruntime as ort

        path = Path(tempfile.mkdtemp()) / "encoder.onnx"
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(encoder, (torch.zeros(1, 3, size, size),), str(path), dynamo=False, input_names=["x"],
                              output_names=["y"], dynamic_axes={"x": {0: "b"}, "y": {0: "b"}}, opset_version=17)
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as FastEncoder sets it
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

        def runtime_padding(x: torch.Tensor) -> torch.Tensor:
            return torch.cat([torch.from_numpy(session.run(None, {"x": c.contiguous().numpy()})[0])
                              for c in x.split(8)])

        out["ONNX Runtime fp32, run-time padding, chunks of 8"] = (runtime_padding, time.perf_counter() - t)
        t = time.perf_counter()
        fast = FastEncoder(encoder, "fp32", backend="onnxruntime", chunk_size=8)
        out["ONNX Runtime fp32, constant padding, chunks of 8 = FastEncoder"] = (fast, time.perf_counter() - t)
        calibration = calibration_path(default_model_path())  # the shipped model's: 288x288, headless
        t = time.perf_counter()
        try:
            fast = FastEncoder(encoder, "int8", chunk_size=8, calibration=calibration)
            out["ONNX Runtime int8 (shipped calibration), chunks of 8"] = (fast, time.perf_counter() - t)
        except CalibrationError as exc:
            print(f"no int8 row: {exc}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--image-size", type=int, default=288, help="input side in pixels (the recipe's: 288)")
    parser.add_argument("--compile", action="store_true", help="also torch.compile (slow to build)")
    parser.add_argument("--onnx", action="store_true", help="also ONNX Runtime (pip install onnxruntime onnx)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    load_before = " ".join(f"{v:.2f}" for v in os.getloadavg())
    torch.manual_seed(0)
    found = variants(args)
    inputs = {b: torch.randn(b, 3, args.image_size, args.image_size) for b in args.batch_sizes}
    speeds: dict[tuple[str, int], list[float]] = {(n, b): [] for n in found for b in inputs}
    with torch.inference_mode():
        reference = found["reference fp32 NCHW"][0](inputs[max(inputs)])
        error = {n: (f(inputs[max(inputs)]) - reference).abs().max().item() for n, (f, _) in found.items()}
        for f, _ in found.values():  # warm-up: kernel creation, profiling runs
            for x in inputs.values():
                f(x), f(x)
        for _ in range(args.rounds):
            for name, (f, _) in found.items():
                for b, x in inputs.items():
                    t = time.perf_counter()
                    f(x)
                    speeds[(name, b)].append(b / (time.perf_counter() - t))
    print(f"torch {torch.__version__}, {args.image_size}x{args.image_size} inputs, {torch.get_num_threads()} threads, "
          "load average before/after: "
          f"{load_before} / {' '.join(f'{v:.2f}' for v in os.getloadavg())}, {args.rounds} rounds")
    head = " | ".join(f"B={b} img/s median (best)" for b in inputs)
    print(f"| variant | set-up s | max abs diff | {head} |")
    print("|---|---:|---:|" + "---:|" * len(inputs))
    for name, (_, setup) in found.items():
        cells = " | ".join(f"{statistics.median(speeds[(name, b)]):.0f} ({max(speeds[(name, b)]):.0f})"
                           for b in inputs)
        print(f"| {name} | {setup:.1f} | {error[name]:.3g} | {cells} |")

if __name__ == "__main__":
    main()
