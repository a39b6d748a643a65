"""How long PyTorch's idle OpenMP threads spin (`GOMP_SPINCOUNT`), against captioning speed, in one run.

    .venv/bin/python benchmarks/openmp_spin.py --images DIR [--checkpoint FILE] [--spin-counts unset,30000,0]
        [--rounds 4] [--latency-images 60] [--precision auto]

libgomp reads the variable when torch loads, so every setting runs in fresh child processes, one after another
in each round, so that load from other processes hits them alike. A child loads the model, warms it up, captions
`--latency-images` images one at a time through `Captioner.caption` (p50 and p90), then times the fast encoder
and the beam search on one batch of 64 images (ms an image, the faster of two passes) and `Captioner.caption` on
the same 64 files (images/s). "unset" leaves both `GOMP_SPINCOUNT` and `OMP_WAIT_POLICY` out of the child's
environment: libgomp's own default. The table gives medians over rounds with [min-max]; `captioner.runtime.openmp`
says why the setting matters and which value the `captioner` command uses.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BATCH = 64


def child(args: argparse.Namespace) -> None:
    """One setting's measurements, as a JSON line on stdout (the environment is the parent's choice)."""
    import time

    import torch

    sys.path.insert(0, str(ROOT))
    from captioner import Captioner
    from captioner.decoding import beam_search
    from captioner.images import open_image

    paths = sorted(str(p) for p in Path(args.images).glob("*.jpg"))
    if len(paths) < 5 + max(args.latency_images, BATCH):
        raise SystemExit(f"{args.images}: needs at least {5 + max(args.latency_images, BATCH)} .jpg files")
    cap = Captioner.load(args.checkpoint, precision=args.precision)
    cap.warmup()
    for p in paths[:5]:
        cap.caption([p])
    single = []
    for p in paths[5:5 + args.latency_images]:
        t0 = time.perf_counter()
        cap.caption([p])
        single.append(time.perf_counter() - t0)
    batch = paths[-BATCH:]
    prep = cap.encoder.preprocess
    pixels = torch.stack([prep.to_uint8(open_image(p, prep.size, None)) for p in batch])
    d, v = cap.decode_defaults, cap.vocab
    search = dict(start_id=v.start_id, end_id=v.end_id, beam_size=d.beam_size, max_length=d.max_length,
                  min_length=d.min_length, length_penalty=d.length_penalty, banned_ids=v.banned_ids,
                  no_repeat_ngram=d.no_repeat_ngram)
    encode, decode, e2e = [], [], []
    for _ in range(2):
        t0 = time.perf_counter()
        features = cap.encode(pixels)
        encode.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        beam_search(cap.step_decoder, features, **search)
        decode.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        cap.caption(batch)
        e2e.append(time.perf_counter() - t0)
    single.sort()
    print(json.dumps({"p50": 1e3 * statistics.median(single), "p90": 1e3 * single[int(0.9 * (len(single) - 1))],
                      "encoder": 1e3 * min(encode) / BATCH, "decoder": 1e3 * min(decode) / BATCH,
                      "images_per_s": BATCH / min(e2e)}))


def run_child(args: argparse.Namespace, spin: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    if spin != "unset":
        env["GOMP_SPINCOUNT"] = spin
    cmd = [sys.executable, __file__, "--child", "--images", args.images, "--precision", args.precision,
           "--latency-images", str(args.latency_images)]
    if args.checkpoint:
        cmd += ["--checkpoint", args.checkpoint]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"child with GOMP_SPINCOUNT={spin} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def spread(values: list[float], digits: int = 1) -> str:
    return f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}-{max(values):.{digits}f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", required=True, help="folder of .jpg files (at least 69)")
    parser.add_argument("--checkpoint", default=None, help="default: the shipped general model")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--spin-counts", default="unset,30000,0",
                        help="comma-separated GOMP_SPINCOUNT values; 'unset' is libgomp's default")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--latency-images", type=int, default=60)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    spins = [s.strip() for s in args.spin_counts.split(",") if s.strip()]
    for s in spins:
        if s != "unset" and not s.isdigit():
            parser.error(f"--spin-counts: {s!r} is neither 'unset' nor a count")
    if args.rounds < 1 or args.latency_images < 1:
        parser.error("--rounds and --latency-images must be >= 1")
    from batch_captioning import cpu_features, cpu_name  # this folder is on sys.path (torch loads, unused)

    results: dict[str, list[dict]] = {s: [] for s in spins}
    for r in range(args.rounds):
        for s in spins:
            results[s].append(run_child(args, s))
            print(f"round {r + 1}, GOMP_SPINCOUNT={s}: {json.dumps(results[s][-1])}", file=sys.stderr, flush=True)
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; {cpu_features()}; precision {args.precision}; "
          f"{args.rounds} rounds, median [min-max]")
    print()
    print("| GOMP_SPINCOUNT | one image p50, ms | one image p90, ms | batch of 64: encoder, ms an image | "
          "decoder, ms an image | caption(64 files), images/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for s, rows in results.items():
        col = {k: [row[k] for row in rows] for k in rows[0]}
        print(f"| {s} | {spread(col['p50'])} | {spread(col['p90'])} | {spread(col['encoder'], 2)} | "
              f"{spread(col['decoder'], 2)} | {spread(col['images_per_s'])} |")


if __name__ == "__main__":
    main()
