"""Self-critical sequence training (Rennie et al. 2017) with a CIDEr-D reward, on cached features.

For each image, `scst_samples` candidate captions are drawn and each one's advantage is its CIDEr-D minus the
mean CIDEr-D of the image's other candidates (the baseline of Luo 2020, which needs no extra greedy decode). The
loss is the advantage-weighted negative log-likelihood of the candidates' words. The candidates are either
sampled from the model (`scst_candidates: sample`, Rennie et al.) or the n-best list of a beam search of
width `scst_samples` with the recipe's other decoding settings (`beam`, as in Cornia et al. 2020), which trains
the kind of captions beam search returns and never wastes a step on the implausible samples of a label-smoothed
model. Sampling is not search, so it lives here rather than in `captioner.decoding`.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as tdist

from captioner.config import Config
from captioner.data.dataset import CaptionSet, epoch_order, rank_share
from captioner.decoding import decode
from captioner.evaluation.cider import CiderD
from captioner.models.checkpoint import CaptionModel
from captioner.models.vocab import tokenize
from captioner.training.distributed import Dist
from captioner.training.ema import WeightAverage
from captioner.training.run_state import Progress


def sample_captions(model: CaptionModel, features: torch.Tensor, samples: int, max_length: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample `samples` captions per image with gradients.

    Returns:
        tokens (B*S, L), <pad> after each <end>, and their summed log-probabilities (B*S,), <end> included.
    """
    decoder, vocab = model.decoder, model.vocab
    memory, state = decoder.init(features)
    rows = torch.arange(features.size(0), device=features.device).repeat_interleave(samples)
    memory = {k: v.index_select(0, rows) for k, v in memory.items()}
    state = {k: v.index_select(0, rows) for k, v in state.items()}
    device = features.device
    tokens = torch.full((rows.numel(),), vocab.start_id, dtype=torch.long, device=device)
    alive = torch.ones(rows.numel(), dtype=torch.bool, device=device)
    banned = torch.tensor(vocab.banned_ids, device=device)
    words, logps = [], []
    for _ in range(max_length):
        out = decoder.step(tokens, memory, state)
        state = out.state
        logits = out.logits.index_fill(1, banned, float("-inf"))
        logp = torch.log_softmax(logits, dim=-1)
        tokens = torch.multinomial(logp.detach().exp(), 1).squeeze(1)
        words.append(torch.where(alive, tokens, torch.full_like(tokens, vocab.pad_id)))
        logps.append(logp.gather(1, tokens.unsqueeze(1)).squeeze(1) * alive)
        alive = alive & (tokens != vocab.end_id)
        if not alive.any():
            break
    return torch.stack(words, 1), torch.stack(logps, 1).sum(1)


def beam_candidates(model: CaptionModel, features: torch.Tensor, cfg: Config) -> list[list[list[int]]]:
    """The `scst_samples` best hypotheses of each image's beam search (beam = scst_samples), ending with <end>
    when finished.

    The search runs with dropout off, as at test time, and without gradients; `sequence_logprobs` then scores
    the chosen words with gradients."""
    decoder, vocab, k = model.decoder, model.vocab, cfg.train.scst_samples
    mode = decoder.training
    decoder.eval()
    try:
        hyps = decode(decoder, features, dataclasses.replace(cfg.decode, beam_size=k), vocab, n_best=k)
    finally:
        decoder.train(mode)
    return [[h.tokens + ([vocab.end_id] if h.finished else []) for h in image] for image in hyps]


def sequence_logprobs(model: CaptionModel, features: torch.Tensor, sequences: list[list[int]], owners: list[int]
                      ) -> torch.Tensor:
    """Summed log-probability of each token sequence (generated ids, <end> included when present) given its
    image `features[owners[i]]`, with gradients: one teacher-forced pass over all of them."""
    vocab = model.vocab
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    lengths = torch.tensor([len(sequences[i]) + 1 for i in order])  # with <start>
    captions = torch.full((len(order), int(lengths[0])), vocab.pad_id, dtype=torch.long)
    for row, i in enumerate(order):
        captions[row, :lengths[row]] = torch.tensor([vocab.start_id, *sequences[i]])
    device = features.device
    out = model.decoder(features, captions.to(device), torch.tensor([owners[i] for i in order], device=device),
                        lengths.to(device))
    token = torch.log_softmax(out.logits, dim=-1).gather(1, out.targets.unsqueeze(1)).squeeze(1)
    summed = token.new_zeros(len(order)).index_add(0, out.rows, token)
    return summed.new_empty(len(order)).index_copy(0, torch.tensor(order, device=device), summed)


def average_gradients(module: torch.nn.Module, dist: Dist) -> None:
    """All-reduce gradients by hand: sampling calls `init`/`step` directly, outside DDP's forward hooks."""
    if not dist.enabled:
        return
    for param in module.parameters():
        if param.grad is not None:
            tdist.all_reduce(param.grad)
            param.grad /= dist.world


def train_scst_epoch(model: CaptionModel, optimizer: torch.optim.Optimizer, data: CaptionSet, cfg: Config,
                     progress: Progress, generator: torch.Generator, dist: Dist | None = None,
                     ema: WeightAverage | None = None) -> float:
    """One self-critical pass over `data`; returns the candidates' mean reward (CIDEr-D on training references)."""
    dist = dist or Dist()
    scorer = CiderD([[tokenize(c) for c in caps] for caps in data.references])
    model.decoder.train(cfg.train.scst_dropout)  # gradients flow either way; this only switches dropout
    for group in optimizer.param_groups:
        group["lr"] = cfg.train.scst_lr * group.get("lr_scale", 1.0)
    order = rank_share(epoch_order(data, generator), dist.rank, dist.world)  # sampling weights, as in XE epochs
    rewards_seen = []
    for start in range(0, len(order), cfg.train.batch_size // dist.world):
        chosen = order[start:start + cfg.train.batch_size // dist.world]
        features = data.features[chosen].float().to(dist.device)
        if cfg.train.scst_candidates == "beam":
            per_image = beam_candidates(model, features, cfg)
            owners = [row for row, cands in enumerate(per_image) for _ in cands]
            sequences = [seq for cands in per_image for seq in cands]
            logprob = sequence_logprobs(model, features, sequences, owners)
        else:
            tokens, logprob = sample_captions(model, features, cfg.train.scst_samples, cfg.decode.max_length)
            owners = [i // cfg.train.scst_samples for i in range(tokens.size(0))]
            sequences = tokens.tolist()
        reward = torch.tensor([scorer.score(chosen[o], model.vocab.decode(seq)) for o, seq in zip(owners, sequences)])
        advantage = reward - _baseline(reward, torch.tensor(owners))
        loss = -(advantage.to(logprob.device) * logprob).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(model.decoder, dist)
        if cfg.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.decoder.parameters(), cfg.train.grad_clip)
        optimizer.step()
        if ema is not None:
            ema.update(model.decoder)
        progress.step += 1
        rewards_seen.append(reward.mean().item())
    return sum(rewards_seen) / max(1, len(rewards_seen))


def _baseline(reward: torch.Tensor, owners: torch.Tensor) -> torch.Tensor:
    """For each candidate, the mean reward of the other candidates of its image (its own reward when alone, so a
    lone candidate teaches nothing)."""
    images = int(owners.max()) + 1
    total = torch.zeros(images).index_add(0, owners, reward)
    count = torch.zeros(images).index_add(0, owners, torch.ones_like(reward))[owners]
    return torch.where(count > 1, (total[owners] - reward) / (count - 1).clamp(min=1), reward)
