"""Batch captioning on the CPU against the naive pipeline, in one run, on the same JPEG files and model.

    .venv/bin/python benchmarks/batch_captioning.py --images DIR [--num-images 200] [--checkpoint FILE]
        [--beam-size 3] [--batch-size 64] [--num-workers 1] [--repeats 3] [--latency-images 50]

naive   what tutorial repositories do: load one image, encode it alone with the fp32 reference encoder, beam-search
        it alone (the project's beam search with one image), next image.
batch   `Captioner.caption_iter` as shipped: decoding threads, batches, the fast paths of `captioner.runtime.fast`
        that precision "auto" picks on this CPU (printed with the CPU's features; fused decoder step, finished
        images leaving the batch). The ablation table also runs the batch pipeline on the reference modules, in
        fp32 with the ONNX Runtime and the TorchScript encoder, and on CPUs with native bf16 "bf16-decoder",
        "bf16-encoder" and "bf16" (with the auto backend, and with TorchScript where that is another), and "int8"
        (ONNX Runtime and OpenVINO where that is auto's) when the checkpoint has an int8 calibration file beside
        it, and counts captions identical to the naive pipeline's.
Pipelines are interleaved within each repeat, so load from other processes hits all of them alike; figures are
medians over repeats with [min-max]. Peak memory and cold start come from fresh subprocesses. Without
`--checkpoint` the decoder has random weights (default ModelConfig, 2,500-word vocabulary): it never ends a
caption early, so every caption runs to the maximum length (the slow case), and its captions are meaningless.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from captioner.runtime import openmp

openmp.limit_spinning()  # before torch loads, as the `captioner` command does (captioner.runtime.openmp)

import torch
from torch.utils.flop_counter import FlopCounterMode

from captioner import Captioner
from captioner.config import DecodeConfig, ModelConfig
from captioner.decoding import beam_search
from captioner.images import open_image
from captioner.models.checkpoint import new_model, save_model
from captioner.models.vocab import SPECIALS, Vocabulary
from captioner.runtime.choice import (
    cpu_flags,
    cpu_has_bf16,
    decoder_products,
    default_backend,
    encoder_precision,
    resolve_precision,
)
from captioner.runtime.fast import FastPaths
from captioner.runtime.fused_decoder import FusedAttentionDecoder
from captioner.runtime.int8 import calibration_path
from captioner.runtime.products import Product


def random_checkpoint(path: Path) -> None:
    torch.manual_seed(0)
    vocab = Vocabulary([*SPECIALS, *(f"word{i}" for i in range(2500 - len(SPECIALS)))])
    save_model(new_model(ModelConfig(), vocab, 1280, DecodeConfig()), path)


def naive(cap: Captioner, paths: list[Path], beam: int) -> tuple[list[str], list[float]]:
    """One image at a time through the reference modules; returns captions and per-image seconds."""
    enc, dec, vocab, d = cap.encoder, cap.decoder, cap.vocab, cap.decode_defaults
    texts, seconds = [], []
    with torch.no_grad():
        for path in paths:
            t = time.perf_counter()
            pixels = enc.preprocess(open_image(path, enc.preprocess.size)).unsqueeze(0)  # (1, 3, H, W)
            [hyps] = beam_search(dec, enc(pixels), start_id=vocab.start_id, end_id=vocab.end_id, beam_size=beam,
                                 max_length=d.max_length, min_length=d.min_length,
                                 length_penalty=d.length_penalty, banned_ids=vocab.banned_ids,
                                 no_repeat_ngram=d.no_repeat_ngram)
            texts.append(" ".join(vocab.decode(hyps[0].tokens)))
            seconds.append(time.perf_counter() - t)
    return texts, seconds


def batch(cap: Captioner, paths: list[Path], beam: int, args: argparse.Namespace) -> list[str]:
    return [c.text for c in cap.caption_iter(paths, beam_size=beam, batch_size=args.batch_size,
                                             num_workers=args.num_workers)]


def timed(fn, *a) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn(*a)
    return time.perf_counter() - t, out


def countable_decoder(decoder: torch.nn.Module) -> FusedAttentionDecoder:
    """The fp32 fused decoder of `decoder` with its products on `torch.mm` / `torch.addmm` instead of oneDNN's
    linear or FBGEMM's fp16-weight product: the same arithmetic, in ops that FlopCounterMode counts."""
    fused = FusedAttentionDecoder(decoder)
    for product in [*vars(fused).values(), *fused.project]:
        if isinstance(product, Product):
            product._linear = product._fp16 = None
    return fused


def matmul_gflops(dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    best = min(timed(torch.matmul, a, b)[0] for _ in range(reps))
    return 2 * n**3 / best / 1e9


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss it is not inherited across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args: argparse.Namespace) -> None:
    """Fresh process: cold start, then the whole pipeline with RSS checked halfway and at the end."""
    paths = [Path(p) for p in json.loads(Path(args.child_paths).read_text())]
    t0 = time.perf_counter()
    cap = Captioner.load(args.checkpoint, precision="reference" if args.child == "naive" else args.child)
    load_s = time.perf_counter() - t0
    t = time.perf_counter()
    if args.child == "naive":
        naive(cap, paths[:1], args.beam_size)
    else:
        cap.caption(paths[:1], beam_size=args.beam_size)
    first_s = time.perf_counter() - t
    rss = []
    half = len(paths) // 2
    for part in (paths[:half], paths[half:]):
        if args.child == "naive":
            naive(cap, part, args.beam_size)
        else:
            batch(cap, part, args.beam_size, args)
        rss.append(peak_rss_mb())
    print(json.dumps({"load_s": load_s, "first_s": first_s, "peak_mb": rss}))


def run_child(kind: str, args: argparse.Namespace, paths_file: str) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--child-paths", paths_file, "--checkpoint", args.checkpoint,
           "--beam-size", str(args.beam_size), "--batch-size", str(args.batch_size),
           "--num-workers", str(args.num_workers), "--threads", str(torch.get_num_threads())]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


class OtherLoad:
    """Share of the machine's CPU time used by other processes while this benchmark ran (from /proc/stat)."""

    def __init__(self):
        self.start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        busy = (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
        t = os.times()
        return time.monotonic(), busy, t.user + t.system + t.children_user + t.children_system

    def share(self) -> float:
        (w0, b0, s0), (w1, b1, s1) = self.start, self._sample()
        return max(0.0, (b1 - b0) - (s1 - s0)) / ((w1 - w0) * os.cpu_count())


def cpu_name() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                platform.machine())
    return name


FEATURES = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
"""The CPU features that decide the fast paths (`captioner.runtime.choice.auto_precision`)."""


def cpu_features() -> str:
    flags = cpu_flags()
    return ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in FEATURES)


def decode_seconds(cap: Captioner, paths: list[Path]) -> float:
    """Seconds per image to open, decode and resize a JPEG (one thread), as the batch pipeline does."""
    prep = cap.encoder.preprocess
    t = time.perf_counter()
    for path in paths:
        prep.to_uint8(open_image(path, prep.size))
    return (time.perf_counter() - t) / len(paths)


def spread(values: list[float], fmt: str = "{:.1f}") -> str:
    return f"{fmt.format(statistics.median(values))} [{fmt.format(min(values))}-{fmt.format(max(values))}]"


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", required=False, help="folder of JPEG files (the first N, sorted, are used)")
    parser.add_argument("--num-images", type=int, default=200)
    parser.add_argument("--checkpoint", help="captioner .safetensors (default: a random decoder, see above)")
    parser.add_argument("--beam-size", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latency-images", type=int, default=50)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-paths", help=argparse.SUPPRESS)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        child(args)
        return
    if not args.images:
        parser.error("--images DIR is required")
    with tempfile.TemporaryDirectory(prefix="captioner-bench-") as tmp:
        run(args, parser, Path(tmp))


def run(args: argparse.Namespace, parser: argparse.ArgumentParser, tmp: Path) -> None:
    note = f"checkpoint {args.checkpoint}"
    if not args.checkpoint:
        args.checkpoint = str(tmp / "random.safetensors")
        random_checkpoint(Path(args.checkpoint))
        note = ("NOTE: no --checkpoint: RANDOM decoder weights (default ModelConfig, 2,500-word vocabulary); "
                "captions are meaningless and always run the full max_length steps")
    paths = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
    paths = paths[: args.num_images]
    if not paths:
        parser.error(f"no JPEG files in {args.images}")
    paths_file = str(tmp / "paths.json")
    Path(paths_file).write_text(json.dumps([str(p) for p in paths]))
    load_start = os.getloadavg()
    other = OtherLoad()
    beam = args.beam_size

    # Without native bf16 (AVX512-BF16 or AMX) bf16 is emulated, over ten times slower than fp32: not worth a row.
    native_bf16 = cpu_has_bf16()
    auto = resolve_precision("auto")
    precisions = ["reference", "fp32"] + (["bf16-decoder", "bf16-encoder", "bf16"] if native_bf16 else [])
    if calibration_path(args.checkpoint).is_file():  # the int8 encoder needs the checkpoint's calibration
        precisions.append("int8")
    caps = {p: Captioner.load(args.checkpoint, precision=p) for p in precisions}
    alternatives = {"fp32-torchscript": "fp32"}  # the TorchScript encoder, where "auto" picks another backend
    if native_bf16 and default_backend("bf16") != "torchscript":
        alternatives["bf16-torchscript"] = "bf16"
    if "int8" in caps and default_backend("int8") != "onnxruntime":
        alternatives["int8-onnxruntime"] = "int8"
    for key, precision in alternatives.items():
        cap = caps[key] = Captioner.load(args.checkpoint, precision=precision)
        cap._fast = FastPaths(cap.encoder, cap.decoder, precision, backend=key.split("-")[1],
                              calibration=cap._fast.calibration)
    fast = caps[auto]
    for cap in caps.values():
        cap.warmup(args.batch_size)
        cap.warmup(1)
    naive(caps["reference"], paths[:3], beam)

    e2e: dict[str, list[float]] = {k: [] for k in ("naive", *caps)}
    texts: dict[str, list[str]] = {}
    parts: dict[str, list[float]] = {k: [] for k in ("enc_naive", "enc_fast", "dec_naive", "dec_fast")}
    pixels = torch.stack([fast.preprocess(p) for p in paths])  # (I, 3, H, W) floats, for the naive encoder
    prep = fast.encoder.preprocess
    raw = torch.stack([prep.to_uint8(open_image(p, prep.size)) for p in paths])  # uint8, as the pipeline has
    d = fast.decode_defaults
    search = {"start_id": fast.vocab.start_id, "end_id": fast.vocab.end_id, "beam_size": beam,
              "max_length": d.max_length, "min_length": d.min_length, "length_penalty": d.length_penalty,
              "banned_ids": fast.vocab.banned_ids, "no_repeat_ngram": d.no_repeat_ngram}
    ref = caps["reference"]
    features = fast.encode(raw)
    naive_seconds: list[float] = []
    for _ in range(args.repeats):
        s, (texts["naive"], sec) = timed(naive, caps["reference"], paths, beam)
        naive_seconds += sec
        e2e["naive"].append(len(paths) / s)
        for p, cap in caps.items():
            s, texts[p] = timed(batch, cap, paths, beam, args)
            e2e[p].append(len(paths) / s)
        with torch.no_grad():
            s, _ = timed(lambda: [ref.encoder(x.unsqueeze(0)) for x in pixels])
            parts["enc_naive"].append(len(paths) / s)
            s, _ = timed(lambda: [fast.encode(x) for x in raw.split(args.batch_size)])
            parts["enc_fast"].append(len(paths) / s)
            s, _ = timed(lambda: [beam_search(ref.decoder, f.unsqueeze(0), **search) for f in features])
            parts["dec_naive"].append(len(paths) / s)
            s, _ = timed(lambda: [beam_search(fast.step_decoder, f, **search) for f in features.split(args.batch_size)])
            parts["dec_fast"].append(len(paths) / s)

    latency = []
    for path in paths[: args.latency_images]:
        s, _ = timed(fast.caption, [path])
        latency.append(s * 1e3)
    naive_ms = [s * 1e3 for s in naive_seconds]
    mem = {k: run_child(k, args, paths_file) for k in ("naive", "auto")}
    flops = FlopCounterMode(display=False)
    with flops, torch.no_grad():
        caps["reference"].encoder(pixels[:1])
    gflop = flops.get_total_flops() / 1e9
    peak = {torch.float32: matmul_gflops(torch.float32)}
    if native_bf16:
        peak[torch.bfloat16] = matmul_gflops(torch.bfloat16)
    dec_flops = FlopCounterMode(display=False)
    with dec_flops, torch.no_grad():
        # The fp32 fused decoder, auto's products, with every product on torch.mm / addmm, which
        # FlopCounterMode counts (it sees neither oneDNN's linear nor FBGEMM's product, which the fast paths run)
        beam_search(countable_decoder(caps["reference"].decoder), features[: args.batch_size], **search)
    dec_gflop = dec_flops.get_total_flops() / 1e9 / min(args.batch_size, len(features))
    jpeg_s = statistics.median(decode_seconds(fast, paths) for _ in range(args.repeats))
    load_end = os.getloadavg()
    other_share = other.share()

    same = {p: sum(a == b for a, b in zip(texts[p], texts["naive"])) / len(paths) for p in texts}
    ratio = statistics.median(e2e[auto]) / statistics.median(e2e["naive"])
    enc_naive_gf, enc_fast_gf = (gflop * statistics.median(parts["enc_naive"]),
                                 gflop * statistics.median(parts["enc_fast"]))
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; load average (1/5/15 min) at start "
          f"{' '.join(f'{v:.2f}' for v in load_start)}, at end {' '.join(f'{v:.2f}' for v in load_end)}; "
          f"other processes used {other_share:.0%} of the CPU time during the run; "
          f"{openmp.VARIABLE}={os.environ.get(openmp.VARIABLE, 'unset')}")
    print(f"{len(paths)} JPEGs from {args.images}; beam {beam}; batch {args.batch_size}; {args.num_workers} "
          f"decoding worker(s); {args.repeats} repeats, median [min-max]")
    print(note)
    print(f"CPU features: {cpu_features()}; precision \"auto\" runs {auto!r} here: {describe(fast)}")
    print()
    print(f"| measurement | naive (one image at a time) | batch pipeline (auto = {auto}) | ratio |")
    print("|---|---:|---:|---:|")
    print(f"| end to end, images/s | {spread(e2e['naive'])} | {spread(e2e[auto])} | {ratio:.1f}x |")
    for name, a, b in (("encoder alone", "enc_naive", "enc_fast"), ("decoder alone (beam search)", "dec_naive",
                                                                       "dec_fast")):
        r = statistics.median(parts[b]) / statistics.median(parts[a])
        print(f"| {name}, images/s | {spread(parts[a])} | {spread(parts[b])} | {r:.1f}x |")
    print(f"| single-image latency p50 / p90, ms | {pct(naive_ms, .5):.1f} / {pct(naive_ms, .9):.1f} | "
          f"{pct(latency, .5):.1f} / {pct(latency, .9):.1f} | |")
    print(f"| cold start: load + first caption, s | {mem['naive']['load_s'] + mem['naive']['first_s']:.2f} | "
          f"{mem['auto']['load_s'] + mem['auto']['first_s']:.2f} | |")
    print(f"| peak RSS after half / all images, MB | {mem['naive']['peak_mb'][0]:.0f} / "
          f"{mem['naive']['peak_mb'][1]:.0f} | {mem['auto']['peak_mb'][0]:.0f} / {mem['auto']['peak_mb'][1]:.0f} | |")
    dtype = torch.bfloat16 if encoder_precision(auto) == "bf16" else torch.float32  # auto's encoder arithmetic
    kind = "bf16" if dtype == torch.bfloat16 else "fp32"
    print(f"| encoder GFLOP/s ({gflop:.2f} GFLOP per image) | "
          f"{enc_naive_gf:.0f} = {enc_naive_gf / peak[torch.float32]:.0%}"
          f" of fp32 matmul | {enc_fast_gf:.0f} = {enc_fast_gf / peak[dtype]:.0%} of {kind} matmul | |")
    print(f"| captions identical to naive | 100% | {same[auto]:.0%} | |")
    print()
    bf16_peak = (f"bf16 {peak[torch.bfloat16]:.0f} GFLOP/s" if torch.bfloat16 in peak
                 else "bf16 not measured (no native bf16 on this CPU)")
    print(f"Machine matrix multiply (2048^3, {torch.get_num_threads()} threads): fp32 {peak[torch.float32]:.0f} "
          f"GFLOP/s, {bf16_peak}")
    print()
    # Where the batch pipeline's time goes, per image: JPEG work runs in the decoding worker(s), overlapped with
    # the network, but it takes the same cores.
    stage = {"JPEG decode + resize": jpeg_s, "encoder": 1 / statistics.median(parts["enc_fast"]),
             "decoder (beam search)": 1 / statistics.median(parts["dec_fast"])}
    total = sum(stage.values())
    print(f"| stage (batch pipeline, {auto}) | ms per image | share |")
    print("|---|---:|---:|")
    for name, sec in stage.items():
        print(f"| {name} | {sec * 1e3:.2f} | {sec / total:.0%} |")
    # Each half at the matmul peak of its own arithmetic: auto's encoder and its decoder products
    dec_dtype = torch.bfloat16 if decoder_products(auto) == "bf16" and torch.bfloat16 in peak else torch.float32
    dec_kind = "bf16" if dec_dtype == torch.bfloat16 else "fp32"
    limit = 1 / (gflop / peak[dtype] + dec_gflop / peak[dec_dtype])
    print(f"| sum (if nothing overlapped) | {total * 1e3:.2f} | = {1 / total:.0f} images/s |")
    print()
    print(f"Arithmetic limit: encoder {gflop:.2f} GFLOP per image at the {kind} matmul peak of {peak[dtype]:.0f} "
          f"GFLOP/s + decoder {dec_gflop:.3f} GFLOP per image (beam {beam}) at the {dec_kind} peak of "
          f"{peak[dec_dtype]:.0f} GFLOP/s = {limit:.0f} images/s for the network alone, "
          f"{1 / (1 / limit + jpeg_s / torch.get_num_threads()):.0f} images/s with the JPEG work on the same "
          f"{torch.get_num_threads()} threads; depthwise convolutions and the step-by-step decoder run well below "
          "matmul peak, so the reachable limit is lower")
    threads = torch.get_num_threads()
    overlapped = (jpeg_s + threads * (stage["encoder"] + stage["decoder (beam search)"])) / threads
    print(f"Measured-stage limit: the JPEG work (one thread) packed perfectly beside the network on {threads} "
          f"threads gives {1 / overlapped:.0f} images/s = {1 / overlapped / statistics.median(e2e['naive']):.1f}x "
          "naive")
    print()
    print("| pipeline | images/s | ratio to naive | captions identical to naive |")
    print("|---|---:|---:|---:|")
    rows = ["naive", "reference", "fp32-torchscript", "fp32", "bf16-decoder", "bf16-encoder", "bf16-torchscript",
            "bf16", "int8-onnxruntime", "int8"]
    for key in rows:
        if key in e2e:
            label = "naive: one image at a time, reference fp32 modules" if key == "naive" else describe(caps[key])
            tag = " (default, auto)" if key == auto else ""
            r = statistics.median(e2e[key]) / statistics.median(e2e["naive"])
            print(f"| {label}{tag} | {spread(e2e[key])} | {r:.1f}x | {same[key]:.0%} |")


def describe(cap: Captioner) -> str:
    """What a batch pipeline runs: its decoder's products and its encoder's backend and arithmetic."""
    if cap._fast is None:
        return "batch, reference fp32 modules"
    encoder, decoder = cap._fast.get()
    return (f"batch, fused decoder with {decoder.products} products + {encoder.backend} {encoder.precision} "
            f"encoder ({cap.precision})")


if __name__ == "__main__":
    main()
