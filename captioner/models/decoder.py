"""LSTM caption decoders: Show, Attend and Tell (soft attention) and Show and Tell (no attention).

Both expose one protocol that `captioner.decoding` drives:

- `init(features) -> (memory, state)`: per-image work done once (the tuned encoder head, the feature projection,
  the attention keys) goes in `memory`, which beam search expands to the beams once and never reorders; `state`
  (h, c) is reordered as beams are chosen.
- `step(tokens, memory, state, return_gates) -> StepOutput`: one word for every row of the batch.
- `forward(features, captions)`: teacher forcing for training, built on the same `advance` (the recurrent part of
  `step`) and output layer; it returns `TeacherForced` (packed logits, their targets and places).

The output layer reads the new hidden state, or with `model.deep_output` the "deep output" of Show, Attend and
Tell: tanh(L_h h + L_z context + E word), so the context and the word just read reach the prediction directly
instead of only through the LSTM's memory. Dropout (`model.dropout`) acts on whichever of the two the output layer
reads.

Gate activations are computed on request from the `nn.LSTMCell`'s own weights, so the fused cell keeps the
normal path fast and the explanation is of exactly the model that produced the caption.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from captioner.config import ModelConfig

Tensors = dict[str, torch.Tensor]


@dataclass
class StepOutput:
    """Result of one decoding step for a batch of R rows."""

    logits: torch.Tensor  # (R, V)
    state: Tensors  # h, c: (R, H)
    attention: torch.Tensor | None = None  # (R, N) weights over the grid, None without attention
    gates: Tensors | None = None  # input, forget, output, cell: (R, H), only when asked


def lstm_cell_with_gates(cell: nn.LSTMCell, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, Tensors]:
    """The same update as `cell(x, (h, c))`, unfused so the gates can be returned.

    PyTorch orders the stacked gate weights input, forget, cell candidate, output.
    """
    z = F.linear(x, cell.weight_ih, cell.bias_ih) + F.linear(h, cell.weight_hh, cell.bias_hh)  # (R, 4H)
    i, f, g, o = z.chunk(4, dim=1)
    i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
    c_new = f * c + i * g
    h_new = o * torch.tanh(c_new)
    return h_new, c_new, {"input": i, "forget": f, "output": o, "cell": c_new}


@dataclass
class Recurrence:
    """The recurrent part of one step for R rows: what `forward` (teacher forcing) and `step` (decoding) share,
    so both feed the output layer the same readout."""

    state: Tensors  # h, c: (R, H)
    readout: torch.Tensor  # (R, H), or (R, E) with the deep output: what the output layer reads
    attention: torch.Tensor | None = None  # (R, N)
    gates: Tensors | None = None


@dataclass
class TeacherForced:
    """Teacher-forced predictions of a caption batch: P positions computed, packed step after step."""

    logits: torch.Tensor  # (P, V)
    targets: torch.Tensor  # (P,) the next token of the captions given (<unk> where word dropout blanked it)
    rows: torch.Tensor  # (P,) caption of each row
    steps: torch.Tensor  # (P,) position of each row: it predicts token steps + 1
    shape: tuple[int, int]  # (B, T - 1)
    attention: torch.Tensor | None  # (B, T - 1, N), zero where skipped; None without attention

    def padded(self) -> torch.Tensor:
        """Logits as (B, T - 1, V), zero at the positions past a caption's end that were skipped."""
        B, steps = self.shape
        return self.logits.new_zeros(B, steps, self.logits.size(1)).index_put((self.rows, self.steps), self.logits)


def feature_size(cfg: ModelConfig, encoder_dim: int) -> int:
    """Width of the grid features attention reads, after `_projection`."""
    return cfg.feature_dim or cfg.encoder_head or encoder_dim


def _projection(cfg: ModelConfig, encoder_dim: int) -> nn.Module:
    """Per-image layers before attention: the tuned encoder head (1x1 convolution + ReLU6, `model.encoder_head`),
    which reads the encoder's grid, then the projection to `model.feature_dim` (+ ReLU); either may be absent.
    Without a head the layers, and so the weight names, are those of checkpoints written before it existed."""
    layers: list[nn.Module] = []
    width = encoder_dim
    if cfg.encoder_head:
        layers += [nn.Linear(width, cfg.encoder_head), nn.ReLU6()]
        width = cfg.encoder_head
    if cfg.feature_dim:
        layers += [nn.Linear(width, cfg.feature_dim), nn.ReLU()]
    return nn.Sequential(*layers) if layers else nn.Identity()


class _LSTMDecoder(nn.Module):
    """Shared parts: embeddings, the output layer, the recurrent step and teacher forcing."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, encoder_dim: int, lstm_input: int):
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.encoder_dim = encoder_dim
        self.feature_size = feature_size(cfg, encoder_dim)
        self.project = _projection(cfg, encoder_dim)
        self.embed = nn.Embedding(vocab_size, cfg.embed_dim)
        self.lstm = nn.LSTMCell(lstm_input, cfg.hidden_dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.feature_dropout = nn.Dropout(cfg.feature_dropout)
        self.out = nn.Linear(cfg.embed_dim if cfg.deep_output else cfg.hidden_dim, vocab_size)

    @property
    def encoder_head(self) -> nn.Linear | None:
        """The tuned encoder head (`model.encoder_head`), None without one."""
        return self.project[0] if self.cfg.encoder_head else None

    def _recur(self, x: torch.Tensor, state: Tensors, return_gates: bool) -> tuple[Tensors, Tensors | None]:
        if return_gates:
            h, c, gates = lstm_cell_with_gates(self.lstm, x, state["h"], state["c"])
            return {"h": h, "c": c}, gates
        h, c = self.lstm(x, (state["h"], state["c"]))
        return {"h": h, "c": c}, None

    def forward(self, features: torch.Tensor, captions: torch.Tensor, image_index: torch.Tensor | None = None,
                lengths: torch.Tensor | None = None) -> TeacherForced:
        """Teacher forcing.

        Args:
            features: (I, N, D) encoder grids.
            captions: (B, T) token ids starting with <start>; position t predicts token t + 1.
            image_index: (B,) image of each caption, so several captions share one image's per-image work
                (projection, attention keys); None means caption b belongs to image b.
            lengths: (B,) tokens per caption including <start> and <end>, sorted in decreasing order; steps past
                a caption's end are then skipped instead of computed on padding.

        Returns:
            The logits of the positions computed, packed (padding positions cost neither the output layer nor
            the loss), with their targets and places; see `TeacherForced`.
        """
        memory, state = self.init(features)
        if image_index is not None:
            memory = {k: v.index_select(0, image_index) for k, v in memory.items()}
            state = {k: v.index_select(0, image_index) for k, v in state.items()}
        B, T = captions.shape
        steps = T - 1
        active = [B] * steps
        if lengths is not None:
            counts = (lengths.unsqueeze(0) > torch.arange(1, T, device=lengths.device).unsqueeze(1)).sum(1)
            active = counts.tolist()  # rows still inside their caption at each step (a prefix: sorted lengths)
        readouts, attention = [], []
        for t in range(steps):
            n = active[t]
            if n == 0:
                break
            if n < state["h"].size(0):
                state = {k: v[:n] for k, v in state.items()}
                memory = {k: v[:n] for k, v in memory.items()}
            rec = self.advance(captions[:n, t], memory, state)
            state = rec.state
            readouts.append(rec.readout)
            if rec.attention is not None:
                attention.append(rec.attention)
        # The output layer runs once on every step's readout, packed step after step.
        device = captions.device
        rows = torch.cat([torch.arange(h.size(0), device=device) for h in readouts])
        cols = torch.cat([torch.full((h.size(0),), t, device=device) for t, h in enumerate(readouts)])
        logits = self.out(self.dropout(torch.cat(readouts)))  # (P, V)
        alphas = None
        if attention:  # one out-of-place index_put: per-step writes would make backward copy the whole tensor
            packed_alpha = torch.cat(attention)
            alphas = packed_alpha.new_zeros(B, steps, packed_alpha.size(1)).index_put((rows, cols), packed_alpha)
        return TeacherForced(logits, captions[rows, cols + 1], rows, cols, (B, steps), alphas)

    def init(self, features: torch.Tensor) -> tuple[Tensors, Tensors]:
        raise NotImplementedError

    def advance(self, tokens: torch.Tensor, memory: Tensors, state: Tensors, return_gates: bool = False
                ) -> Recurrence:
        """The recurrent part of a step: the new state and what the output layer reads."""
        raise NotImplementedError

    def step(self, tokens: torch.Tensor, memory: Tensors, state: Tensors, return_gates: bool = False) -> StepOutput:
        """One word for every row: `advance`, then the output layer on its readout."""
        rec = self.advance(tokens, memory, state, return_gates)
        return StepOutput(self.out(self.dropout(rec.readout)), rec.state, rec.attention, rec.gates)


class AttentionDecoder(_LSTMDecoder):
    """Show, Attend and Tell (Xu et al. 2015) with soft additive attention and a gating scalar on the context."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, encoder_dim: int):
        feat = feature_size(cfg, encoder_dim)
        super().__init__(cfg, vocab_size, encoder_dim, cfg.embed_dim + feat)
        self.att_feat = nn.Linear(feat, cfg.attention_dim)
        self.att_hidden = nn.Linear(cfg.hidden_dim, cfg.attention_dim)
        self.att_score = nn.Linear(cfg.attention_dim, 1)
        self.gate = nn.Linear(cfg.hidden_dim, feat)  # beta in the paper
        self.init_h = nn.Linear(feat, cfg.hidden_dim)
        self.init_c = nn.Linear(feat, cfg.hidden_dim)
        if cfg.deep_output:  # L_h and L_z of the paper; E is the input embedding
            self.readout_hidden = nn.Linear(cfg.hidden_dim, cfg.embed_dim)
            self.readout_context = nn.Linear(feat, cfg.embed_dim, bias=False)

    def init(self, features: torch.Tensor) -> tuple[Tensors, Tensors]:
        feats = self.feature_dropout(self.project(features))  # (B, N, F)
        keys = self.att_feat(feats)  # (B, N, A): the attention projection, computed once per image
        mean = feats.mean(1)  # (B, F)
        state = {"h": torch.tanh(self.init_h(mean)), "c": torch.tanh(self.init_c(mean))}
        return {"feats": feats, "keys": keys}, state

    def advance(self, tokens: torch.Tensor, memory: Tensors, state: Tensors, return_gates: bool = False
                ) -> Recurrence:
        h = state["h"]  # (R, H)
        energy = self.att_score(torch.tanh(memory["keys"] + self.att_hidden(h).unsqueeze(1))).squeeze(2)  # (R, N)
        alpha = torch.softmax(energy, dim=1)  # (R, N)
        context = torch.bmm(alpha.unsqueeze(1), memory["feats"]).squeeze(1)  # (R, F)
        context = torch.sigmoid(self.gate(h)) * context
        words = self.embed(tokens)  # (R, E)
        new_state, gates = self._recur(torch.cat([words, context], dim=1), state, return_gates)
        readout = new_state["h"]
        if self.cfg.deep_output:
            readout = torch.tanh(self.readout_hidden(readout) + self.readout_context(context) + words)  # (R, E)
        return Recurrence(new_state, readout, alpha, gates)


class ShowTellDecoder(_LSTMDecoder):
    """Show and Tell (Vinyals et al. 2015): the image vector is the LSTM's first input, then only words."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, encoder_dim: int):
        super().__init__(cfg, vocab_size, encoder_dim, cfg.embed_dim)
        self.image_embed = nn.Linear(feature_size(cfg, encoder_dim), cfg.embed_dim)

    def init(self, features: torch.Tensor) -> tuple[Tensors, Tensors]:
        image = self.feature_dropout(self.project(features)).mean(1)  # (B, F)
        zeros = image.new_zeros(image.size(0), self.cfg.hidden_dim)
        state, _ = self._recur(self.image_embed(image), {"h": zeros, "c": zeros}, False)
        return {}, state

    def advance(self, tokens: torch.Tensor, memory: Tensors, state: Tensors, return_gates: bool = False
                ) -> Recurrence:
        new_state, gates = self._recur(self.embed(tokens), state, return_gates)
        return Recurrence(new_state, new_state["h"], None, gates)


def build_decoder(cfg: ModelConfig, vocab_size: int, encoder_dim: int) -> _LSTMDecoder:
    """Decoder named by `cfg.decoder`."""
    if cfg.decoder == "attention":
        return AttentionDecoder(cfg, vocab_size, encoder_dim)
    if cfg.decoder == "show_tell":
        return ShowTellDecoder(cfg, vocab_size, encoder_dim)
    raise ValueError(f"unknown decoder {cfg.decoder!r}; available: attention, show_tell")
