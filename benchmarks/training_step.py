"""Cross-entropy training step time on a recipe's cached features, as `captioner train` runs it.

    .venv/bin/python benchmarks/training_step.py [--config configs/flickr8k.yaml] [--steps 20] [--repeats 3]
        [--set train.lr=3e-3 ...]

Extracts (or reuses) the recipe's feature cache, builds the model and optimizer as `fit` does, and times
`--steps` calls of `captioner.training.loop.train_step` (forward, loss, backward, clipping, AdamW) after 3 warm-up
steps, `--repeats` times on fresh batches. Prints the median step time with [min-max], captions per second, and
the implied time of one epoch of teacher forcing (validation not included). Compare two versions of the code by
running it on each in turn on an otherwise idle machine; figures from different machines or busy ones do not
compare.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from captioner.config import load_config
from captioner.data.dataset import encode_captions, iterate_batches
from captioner.models.checkpoint import new_model
from captioner.models.vocab import Vocabulary
from captioner.training.loop import parameter_groups, start_encoder_head, train_step
from captioner.training.prepare import prepare_data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/flickr8k.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    cfg = load_config(args.config, args.set)
    torch.manual_seed(cfg.train.seed)
    data = prepare_data(cfg)
    vocab = Vocabulary.build((c for caps in data.train.references for c in caps), cfg.data.min_word_count)
    model = new_model(cfg.model, vocab, data.encoder_dim, cfg.decode)
    start_encoder_head(model.decoder, data.encoder_head)
    decoder = model.decoder.train()
    optimizer = torch.optim.AdamW(parameter_groups(decoder, cfg), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    encoded = encode_captions(data.train, vocab, cfg.data.max_caption_length)
    generator = torch.Generator().manual_seed(cfg.train.seed)

    def batches():
        while True:
            yield from iterate_batches(data.train, encoded, cfg.train.batch_size, cfg.train.captions_per_image,
                                       generator, mirror_ids=vocab.mirror_ids())

    stream = batches()

    def step() -> int:
        batch = next(stream)
        train_step(model, decoder, optimizer, batch, cfg)
        return batch.captions.size(0)

    for _ in range(3):
        step()
    times, captions = [], 0
    for _ in range(args.repeats):
        start = time.perf_counter()
        captions = sum(step() for _ in range(args.steps))
        times.append((time.perf_counter() - start) / args.steps)
    median = statistics.median(times)
    steps_per_epoch = math.ceil(len(data.train) / cfg.train.batch_size)
    print(f"\n{args.config}: {len(data.train)} images, {cfg.train.batch_size} images x "
          f"{cfg.train.captions_per_image} captions per step, {torch.get_num_threads()} threads\n")
    print("| measurement | value |\n|---|---:|")
    print(f"| step, s | {median:.3f} [{min(times):.3f}-{max(times):.3f}] |")
    print(f"| captions per second | {captions / args.steps / median:.0f} |")
    print(f"| one epoch of teacher forcing ({steps_per_epoch} steps), s | {median * steps_per_epoch:.0f} |")


if __name__ == "__main__":
    main()
