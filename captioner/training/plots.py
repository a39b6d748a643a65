"""Training curves as a PNG (matplotlib's non-interactive Agg backend; no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_history(history: list[dict[str, Any]], path: str | Path) -> None:
    """Loss and validation scores per epoch, side by side."""
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    xe = [row for row in history if row.get("loss") is not None]
    left.plot([row["epoch"] for row in xe], [row["loss"] for row in xe], marker="o", label="cross-entropy loss")
    scst = [row for row in history if row.get("reward") is not None]
    if scst:
        left.plot([row["epoch"] for row in scst], [row["reward"] for row in scst], marker="s",
                  label="self-critical reward (CIDEr-D)")
    left.set(title="training", xlabel="epoch")
    left.legend()
    # One dataset: CIDEr, Bleu_4, ...; several: "<dataset>/CIDEr", ... for each, and the selection score.
    keys = [k for k in dict.fromkeys(k for row in history for k in row)
            if k.rsplit("/", 1)[-1] in ("CIDEr", "Bleu_4", "ROUGE_L", "METEOR") or k == "selection"]
    for key in keys:
        values = [row.get(key) for row in history]
        right.plot(epochs, values, marker="o" if key != "selection" else "s", label=key,
                   linestyle="--" if key == "selection" else "-")
    right.set(title="validation (beam search)", xlabel="epoch")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
