"""Plain data for the Streamlit app (no Streamlit here): the sidebar's model card, the tags line, the gate heat
maps' specs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from captioner.config import DecodeConfig
from captioner.models.shipped import dataset_scores

if TYPE_CHECKING:
    from captioner.results import Tag

TAGS_HINT = ("ImageNet classes that the encoder's own classifier sees, not part of the caption: the two can "
             "disagree (ImageNet has no plain \"person\" class, for one).")


def model_card(info: dict, decode: DecodeConfig) -> list[str]:
    """The model card's fields as short sentences: name, data, training, the selection score and license.

    The selection score is the one recorded when the epoch was picked during training, at the decode settings
    of that moment (`selection.beam_size`, `selection.length_penalty`); when these differ from the checkpoint's
    own decode defaults the line says so, since the README's headline is measured at the defaults.
    """
    if not isinstance(info, dict):
        return [str(info)]
    lines = []
    if info.get("name"):
        lines.append(f"**{info['name']}**")
    data = info.get("data")
    train, val = info.get("train_images"), info.get("val_images")
    if train:  # the counts only: the data line below names the data (a name cut from it read "Flickr8k" for
        # the model trained on Flickr8k and COCO, and "csv" for a CSV)
        lines.append(f"Trained on {train:,} images" + (f", model selection on {val:,}." if val else "."))
    if data:
        lines.append(str(data) + ("" if str(data).endswith(".") else "."))
    selection = info.get("selection")
    per = dataset_scores(info)
    if per is not None:  # per dataset: the shipped weights' own evaluation, or the selection's
        lines += [_dev_line(label, s, decode) for label, s in per.items()]
    elif isinstance(selection, dict):
        lines.append(_score_line(selection, info.get("epoch"), decode))
    if info.get("license"):
        lines.append(f"License: {info['license']}.")
    return lines


def _dev_line(label: str, scores: dict, decode: DecodeConfig) -> str:
    """"flickr8k dev: CIDEr-D 0.601, BLEU-4 0.236 (beam 3)." for one dataset's scores."""
    parts = [f"{name} {scores[key]:.3f}" for key, name in (("CIDEr", "CIDEr-D"), ("Bleu_4", "BLEU-4"))
             if isinstance(scores.get(key), (int, float))]
    beam = scores.get("beam_size", decode.beam_size)
    return f"{label} {scores.get('split', 'dev')}: {', '.join(parts) or 'no scores'} (beam {beam})."


def _score_line(sel: dict, epoch, decode: DecodeConfig) -> str:
    metric = sel.get("metric", "CIDEr")
    value = sel.get(metric, sel.get(metric.replace("-D", "")))
    if not isinstance(value, (int, float)):
        return f"Selected by {metric} on {sel.get('split', 'the validation split')}."
    beam, penalty = sel.get("beam_size"), sel.get("length_penalty")
    at = ", ".join(s for s in (f"beam {beam}" if beam else "",
                               f"length penalty {penalty}" if penalty is not None else "") if s)
    text = f"{sel.get('split', 'validation')} {metric} {value:.3f}" + (f" at {at}" if at else "")
    if epoch:
        text += f": the score that picked epoch {epoch} during training"
    text = text[0].upper() + text[1:] + "."
    if penalty is not None and float(penalty) != float(decode.length_penalty):
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
