"""How varied a model's captions are over a set of images: distinct words, and captions shared between images.

A captioner that says "a man in a blue shirt is standing in front of a building" for a hundred different photos
can still score well on n-gram metrics; these two numbers show it. Words are counted after the same
lower-casing and punctuation split as the metrics' tokenizer.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

from captioner.evaluation.metrics import tokenize_for_eval


def diversity(predictions: Mapping[str, str]) -> dict[str, float]:
    """{"distinct_words", "duplicate_share", "distinct_captions"} of one caption per image.

    `duplicate_share` is the share of images whose caption is word for word another image's caption too.
    """
    if not predictions:
        return {"distinct_words": 0, "duplicate_share": 0.0, "distinct_captions": 0}
    tokens = tokenize_for_eval({k: [v] for k, v in predictions.items()}, use_java=False)
    captions = {k: " ".join(v[0].split()) for k, v in tokens.items()}
    counts = Counter(captions.values())
    words = {w for c in captions.values() for w in c.split()}
    shared = sum(n for n in counts.values() if n > 1)
    return {"distinct_words": len(words), "duplicate_share": shared / len(captions),
            "distinct_captions": len(counts)}
