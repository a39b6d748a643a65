"""CIDEr-D with document frequencies computed once, for self-critical rewards.

coco-caption's scorer recomputes document frequencies from the references on every call, which is fine for a
final evaluation but far too slow for a reward evaluated on every sampled caption. This follows the same
definition (n = 1..4, tf-idf vectors, clipped overlap, Gaussian length penalty with sigma = 6, x10), with the
corpus statistics taken from the training references once.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

Ngrams = list[Counter]


def _ngrams(words: Sequence[str], n_max: int = 4) -> Ngrams:
    return [Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1)) for n in range(1, n_max + 1)]


class CiderD:
    """CIDEr-D of candidate word lists against per-image references."""

    def __init__(self, references: Sequence[Sequence[Sequence[str]]], sigma: float = 6.0):
        """`references[i]` is the list of tokenized reference captions of image i."""
        self.sigma = sigma
        df: Counter = Counter()
        for refs in references:
            seen = set()
            for ref in refs:
                for grams in _ngrams(ref):
                    seen.update(grams)
            df.update(seen)
        self.df = df
        self.log_images = math.log(float(len(references)))
        self.refs = [[self._vector(ref) for ref in refs] for refs in references]

    def _vector(self, words: Sequence[str]) -> tuple[list[dict], list[float], int]:
        vec, norms = [], []
        for grams in _ngrams(words):
            v = {g: tf * (self.log_images - math.log(max(1.0, self.df[g]))) for g, tf in grams.items()}
            vec.append(v)
            norms.append(math.sqrt(sum(x * x for x in v.values())))
        return vec, norms, len(words)

    def score(self, image: int, words: Sequence[str]) -> float:
        """CIDEr-D of one candidate for image `image` (index into the references given at construction)."""
        vec, norms, length = self._vector(words)
        total = 0.0
        for ref_vec, ref_norms, ref_len in self.refs[image]:
            penalty = math.exp(-((length - ref_len) ** 2) / (2 * self.sigma ** 2))
            for n in range(4):
                if norms[n] == 0 or ref_norms[n] == 0:
                    continue
                dot = sum(min(x, ref_vec[n].get(g, 0.0)) * ref_vec[n].get(g, 0.0) for g, x in vec[n].items())
                total += penalty * dot / (norms[n] * ref_norms[n])
        return total / 4 / len(self.refs[image]) * 10.0
