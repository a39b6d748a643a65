"""Self-critical sequence training (Rennie et al. 2017) with a CIDEr-D reward, on cached features.

For each image, `scst_samples` captions are sampled from the model; each one's advantage is its CIDEr-D minus
the mean CIDEr-D of the image's other samples (the baseline of Luo 2020, which needs no extra greedy decode).
The loss is the advantage-weighted negative log-likelihood of the sampled words. Sampling is not search, so it
lives here rather than in `captioner.decoding`.
"""

from __future__ import annotations

import torch
import torch.distributed as tdist

from captioner.checkpoint import CaptionModel
from captioner.cider import CiderD
from captioner.config import Config
from captioner.data.dataset import CaptionSet, rank_share
from captioner.distributed import Dist
from captioner.run_state import Progress
from captioner.vocab import tokenize


def sample_captions(model: CaptionModel, features: torch.Tensor, samples: int, max_length: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample `samples` captions per image with gradients.

    Returns:
        tokens (B*S, L), summed log-probabilities (B*S,), and a mask (B*S, L) of the generated positions
        (words and the <end> token).
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
    words, logps, masks = [], [], []
    for _ in range(max_length):
        out = decoder.step(tokens, memory, state)
        state = out.state
        logits = out.logits.index_fill(1, banned, float("-inf"))
        logp = torch.log_softmax(logits, dim=-1)
        tokens = torch.multinomial(logp.detach().exp(), 1).squeeze(1)
        words.append(torch.where(alive, tokens, torch.full_like(tokens, vocab.pad_id)))
        logps.append(logp.gather(1, tokens.unsqueeze(1)).squeeze(1) * alive)
        masks.append(alive)
        alive = alive & (tokens != vocab.end_id)
        if not alive.any():
            break
    return torch.stack(words, 1), torch.stack(logps, 1).sum(1), torch.stack(masks, 1)


def average_gradients(module: torch.nn.Module, dist: Dist) -> None:
    """All-reduce gradients by hand: sampling calls `init`/`step` directly, outside DDP's forward hooks."""
    if not dist.enabled:
        return
    for param in module.parameters():
        if param.grad is not None:
            tdist.all_reduce(param.grad)
            param.grad /= dist.world


def train_scst_epoch(model: CaptionModel, optimizer: torch.optim.Optimizer, data: CaptionSet, cfg: Config,
                     progress: Progress, generator: torch.Generator, dist: Dist | None = None) -> float:
    """One self-critical pass over `data`; returns the mean sampled reward (CIDEr-D on training references)."""
    dist = dist or Dist()
    scorer = CiderD([[tokenize(c) for c in caps] for caps in data.references])
    model.decoder.train()
    for group in optimizer.param_groups:
        group["lr"] = cfg.train.scst_lr
    S = cfg.train.scst_samples
    order = torch.randperm(len(data), generator=generator).tolist()
    order = rank_share(order, dist.rank, dist.world)
    rewards_seen = []
    for start in range(0, len(order), cfg.train.batch_size // dist.world):
        chosen = order[start:start + cfg.train.batch_size // dist.world]
        features = data.features[chosen].float().to(dist.device)
        tokens, logprob, _ = sample_captions(model, features, S, cfg.decode.max_length)
        words = [model.vocab.decode(row) for row in tokens.tolist()]
        reward = torch.tensor([scorer.score(chosen[i // S], w) for i, w in enumerate(words)]).view(-1, S)
        baseline = (reward.sum(1, keepdim=True) - reward) / max(1, S - 1)  # mean of the other samples
        advantage = (reward - baseline).view(-1).to(logprob.device)
        loss = -(advantage * logprob).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(model.decoder, dist)
        if cfg.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.decoder.parameters(), cfg.train.grad_clip)
        optimizer.step()
        progress.step += 1
        rewards_seen.append(reward.mean().item())
    return sum(rewards_seen) / max(1, len(rewards_seen))
