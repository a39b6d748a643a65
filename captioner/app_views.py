"""Plain data for the Streamlit app (no Streamlit here): the sidebar's model card, file names as one line of
markdown, the tags line, the gate heat maps' specs, the CSV and JSON downloads."""

from __future__ import annotations

import io
import re
import unicodedata
from collections.abc import Sequence
from typing import TYPE_CHECKING

from captioner.config import DecodeConfig
from captioner.escapes import text_field
from captioner.models.shipped import dataset_scores, finite_number
from captioner.outputs import CaptionWriter, record, strict_json

if TYPE_CHECKING:
    from captioner.results import Caption, Tag

_INVISIBLE = frozenset({"Cf", "Zl", "Zp"})
"""Unicode categories shown as `\\u202e`: format (bidi overrides, zero widths, BOM), line and paragraph separators."""

TAGS_HINT = ("ImageNet classes that the encoder's own classifier sees, not part of the caption: the two can "
             "disagree (ImageNet has no plain \"person\" class, for one).")


def model_card(info: dict, decode: DecodeConfig) -> list[str]:
    """The model card's fields as short sentences: name, data, training, the selection score and license.

    The selection score is the one recorded when the epoch was picked during training, at the decode settings
    of that moment (`selection.beam_size`, `selection.length_penalty`); when these differ from the checkpoint's
    own decode defaults the line says so, since the README's headline is measured at the defaults.
    """
    if not isinstance(info, dict):
        return [escape_md(str(info))]
    lines = []
    if info.get("name"):
        lines.append(f"**{escape_md(str(info['name']))}**")
    data = info.get("data")
    train, val = _count(info.get("train_images")), _count(info.get("val_images"))
    if train:  # the counts only: the data line below names the data (a name cut from it read "Flickr8k" for
        # the model trained on Flickr8k and COCO, and "csv" for a CSV)
        lines.append(f"Trained on {train:,} images" + (f", model selection on {val:,}." if val else "."))
    if data:
        lines.append(escape_md(str(data)) + ("" if str(data).endswith(".") else "."))
    selection = info.get("selection")
    per = dataset_scores(info)
    if per is not None:  # per dataset: the shipped weights' own evaluation, or the selection's
        lines += [_dev_line(label, s, decode) for label, s in per.items()]
    elif isinstance(selection, dict):
        lines.append(_score_line(selection, info.get("epoch"), decode))
    if info.get("license"):
        lines.append(f"License: {escape_md(str(info['license']))}.")
    return lines


def escape_md(text: str) -> str:
    """`text` with what Streamlit's markdown would interpret escaped (`*`, `_`, `$`, brackets, `<`...).

    Why: a checkpoint's name, data line or vocabulary is text from a file; unescaped, a name holding
    `[...](https://...)` or `![](...)` showed a link or loaded a remote image in the page."""
    return re.sub(r"([\\`*_\[\]$~|<>#!&])", r"\\\1", text)  # & too: "&NoBreak;" would render invisible


def _count(value: object) -> int | None:
    """A checkpoint's image count when it is one (an int, not a bool); None otherwise. Why: "6000" or [1] from a
    hand-written checkpoint ended the app in a format error."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _dev_line(label: str, scores: dict, decode: DecodeConfig) -> str:
    """"flickr8k dev: CIDEr-D 0.601, BLEU-4 0.236 (beam 3)." for one dataset's scores."""
    values = {name: finite_number(scores.get(key)) for key, name in (("CIDEr", "CIDEr-D"), ("Bleu_4", "BLEU-4"))}
    parts = [f"{name} {value:.3f}" for name, value in values.items() if value is not None]
    beam = _count(scores.get("beam_size")) or decode.beam_size
    split = escape_md(str(scores.get("split", "dev")))
    return f"{escape_md(str(label))} {split}: {', '.join(parts) or 'no scores'} (beam {beam})."


def _score_line(sel: dict, epoch, decode: DecodeConfig) -> str:
    """The selection score's sentence. Every field is checked for its type first: a metric of 5 or a length
    penalty of "high" in a hand-written checkpoint ended the app in a traceback."""
    metric = sel.get("metric") if isinstance(sel.get("metric"), str) else "CIDEr"
    value = finite_number(sel.get(metric, sel.get(metric.replace("-D", ""))))
    split = escape_md(str(sel.get("split", "validation")))
    if value is None:
        return f"Selected by {escape_md(metric)} on {escape_md(str(sel.get('split', 'the validation split')))}."
    beam, penalty = _count(sel.get("beam_size")), finite_number(sel.get("length_penalty"))
    at = ", ".join(s for s in (f"beam {beam}" if beam else "",
                               f"length penalty {penalty:g}" if penalty is not None else "") if s)
    text = f"{split} {escape_md(metric)} {value:.3f}" + (f" at {at}" if at else "")
    if _count(epoch):
        text += f": the score that picked epoch {epoch} during training"
    text = text[0].upper() + text[1:] + "."
    if penalty is not None and penalty != float(decode.length_penalty):
        text += f" This model decodes with length penalty {decode.length_penalty} by default."
    return text


def tags_line(tags: Sequence[Tag]) -> str:
    """"The encoder sees: pizza 93%, plate 4%, ...": the tags with their probabilities, most probable first, so
    that a caption at odds with what the encoder recognises shows it beside the caption."""
    return "The encoder sees: " + ", ".join(f"{t.label} {_percent(t.probability)}" for t in tags)


def _percent(p: float) -> str:
    return "<1%" if p < 0.005 else f"{p:.0%}"


def heatmap_spec(quantity: str, step: int) -> dict:
    """Vega-Lite words x cells heat map of one quantity, with R/H marks and the picked word outlined."""
    signed = quantity == "cell change"
    color = ({"scheme": "redblue", "reverse": True, "domainMid": 0} if signed
             else {"scheme": "viridis", "domain": [0, 1]})
    title = ("cell change (new value - old value)" if signed else f"{quantity} gate (0 = closed, 1 = open)")
    pos = {"x": {"field": "cell", "type": "ordinal", "sort": None, "title": "cell"},
           "y": {"field": "word", "type": "ordinal", "sort": None, "title": None,
                 "axis": {"labelOverlap": False}}}
    return {"title": title, "height": {"step": 18}, "layer": [
        {"mark": "rect", "encoding": {**pos, "color": {"field": "value", "type": "quantitative",
                                                        "scale": color, "title": None},
                                      "stroke": {"condition": {"test": f"datum.step == {step}", "value": "black"},
                                                 "value": None},
                                      "tooltip": [{"field": "word"}, {"field": "cell"},
                                                  {"field": "value", "format": ".4f"}, {"field": "mark"}]}},
        {"mark": {"type": "text", "fontWeight": "bold", "color": "white"},
         "transform": [{"filter": "datum.mark != ''"}],
         "encoding": {**pos, "text": {"field": "mark", "type": "nominal"}}},
    ], "transform": [{"calculate": "datum.mark == 'reset' ? 'R' : datum.mark == 'held' ? 'H' : ''",
                      "as": "mark"}]}


def one_line(text: str) -> str:
    """`text` with its control characters written visibly, as the text output writes them (`text_field`: tab,
    newline and CR as `\\t`, `\\n`, `\\r`, the others as `\\x07`), and its invisible characters too.

    Why: a file name holding a newline split its header, the rest of the name shown as a paragraph of its own,
    and other control characters were invisible, so the name shown was not the file's.
    """
    text = text_field(text)
    # Format and separator characters too (U+202E turned "photo<U+202E>gpj.png" into "photognp.jpg" on screen).
    return "".join((f"\\u{ord(c):04x}" if ord(c) <= 0xFFFF else f"\\U{ord(c):08x}")
                   if unicodedata.category(c) in _INVISIBLE else c for c in text)


def md_name(text: str) -> str:
    """A file name (or a message naming one) as one line of markdown: controls shown, then escaped."""
    return escape_md(one_line(text))


def results_csv(captions: Sequence[Caption], n_best: int = 1) -> str:
    """The CSV that `captioner caption --format csv` writes: one row per image (the one serialiser, outputs)."""
    out = io.StringIO()
    writer = CaptionWriter(out, "csv", n_best)
    for c in captions:
        writer.write(c)
    return out.getvalue()


def results_json(captions: Sequence[Caption], settings: dict, n_best: int = 1) -> str:
    """The settings and the CLI's JSON record per image (`captioner.outputs.record`), written as the JSON lines
    are (`strict_json`): NaN as null, letters as UTF-8 (json.dumps' default wrote "café" as "caf\\u00e9"), the
    controls and line separators as `\\u` escapes."""
    records = [record(c, n_best) for c in captions]
    return strict_json({"settings": settings, "results": records}, indent=2)
