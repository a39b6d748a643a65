"""How far two captionings of the same images are apart in CIDEr-D, with a paired bootstrap interval.

Why: a precision is "within tolerance" when its dev CIDEr-D stays within 0.01 of fp32's
(`captioner.runtime.choice.CIDER_TOLERANCE`), but a difference of corpus scores says nothing of how much of it is
chance. CIDEr-D's document frequencies come from the references alone, so the corpus score is the mean of the
per-image scores, and two captionings of the same images can be compared image by image: the mean of the
per-image differences, and a percentile interval from resampling the images with replacement. On coco_small's
150 dev images that interval is 0.03-0.04 wide for a path that changes a fifth of the captions
(docs/performance.md), three to four times the tolerance.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from captioner.evaluation.metrics import tokenize_for_eval


@dataclass(frozen=True)
class Comparison:
    """CIDEr-D of captioning B against captioning A on the same images."""

    images: int
    score_a: float
    score_b: float
    difference: float
    """score_b - score_a, the mean of the per-image differences."""
    low: float
    high: float
    """The central interval of the bootstrap distribution of `difference` (95% by default)."""
    changed: int
    """Images whose two captions differ as text."""


def per_image_cider(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]],
                    use_java: bool | None = None) -> dict[str, float]:
    """{image: CIDEr-D of its caption}, tokenized as `score_captions` does; their mean is the corpus CIDEr-D."""
    keys = sorted(predictions)
    return _scores(predictions, tokenize_for_eval({k: list(references[k]) for k in keys}, use_java), use_java)


def _scores(predictions: Mapping[str, str], tokenized_references: dict[str, list[str]],
            use_java: bool | None) -> dict[str, float]:
    """Per-image CIDEr-D against references already tokenized (once for both sides of a comparison)."""
    from pycocoevalcap.cider.cider import Cider

    keys = sorted(predictions)
    res = tokenize_for_eval({k: [predictions[k]] for k in keys}, use_java)
    _, scores = Cider().compute_score({k: tokenized_references[k] for k in keys}, res)
    return {k: float(s) for k, s in zip(keys, scores)}


def compare(a: Mapping[str, str], b: Mapping[str, str], references: Mapping[str, Sequence[str]], *,
            resamples: int = 10_000, confidence: float = 0.95, seed: int = 0,
            use_java: bool | None = None) -> Comparison:
    """Captionings `a` and `b` ({image: caption}, the same images) against `references`.

    Raises:
        ValueError: the two cover different images, an image has no references, or an argument is out of range.
    """
    if set(a) != set(b):
        only = sorted(set(a) ^ set(b))
        raise ValueError(f"the two captionings cover different images ({len(only)} in one only, e.g. {only[:3]})")
    missing = sorted(k for k in a if not references.get(k))
    if missing:
        raise ValueError(f"{len(missing)} images have no references, e.g. {missing[:3]}")
    if not a:
        raise ValueError("no images to compare")
    if resamples < 1 or not 0 < confidence < 1:
        raise ValueError(f"need resamples >= 1 and 0 < confidence < 1, got {resamples=} {confidence=}")
    keys = sorted(a)
    gts = tokenize_for_eval({k: list(references[k]) for k in keys}, use_java)
    score_a, score_b = _scores(a, gts, use_java), _scores(b, gts, use_java)
    diff = np.array([score_b[k] - score_a[k] for k in keys])
    picks = np.random.default_rng(seed).integers(0, len(keys), (resamples, len(keys)))
    low, high = np.quantile(diff[picks].mean(axis=1), [(1 - confidence) / 2, (1 + confidence) / 2])
    return Comparison(images=len(keys), score_a=float(np.mean([score_a[k] for k in keys])),
                      score_b=float(np.mean([score_b[k] for k in keys])), difference=float(diff.mean()),
                      low=float(low), high=float(high), changed=sum(a[k] != b[k] for k in keys))
