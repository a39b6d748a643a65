"""Display-ready summaries of one caption's attention and LSTM gates, for the app (no Streamlit here).

`Captioner.caption(..., return_attention=True, return_gates=True)` gives, per generated word (the <end> step
included when it was generated), the attention over the encoder grid (L, g, g) and the LSTM's input, forget
and output gate activations and cell state (L, H), H = number of LSTM cells. These functions average the gates
over the cells, measure how much the cell state moved at each word, find the cells that moved most, and paint
an attention map over the image.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from captioner.api import Caption

END = "<end>"
GATES = ("forget", "input", "output")

GATE_HELP = {
    "forget": "how much of the old memory (cell state) is **kept**: 1 keeps it all, 0 wipes it",
    "input": "how much of the new candidate content is **written** into the memory",
    "output": "how much of the memory is **shown** to the word predictor as the hidden state",
    "cell change": "how far the memory moved at this word: the length of (cell state now - cell state "
                   "before); blank for the first word, whose starting memory is not reported",
}
"""One plain sentence per quantity, shown next to the charts."""


@dataclass
class WordGates:
    """Gate activity while generating one word, averaged over the LSTM's cells."""

    step: int
    word: str
    forget: float
    input: float
    output: float
    cell_change: float
    """L2 norm of c_t - c_(t-1); NaN for the first word, whose starting cell state the API does not return."""

    def as_row(self) -> dict:
        """Table row: 1-based word number, values rounded, an unknown change as None."""
        return {"#": self.step + 1, "word": self.word, "forget": _round(self.forget),
                "input": _round(self.input), "output": _round(self.output),
                "cell change": _round(self.cell_change)}


@dataclass
class CellChange:
    """One LSTM cell at one word: its value before and after, and its gates."""

    cell: int
    before: float
    after: float
    change: float
    forget: float
    input: float
    output: float

    def as_row(self) -> dict:
        """Table row: values rounded, unknown ones (before the first word) as None."""
        return {name: _round(value) for name, value in dataclasses.asdict(self).items()}


def num_steps(caption: Caption) -> int:
    """Decoding steps recorded in the caption's gates or attention (0 when neither was asked for)."""
    if caption.gates is not None:
        return int(caption.gates["forget"].shape[0])
    if caption.attention is not None:
        return int(caption.attention.shape[0])
    return 0


def step_words(caption: Caption) -> list[str]:
    """The word generated at each recorded step: the caption's tokens, then <end> if its step was recorded."""
    steps = num_steps(caption)
    words = list(caption.tokens) + [END] * max(0, steps - len(caption.tokens))
    return words[:steps]


def step_labels(caption: Caption) -> list[str]:
    """Unique, ordered labels for a word picker: '1 a', '2 dog', ..."""
    return [f"{i + 1} {word}" for i, word in enumerate(step_words(caption))]


def cell_changes(cell: np.ndarray) -> np.ndarray:
    """(L, H) cell states -> (L,) norm of the change at each step; the first is NaN (no previous state)."""
    change = np.full(cell.shape[0], np.nan, dtype=np.float64)
    if cell.shape[0] > 1:
        change[1:] = np.linalg.norm(np.diff(cell.astype(np.float64), axis=0), axis=1)  # (L - 1,)
    return change


def gate_table(caption: Caption) -> list[WordGates]:
    """Per word: mean forget, input and output activation over the cells, and the cell-state change.

    Raises:
        ValueError: the caption was made without `return_gates=True`.
    """
    gates = _gates(caption)
    means = {name: gates[name].astype(np.float64).mean(axis=1) for name in GATES}  # (L,) each
    change = cell_changes(gates["cell"])
    return [WordGates(t, word, float(means["forget"][t]), float(means["input"][t]), float(means["output"][t]),
                      float(change[t])) for t, word in enumerate(step_words(caption))]


def top_cells(caption: Caption, step: int, k: int = 8) -> list[CellChange]:
    """The k cells whose value changed most (by absolute change) at `step`, largest first.

    At step 0 the previous cell state is unknown, so cells are ranked by their absolute value instead and
    `before` and `change` are NaN.
    """
    gates = _gates(caption)
    cell = gates["cell"].astype(np.float64)  # (L, H)
    if not 0 <= step < cell.shape[0]:
        raise IndexError(f"step {step} out of range for {cell.shape[0]} steps")
    after = cell[step]
    before = cell[step - 1] if step > 0 else np.full_like(after, np.nan)
    change = after - before
    order = np.argsort(-np.abs(change if step > 0 else after), kind="stable")[:k]
    return [CellChange(int(j), float(before[j]), float(after[j]), float(change[j]),
                       float(gates["forget"][step, j]), float(gates["input"][step, j]),
                       float(gates["output"][step, j])) for j in order]


def describe_word(row: WordGates) -> str:
    """One plain-English sentence about the gates at one word."""
    text = (f"While writing **{row.word}**, the LSTM kept on average {row.forget:.0%} of each memory cell "
            f"(forget gate), wrote {row.input:.0%} of the new candidate content (input gate) and showed "
            f"{row.output:.0%} of its memory to the word predictor (output gate).")
    if not math.isnan(row.cell_change):
        text += f" Its memory moved by {row.cell_change:.3g} (cell change)."
    return text


def attention_overlay(image: Image.Image, weights: np.ndarray, alpha: float = 0.55) -> Image.Image:
    """Paint a (g, g) attention map over `image` (RGB), hot where the model looked.

    The encoder sees the whole image squashed to a square, so the grid is stretched over the full image.
    Colours are scaled by the map's maximum: a uniform map paints one even colour, a peaked one a hot spot.
    """
    from matplotlib import colormaps

    weights = np.asarray(weights, dtype=np.float64)
    peak = weights.max()
    scaled = weights / peak if peak > 0 else np.zeros_like(weights)  # (g, g) in [0, 1]
    grid = Image.fromarray(np.round(scaled * 255).astype(np.uint8))
    smooth = np.asarray(grid.resize(image.size, Image.Resampling.BICUBIC), dtype=np.float64) / 255  # (H, W)
    heat = colormaps["jet"](smooth)[..., :3]  # (H, W, 3)
    base = np.asarray(image.convert("RGB"), dtype=np.float64) / 255
    mixed = (1 - alpha) * base + alpha * heat
    return Image.fromarray(np.round(mixed * 255).astype(np.uint8))


def attention_summary(weights: np.ndarray) -> str:
    """Where the peak is and how peaked the map is, compared with uniform attention."""
    weights = np.asarray(weights)
    rows, cols = weights.shape
    r, c = np.unravel_index(int(np.argmax(weights)), weights.shape)
    return (f"Peak: row {r + 1}, column {c + 1} of the {rows}x{cols} grid with {weights[r, c]:.1%} of the "
            f"attention (uniform would be {1 / weights.size:.1%}).")


def _round(value: float, digits: int = 4) -> float | None:
    return None if math.isnan(value) else round(value, digits)


def _gates(caption: Caption) -> dict[str, np.ndarray]:
    if caption.gates is None:
        raise ValueError(f"{caption.source}: no gates recorded; caption with return_gates=True")
    return caption.gates
