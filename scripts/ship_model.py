"""Turn a Flickr8k training run's best checkpoint into the shipped model: fp16 weights plus the model card fields.

    .venv/bin/python scripts/ship_model.py runs/flickr8k/best.safetensors [captioner/weights/flickr8k.safetensors]

Training records what it knows (data format, image counts, epoch, dev scores, the resolved recipe); the app and the
API also show a human name, the data's citation and the licence, which only the person shipping can state.
"""

from __future__ import annotations

import sys
from pathlib import Path

from captioner.checkpoint import load_model, save_model

CARD = {
    "name": "captioner Flickr8k (EfficientNet-Lite0 + soft-attention LSTM)",
    "data": "Flickr8k (Hodosh, Young and Hockenmaier 2013): official train split (6,000 images x 5 captions); "
            "model selection on the official dev split (1,000 images)",
    "license": "weights: Apache-2.0 encoder (EfficientNet-Lite0); decoder trained on Flickr8k, research use",
}


def ship(best: Path, target: Path) -> None:
    """Write `best` to `target` with fp16 weights and the model card fields."""
    model = load_model(best)
    info = model.info
    metrics = info.get("metrics")
    model.info = {"name": CARD["name"], "data": CARD["data"],
                  **{k: info[k] for k in ("train_images", "val_images", "epoch") if k in info},
                  **({"selection": {"metric": "CIDEr-D", **metrics}} if metrics else {}),
                  "recipe": info.get("recipe"), "license": CARD["license"]}
    save_model(model, target, half=True)


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 2):
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    target = Path(argv[1]) if len(argv) == 2 else Path(__file__).resolve().parents[1] / "captioner/weights/flickr8k.safetensors"
    ship(Path(argv[0]), target)
    print(f"wrote {target} ({target.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
