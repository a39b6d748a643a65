"""Turn a Flickr8k training run's best checkpoint into the shipped model: fp16 weights plus the model card fields.

    .venv/bin/python scripts/ship_model.py runs/flickr8k/best.safetensors [captioner/weights/flickr8k.safetensors]
        [--length-penalty 0.7]

Training records what it knows (data format, image counts, epoch, dev scores, the resolved recipe); the app and the
API also show a human name, the data's citation and the licence, which only the person shipping can state.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from captioner.models.checkpoint import load_model, save_model

CARD = {
    "name": "captioner Flickr8k (EfficientNet-Lite0 + soft-attention LSTM)",
    "data": "Flickr8k (Hodosh, Young and Hockenmaier 2013): official train split (6,000 images x 5 captions); "
            "model selection on the official dev split (1,000 images)",
    "license": "weights: Apache-2.0 encoder (EfficientNet-Lite0); decoder trained on Flickr8k, research use",
}


def ship(best: Path, target: Path, length_penalty: float | None = None) -> None:
    """Write `best` to `target` with fp16 weights and the model card fields; `length_penalty` replaces the
    decoding default the run validated with (a choice made afterwards on dev, like the epoch)."""
    model = load_model(best)
    info = model.info
    metrics = info.get("metrics")
    if length_penalty is not None:
        if metrics:  # the selection scores were measured with the run's own default: say which
            metrics = {**metrics, "length_penalty": model.decode_cfg.length_penalty}
        model.decode_cfg = dataclasses.replace(model.decode_cfg, length_penalty=length_penalty)
    model.info = {"name": CARD["name"], "data": CARD["data"],
                  **{k: info[k] for k in ("train_images", "val_images", "epoch") if k in info},
                  **({"selection": {"metric": "CIDEr-D", **metrics}} if metrics else {}),
                  "recipe": info.get("recipe"), "license": CARD["license"]}
    save_model(model, target, half=True)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("best", type=Path, help="a training run's best.safetensors")
    parser.add_argument("target", type=Path, nargs="?",
                        default=Path(__file__).resolve().parents[1] / "captioner/weights/flickr8k.safetensors")
    parser.add_argument("--length-penalty", type=float, help="decoding default to ship instead of the run's")
    args = parser.parse_args(argv)
    ship(args.best, args.target, args.length_penalty)
    print(f"wrote {args.target} ({args.target.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
