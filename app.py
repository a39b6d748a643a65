"""Streamlit app: upload images, read their captions, see where the model looked and what its LSTM gates did.

    streamlit run app.py                                          # the shipped models (general first)
    CAPTIONER_CHECKPOINT=runs/x/best.safetensors streamlit run app.py
    CAPTIONER_CHECKPOINT=runs/r50/best.safetensors CAPTIONER_ENCODER_WEIGHTS=resnet50.pth streamlit run app.py
    captioner app --checkpoint runs/x/best.safetensors --server.port 8502   # the same, from the CLI

UI only: every model operation goes through `captioner.Captioner`; the gate and attention summaries come from
`captioner.explain`.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from captioner.runtime import openmp

openmp.limit_spinning()  # before anything imports torch: the encoder's threads and torch's share the cores

import streamlit as st
from PIL import Image

from captioner import Caption, Captioner, CheckpointError
from captioner.app_views import (
    TAGS_HINT,
    escape_md,
    heatmap_spec,
    md_name,
    model_card,
    results_csv,
    results_json,
    tags_line,
)
from captioner.explain import (
    GATE_HELP,
    attention_legend,
    attention_overlay,
    attention_summary,
    describe_resets,
    describe_word,
    gate_heatmap,
    gate_table,
    moving_cells,
    step_labels,
    top_cells,
)
from captioner.images import open_image
from captioner.models.encoder import EncoderError
from captioner.models.shipped import list_models

CHECKPOINT_ENV = "CAPTIONER_CHECKPOINT"
ENCODER_WEIGHTS_ENV = "CAPTIONER_ENCODER_WEIGHTS"
# Per file, in Streamlit's megabytes (10^6 bytes); .streamlit/config.toml sets the same server.maxUploadSize.
MAX_UPLOAD_MB = 20
MAX_UPLOAD_BYTES = MAX_UPLOAD_MB * 1_000_000
IMAGE_TYPES = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")  # captioner.images.SUPPORTED_FORMATS
HEATMAP_CELLS = 16
PREVIEW_SIZE = 448


@dataclass(frozen=True)
class Settings:
    """Decoding options chosen in the sidebar."""

    beam_size: int
    n_best: int
    max_length: int
    length_penalty: float


@dataclass(frozen=True)
class Upload:
    """One uploaded file: its name, a widget-key-safe id and its bytes."""

    name: str
    key: str
    data: bytes


@st.cache_resource(show_spinner="Loading the model...")
def load_captioner(path: str | None, encoder_weights: str | None = None) -> Captioner:
    """The model, loaded once per checkpoint path and shared by all sessions (a Captioner is thread-safe).

    Warmed up here so the first upload does not pay for building the fast inference paths.
    """
    cap = Captioner.load(path, encoder_weights=encoder_weights)
    cap.warmup()
    return cap


@st.cache_data(max_entries=64, show_spinner=False)
def preview(data: bytes) -> Image.Image:
    """The upright RGB image, shrunk for display and the attention overlay."""
    image = open_image(data, PREVIEW_SIZE)
    image.thumbnail((PREVIEW_SIZE, PREVIEW_SIZE))
    return image


def caption_uploads(cap: Captioner, uploads: list[Upload], settings: Settings, memo: dict) -> list[Caption]:
    """One Caption per upload, in order; too-large and unreadable files carry an error naming the file.

    `memo` (the session's) keeps each file's Caption per settings, so picking a word or adding a file decodes
    only what is new; the new files go through the model as one batch. Entries of removed files are dropped.
    """
    keys = [(upload.key, settings) for upload in uploads]
    new = [(key, u) for key, u in zip(keys, uploads) if key not in memo and len(u.data) <= MAX_UPLOAD_BYTES]
    if new:
        results = cap.caption([u.data for _, u in new], beam_size=settings.beam_size, n_best=settings.n_best,
                              max_length=settings.max_length,
                              min_length=min(cap.decode_defaults.min_length, settings.max_length),
                              length_penalty=settings.length_penalty, return_attention=True,
                              return_gates=True, return_tags=cap.supports_tags, on_error="skip",
                              names=[u.name for _, u in new])
        for (key, _), result in zip(new, results):
            memo[key] = result
    for key, upload in zip(keys, uploads):
        if key not in memo:
            reason = f"file too large ({len(upload.data) / 1e6:.1f} MB; the limit is {MAX_UPLOAD_MB} MB)"
            memo[key] = Caption(source=upload.name, error=f"{upload.name}: {reason}")
    for stale in memo.keys() - set(keys):
        del memo[stale]
    return [memo[key] for key in keys]


def choose_model_ui() -> str | None:
    """The checkpoint named by $CAPTIONER_CHECKPOINT, else the shipped model picked in the sidebar (the default
    model first); None when no shipped model is installed (load_ui then explains)."""
    path = os.environ.get(CHECKPOINT_ENV) or None
    if path:
        return path
    names = [m.name for m in list_models()]
    if len(names) < 2:
        return names[0] if names else None
    return st.sidebar.selectbox("Model", names, key="model", help="Shipped models (`captioner models`); "
                                "the first is the default of the API and the CLI.")


def load_ui() -> tuple[Captioner, str | None] | None:
    """Load the model named by $CAPTIONER_CHECKPOINT, else the chosen shipped one; explain any failure."""
    path = choose_model_ui()
    # The weights file goes with $CAPTIONER_CHECKPOINT's model alone: the shipped ones carry their own.
    from_env = bool(os.environ.get(CHECKPOINT_ENV)) and path == os.environ[CHECKPOINT_ENV]
    weights = (os.environ.get(ENCODER_WEIGHTS_ENV) or None) if from_env else None
    try:
        return load_captioner(path, weights), path
    except CheckpointError as exc:
        hint = ("The shipped model is not installed yet (it is trained with `captioner train`). "
                if path is None else "")
        st.error(f"No usable model: {exc}\n\n{hint}To use another checkpoint, start the app with "
                 f"`{CHECKPOINT_ENV}=/path/to/model.safetensors streamlit run app.py`.")
    except EncoderError as exc:  # a model whose encoder's weights no package ships (resnet50), or a bad file
        hint = ("" if weights else f"\n\nName its encoder's weights file in `{ENCODER_WEIGHTS_ENV}` "
                "(`captioner app --encoder-weights FILE` sets it).")
        st.error(f"The model could not be loaded: {exc}{hint}")
    except (ValueError, OSError) as exc:
        st.error(f"The model could not be loaded: {exc}")
    return None


def sidebar_ui(cap: Captioner, model: str | None = None) -> Settings:
    """Decoding controls, defaults taken from the checkpoint. Their keys carry the `model` they are for: with
    one set of keys, a switch of model kept the other model's values (the flickr8k model showed the general
    one's length penalty 0.7 beside its card saying it decodes with 0.5)."""
    d = cap.decode_defaults
    key = f"{model or 'default'}:"
    st.sidebar.header("Decoding")
    beam = st.sidebar.slider("Beam size", 1, max(10, d.beam_size), d.beam_size, key=key + "beam_size",
                             help="How many partial captions are kept at each step; 1 is greedy decoding.")
    if beam > 1:
        # The widget's state goes when greedy decoding hides it; a copy outside it brings the choice back.
        state = st.session_state
        state[key + "n_best"] = min(state.get(key + "n_best", state.get(key + "n_best_kept", 3)), beam)
        n_best = st.sidebar.slider("Alternatives (n-best)", 1, beam, key=key + "n_best",
                                   help="How many of the best finished captions to list.")
        st.session_state[key + "n_best_kept"] = n_best
    else:
        n_best = 1
        st.sidebar.caption("Alternatives (n-best): 1 with greedy decoding.")
    max_length = st.sidebar.slider("Maximum length (words)", 1, max(40, d.max_length), d.max_length,
                                   key=key + "max_length")
    penalty = st.sidebar.slider("Length penalty", 0.0, 2.0, float(d.length_penalty), 0.1,
                                key=key + "length_penalty", help="0 ranks by total log-probability (favours "
                                                                 "short captions); higher values favour longer ones.")
    return Settings(beam, n_best, max_length, penalty)


def model_info_ui(cap: Captioner, path: str | None) -> None:
    """What the model is and, when the checkpoint says so, what it was trained on and how it scores."""
    st.sidebar.header("Model")
    cfg = cap.model.model_cfg
    tuned = ", last layer tuned for captioning" if cfg.encoder_head else ""
    st.sidebar.markdown(f"- checkpoint: `{os.path.basename(path) if path else 'shipped model'}`\n"
                        f"- encoder: `{cap.encoder.name}`{tuned}\n- decoder: `{cfg.decoder}`, {cfg.hidden_dim} LSTM "
                        f"cells{', deep output' if cfg.deep_output else ''}\n- vocabulary: {len(cap.vocab)} words")
    info = cap.model.info
    if not info:
        st.sidebar.caption("This checkpoint records no training data or scores.")
        return
    st.sidebar.markdown("\n".join(f"- {line}" for line in model_card(info, cap.decode_defaults)))


def upload_ui() -> list[Upload]:
    files = st.file_uploader("Images", type=list(IMAGE_TYPES), accept_multiple_files=True,
                             max_upload_size=MAX_UPLOAD_MB,
                             help=f"{', '.join(IMAGE_TYPES)}; up to {MAX_UPLOAD_MB} MB each.")
    return [Upload(f.name, f.file_id, f.getvalue()) for f in files or []]


def downloads_ui(captions: list[Caption], settings: Settings) -> None:
    left, right = st.columns(2)
    left.download_button("Download CSV", results_csv(captions, settings.n_best), "captions.csv", "text/csv",
                         on_click="ignore")
    right.download_button("Download JSON", results_json(captions, dataclasses.asdict(settings), settings.n_best),
                          "captions.json", "application/json", on_click="ignore")


def caption_ui(number: int, upload: Upload, caption: Caption) -> None:
    """One image: caption, alternatives, and the attention and gates for a chosen word."""
    with st.container(border=True):
        st.subheader(f"{number}. {md_name(upload.name)}")
        if not caption.ok:
            st.error(f"Could not caption {md_name(caption.error)}")
            return
        image = preview(upload.data)
        left, right = st.columns([2, 3])
        left.image(image)
        with right:
            st.markdown(f"### {escape_md(caption.text) or '(empty caption)'}")  # a checkpoint's words are text
            st.caption(f"score {caption.score:.3f} | log-probability {caption.logprob:.3f}")
            if caption.tags:  # beside the caption, so a disagreement between the two is seen
                st.markdown(escape_md(tags_line(caption.tags)))
                st.caption(TAGS_HINT)
        # Full width below the picture, so no column is cut off.
        alternatives = [{"rank": rank, "caption": a.text, "score": round(a.score, 4),
                         "log-probability": round(a.logprob, 4)} for rank, a in enumerate(caption.alternatives, 1)]
        st.dataframe(alternatives, hide_index=True, use_container_width=True)
        labels = step_labels(caption)
        if not labels:
            return
        label = st.select_slider("Word", labels, key=f"word-{upload.key}",
                                 help="Pick a word: where did the model look, what did its gates do?")
        step = labels.index(label)
        attention_tab, gates_tab = st.tabs(["Attention", "LSTM gates"])
        with attention_tab:
            attention_ui(image, caption, step, label)
        with gates_tab:
            gates_ui(caption, step, labels)


def attention_ui(image: Image.Image, caption: Caption, step: int, label: str) -> None:
    if caption.attention is None:
        st.info("This model does not use attention (show_tell decoder): every word sees the whole image.")
        return
    weights = caption.attention[step]  # (g, g)
    vmax = float(caption.attention.max())  # one scale for every word of this caption
    st.image(attention_overlay(image, weights, vmax=vmax), caption=f"Attention for word {label}")
    st.image(attention_legend(vmax, weights.size))
    st.caption(f"{attention_summary(weights)} Colours run from 0 to {vmax:.1%}, the largest weight over the "
               "whole caption, so a word whose map looks cool spread its attention evenly.")


def gates_ui(caption: Caption, step: int, labels: list[str]) -> None:
    rows = gate_table(caption)
    st.markdown("An LSTM carries a memory (the **cell state**) from word to word. At every word three gates, "
                "each a number between 0 and 1 per memory cell, decide what happens to it:\n"
                + "\n".join(f"- **{name}**: {text}" for name, text in GATE_HELP.items()))
    st.info(describe_word(rows[step]))
    st.markdown(describe_resets(caption))
    cells = moving_cells(caption.gates, HEATMAP_CELLS)
    st.caption(f"Reading guide: rows are words, columns the {len(cells)} memory cells that changed most over "
               "this caption. **R** = reset (forget near 0, input near 1: the old value is wiped and a new one "
               "written); **H** = held (forget near 1, input near 0: kept as it was). The picked word is outlined.")
    heat = gate_heatmap(caption, cells)
    for quantity in ("forget", "input", "output", "cell change"):
        st.vega_lite_chart([r for r in heat if r["quantity"] == quantity], heatmap_spec(quantity, step),
                           use_container_width=True)
    with st.expander("All words: gates averaged over the cells"):
        st.dataframe([r.as_row() for r in rows], hide_index=True)
    st.markdown(f"**Memory cells that changed most at word {escape_md(labels[step])}**")
    if step == 0:
        st.caption("The memory before the first word is not reported, so these are the cells with the "
                   "largest values after it.")
    st.dataframe([c.as_row() for c in top_cells(caption, step)], hide_index=True)


def main() -> None:
    st.set_page_config(page_title="captioner", layout="wide")
    st.title("captioner")
    st.markdown("Upload photos to caption them, see where the model looked for each word, and watch how the "
                "LSTM's gates decide what to keep, add and emit.")
    loaded = load_ui()
    if loaded is None:
        return
    cap, path = loaded
    settings = sidebar_ui(cap, path)
    model_info_ui(cap, path)
    uploads = upload_ui()
    if not uploads:
        st.info("Upload one or more images to caption them.")
        return
    # One memo per model: switching models in the sidebar captions again instead of showing the other's captions.
    captions = caption_uploads(cap, uploads, settings, st.session_state.setdefault(f"captions:{path}", {}))
    failed = sum(not c.ok for c in captions)
    st.caption(f"{len(captions) - failed} of {len(captions)} images captioned"
               + (f"; {failed} could not be read." if failed else "."))
    downloads_ui(captions, settings)
    for number, (upload, caption) in enumerate(zip(uploads, captions), 1):
        caption_ui(number, upload, caption)


if __name__ == "__main__":
    main()
