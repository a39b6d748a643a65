"""Training from a config: cached features, teacher forcing, beam-search validation, best-by-CIDEr checkpoints.

`fit(cfg)` is the whole recipe as small named steps: `prepare_data`, `train_one_epoch`, validation through
`captioner.evaluation`, `checkpoint_epoch`. The command line only parses arguments and calls `fit`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from captioner.checkpoint import CaptionModel, new_model, save_model
from captioner.config import Config, ConfigError, config_to_dict, save_config
from captioner.data.dataset import CaptionSet, encode_captions, iterate_batches
from captioner.data.features import FeatureCache
from captioner.data.readers import DatasetError, check_images, read_dataset
from captioner.encoder import build_encoder
from captioner.evaluation import evaluate_set
from captioner.plots import plot_history
from captioner.run_state import Progress, load_state, save_state
from captioner.vocab import Vocabulary

VAL_METRICS = ("Bleu_1", "Bleu_4", "ROUGE_L", "CIDEr")


@dataclass
class Prepared:
    train: CaptionSet
    val: CaptionSet
    encoder_dim: int


def log(message: str) -> None:
    print(f"[captioner {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _load_split(cfg: Config, cache: FeatureCache, split: str, limit: int) -> CaptionSet:
    samples = read_dataset(cfg.data, split)
    if limit:
        samples = samples[:limit]
    samples, missing = check_images(samples, cfg.data.on_missing, f"{split} split")
    if missing:
        log(f"skipping {len(missing)} missing images of the {split} split (data.on_missing=skip)")
    failures = cache.extract([s.image for s in samples], num_workers=max(1, cfg.train.num_workers))
    if failures:
        listed = "\n  ".join(f"{p}: {why}" for p, why in failures[:20])
        if cfg.data.on_missing == "error":
            raise DatasetError(f"{len(failures)} unreadable image(s) in the {split} split:\n  {listed}")
        log(f"skipping {len(failures)} unreadable images of the {split} split")
        bad = {p for p, _ in failures}
        samples = [s for s in samples if s.image not in bad]
    if not samples:
        raise DatasetError(f"the {split} split has no usable images")
    return CaptionSet([s.image for s in samples], cache.load([s.image for s in samples]),
                      [s.captions for s in samples])


def prepare_data(cfg: Config) -> Prepared:
    """Read both splits, check images, and extract (or reuse) their encoder features."""
    encoder = build_encoder(cfg.model.encoder, cfg.model.encoder_weights)
    cache = FeatureCache(cfg.data.cache_dir, encoder)
    train = _load_split(cfg, cache, cfg.data.train_split, cfg.data.max_images)
    val = _load_split(cfg, cache, cfg.data.val_split, cfg.train.val_max_images)
    return Prepared(train, val, encoder.feature_dim)


def validate_paths(cfg: Config) -> None:
    """Fail before any work when the data the config names does not exist."""
    problems = []
    if cfg.data.format == "flickr8k":
        if not Path(cfg.data.root).is_dir():
            problems.append(f"data.root {cfg.data.root!r} is not a folder")
    else:
        if not Path(cfg.data.annotations).is_file():
            problems.append(f"data.annotations {cfg.data.annotations!r} does not exist")
        if cfg.data.val_annotations and not Path(cfg.data.val_annotations).is_file():
            problems.append(f"data.val_annotations {cfg.data.val_annotations!r} does not exist")
    if cfg.data.images and not Path(cfg.data.images).is_dir():
        problems.append(f"data.images {cfg.data.images!r} is not a folder")
    if cfg.model.encoder_weights and not Path(cfg.model.encoder_weights).is_file():
        problems.append(f"model.encoder_weights {cfg.model.encoder_weights!r} does not exist")
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))


def learning_rate(cfg: Config, step: int, total_steps: int) -> float:
    """Linear warm-up, then cosine decay to lr * min_lr_ratio."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = min(1.0, (step - t.warmup_steps) / max(1, total_steps - t.warmup_steps))
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def caption_loss(model: CaptionModel, batch, cfg: Config) -> torch.Tensor:
    """Cross-entropy (optionally label-smoothed) plus the doubly stochastic attention penalty."""
    logits, alphas = model.decoder(batch.features, batch.captions, batch.image_index, batch.lengths)
    targets = batch.captions[:, 1:]  # (B, T-1)
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                           ignore_index=model.vocab.pad_id, label_smoothing=cfg.train.label_smoothing)
    if alphas is not None and cfg.train.attention_reg:
        loss = loss + cfg.train.attention_reg * ((1.0 - alphas.sum(1)) ** 2).mean()
    return loss


def train_one_epoch(model: CaptionModel, optimizer: torch.optim.Optimizer, data: CaptionSet,
                    encoded: list[list[list[int]]], cfg: Config, progress: Progress, total_steps: int,
                    generator: torch.Generator, indices: list[int] | None = None) -> float:
    """One pass of teacher forcing over `data`; returns the mean loss."""
    model.decoder.train()
    losses = []
    for batch in iterate_batches(data, encoded, cfg.train.batch_size, cfg.train.captions_per_image, generator,
                                 indices):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(cfg, progress.step, total_steps)
        loss = caption_loss(model, batch, cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.decoder.parameters(), cfg.train.grad_clip)
        optimizer.step()
        progress.step += 1
        losses.append(loss.item())
    return sum(losses) / max(1, len(losses))


def checkpoint_epoch(run: Path, model: CaptionModel, optimizer: torch.optim.Optimizer, progress: Progress,
                     generator: torch.Generator, improved: bool) -> None:
    """Save the best model (when improved), then the resumable state, then the log and curves."""
    if improved:
        save_model(model, run / "best.safetensors")
    save_state(run / "train_state.safetensors", model.decoder, optimizer, progress, model.vocab.itos, generator)
    with (run / "metrics.jsonl").open("w") as fh:
        for row in progress.history:
            fh.write(json.dumps(row) + "\n")
    plot_history(progress.history, run / "curves.png")


def start_from_best(model: CaptionModel, optimizer: torch.optim.Optimizer, run: Path) -> None:
    """Load the best checkpoint's weights and forget the optimizer's moments (a new phase, a new objective)."""
    from captioner.checkpoint import load_model

    model.decoder.load_state_dict(load_model(run / "best.safetensors").decoder.state_dict())
    optimizer.state.clear()


def fit(cfg: Config, resume: bool = False) -> CaptionModel:
    """Train the model `cfg` describes; returns the best model (also at `<out_dir>/best.safetensors`)."""
    validate_paths(cfg)
    run = Path(cfg.train.out_dir)
    state_file = run / "train_state.safetensors"
    if state_file.exists() and not resume:
        raise ConfigError(f"invalid config:\n  - {run} holds a previous run; pass --resume to continue it or "
                          "set train.out_dir to a new folder")
    run.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run / "config.yaml")
    torch.manual_seed(cfg.train.seed)
    generator = torch.Generator().manual_seed(cfg.train.seed)

    started = time.time()
    data = prepare_data(cfg)
    log(f"features ready: {len(data.train)} train / {len(data.val)} val images ({time.time() - started:.0f}s)")
    vocab = Vocabulary.build((c for caps in data.train.references for c in caps), cfg.data.min_word_count)
    model = new_model(cfg.model, vocab, data.encoder_dim, cfg.decode)
    optimizer = torch.optim.AdamW(model.decoder.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    progress = Progress()
    if resume and state_file.exists():
        progress, itos = load_state(state_file, model.decoder, optimizer, generator)
        if itos != vocab.itos:
            raise ConfigError(f"invalid config:\n  - {run}: the data no longer gives the vocabulary of the run "
                              "being resumed")
        log(f"resumed after epoch {progress.epoch} (best CIDEr {progress.best_score:.4f})")
    encoded = encode_captions(data.train, vocab, cfg.data.max_caption_length)
    steps_per_epoch = math.ceil(len(data.train) / cfg.train.batch_size)
    total_steps = steps_per_epoch * cfg.train.epochs
    model.info = {"data": cfg.data.format, "train_images": len(data.train), "val_images": len(data.val),
                  "recipe": config_to_dict(cfg)}

    while progress.epoch < cfg.train.epochs + cfg.train.scst_epochs:
        epoch_start = time.time()
        if progress.epoch < cfg.train.epochs:
            phase = "xe"
            loss = train_one_epoch(model, optimizer, data.train, encoded, cfg, progress, total_steps, generator)
        else:
            from captioner.scst import train_scst_epoch

            phase = "scst"
            if progress.epoch == cfg.train.epochs:  # self-critical training starts from the best XE model
                start_from_best(model, optimizer, run)
            loss = train_scst_epoch(model, optimizer, data.train, cfg, progress, generator)
        progress.epoch += 1
        scores, _ = evaluate_set(model, data.val, cfg.decode, VAL_METRICS)
        improved = scores["CIDEr"] > progress.best_score
        if improved:
            progress.best_score, progress.best_epoch, progress.bad_epochs = scores["CIDEr"], progress.epoch, 0
            model.info["metrics"] = {"split": cfg.data.val_split, "beam_size": cfg.decode.beam_size, **scores}
            model.info["epoch"] = progress.epoch
        else:
            progress.bad_epochs += 1
        seconds = time.time() - epoch_start
        progress.history.append({"epoch": progress.epoch, "phase": phase, "loss": loss, "seconds": seconds,
                                 "lr": optimizer.param_groups[0]["lr"], **scores})
        checkpoint_epoch(run, model, optimizer, progress, generator, improved)
        log(f"epoch {progress.epoch} {phase} loss {loss:.3f} | " +
            " ".join(f"{k} {v:.4f}" for k, v in scores.items()) + f" | {seconds:.0f}s" + (" *" if improved else ""))
        if (phase == "xe" and cfg.train.patience and progress.bad_epochs >= cfg.train.patience
                and progress.epoch < cfg.train.epochs):
            log(f"early stop: no better CIDEr for {progress.bad_epochs} epochs")
            progress.epoch = cfg.train.epochs  # go on to self-critical training, if configured
            progress.bad_epochs = 0
    from captioner.checkpoint import load_model

    best = load_model(run / "best.safetensors")
    log(f"best epoch {progress.best_epoch}: CIDEr {progress.best_score:.4f}; total {time.time() - started:.0f}s")
    return best

