"""`captioner models`: the shipped models, with their data, size and dev scores (read from their headers)."""

from __future__ import annotations

import argparse
import json
import sys

from captioner.escapes import shown


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `models` and its options."""
    p = sub.add_parser("models", help="list the shipped models (name, data, size, dev scores)",
                       description="List the models shipped with captioner. Pass a name to --checkpoint (or "
                                   "to Captioner.load) to use one; the default is marked *.")
    p.add_argument("--json", action="store_true", help="one JSON object per model instead of a table")
    p.set_defaults(func=run, light=True)  # reads file headers only: main() imports no torch for it


def _scores_text(scores: dict[str, dict[str, float]]) -> str:
    parts = []
    for label, s in scores.items():
        cider, bleu = s.get("CIDEr"), s.get("Bleu_4")
        if cider is not None:
            beam = s.get("beam_size")
            parts.append(f"{label} CIDEr-D {cider:.3f}" + (f" BLEU-4 {bleu:.3f}" if bleu is not None else "")
                         + (f" (beam {beam:g})" if isinstance(beam, (int, float)) else ""))
    return "; ".join(parts)


def run(args: argparse.Namespace) -> int:
    """Print the shipped models; exit 1 when none is installed."""
    from captioner.models.shipped import list_models

    try:
        models = list_models()
    except ValueError as exc:  # a damaged header (UnknownModelError is one too, never raised here)
        print(f"captioner: error: {shown(exc)}", file=sys.stderr)
        return 2
    if args.json:
        for m in models:
            print(json.dumps({"name": m.name, "default": m.default, "path": str(m.path), "size_mb": round(m.size_mb, 1),
                              "encoder": m.encoder, "data": m.data, "dev_scores": m.scores}, allow_nan=False))
        return 0 if models else 1
    if not models:
        print("no shipped models are installed (a source checkout without captioner/weights?)")
        return 1
    rows = [(("* " if m.default else "  ") + m.name, m.encoder, f"{m.size_mb:.1f} MB", _scores_text(m.scores))
            for m in models]
    widths = [max(len(r[i]) for r in rows + [("  name", "encoder", "size", "")]) for i in range(3)]
    print(f"{'  name':<{widths[0]}}  {'encoder':<{widths[1]}}  {'size':<{widths[2]}}  dev scores")
    for r in rows:
        print(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}")
    for m in models:
        print(f"  {m.name}: {m.data}")
    return 0
