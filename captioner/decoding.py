"""Batched beam search: the only caption search in the project (greedy is `beam_size=1`).

All B images x K beams advance together as (B*K)-row tensors (the first step, before the beams of an image differ,
runs one row per image); the only Python loop is over time steps. A beam that has emitted <end> stays in its slot
with a frozen score (it can only be extended by <end> at no cost), so finished and unfinished hypotheses compete on
the same length-normalised score and the search ends early when every beam has finished. Once all K beams of an
image have finished, nothing about it can change, so it leaves the batch (when at least an eighth of the batch is
done) and later steps run on the remaining images only. If no beam ever ends, the best partial hypotheses are
returned.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from captioner.config.checks import MAX_LENGTH_PENALTY
from captioner.models.decoder import StepOutput, Tensors

if TYPE_CHECKING:
    from captioner.config import DecodeConfig
    from captioner.models.vocab import Vocabulary


class StepDecoder(Protocol):
    """What beam search needs from a decoder (see `captioner.models.decoder`).

    `step` is first called with one row per image (tokens all <start>, the state straight from `init`), then with
    K rows per image, image-major. A decoder may also set `memory_per_image = True`: its `step` then takes
    `memory` with one row per image and broadcasts it over that image's rows (rows b*K ... b*K + K - 1, K = 1 at
    the first step), so the memory is never copied K times. The memory `init` returns is then the search's own:
    rows of images that have finished are overwritten. A decoder that sets `skips_ended_rows = True` is handed
    `ended=` (a keyword its `step` must accept) the mask of the rows now in the batch whose hypothesis has ended,
    so that it may skip their work: their outputs never reach a result (an ended row's only candidate is <end>
    again, and its successor has ended too). Their state is still handed back to `step`, so it must stay finite.
    """

    def init(self, features: torch.Tensor) -> tuple[Tensors, Tensors]: ...

    def step(self, tokens: torch.Tensor, memory: Tensors, state: Tensors,
             return_gates: bool = False) -> StepOutput: ...


@dataclass
class Hypothesis:
    """One decoded sentence."""

    tokens: list[int]
    """Generated ids without <start> and <end>."""
    logprob: float
    """Total log-probability, the <end> token included when present."""
    score: float
    """Ranking score: logprob / length ** length_penalty."""
    finished: bool
    """False when the sentence hit max_length without <end>."""
    attention: torch.Tensor | None = None
    """(L, N) attention weights, one row per generated token (the <end> step included when present)."""
    gates: dict[str, torch.Tensor] | None = None
    """input, forget, output, cell: (L, H) each, aligned with `attention`."""


def decode(decoder: StepDecoder, features: torch.Tensor, settings: DecodeConfig, vocab: Vocabulary, *,
           n_best: int = 1, return_attention: bool = False, return_gates: bool = False) -> list[list[Hypothesis]]:
    """`beam_search` with its settings as one `DecodeConfig` and the ids of `vocab`: how the API, evaluation and
    self-critical training run the search, so that no caller copies the settings one field at a time (a new
    setting reaches all of them) and every one is checked by `DecodeConfig`'s own rules (`min_length` above
    `max_length` among them). Variants are `dataclasses.replace(settings, ...)`."""
    search = {field.name: getattr(settings, field.name) for field in dataclasses.fields(settings)}
    return beam_search(decoder, features, start_id=vocab.start_id, end_id=vocab.end_id,
                       banned_ids=vocab.banned_ids, n_best=n_best, return_attention=return_attention,
                       return_gates=return_gates, **search)


def _select(tensors: Tensors, index: torch.Tensor) -> Tensors:
    return {k: v.index_select(0, index) for k, v in tensors.items()}


@torch.inference_mode()
def beam_search(decoder: StepDecoder, features: torch.Tensor, *, start_id: int, end_id: int, beam_size: int = 3,
                max_length: int = 20, min_length: int = 1, length_penalty: float = 0.0, n_best: int = 1,
                return_attention: bool = False, return_gates: bool = False,
                banned_ids: Sequence[int] = (), no_repeat_ngram: int = 0) -> list[list[Hypothesis]]:
    """Decode a batch of images.

    Args:
        decoder: implements `init` and `step`.
        features: (B, N, D) encoder grids.
        start_id, end_id: ids of <start> and <end>.
        beam_size: K beams per image; 1 is greedy.
        max_length: at most this many tokens are generated per hypothesis (<end> included).
        min_length: <end> is forbidden until this many tokens have been generated.
        length_penalty: exponent a of score = logprob / length ** a (0: plain log-probability).
        n_best: hypotheses returned per image, best first (at most beam_size).
        return_attention, return_gates: keep per-token attention maps / LSTM gate activations.
        banned_ids: tokens never generated (the API bans <pad>, <start> and <unk>).
        no_repeat_ngram: n > 0 forbids a word that would repeat an n-gram already in the hypothesis; 3 removes
            the "a black dog and a black dog" loops of a small model without forbidding "in a ... in a".

    Returns:
        For each image, `n_best` hypotheses sorted by score, best first.
    """
    if beam_size < 1 or not 1 <= n_best <= beam_size:
        raise ValueError(f"need beam_size >= 1 and 1 <= n_best <= beam_size, got {beam_size=} {n_best=}")
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if no_repeat_ngram < 0:
        raise ValueError(f"no_repeat_ngram must be >= 0, got {no_repeat_ngram}")
    if not 0 <= length_penalty <= MAX_LENGTH_PENALTY:  # also refuses NaN
        raise ValueError(f"length_penalty must be in [0, {MAX_LENGTH_PENALTY:g}], got {length_penalty}")
    B, K = features.size(0), beam_size
    device = features.device
    memory, state = decoder.init(features)  # per-image work is shared by the beams, not recomputed
    rows = torch.arange(B, device=device).repeat_interleave(K)  # (B*K,) image of each row
    per_image = getattr(decoder, "memory_per_image", False)
    skips_ended = getattr(decoder, "skips_ended_rows", False)
    image_memory = memory
    if not per_image:
        memory = _select(memory, rows)

    # The first step runs one row per image: the K beams of an image are the same hypothesis until it is
    # extended, so its output is copied to the K rows afterwards.
    tokens = torch.full((B,), start_id, dtype=torch.long, device=device)
    logprob = torch.zeros(B, K, device=device)
    logprob[:, 1:] = float("-inf")  # all beams start identical: expand only the first at step one
    lengths = torch.zeros(B * K, device=device)
    finished = torch.zeros(B * K, dtype=torch.bool, device=device)
    history = torch.empty(B * K, 0, dtype=torch.long, device=device)
    attn_hist: torch.Tensor | None = None
    gate_hist: Tensors | None = None
    banned = torch.tensor(list(banned_ids), dtype=torch.long, device=device)
    final = _Final(B, K, max_length, end_id, device)
    active = torch.arange(B, device=device)  # (A,) original index of each image still being searched
    minus_inf = torch.tensor(float("-inf"), device=device)
    end_again: torch.Tensor | None = None  # a finished row's candidates: <end> at no cost, then nothing

    for t in range(max_length):
        A = active.numel()
        if t == 0:
            out = decoder.step(tokens, image_memory, state, return_gates=return_gates)
            out = _expand(out, rows) if K > 1 else out
        elif skips_ended:
            out = decoder.step(tokens, memory, state, return_gates=return_gates, ended=finished)
        else:
            out = decoder.step(tokens, memory, state, return_gates=return_gates)
        logp = torch.log_softmax(out.logits.float(), dim=-1)  # (A*K, V)
        if banned_ids:
            logp.index_fill_(1, banned, float("-inf"))
        if t < min_length:
            logp[:, end_id] = float("-inf")
        if no_repeat_ngram and t >= no_repeat_ngram:
            logp.index_put_(_repeating_words(history, no_repeat_ngram), minus_inf)
        # Only a row's K best words can be among its image's K best extensions (the row's log-probability and
        # length are shared by all its words), so K candidates per row are ranked, not the whole vocabulary:
        # five passes over (A*K, V) tensors fewer per step (the n-gram rule's mask, the finished rows' mask, the
        # totals and their length normalisation). Between exactly equal scores, another of the tied words may win
        # than in a ranking of the whole vocabulary (random or saturated toy models; never seen on trained ones).
        C = min(K, logp.size(1))  # candidates per row (fewer where the vocabulary is smaller than the beam)
        cand, cand_word = logp.topk(C, dim=1)  # (A*K, C) each
        if end_again is None:
            end_again = torch.full((C,), float("-inf"), device=device)
            end_again[0] = 0.0
        # Finished beams: the only continuation is <end> again, free and without growing the length.
        cand = torch.where(finished.unsqueeze(1), end_again, cand)
        cand_word = cand_word.masked_fill_(finished.unsqueeze(1), end_id)
        new_len = (lengths + (~finished).float()).unsqueeze(1)  # (A*K, 1)
        total = logprob.view(A * K, 1) + cand  # (A*K, C)
        ranked = total / new_len.pow(length_penalty) if length_penalty else total
        top_index = ranked.view(A, K * C).topk(K, dim=1).indices  # (A, K)
        beam = torch.div(top_index, C, rounding_mode="floor")  # (A, K)
        word = cand_word.view(A, K * C).gather(1, top_index)  # (A, K)
        offsets = torch.arange(0, A * K, K, device=device).unsqueeze(1)  # (A, 1)
        source = (offsets + beam).view(-1)  # (A*K,) row each new beam extends

        logprob = total.view(A, K * C).gather(1, top_index)  # (A, K)
        lengths = new_len.view(-1).index_select(0, source)
        was_finished = finished.index_select(0, source)
        tokens = word.view(-1)
        finished = was_finished | (tokens == end_id)
        history = torch.cat([history.index_select(0, source), tokens.unsqueeze(1)], dim=1)
        state = _select(out.state, source)
        if return_attention and out.attention is not None:
            step_attn = out.attention.index_select(0, source).unsqueeze(1)  # (A*K, 1, N)
            attn_hist = step_attn if attn_hist is None else torch.cat([attn_hist.index_select(0, source), step_attn], 1)
        if return_gates and out.gates is not None:
            new = {k: v.index_select(0, source).unsqueeze(1) for k, v in out.gates.items()}
            gate_hist = new if gate_hist is None else {
                k: torch.cat([gate_hist[k].index_select(0, source), new[k]], 1) for k in new}
        done = finished.view(A, K).all(1)  # (A,) images whose every beam has ended
        n_done = int(done.sum())
        if n_done == A or t == max_length - 1:
            break
        if n_done and 8 * n_done >= A:
            # Images whose beams have all ended can only repeat <end> at no cost: store them and drop their
            # rows, so the remaining steps run on the unfinished images alone.
            gone, gone_rows = _rows_of(done, K)
            final.store(active[gone], gone_rows, logprob, lengths, finished, history, attn_hist, gate_hist)
            keep, holes, movers = _fill_order(done)
            keep_rows = _rows(keep, K)
            active = active[keep]
            logprob, lengths, finished = logprob[keep], lengths[keep_rows], finished[keep_rows]
            tokens, history, state = tokens[keep_rows], history[keep_rows], _select(state, keep_rows)
            memory = _fill(memory, holes, movers, keep.numel()) if per_image else _select(memory, keep_rows)
            attn_hist = attn_hist[keep_rows] if attn_hist is not None else None
            gate_hist = {k: v[keep_rows] for k, v in gate_hist.items()} if gate_hist is not None else None

    final.store(active, torch.arange(active.numel() * K, device=device), logprob, lengths, finished, history,
                attn_hist, gate_hist)
    logprob, lengths = final.logprob.view(-1), final.lengths
    score = logprob / lengths.clamp(min=1).pow(length_penalty) if length_penalty else logprob
    order = score.view(B, K).argsort(dim=1, descending=True)  # (B, K)
    return _collect(order, final.history, logprob, score, lengths, final.finished, final.attention, final.gates,
                    end_id, n_best)


def _expand(out: StepOutput, rows: torch.Tensor) -> StepOutput:
    """`out` with its rows repeated as `rows` says (one row per image -> the image's K beams)."""
    return StepOutput(out.logits.index_select(0, rows), _select(out.state, rows),
                      out.attention.index_select(0, rows) if out.attention is not None else None,
                      _select(out.gates, rows) if out.gates is not None else None)


def _repeating_words(history: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, words): the words that would complete, after each row's last n - 1 words, an n-gram the row
    already holds (positions of an (R, V) tensor; a pair may repeat)."""
    windows = history.unfold(1, n, 1)  # (R, W, n): every n-gram generated so far
    last = history[:, history.size(1) - (n - 1):]  # (R, n - 1)
    rows, cols = (windows[:, :, :-1] == last.unsqueeze(1)).all(2).nonzero(as_tuple=True)
    return rows, windows[rows, cols, -1]


def _rows_of(mask: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the images where `mask` (A,) is true, and of their K rows each."""
    images = mask.nonzero().view(-1)
    return images, _rows(images, K)


def _rows(images: torch.Tensor, K: int) -> torch.Tensor:
    """The K rows of each image in `images`, image by image."""
    return (images.unsqueeze(1) * K + torch.arange(K, device=images.device)).view(-1)


def _fill_order(done: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(keep, holes, movers) for dropping the `done` (A,) images: the images that stay, in their new order, are
    those already among the first n = A - done.sum() places, with the ones from beyond filling the places
    (`holes`) of the dropped ones; `movers` are where those came from. The per-image memory is then compacted by
    copying the movers alone (`_fill`), at most as many rows as were dropped, not every image that stays (a
    drop of 8 of 64 images: 8 rows instead of 56)."""
    n = done.numel() - int(done.sum())
    holes = done[:n].nonzero().view(-1)
    movers = (~done[n:]).nonzero().view(-1) + n
    keep = torch.arange(n, device=done.device)
    keep[holes] = movers
    return keep, holes, movers


def _fill(tensors: Tensors, holes: torch.Tensor, movers: torch.Tensor, n: int) -> Tensors:
    """`tensors` indexed by `_fill_order`'s keep, in place: the movers' rows copied into the holes, then the
    first n rows (views)."""
    for v in tensors.values():
        v[holes] = v[movers]
    return {k: v[:n] for k, v in tensors.items()}


class _Final:
    """Final beam tensors of every image, filled in as images finish (histories padded with <end>)."""

    def __init__(self, B: int, K: int, max_length: int, end_id: int, device: torch.device):
        self.K = K
        self.logprob = torch.empty(B, K, device=device)
        self.lengths = torch.empty(B * K, device=device)
        self.finished = torch.empty(B * K, dtype=torch.bool, device=device)
        self.history = torch.full((B * K, max_length), end_id, dtype=torch.long, device=device)
        self.attention: torch.Tensor | None = None
        self.gates: Tensors | None = None

    def store(self, images: torch.Tensor, rows: torch.Tensor, logprob: torch.Tensor, lengths: torch.Tensor,
              finished: torch.Tensor, history: torch.Tensor, attention: torch.Tensor | None,
              gates: Tensors | None) -> None:
        """Copy the given active images (original ids `images`, active rows `rows`) into place."""
        K = self.K
        targets = (images.unsqueeze(1) * K + torch.arange(K, device=images.device)).view(-1)
        self.logprob[images] = logprob.view(-1, K)[rows[::K] // K]
        self.lengths[targets] = lengths[rows]
        self.finished[targets] = finished[rows]
        self.history[targets, : history.size(1)] = history[rows]
        if attention is not None:
            if self.attention is None:
                self.attention = attention.new_zeros(self.history.size(0), self.history.size(1), attention.size(2))
            self.attention[targets, : attention.size(1)] = attention[rows]
        if gates is not None:
            if self.gates is None:
                self.gates = {k: v.new_zeros(self.history.size(0), self.history.size(1), v.size(2))
                              for k, v in gates.items()}
            for k, v in gates.items():
                self.gates[k][targets, : v.size(1)] = v[rows]


def _collect(order: torch.Tensor, history: torch.Tensor, logprob: torch.Tensor, score: torch.Tensor,
             lengths: torch.Tensor, finished: torch.Tensor, attn: torch.Tensor | None, gates: Tensors | None,
             end_id: int, n_best: int) -> list[list[Hypothesis]]:
    """Turn the final beam tensors into per-image Python lists (the only per-image loop, after the search)."""
    B, K = order.shape
    history, lengths, finished = history.tolist(), lengths.long().tolist(), finished.tolist()
    logprob, score = logprob.tolist(), score.tolist()
    results = []
    for b in range(B):
        hyps = []
        for k in order[b].tolist():
            r = b * K + k
            if logprob[r] == float("-inf"):
                continue  # a slot that never held a real hypothesis (vocabulary smaller than the beam)
            n = lengths[r]
            words = [w for w in history[r][:n] if w != end_id]
            hyps.append(Hypothesis(
                tokens=words, logprob=logprob[r], score=score[r], finished=finished[r],
                attention=attn[r, :n].clone() if attn is not None else None,
                gates={g: v[r, :n].clone() for g, v in gates.items()} if gates is not None else None,
            ))
            if len(hyps) == n_best:
                break
        results.append(hyps)
    return results
