"""Compare two `captioner evaluate` runs on the same images: CIDEr-D difference with a paired bootstrap interval.

    .venv/bin/python scripts/compare_captions.py A/captions.jsonl B/captions.jsonl [--resamples 10000] [--seed 0]

A and B are the `captions.jsonl` files that `captioner evaluate --output DIR` writes (for example `--precision
fp32` and `--precision bf16`). Images are matched by path; an image that failed in either run is left out and
counted. Prints one table row: images, CIDEr-D of A and of B, B - A with its 95% interval, captions changed.
Exit status 2 when a file cannot be read or the two runs share no images.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from captioner.evaluation.compare import compare  # noqa: E402


def read_run(path: Path) -> tuple[dict[str, str], dict[str, list[str]], set[str]]:
    """({image: caption}, {image: references}, the images that failed) of one captions.jsonl."""
    captions: dict[str, str] = {}
    references: dict[str, list[str]] = {}
    failed: set[str] = set()
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                key, error = row["path"], row.get("error")
                if not isinstance(key, str):
                    raise TypeError("its path is not a string")
                if error is not None:
                    failed.add(key)
                    continue
                caption, refs = row["caption"], row["references"]
                if not isinstance(caption, str):
                    raise TypeError("its caption is not a string")
                if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
                    raise TypeError("its references are not a non-empty list of strings")
                captions[key], references[key] = caption, refs
            except (json.JSONDecodeError, RecursionError, KeyError, TypeError) as exc:
                # RecursionError: JSON nested too deep for the parser
                raise ValueError(f"{path}: line {number} is not a caption record ({exc})") from exc
    return captions, references, failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("a", type=Path, help="captions.jsonl of the baseline run")
    parser.add_argument("b", type=Path, help="captions.jsonl of the run compared with it")
    parser.add_argument("--resamples", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        (a, refs, failed_a), (b, _, failed_b) = read_run(args.a), read_run(args.b)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    shared = sorted(set(a) & set(b))
    if not shared:
        print(f"error: {args.a} and {args.b} share no captioned images", file=sys.stderr)
        return 2
    left_out = len(set(a) | set(b) | failed_a | failed_b) - len(shared)
    try:
        result = compare({k: a[k] for k in shared}, {k: b[k] for k in shared}, refs,
                         resamples=args.resamples, seed=args.seed)
    except ValueError as exc:  # an option out of range
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("| images | CIDEr-D A | CIDEr-D B | B - A [95% interval] | captions changed |")
    print("|---:|---:|---:|---|---:|")
    print(f"| {result.images} | {result.score_a:.4f} | {result.score_b:.4f} | {result.difference:+.4f} "
          f"[{result.low:+.4f}, {result.high:+.4f}] | {result.changed} |")
    if left_out:
        print(f"{left_out} images left out (failed in a run, or in one run only)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
