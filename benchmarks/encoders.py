"""How much each registered EfficientNet-Lite encoder costs on this CPU: size, grid, compute, parameters, speed.

    .venv/bin/python benchmarks/encoders.py [--encoders efficientnet_lite0 efficientnet_lite1 efficientnet_lite2]
        [--image-size 0] [--headless] [--batch 32] [--threads 1 2] [--rounds 3]

Each encoder runs at the size its weights were trained at (`--image-size 0`: 224, 240, 260) through the path the
API takes (`FastEncoder`, fp32: ONNX Runtime when installed, else TorchScript), built in memory (no disk cache
written). GMACs are counted from the convolutions' and linear layers' shapes in one forward pass of the
trunk (the classifier, never run, is left out); GFLOPs are twice that. Parameters are the trunk's, without the
classifier. images/s is the median over `--rounds` batches of `--batch` random images, after one warm-up batch,
with ONNX Runtime's (or torch's) intra-op threads set to each `--threads` value in turn. The largest difference
from the reference module (`Encoder.forward`) on four of the images is printed too, as a check of the fast path.
Load from other processes shows in the load averages printed before and after: figures under load are noisy.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from captioner.models.encoder import Encoder, build_encoder
from captioner.runtime.fast import FastEncoder


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


def count_macs(trunk: nn.Module, size: int) -> int:
    """Multiply-accumulates of one (1, 3, size, size) image through `trunk`: each convolution does
    (output elements) x (input channels per group) x (kernel area), each linear layer in x out per row."""
    macs = 0

    def hook(module: nn.Module, _: tuple, out: torch.Tensor) -> None:
        nonlocal macs
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            macs += out.numel() * (module.in_channels // module.groups) * kh * kw
        else:  # nn.Linear
            macs += out.numel() * module.in_features

    hooks = [m.register_forward_hook(hook) for m in trunk.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.inference_mode():
            trunk(torch.zeros(1, 3, size, size))
    finally:
        for h in hooks:
            h.remove()
    return macs


def trunk_params(encoder: Encoder) -> int:
    """Parameters the encoder runs: its trunk's without the ImageNet classifier, plus a cut-off head's."""
    model = encoder.trunk.model
    total = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in model.classifier.parameters())
    if encoder.head is not None:
        total += sum(p.numel() for p in encoder.head.parameters())
    return total


def images_per_second(fast: FastEncoder, images: torch.Tensor, rounds: int) -> float:
    """Median images/s of `fast` over `rounds` calls on `images`, after one warm-up call."""
    fast(images)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fast(images)
        times.append(time.perf_counter() - start)
    return len(images) / statistics.median(times)


def measure(name: str, args: argparse.Namespace) -> dict[str, object]:
    """One table row: the encoder built as the API builds it, and its fast path at each thread count."""
    encoder = build_encoder(name, image_size=args.image_size, headless=args.headless)
    size = encoder.preprocess.size
    images = torch.randn(args.batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    row: dict[str, object] = {"encoder": name, "size": size, "grid": encoder.grid_size,
                              "dim": encoder.feature_dim, "gmacs": count_macs(encoder.trunk, size) / 1e9,
                              "params": trunk_params(encoder) / 1e6}
    for threads in args.threads:
        torch.set_num_threads(threads)  # ONNX Runtime's session takes torch's thread count when it is built
        fast = FastEncoder(encoder, "fp32", disk_cache=False)
        row["backend"] = fast.backend
        row[f"ips{threads}"] = images_per_second(fast, images, args.rounds)
        if threads == args.threads[0]:
            with torch.inference_mode():
                row["diff"] = (fast(images[:4]) - encoder(images[:4])).abs().max().item()
    return row


def print_table(rows: list[dict[str, object]], threads: list[int], batch: int) -> None:
    speed = [f"img/s {t} thr" for t in threads]
    header = ["encoder", "size", "grid", "D", "GMACs", "GFLOPs", "params M", *speed, "backend", "max diff vs ref"]
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for r in rows:
        cells = [r["encoder"], r["size"], f"{r['grid']}x{r['grid']}", r["dim"], f"{r['gmacs']:.3f}",
                 f"{2 * r['gmacs']:.3f}", f"{r['params']:.2f}", *(f"{r[f'ips{t}']:.1f}" for t in threads),
                 r["backend"], f"{r['diff']:.1e}"]
        print(" | ".join(map(str, cells)))
    print(f"(batch {batch}; GMACs per image; GFLOPs = 2 x GMACs)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoders", nargs="+",
                        default=["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
    parser.add_argument("--image-size", type=int, default=0, help="0: each encoder's native size")
    parser.add_argument("--headless", action="store_true", help="stop before the 1x1 head (model.encoder_head)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"CPU: {cpu_name()} ({os.cpu_count()} logical CPUs); torch {torch.__version__}")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    rows = [measure(name, args) for name in args.encoders]
    print_table(rows, args.threads, args.batch)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
