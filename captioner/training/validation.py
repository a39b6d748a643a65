"""Validation during training: beam search on every dataset's validation split, and the score that selects.

One dataset: its scores, and CIDEr-D selects the best epoch (as before several datasets existed). Several: each
dataset's scores under `<label>/<metric>`, and `selection`, their CIDEr-D weighted by `selection_weight`.
"""

from __future__ import annotations

from captioner.config import Config
from captioner.evaluation.evaluate import evaluate_set
from captioner.models.checkpoint import CaptionModel
from captioner.training.distributed import Dist
from captioner.training.prepare import Prepared

VAL_METRICS = ("Bleu_1", "Bleu_4", "ROUGE_L", "CIDEr")


def validation_scores(model: CaptionModel, data: Prepared, cfg: Config, dist: Dist) -> dict[str, float]:
    """Beam-search scores on every dataset's validation split. One dataset: its scores (`CIDEr` selects).
    Several: `<label>/<metric>` for each, and `selection`, the CIDEr-D mean weighted by `selection_weight`."""
    per = {}
    for label, val in data.vals.items():
        # The Python PTB tokenizer gives the Java one's tokens on captions and saves two JVM starts per epoch.
        per[label], _ = evaluate_set(model, val.to(dist.device), cfg.decode, VAL_METRICS, use_java=False)
    if len(per) == 1:
        return next(iter(per.values()))
    scores = {f"{label}/{k}": v for label, s in per.items() for k, v in s.items()}
    total = sum(data.selection.values())
    scores["selection"] = sum(w * per[label]["CIDEr"] for label, w in data.selection.items()) / total
    return scores


def per_dataset(scores: dict[str, float], cfg: Config) -> dict[str, dict]:
    """{label: {"split": ..., metric: value}} from the flat `<label>/<metric>` validation scores."""
    out = {}
    for source in cfg.data.sources():
        label = source.label()
        out[label] = {"split": source.val_split,
                      **{k.split("/", 1)[1]: v for k, v in scores.items() if k.startswith(label + "/")}}
    return out
