"""Turn a training run's best checkpoint into a shipped model: fp16 weights plus the model card fields.

    .venv/bin/python scripts/ship_model.py runs/general/best.safetensors --name general [--length-penalty 0.7]
    .venv/bin/python scripts/ship_model.py runs/flickr8k/best.safetensors --name flickr8k

The file goes to captioner/weights/<name>.safetensors (`captioner.models.shipped.SHIPPED`), unless a target is given.

Training records what it knows (data format, image counts, epoch, dev scores, the resolved recipe); the app and the
API also show a human name, the data's citation and the licence, which only the person shipping can state.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from captioner.models.checkpoint import load_model, save_model

CARDS = {
    "flickr8k": {
        "name": "captioner Flickr8k (EfficientNet-Lite0 + soft-attention LSTM)",
        "data": "Flickr8k (Hodosh, Young and Hockenmaier 2013): official train split (6,000 images x 5 captions); "
                "model selection on the official dev split (1,000 images)",
        "license": "weights: Apache-2.0 encoder (EfficientNet-Lite0); decoder trained on Flickr8k, research use",
    },
    "general": {
        "name": "captioner general (Flickr8k + COCO; EfficientNet-Lite + soft-attention LSTM)",
        "data": "Flickr8k (Hodosh, Young and Hockenmaier 2013) train split, 6,000 images x 5 captions, and "
                "coco_small, 1,328 COCO images (Lin et al. 2014; captions: Chen et al. 2015) with 2,616 captions; "
                "model selection on both dev splits (1,000 and 150 images), by the mean of their CIDEr-D",
        "license": "weights: Apache-2.0 encoder (EfficientNet-Lite); decoder trained on Flickr8k and COCO "
                   "captions (CC BY 4.0), research use",
    },
}


def ship(best: Path, target: Path, length_penalty: float | None = None, card: dict | None = None,
         dev_scores: dict[str, dict] | None = None) -> None:
    """Write `best` to `target` with fp16 weights and the model card fields; `length_penalty` replaces the
    decoding default the run validated with (a choice made afterwards on dev, like the epoch)."""
    model = load_model(best)
    info = model.info
    metrics = info.get("metrics")
    if length_penalty is not None:
        if metrics:  # the selection scores were measured with the run's own default: say which
            metrics = {**metrics, "length_penalty": model.decode_cfg.length_penalty}
        model.decode_cfg = dataclasses.replace(model.decode_cfg, length_penalty=length_penalty)
    card = card or CARDS["flickr8k"]
    model.info = {"name": card["name"], "data": card["data"],
                  **{k: info[k] for k in ("train_images", "val_images", "epoch") if k in info},
                  **({"selection": {"metric": "CIDEr-D", **metrics}} if metrics else {}),
                  **({"dev_scores": dev_scores} if dev_scores else {}),
                  "recipe": info.get("recipe"), "license": card["license"]}
    save_model(model, target, half=True)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("best", type=Path, help="a training run's best.safetensors")
    parser.add_argument("target", type=Path, nargs="?", help="default: captioner/weights/<name>.safetensors")
    parser.add_argument("--name", choices=sorted(CARDS), default="flickr8k", help="which shipped model this is")
    parser.add_argument("--length-penalty", type=float, help="decoding default to ship instead of the run's")
    parser.add_argument("--dev-scores", action="append", default=[], metavar="DATASET=SCORES_JSON",
                        help="`captioner evaluate --output` scores.json of the shipped weights on a dev split, "
                             "listed by `captioner models` (repeatable, one per dataset)")
    args = parser.parse_args(argv)
    dev_scores = {}
    for item in args.dev_scores:
        label, _, file = item.partition("=")
        report = json.loads(Path(file).read_text())
        dev_scores[label] = {"split": report["split"], "beam_size": report["beam_size"], **report["scores"],
                             **({"diversity": report["diversity"]} if "diversity" in report else {})}
    target = args.target or Path(__file__).resolve().parents[1] / "captioner" / "weights" / f"{args.name}.safetensors"
    ship(args.best, target, args.length_penalty, CARDS[args.name], dev_scores)
    args.target = target
    print(f"wrote {args.target} ({args.target.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
