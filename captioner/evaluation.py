"""Decoding a whole caption set and scoring it; the `captioner evaluate` command.

Validation during training and `captioner evaluate` both go through `decode_set` -> the one beam search, and
`score_captions` -> pycocoevalcap, so the numbers selected on are the numbers reported.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from captioner.checkpoint import CaptionModel
from captioner.config import DataConfig, DecodeConfig
from captioner.data.dataset import CaptionSet
from captioner.decoding import beam_search
from captioner.metrics import ALL_METRICS, score_captions


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
            hyps = beam_search(decoder, feats, start_id=vocab.start_id, end_id=vocab.end_id,
                               beam_size=decode.beam_size, max_length=decode.max_length,
                               min_length=decode.min_length, length_penalty=decode.length_penalty,
                               banned_ids=vocab.banned_ids, no_repeat_ngram=decode.no_repeat_ngram)
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


def evaluate_command(args: argparse.Namespace) -> int:
    """`captioner evaluate`: score a checkpoint on a dataset split, print JSON, write per-image captions."""
    from captioner.api import Captioner
    from captioner.data.readers import check_images, read_dataset

    cap = Captioner.load(args.checkpoint)
    if args.format == "flickr8k":
        data_cfg = DataConfig(format="flickr8k", root=args.data or "")
    else:
        annotations = args.annotations or args.data or ""
        data_cfg = DataConfig(format=args.format, annotations=annotations, images=args.images or "")
    samples = read_dataset(data_cfg, args.split)
    samples, missing = check_images(samples, "skip", f"{args.split} split")
    if missing:
        print(f"captioner: skipping {len(missing)} missing images, e.g. {missing[0]}", file=sys.stderr)
    if args.max_images:
        samples = samples[: args.max_images]
    # Evaluation reads each image once: decode straight from the files through the public API.
    results = cap.caption([s.image for s in samples], beam_size=args.beam_size, batch_size=args.batch_size,
                          length_penalty=args.length_penalty, no_repeat_ngram=args.no_repeat_ngram, on_error="skip")
    ids = [str(s.image) for s in samples]
    good = [i for i, r in enumerate(results) if r.ok]
    scores = score_captions({ids[i]: results[i].text for i in good},
                            {ids[i]: samples[i].captions for i in good})
    report = {"checkpoint": str(args.checkpoint or "shipped"), "split": args.split, "images": len(good),
              "failed": len(samples) - len(good), "beam_size": args.beam_size, "scores": scores}
    print(json.dumps(report, indent=2))
    if args.output:
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "scores.json").write_text(json.dumps(report, indent=2))
        with (out / "captions.jsonl").open("w", encoding="utf-8") as fh:
            for s, r in zip(samples, results):
                fh.write(json.dumps({"image": str(s.image), "caption": r.text, "error": r.error,
                                     "references": s.captions}) + "\n")
    return 0 if len(good) == len(samples) else 1
