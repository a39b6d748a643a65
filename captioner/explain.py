"""Display-ready summaries of one caption's attention and LSTM gates, for the app (no Streamlit here).

`Captioner.caption(..., return_attention=True, return_gates=True)` gives, per generated word (the <end> step
included when it was generated), the attention over the encoder grid (L, g, g) and the LSTM's input, forget
and output gate activations and cell state (L, H), H = number of LSTM cells. These functions average the gates
over the cells, measure how much the cell state moved at each word, find the cells that moved most, and paint
an attention map over the image on a fixed, stated colour scale.

The per-cell views (`moving_cells`, `resets`, `held`, `gate_heatmap`) show what the cell averages hide: the
mean gates sit near 0.5 for every word, while single cells are wiped and rewritten (forget near 0, input
near 1) at the words that start something new.
"""

from __future__ import annotations

import dataclasses
import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from captioner.app_views import escape_md
from captioner.results import Caption

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


RESET_FORGET = 0.1
"""A cell is *reset* at a word when its forget gate is below this and its input gate above 1 - this."""
HELD_FORGET = 0.9
"""A cell is *held* at a word when its forget gate is above this and its input gate below 1 - this."""


def resets(gates: dict[str, np.ndarray], forget_below: float = RESET_FORGET,
           input_above: float = 1 - RESET_FORGET) -> np.ndarray:
    """(L, H) bool: the cells wiped and rewritten at each word (forget gate near 0, input gate near 1)."""
    return (gates["forget"] < forget_below) & (gates["input"] > input_above)


def held(gates: dict[str, np.ndarray], forget_above: float = HELD_FORGET,
         input_below: float = 1 - HELD_FORGET) -> np.ndarray:
    """(L, H) bool: the cells kept untouched at each word (forget gate near 1, input gate near 0)."""
    return (gates["forget"] > forget_above) & (gates["input"] < input_below)


def moving_cells(gates: dict[str, np.ndarray], k: int = 16) -> list[int]:
    """The k cells that do most over the caption, most active first.

    A cell's activity is the total absolute change of its value from word to word, plus 1 for every reset (so a
    wiped and rewritten cell is shown even when its new value happens to be close to the old one). With a
    single word, cells are ranked by the size of their value.
    """
    cell = np.asarray(gates["cell"], dtype=np.float64)  # (L, H)
    moved = np.abs(np.diff(cell, axis=0)).sum(axis=0) if cell.shape[0] > 1 else np.abs(cell[0])  # (H,)
    score = moved + resets(gates).sum(axis=0)
    return [int(j) for j in np.argsort(-score, kind="stable")[:k]]


def gate_heatmap(caption: Caption, cells: list[int]) -> list[dict]:
    """Rows for a words x cells heat map: one per (word, cell, quantity) with quantity one of GATES or
    "cell change" (c_t - c_(t-1); None at the first word), and `mark` "reset", "held" or ""."""
    gates = _gates(caption)
    cell = gates["cell"].astype(np.float64)  # (L, H)
    change = np.full_like(cell, np.nan)
    change[1:] = np.diff(cell, axis=0)
    reset, keep = resets(gates), held(gates)
    rows = []
    for t, word in enumerate(step_words(caption)):
        for j in cells:
            mark = "reset" if reset[t, j] else "held" if keep[t, j] else ""
            values = {g: float(gates[g][t, j]) for g in GATES} | {"cell change": _round(change[t, j])}
            rows += [{"step": t, "word": f"{t + 1} {word}", "cell": j, "quantity": q, "value": v, "mark": mark}
                     for q, v in values.items()]
    return rows


def describe_resets(caption: Caption, max_words: int = 6) -> str:
    """One sentence naming the words at which cells were wiped and rewritten, and how many."""
    gates = _gates(caption)
    per_word = resets(gates).sum(axis=1)  # (L,)
    words = step_words(caption)
    hits = [(int(n), f"**{escape_md(words[t])}** (word {t + 1}: {n} cell{'s' if n > 1 else ''})")
            for t, n in enumerate(per_word) if n]
    if not hits:
        return ("No cell was reset in this caption (no word had a cell with forget gate below "
                f"{RESET_FORGET} and input gate above {1 - RESET_FORGET:.1f}).")
    hits.sort(key=lambda h: -h[0])
    shown = ", ".join(text for _, text in hits[:max_words]) + (", ..." if len(hits) > max_words else "")
    return f"Cells wiped and rewritten (reset) at: {shown}."


def describe_word(row: WordGates) -> str:
    """One plain-English sentence about the gates at one word."""
    text = (f"While writing **{escape_md(row.word)}**, the LSTM kept on average {row.forget:.0%} of each memory cell "
            f"(forget gate), wrote {row.input:.0%} of the new candidate content (input gate) and showed "
            f"{row.output:.0%} of its memory to the word predictor (output gate).")
    if not math.isnan(row.cell_change):
        text += f" Its memory moved by {row.cell_change:.3g} (cell change)."
    return text


ATTENTION_CMAP = "jet"


def attention_overlay(image: Image.Image, weights: np.ndarray, alpha: float = 0.55,
                      vmax: float | None = None) -> Image.Image:
    """Paint a (g, g) attention map over `image` (RGB), hot where the model looked.

    The encoder sees the whole image squashed to a square, so the grid is stretched over the full image.
    Colours run from 0 (cold) to `vmax` (hot); pass one `vmax` for every word of a caption (e.g. the largest
    weight over the caption, `caption.attention.max()`) so colours compare between words. Without it the map's
    own maximum is used: a uniform map paints one even colour, a peaked one a hot spot.
    """
    from matplotlib import colormaps

    weights = np.asarray(weights, dtype=np.float64)
    peak = weights.max() if vmax is None else vmax
    scaled = np.clip(weights / peak, 0, 1) if peak > 0 else np.zeros_like(weights)  # (g, g) in [0, 1]
    grid = Image.fromarray(np.round(scaled * 255).astype(np.uint8))
    smooth = np.asarray(grid.resize(image.size, Image.Resampling.BICUBIC), dtype=np.float64) / 255  # (H, W)
    heat = colormaps[ATTENTION_CMAP](smooth)[..., :3]  # (H, W, 3)
    base = np.asarray(image.convert("RGB"), dtype=np.float64) / 255
    mixed = (1 - alpha) * base + alpha * heat
    return Image.fromarray(np.round(mixed * 255).astype(np.uint8))


def attention_legend(vmax: float, cells: int, width: int = 448) -> Image.Image:
    """A horizontal colour bar for `attention_overlay(..., vmax=vmax)`: ticks in % of the attention, and a
    mark at uniform attention (1 / cells, e.g. 1.2% on a 9x9 grid)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(width / 100, 0.75), dpi=100)
    try:
        gradient = np.linspace(0, vmax, 256)[None, :]  # (1, 256)
        ax.imshow(gradient, aspect="auto", cmap=ATTENTION_CMAP, extent=(0, vmax * 100, 0, 1))
        uniform = 100 / cells
        ax.axvline(uniform, color="white", linewidth=2)
        ax.set_yticks([])
        ax.set_xlabel(f"share of the attention (%); white line: uniform, {uniform:.1f}%", fontsize=8)
        ax.tick_params(labelsize=8)
        fig.tight_layout(pad=0.2)
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
    finally:
        plt.close(fig)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


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
