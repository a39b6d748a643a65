"""Training from a config: cached features, teacher forcing, beam-search validation, best-by-CIDEr checkpoints.

`fit(cfg)` is the whole recipe as small named steps: `prepare_data`, `train_one_epoch` (or a self-critical
epoch), `validate` through `captioner.evaluation.evaluate`, `checkpoint_epoch`. The command line only parses arguments.
Under torchrun the decoder is wrapped in DistributedDataParallel, every rank trains on its share of each epoch's
images, and rank 0 alone validates, writes checkpoints and logs; its decisions are broadcast to the others.
"""

from __future__ import annotations

import math
import time
from contextlib import ExitStack
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from captioner.config import Config, config_to_dict
from captioner.config.checks import config_error
from captioner.data.dataset import Batch, CaptionSet, encode_captions, iterate_batches
from captioner.models.checkpoint import CaptionModel, CheckpointError, load_model, new_model, save_model
from captioner.models.vocab import Vocabulary
from captioner.training.distributed import Dist, barrier, broadcast, setup, teardown
from captioner.training.ema import WeightAverage, averaged
from captioner.training.log import log
from captioner.training.prepare import Prepared, build_vocabulary, prepare_data, validate_paths
from captioner.training.run_folder import BEST, STATE, lock_run, open_run, write_history
from captioner.training.run_state import Progress, SavedState, load_state, read_state, save_state
from captioner.training.start import check_features, starting_model
from captioner.training.validation import per_dataset, validation_scores


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss); the run folder keeps the last good checkpoint. Exit code 3."""


def learning_rate(cfg: Config, step: int, total_steps: int) -> float:
    """Linear warm-up, then cosine decay to lr * min_lr_ratio."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = min(1.0, (step - t.warmup_steps) / max(1, total_steps - t.warmup_steps))
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def start_encoder_head(decoder: torch.nn.Module, pretrained: torch.nn.Linear | None) -> None:
    """Copy the head cut off the encoder into the decoder's tuned head (`model.encoder_head`), if it has one."""
    head = decoder.encoder_head
    if head is None:
        return
    if pretrained is None or pretrained.weight.shape != head.weight.shape:
        got = "no head" if pretrained is None else f"a {pretrained.out_features}-wide head"
        raise config_error(f"model.encoder_head is {head.out_features} but the encoder has {got}")
    head.weight.copy_(pretrained.weight)
    head.bias.copy_(pretrained.bias)


def parameter_groups(decoder: torch.nn.Module, cfg: Config) -> list[dict]:
    """AdamW groups: the decoder at the scheduled rate, a tuned encoder head at `train.encoder_head_lr` times it
    (its `lr_scale`, applied wherever the rate is set)."""
    head = decoder.encoder_head
    tuned = {id(p) for p in head.parameters()} if head is not None else set()
    groups = [{"params": [p for p in decoder.parameters() if id(p) not in tuned], "lr_scale": 1.0}]
    if head is not None:
        groups.append({"params": list(head.parameters()), "lr_scale": cfg.train.encoder_head_lr})
    return groups


def caption_loss(decoder: torch.nn.Module, batch: Batch, vocab: Vocabulary, cfg: Config) -> torch.Tensor:
    """Cross-entropy (optionally label-smoothed) plus the doubly stochastic attention penalty."""
    inputs = batch.captions
    if decoder.training and cfg.train.word_dropout:
        inputs = drop_words(inputs, cfg.train.word_dropout, vocab)
    out = decoder(batch.features, inputs, batch.image_index, batch.lengths)
    targets = batch.captions[out.rows, out.steps + 1]  # the true next words, whatever the inputs were
    # Packed logits: only positions inside a caption reach the softmax (ignore_index covers unsorted batches).
    loss = F.cross_entropy(out.logits, targets, ignore_index=vocab.pad_id, label_smoothing=cfg.train.label_smoothing)
    if out.attention is not None and cfg.train.attention_reg:
        loss = loss + cfg.train.attention_reg * ((1.0 - out.attention.sum(1)) ** 2).mean()
    return loss


def drop_words(captions: torch.Tensor, p: float, vocab: Vocabulary) -> torch.Tensor:
    """A copy of `captions` with each word replaced by <unk> with probability p; <start>, <end> and padding stay.

    Teacher forcing always shows the true previous word, so a decoder can caption from the words alone; blanking
    some of them makes it look at the image (word dropout, Bowman et al. 2016).
    """
    words = captions > vocab.unk_id  # special tokens have the lowest ids
    drop = words & (torch.rand(captions.shape, device=captions.device) < p)
    return captions.masked_fill(drop, vocab.unk_id)


def _to(batch: Batch, device: torch.device) -> Batch:
    return Batch(*(t.to(device) for t in (batch.features, batch.captions, batch.lengths, batch.image_index)),
                 images=batch.images)


def train_one_epoch(model: CaptionModel, trainer: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    data: CaptionSet, encoded: list[list[list[int]]], cfg: Config, progress: Progress,
                    total_steps: int, generator: torch.Generator, dist: Dist, ema: WeightAverage | None = None
                    ) -> float:
    """One pass of teacher forcing; `trainer` is the decoder or its DDP wrapper. Returns the mean loss."""
    trainer.train()
    losses = []
    batches = iterate_batches(data, encoded, cfg.train.batch_size // dist.world, cfg.train.captions_per_image,
                              generator, rank=dist.rank, world=dist.world, mirror_ids=model.vocab.mirror_ids())
    for batch in batches:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(cfg, progress.step, total_steps) * group.get("lr_scale", 1.0)
        losses.append(train_step(model, trainer, optimizer, _to(batch, dist.device), cfg))
        if ema is not None:
            ema.update(model.decoder)
        progress.step += 1
    return sum(losses) / max(1, len(losses))


def train_step(model: CaptionModel, trainer: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: Batch,
               cfg: Config) -> float:
    """One teacher-forcing update on a batch already on the decoder's device; returns its loss."""
    with torch.autocast("cuda", enabled=batch.captions.device.type == "cuda", dtype=torch.bfloat16):
        loss = caption_loss(trainer, batch, model.vocab, cfg)
    if not torch.isfinite(loss.detach()).item():  # before the update, so the weights (and checkpoints) stay good
        raise TrainingError(f"training loss became {loss.item()} in a teacher-forcing step; the run "
                            "stopped and its last checkpoint is kept (lower train.lr, or set train.grad_clip)")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.train.grad_clip:
        torch.nn.utils.clip_grad_norm_(model.decoder.parameters(), cfg.train.grad_clip)
    optimizer.step()
    return loss.item()


def checkpoint_epoch(run: Path, model: CaptionModel, optimizer: torch.optim.Optimizer, progress: Progress,
                     generator: torch.Generator, improved: bool, ema: WeightAverage | None = None) -> None:
    """Save the best model (when improved; the averaged weights if averaging), then the resumable state (the
    live weights and the average), then the log and curves: each file written whole, so a kill at any moment
    leaves every one complete."""
    if improved:
        with averaged(ema, model.decoder):
            save_model(model, run / BEST)
    save_state(run / STATE, model.decoder, optimizer, progress, model.vocab.itos, generator,
               extra=ema.state() if ema is not None else None)
    write_history(run, progress.history)


def start_from_best(model: CaptionModel, optimizer: torch.optim.Optimizer, run: Path,
                    ema: WeightAverage | None = None) -> None:
    """Load the best checkpoint's weights and forget the optimizer's moments (a new phase, a new objective);
    the weight average restarts from there."""
    model.decoder.load_state_dict(load_model(run / BEST).decoder.state_dict())
    optimizer.state.clear()
    if ema is not None:
        ema.reset(model.decoder)


def _load_average(ema: WeightAverage, extra: dict[str, torch.Tensor], state_file: Path) -> None:
    """Restore the saved weight average; one that does not fit the model (missing weights, other shapes) is a
    CheckpointError naming the state file, not a KeyError traceback."""
    try:
        ema.load(extra)
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{state_file}: the saved weight average does not fit the configured model "
                              f"({type(exc).__name__}: {exc})") from exc


def fit(cfg: Config, resume: bool = False) -> CaptionModel:
    """Train the model `cfg` describes; returns the best model (also at `<out_dir>/best.safetensors`)."""
    validate_paths(cfg)
    dist = setup()
    try:
        with ExitStack() as held:  # the run folder's lock (`run_folder.lock_run`), let go however training ends
            return _fit(cfg, resume, dist, held)
    finally:
        teardown(dist)


def _fit(cfg: Config, resume: bool, dist: Dist, held: ExitStack) -> CaptionModel:
    state_file = Path(cfg.train.out_dir) / STATE
    resuming = resume and state_file.exists()
    # A new run from a model checks it before anything is written or extracted; a resumed one has all it needs,
    # its state checked here too (a damaged one is refused before the features, not after).
    start = starting_model(cfg) if cfg.train.init_from and not resuming else None
    saved: SavedState | None = read_state(state_file) if resuming else None
    lock_run(cfg, dist, held)
    run = open_run(cfg, resume, dist)
    torch.manual_seed(cfg.train.seed + dist.rank)  # dropout differs per rank; the data order does not
    generator = torch.Generator().manual_seed(cfg.train.seed)
    started = time.time()
    data = prepare_data(cfg, dist)
    if dist.is_main:
        val_images = sum(len(v) for v in data.vals.values())
        log(f"features ready: {len(data.train)} train / {val_images} val images ({time.time() - started:.0f}s)"
            + (f" on {dist.world} processes" if dist.enabled else ""))
    if start:
        check_features(start, data.encoder_dim, cfg.train.init_from)
        vocab = start.vocab
    elif cfg.train.init_from and saved is not None:
        vocab = Vocabulary(saved.vocab)
    else:
        vocab = build_vocabulary((c for caps in data.train.references for c in caps), cfg.data.min_word_count)
    model = new_model(cfg.model, vocab, data.encoder_dim, cfg.decode)
    if start:
        model.decoder.load_state_dict(start.decoder.state_dict())
    else:
        start_encoder_head(model.decoder, data.encoder_head)
    started_from_model, start = start is not None, None  # the copy of its weights is not needed any more
    model.decoder.to(dist.device)
    optimizer = torch.optim.AdamW(parameter_groups(model.decoder, cfg), lr=cfg.train.lr,
                                  weight_decay=cfg.train.weight_decay)
    progress = Progress()
    extra: dict[str, torch.Tensor] = {}
    if saved is not None:
        progress, itos, extra = load_state(saved, model.decoder, optimizer, generator)
        saved = None  # its tensors are in the model and optimizer now
        for group, configured in zip(optimizer.param_groups, parameter_groups(model.decoder, cfg)):
            group["lr_scale"] = configured["lr_scale"]  # the config's scale, not the saved one: it may have changed
        if dist.enabled:  # the saved RNG state is rank 0's; give each rank its own dropout stream again
            torch.manual_seed(cfg.train.seed + dist.rank + 1000 * progress.epoch)
        if itos != vocab.itos:
            raise config_error(f"{run}: the data no longer gives the vocabulary of the run "
                               "being resumed")
        if dist.is_main:
            write_history(run, progress.history)  # repairs a log or curves a kill (of an older version) damaged
            log(f"resumed after epoch {progress.epoch} (best validation score {progress.best_score:.4f})")
    trainer = (DistributedDataParallel(model.decoder, device_ids=[dist.device.index] if dist.device.index is not None
                                       else None) if dist.enabled else model.decoder)
    # Made after DDP has given every rank rank 0's weights; a resumed run without a saved average starts one here.
    ema = WeightAverage(model.decoder, cfg.train.ema_decay) if cfg.train.ema_decay else None
    if ema is not None and extra:
        _load_average(ema, extra, state_file)
    encoded = encode_captions(data.train, vocab, cfg.data.max_caption_length)
    total_steps = math.ceil(data.train.epoch_size() / cfg.train.batch_size) * cfg.train.epochs
    model.info = {"data": "+".join(data.vals), "train_images": len(data.train),
                  "val_images": sum(len(v) for v in data.vals.values()), "recipe": config_to_dict(cfg)}
    if started_from_model:  # epoch 0, the starting model's scores: what training has to beat (0 s trained)
        _validate_and_checkpoint(run, model, optimizer, progress, generator, data, cfg, dist, "init", 0.0, 0.0, ema)

    while True:
        # Checked before each epoch rather than after it, so a run resumed after its early stop goes straight on.
        if (progress.epoch < cfg.train.epochs and cfg.train.patience
                and progress.bad_epochs >= cfg.train.patience):
            if dist.is_main:
                log(f"early stop: no better validation score for {progress.bad_epochs} epochs")
            progress.epoch = cfg.train.epochs  # go on to self-critical training, if configured
            progress.bad_epochs = 0
        if progress.epoch >= cfg.train.epochs + cfg.train.scst_epochs:
            break
        epoch_start = time.time()
        if progress.epoch < cfg.train.epochs:
            phase = "xe"
            loss = train_one_epoch(model, trainer, optimizer, data.train, encoded, cfg, progress, total_steps,
                                   generator, dist, ema)
        else:
            from captioner.training.scst import train_scst_epoch

            phase = "scst"
            if progress.epoch == cfg.train.epochs:  # self-critical training starts from the best XE model
                start_from_best(model, optimizer, run, ema)
            loss = train_scst_epoch(model, optimizer, data.train, cfg, progress, generator, dist, ema)
        progress.epoch += 1
        _validate_and_checkpoint(run, model, optimizer, progress, generator, data, cfg, dist, phase, loss,
                                 time.time() - epoch_start, ema)
    barrier(dist)
    best = load_model(run / BEST)
    if dist.is_main:
        what = "CIDEr" if len(data.vals) == 1 else "selection score (weighted CIDEr)"
        log(f"best epoch {progress.best_epoch}: {what} {progress.best_score:.4f}; total {time.time() - started:.0f}s")
    return best


def _validate_and_checkpoint(run: Path, model: CaptionModel, optimizer: torch.optim.Optimizer, progress: Progress,
                             generator: torch.Generator, data: Prepared, cfg: Config, dist: Dist, phase: str,
                             loss: float, seconds: float, ema: WeightAverage | None = None) -> None:
    """Rank 0 decodes every validation split with beam search, scores them and checkpoints; all ranks agree after.

    With weight averaging on, the averaged weights are the ones validated and kept as the best model."""
    scores = None
    if dist.is_main:
        with averaged(ema, model.decoder):
            scores = validation_scores(model, data, cfg, dist)
    scores = broadcast(scores, dist)
    selection = scores["selection"] if "selection" in scores else scores["CIDEr"]
    improved = selection > progress.best_score
    if improved:
        progress.best_score, progress.best_epoch, progress.bad_epochs = selection, progress.epoch, 0
        if len(data.vals) == 1:
            model.info["metrics"] = {"split": cfg.data.sources()[0].val_split, "beam_size": cfg.decode.beam_size,
                                     **scores}
        else:
            model.info["metrics"] = {"beam_size": cfg.decode.beam_size, "selection": selection,
                                     "selection_weights": data.selection, "datasets": per_dataset(scores, cfg)}
        model.info["epoch"] = progress.epoch
    else:
        progress.bad_epochs += 1
    # Cross-entropy epochs report their loss; self-critical epochs the mean CIDEr-D reward of their samples;
    # epoch 0 of a run started from a model (phase "init") neither.
    if phase == "xe":
        value, said = {"loss": loss}, f"loss {loss:.3f}"
    elif phase == "scst":
        value, said = {"loss": None, "reward": loss}, f"reward {loss:.3f}"
    else:
        value, said = {"loss": None, "lr": None}, f"(the starting model, {cfg.train.init_from})"
    progress.history.append({"epoch": progress.epoch, "phase": phase, "seconds": seconds,
                             "lr": optimizer.param_groups[0]["lr"], **value, **scores})
    if dist.is_main:
        checkpoint_epoch(run, model, optimizer, progress, generator, improved, ema)
        log(f"epoch {progress.epoch} {phase} {said} | " +
            " ".join(f"{k} {v:.4f}" for k, v in scores.items()) + f" | {seconds:.0f}s" + (" *" if improved else ""))
    barrier(dist)
