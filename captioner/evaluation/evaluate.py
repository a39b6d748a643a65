"""Decoding a whole caption set and scoring it.

Validation during training goes through `decode_set` -> the one beam search, and
`score_captions` -> pycocoevalcap, so the numbers selected on are the numbers reported.
"""

from __future__ import annotations

from captioner.config import DecodeConfig
from captioner.data.dataset import CaptionSet
from captioner.decoding import decode as search
from captioner.evaluation.metrics import ALL_METRICS, score_captions
from captioner.models.checkpoint import CaptionModel


def decode_set(model: CaptionModel, data: CaptionSet, decode: DecodeConfig, batch_size: int = 100
               ) -> list[str]:
    """Beam-search captions for every image of `data` (features already cached)."""
    decoder, vocab = model.decoder, model.vocab
    was_training = decoder.training
    decoder.eval()
    texts = []
    try:
        for start in range(0, len(data), batch_size):
            feats = data.features[start:start + batch_size].float()
            hyps = search(decoder, feats, decode, vocab)
            texts += [" ".join(vocab.decode(h[0].tokens)) for h in hyps]
    finally:
        decoder.train(was_training)
    return texts


def evaluate_set(model: CaptionModel, data: CaptionSet, decode: DecodeConfig,
                 metrics: tuple[str, ...] = ALL_METRICS, use_java: bool | None = None
                 ) -> tuple[dict[str, float | None], list[str]]:
    """Decode and score `data`: (scores, captions in data order). See `score_captions` for `use_java`."""
    texts = decode_set(model, data, decode)
    ids = data.ids()
    scores = score_captions(dict(zip(ids, texts)), dict(zip(ids, data.references)), metrics, use_java)
    return scores, texts
