"""Cold start: how long one image takes from a fresh process, by phase, with and without the disk cache.

Each run is a new Python process (nothing warm but the OS file cache):
- phases: `import torch`, `import captioner`, `Captioner.load()`, the first caption, and a second caption of the
  same image for comparison. With `--precision auto` one image runs on the reference modules (a job that small
  finishes sooner than the fast paths take to build: `captioner.runtime.fast.SMALL_JOB`), so the cache is not
  used; an explicit precision (`--precision bf16`, `fp32`) builds the fast paths at the first caption, or reads
  them from the cache;
- wall: the whole `python -m captioner caption IMAGE` command, as a user runs it.

"without cache" gives every run a fresh, empty cache folder (`CAPTIONER_CACHE_DIR`), so the ONNX export happens
in it; "with cache" shares one folder that a first, untimed run filled. Prints the median and the range of
`--repeats` runs.

    python benchmarks/cold_start.py --image path/to/one.jpg [--repeats 5] [--precision auto]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PHASES = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
from captioner import Captioner
t2 = time.perf_counter()
c = Captioner.load(precision=sys.argv[2])
t3 = time.perf_counter()
c.caption(sys.argv[1])
t4 = time.perf_counter()
c.caption(sys.argv[1])
t5 = time.perf_counter()
print(json.dumps({"import torch": t1 - t0, "import captioner": t2 - t1, "Captioner.load()": t3 - t2,
                  "first caption": t4 - t3, "second caption": t5 - t4}))
"""


def phases(image: str, precision: str, env: dict) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", PHASES, image, precision], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def wall(image: str, precision: str, env: dict) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "captioner", "caption", image, "--precision", precision], env=env,
                   check=True, capture_output=True)
    return time.perf_counter() - start


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):6.2f} s ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", required=True, help="one image file")
    parser.add_argument("--repeats", type=int, default=3, help="runs per setting (default 3)")
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args()
    if not Path(args.image).is_file():
        parser.error(f"{args.image}: no such file")
    print(f"CPU load before: {os.getloadavg()[0]:.2f} (1-minute average), {os.cpu_count()} CPUs, "
          f"{args.repeats} runs per setting, precision {args.precision}")
    rows: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="captioner-cold-") as tmp:
        shared = dict(os.environ, CAPTIONER_CACHE_DIR=str(Path(tmp) / "shared"))
        wall(args.image, args.precision, shared)  # fills the shared cache, untimed
        for label in ("without cache", "with cache"):
            table = rows.setdefault(label, {})
            for i in range(args.repeats):
                env = shared if label == "with cache" else dict(
                    os.environ, CAPTIONER_CACHE_DIR=str(Path(tmp) / f"fresh-{i}"))
                for name, seconds in phases(args.image, args.precision, env).items():
                    table.setdefault(name, []).append(seconds)
                if label == "without cache":
                    env["CAPTIONER_CACHE_DIR"] = str(Path(tmp) / f"fresh-wall-{i}")
                table.setdefault("wall: captioner caption IMAGE", []).append(wall(args.image, args.precision, env))
    names = list(next(iter(rows.values())))
    print(f"\n| phase | {' | '.join(rows)} |\n|---|{'---|' * len(rows)}")
    for name in names:
        print(f"| {name} | {' | '.join(summary(rows[label][name]) for label in rows)} |")
    print(f"\nCPU load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
