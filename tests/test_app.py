"""The Streamlit app driven through AppTest (uploads, controls, bad files, gates), its exports, and the pure
summaries in captioner.explain. A tiny random checkpoint with the real EfficientNet encoder; no browser."""

from __future__ import annotations

import csv
import dataclasses
import importlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from streamlit.dataframe_util import convert_arrow_bytes_to_pandas_df
from streamlit.testing.v1 import AppTest

from captioner import Caption, Captioner, explain
from captioner.app_views import results_csv, results_json
from captioner.config import DecodeConfig, ModelConfig
from captioner.models.checkpoint import save_model
from captioner.models.vocab import Vocabulary
from tests.conftest import WORDS, make_model, write_images

APP = Path(__file__).resolve().parents[1] / "app.py"
ENV = "CAPTIONER_CHECKPOINT"
APP_N_BEST = 3  # the app's default number of alternatives


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """One checkpoint for the whole module, so the app's cached model loads once."""
    vocab = Vocabulary.build([" ".join(WORDS)], min_count=1)
    model = make_model(vocab, ModelConfig(embed_dim=16, hidden_dim=24, attention_dim=12, feature_dim=20,
                                          dropout=0.0))
    model.info = {"name": "tiny test model", "data": "unit-test pictures (made up)", "train_images": 6000,
                  "val_images": 1000, "epoch": 4,
                  "selection": {"metric": "CIDEr", "split": "dev", "beam_size": 3, "CIDEr": 0.456,
                                "length_penalty": 0.7}}
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_model(model, path)
    return path


@pytest.fixture(scope="module")
def captioner(checkpoint) -> Captioner:
    """What the app captions with: it warms its Captioner up, so it runs the fast paths from the first photo."""
    cap = Captioner.load(checkpoint)
    cap.warmup()
    return cap


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[bytes]:
    return [p.read_bytes() for p in write_images(tmp_path_factory.mktemp("photos"), 3, size=(96, 72))]


@pytest.fixture
def app(checkpoint, monkeypatch) -> AppTest:
    monkeypatch.setenv(ENV, str(checkpoint))
    at = AppTest.from_file(str(APP), default_timeout=60).run()
    assert not at.exception
    return at


def upload(at: AppTest, files: list[tuple[str, bytes]]) -> AppTest:
    at.file_uploader[0].set_value([(name, data, "application/octet-stream") for name, data in files])
    at.run()
    assert not at.exception, at.exception
    return at


def shown_captions(at: AppTest) -> list[str]:
    return [m.value.removeprefix("### ") for m in at.main.markdown if m.value.startswith("### ")]


def tables(at: AppTest, column: str) -> list:
    """The dataframes (as pandas) that have `column`."""
    return [d.value for d in at.main.dataframe if column in d.value.columns]


def sidebar_slider(at: AppTest, label: str):
    return next(s for s in at.sidebar.slider if s.label == label)


# --- the app ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case, says", [
    ("missing", "checkpoint file not found"),
    ("damaged", "damaged or not a safetensors file"),
    ("shipped", "shipped model is not installed yet"),
])
def test_no_usable_model_is_a_clear_error_not_a_traceback(case, says, tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    if case == "shipped":  # no env var and no shipped model installed: the app asks Captioner.load() for one
        monkeypatch.delenv(ENV, raising=False)
        monkeypatch.setattr("captioner.models.shipped.weights_dir", lambda: tmp_path)
    else:
        if case == "damaged":
            path.write_text("not a checkpoint")
        monkeypatch.setenv(ENV, str(path))
    at = AppTest.from_file(str(APP), default_timeout=60).run()
    assert not at.exception
    [error] = at.error
    assert says in error.value and ENV in error.value
    assert not at.file_uploader


def test_start_page_has_checkpoint_defaults_and_model_info(app):
    assert sidebar_slider(app, "Beam size").value == 3  # the checkpoint's decode defaults
    assert sidebar_slider(app, "Maximum length (words)").value == 8
    assert sidebar_slider(app, "Alternatives (n-best)").value == APP_N_BEST
    [card] = [m.value for m in app.sidebar.markdown if "tiny test model" in m.value]
    assert "Trained on 6,000 images, model selection on 1,000." in card and "unit-test pictures (made up)." in card
    assert "Dev CIDEr 0.456 at beam 3, length penalty 0.7: the score that picked epoch 4 during training." in card
    assert "decodes with length penalty 0.0 by default" in card  # the decode default differs from 0.7
    assert "train_images" not in card and "{" not in card and not app.sidebar.dataframe
    assert [i.value for i in app.info] == ["Upload one or more images to caption them."]
    assert set(app.file_uploader[0].allowed_type) >= {".jpg", ".png", ".webp", ".gif", ".bmp", ".tiff"}


def test_uploader_accepts_every_format_the_loader_decodes():
    from captioner.images import SUPPORTED_FORMATS

    app_module = importlib.import_module("app")
    registered = Image.registered_extensions()
    for fmt in SUPPORTED_FORMATS:
        assert any(registered.get(f".{ext}") == fmt for ext in app_module.IMAGE_TYPES), fmt


def test_one_upload_limit_in_streamlit_megabytes():
    import tomllib

    app_module = importlib.import_module("app")
    config = tomllib.loads((APP.parent / ".streamlit" / "config.toml").read_text())
    assert config["server"]["maxUploadSize"] == app_module.MAX_UPLOAD_MB
    assert app_module.MAX_UPLOAD_BYTES == app_module.MAX_UPLOAD_MB * 1_000_000  # Streamlit's MB


def test_starts_on_the_shipped_model_without_arguments(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    at = AppTest.from_file(str(APP), default_timeout=120).run()
    assert not at.exception and not at.error
    assert any("Flickr8k" in m.value for m in at.sidebar.markdown)
    assert any("last layer tuned for captioning" in m.value for m in at.sidebar.markdown)  # model.encoder_head
    assert at.file_uploader


def test_upload_shows_each_caption_with_its_alternatives(app, captioner, photos):
    upload(app, [("a.jpg", photos[0]), ("b.png", photos[1])])
    expected = captioner.caption(photos[:2], n_best=APP_N_BEST)
    assert [s.value for s in app.main.subheader] == ["1. a.jpg", "2. b.png"]
    assert shown_captions(app) == [c.text for c in expected]
    alternatives = tables(app, "rank")
    for table, caption in zip(alternatives, expected, strict=True):
        assert list(table["caption"]) == [a.text for a in caption.alternatives]
        np.testing.assert_allclose(table["score"], [a.score for a in caption.alternatives], atol=1e-3)
    assert "2 of 2 images captioned." in [c.value for c in app.main.caption]
    downloads = app.download_button
    assert [b.label for b in downloads] == ["Download CSV", "Download JSON"]
    assert downloads[0].proto.url.endswith(".csv") and downloads[1].proto.url.endswith(".json")
    assert not app.error


def test_sidebar_controls_reach_the_decoder(app, captioner, photos):
    upload(app, [("a.jpg", photos[0])])
    sidebar_slider(app, "Beam size").set_value(1).run()
    greedy = captioner.caption(photos[0], beam_size=1)[0]
    assert shown_captions(app) == [greedy.text]
    assert "Alternatives (n-best)" not in [s.label for s in app.sidebar.slider]
    assert len(tables(app, "rank")[0]) == 1

    sidebar_slider(app, "Beam size").set_value(4).run()
    sidebar_slider(app, "Alternatives (n-best)").set_value(4)
    sidebar_slider(app, "Maximum length (words)").set_value(2)
    sidebar_slider(app, "Length penalty").set_value(1.0)
    app.run()
    short = captioner.caption(photos[0], beam_size=4, n_best=4, max_length=2, length_penalty=1.0)[0]
    assert len(short.tokens) <= 2
    assert shown_captions(app) == [short.text]
    [table] = tables(app, "rank")
    assert list(table["caption"]) == [a.text for a in short.alternatives]
    np.testing.assert_allclose(table["score"], [a.score for a in short.alternatives], atol=1e-3)


def test_bad_files_are_named_and_the_others_still_captioned(app, captioner, photos):
    noisy = io.BytesIO()
    Image.effect_noise((128, 96), 60).convert("RGB").save(noisy, "JPEG")
    app_module = importlib.import_module("app")
    too_big = b"\xff" * (app_module.MAX_UPLOAD_BYTES + 1)
    upload(app, [("notes.png", b"just some text"), ("good.jpg", photos[0]),
                 ("cut.jpg", noisy.getvalue()[: len(noisy.getvalue()) // 2]), ("empty.gif", b""),
                 ("huge.bmp", too_big)])
    errors = [e.value for e in app.error]
    expected = [("notes.png", "not a recognised image format"), ("cut.jpg", "truncated"), ("empty.gif", "empty"),
                ("huge.bmp", f"file too large ({app_module.MAX_UPLOAD_MB}.0 MB; "
                             f"the limit is {app_module.MAX_UPLOAD_MB} MB)")]
    assert len(errors) == len(expected)
    for error, (name, reason) in zip(errors, expected):
        assert error.startswith(f"Could not caption {name}: ") and reason in error, error
    assert shown_captions(app) == [captioner.caption(photos[0], n_best=APP_N_BEST)[0].text]
    assert [s.value for s in app.main.subheader][1] == "2. good.jpg"
    assert "1 of 5 images captioned; 4 could not be read." in [c.value for c in app.main.caption]


def test_a_file_name_with_control_characters_is_shown_on_one_line(app, photos):
    """A newline in a name split its header (the rest of the name became a paragraph of its own); control
    characters are now written visibly, as the text output writes them, and markdown stays escaped."""
    upload(app, [("new\nline\r\t*.jpg", photos[0]), ("bell\x07del\x7f\x85.png", b"just some text")])
    headers = [s.value for s in app.main.subheader]
    assert headers == [r"1. new\\nline\\r\\t\*.jpg", r"2. bell\\x07del\\x7f\\x85.png"]
    [error] = [e.value for e in app.error]
    assert error.startswith(r"Could not caption bell\\x07del\\x7f\\x85.png: "), error
    assert "not a recognised image format" in error
    shown = "".join(headers) + error
    assert not any(ch < " " or "\x7f" <= ch <= "\x9f" for ch in shown), shown


def test_gates_view_matches_the_api_and_follows_the_picked_word(app, captioner, photos):
    upload(app, [("a.jpg", photos[2])])
    expected = captioner.caption(photos[2], n_best=APP_N_BEST, return_attention=True, return_gates=True)[0]
    rows = explain.gate_table(expected)
    labels = explain.step_labels(expected)

    explanation = next(m.value for m in app.main.markdown if "cell state" in m.value)
    assert all(f"**{gate}**" in explanation for gate in ("forget", "input", "output", "cell change"))
    [table] = [e.value for e in app.main.expander[0].dataframe]
    assert list(table["word"]) == explain.step_words(expected)
    for gate in explain.GATES:
        np.testing.assert_allclose(table[gate], [getattr(r, gate) for r in rows], atol=1e-4)
    assert math.isnan(table["cell change"][0])
    np.testing.assert_allclose(table["cell change"][1:], [r.cell_change for r in rows[1:]], atol=1e-4)
    charts = app.main.get("vega_lite_chart")
    assert len(charts) == 4  # forget, input, output, cell change
    cells = explain.moving_cells(expected.gates, 16)
    for chart, gate in zip(charts, explain.GATES):
        heat = convert_arrow_bytes_to_pandas_df(chart.proto.data.data)
        assert len(heat) == len(rows) * len(cells) and set(heat["quantity"]) == {gate}
        np.testing.assert_allclose(heat["value"], expected.gates[gate][heat["step"], heat["cell"]], atol=1e-5)
        assert json.loads(chart.proto.spec)["layer"][0]["encoding"]["y"]["sort"] is None  # caption order
    assert explain.describe_resets(expected) in [m.value for m in app.main.markdown]

    picker = app.select_slider[0]
    assert list(picker.options) == labels
    picker.set_value(labels[2]).run()
    assert not app.exception
    assert [i.value for i in app.main.info] == [explain.describe_word(rows[2])]
    [top] = tables(app, "change")
    assert list(top["cell"]) == [c.cell for c in explain.top_cells(expected, 2)]
    [_, overlay, _legend] = app.main.image
    assert overlay.captions == [f"Attention for word {labels[2]}"]
    assert any(c.value.startswith(explain.attention_summary(expected.attention[2])) for c in app.main.caption)


def test_a_model_without_attention_still_shows_its_gates(tmp_path, monkeypatch, photos):
    vocab = Vocabulary.build([" ".join(WORDS)], min_count=1)
    model = make_model(vocab, ModelConfig(decoder="show_tell", embed_dim=16, hidden_dim=24, attention_dim=12,
                                          feature_dim=20, dropout=0.0))
    save_model(model, tmp_path / "show_tell.safetensors")
    monkeypatch.setenv(ENV, str(tmp_path / "show_tell.safetensors"))
    at = upload(AppTest.from_file(str(APP), default_timeout=60).run(), [("a.jpg", photos[0])])
    assert any("does not use attention" in i.value for i in at.main.info)
    assert len(at.main.image) == 1  # the photo, no overlay
    [table] = [e.value for e in at.main.expander[0].dataframe]
    assert len(table) == len(at.select_slider[0].options) > 0
    assert len(at.main.get("vega_lite_chart")) == 4


def test_only_new_files_are_decoded_in_one_batch_and_removed_files_forgotten(captioner, photos, monkeypatch):
    app_module = importlib.import_module("app")
    batches = []
    real_caption = captioner.caption
    monkeypatch.setattr(captioner, "caption", lambda images, **kw: batches.append(len(images)) or
                        real_caption(images, **kw))
    settings = app_module.Settings(beam_size=2, n_best=2, max_length=5, length_penalty=0.0)
    a, b, c = (app_module.Upload(f"{k}.jpg", k, data) for k, data in zip("abc", photos))
    huge = app_module.Upload("huge.jpg", "h", b"\0" * (app_module.MAX_UPLOAD_BYTES + 1))
    memo: dict = {}
    first = app_module.caption_uploads(captioner, [a, huge], settings, memo)
    assert batches == [1] and first[0].source == "a.jpg" and first[0].ok and "too large" in first[1].error
    again = app_module.caption_uploads(captioner, [a, b, c], settings, memo)  # a is known, huge was removed
    assert batches == [1, 2] and again[0] is first[0]
    assert [r.source for r in again] == ["a.jpg", "b.jpg", "c.jpg"]
    assert len(memo) == 3
    app_module.caption_uploads(captioner, [c], app_module.Settings(1, 1, 5, 0.0), memo)  # new settings
    assert batches == [1, 2, 1] and len(memo) == 1


def test_exports_are_valid_csv_and_json(captioner, photos):
    app_module = importlib.import_module("app")
    good = captioner.caption(photos[0], n_best=2)[0]
    good.source = "a.jpg"
    bad = Caption(source="b.png", error="b.png: not a recognised image format")
    settings = app_module.Settings(beam_size=3, n_best=2, max_length=8, length_penalty=0.5)

    rows = list(csv.DictReader(io.StringIO(results_csv([good, bad], n_best=2))))
    assert [r["path"] for r in rows] == ["a.jpg", "b.png"]  # the columns of `captioner caption --format csv`
    assert rows[0]["caption"] == good.text and float(rows[0]["score"]) == pytest.approx(good.score, abs=1e-4)
    assert rows[0]["alternative_2"] == good.alternatives[1].text and rows[0]["error"] == ""
    assert rows[1]["caption"] == rows[1]["score"] == "" and rows[1]["error"] == bad.error

    def no_nan(constant):
        raise AssertionError(f"{constant} is not JSON")

    doc = json.loads(results_json([good, bad], dataclasses.asdict(settings), n_best=2), parse_constant=no_nan)
    assert doc["settings"] == {"beam_size": 3, "n_best": 2, "max_length": 8, "length_penalty": 0.5}
    assert [r["path"] for r in doc["results"]] == ["a.jpg", "b.png"]
    assert [a["text"] for a in doc["results"][0]["alternatives"]] == [a.text for a in good.alternatives]
    assert doc["results"][1]["score"] is None and doc["results"][1]["error"] == bad.error


def test_the_json_download_keeps_text_readable_and_escapes_controls_and_line_separators():
    """The download writes text as the JSON lines do (`strict_json`): letters as UTF-8, so "café" stays
    readable, and DEL, U+009B (a terminal's CSI) and U+2028 as escapes, so `cat captions.json` runs nothing;
    a parser reads the same name back."""
    name = "café\x9b31mred\u2028b\x7f.jpg"
    text = results_json([Caption(source=name, error=f"{name}: not a recognised image format")], {}, n_best=1)
    assert not set(text) & {"\x7f", "\x9b", "\u2028"}
    assert "café" in text and "\\u009b" in text and "\\u2028" in text and "\\u007f" in text
    assert json.loads(text)["results"][0]["path"] == name


# --- captioner.explain --------------------------------------------------------------------------------------


def synthetic(tokens: list[str], steps: int, cell=None, hidden: int = 4) -> Caption:
    rng = np.random.default_rng(0)
    gates = {g: rng.uniform(size=(steps, hidden)).astype(np.float32) for g in ("input", "forget", "output")}
    gates["cell"] = rng.normal(size=(steps, hidden)) if cell is None else np.asarray(cell, dtype=np.float32)
    attention = rng.dirichlet(np.ones(49), size=steps).reshape(steps, 7, 7)
    return Caption(source="x", text=" ".join(tokens), tokens=tokens, attention=attention, gates=gates)


def test_step_words_add_end_only_when_that_step_was_recorded():
    assert explain.step_words(synthetic(["a", "dog", "a"], 4)) == ["a", "dog", "a", "<end>"]
    assert explain.step_words(synthetic(["a", "dog", "a"], 3)) == ["a", "dog", "a"]
    assert explain.step_labels(synthetic(["a", "dog", "a"], 4)) == ["1 a", "2 dog", "3 a", "4 <end>"]
    assert explain.step_words(Caption(source="x", text="a dog", tokens=["a", "dog"])) == []


def test_gate_table_averages_cells_and_measures_the_memory_change():
    caption = synthetic(["a", "dog", "runs"], 3, cell=[[0, 0], [3, 4], [3, 4]], hidden=2)
    caption.gates["forget"] = np.array([[0.2, 0.4], [1.0, 0.0], [0.5, 0.5]], dtype=np.float32)
    rows = explain.gate_table(caption)
    assert [r.word for r in rows] == ["a", "dog", "runs"]
    assert [r.forget for r in rows] == pytest.approx([0.3, 0.5, 0.5])
    assert rows[1].input == pytest.approx(caption.gates["input"][1].mean())
    assert math.isnan(rows[0].cell_change) and [r.cell_change for r in rows[1:]] == pytest.approx([5.0, 0.0])
    assert rows[0].as_row()["cell change"] is None and rows[1].as_row()["#"] == 2
    assert "30%" in explain.describe_word(rows[0]) and "moved by 5" in explain.describe_word(rows[1])
    with pytest.raises(ValueError, match="return_gates"):
        explain.gate_table(Caption(source="x", text="a", tokens=["a"]))


def test_top_cells_are_ranked_by_absolute_change():
    caption = synthetic(["a", "dog"], 2, cell=[[3.0, 0.0, 0.0], [3.0, -2.0, 0.5]], hidden=3)
    [first, second, third] = explain.top_cells(caption, 1, k=3)
    assert [first.cell, second.cell, third.cell] == [1, 2, 0]
    assert (first.before, first.after, first.change) == pytest.approx((0.0, -2.0, -2.0))
    assert first.forget == pytest.approx(caption.gates["forget"][1, 1])
    start = explain.top_cells(caption, 0, k=1)  # no earlier state: ranked by size, change unknown
    assert start[0].cell == 0 and math.isnan(start[0].change) and start[0].as_row()["before"] is None
    with pytest.raises(IndexError):
        explain.top_cells(caption, 2)


def test_attention_overlay_is_hot_where_the_model_looked():
    image = Image.new("RGB", (140, 70), (128, 128, 128))
    weights = np.zeros((7, 7))
    weights[0, 0] = 1.0
    overlay = np.asarray(explain.attention_overlay(image, weights), dtype=int)
    assert overlay.shape == (70, 140, 3)
    red, _, blue = overlay[2, 2]
    assert red > blue + 50  # top-left cell: hot end of the colour map
    red, _, blue = overlay[-2, -2]
    assert blue > red + 50  # far corner: cold
    uniform = np.asarray(explain.attention_overlay(image, np.full((7, 7), 1 / 49)))
    assert np.ptp(uniform.reshape(-1, 3), axis=0).max() == 0  # no attention preference, no hot spot
    assert explain.attention_summary(weights) == ("Peak: row 1, column 1 of the 7x7 grid with 100.0% of the "
                                                  "attention (uniform would be 2.0%).")


def planted(steps: int = 4, hidden: int = 8) -> dict[str, np.ndarray]:
    """Gates with middling values everywhere, a reset at word 2 cell 5 and cell 1 held at word 3."""
    rng = np.random.default_rng(1)
    gates = {g: rng.uniform(0.3, 0.7, size=(steps, hidden)) for g in ("input", "forget", "output")}
    gates["cell"] = np.cumsum(rng.normal(scale=0.01, size=(steps, hidden)), axis=0)
    gates["forget"][2, 5], gates["input"][2, 5] = 0.0001, 0.99
    gates["cell"][2:, 5] += 3.0  # the rewritten cell jumps
    gates["forget"][3, 1], gates["input"][3, 1] = 0.98, 0.02
    return gates


def test_resets_and_held_cells_find_the_planted_ones():
    gates = planted()
    assert [tuple(ix) for ix in np.argwhere(explain.resets(gates))] == [(2, 5)]
    assert [tuple(ix) for ix in np.argwhere(explain.held(gates))] == [(3, 1)]
    assert explain.moving_cells(gates, 3)[0] == 5 and len(explain.moving_cells(gates, 3)) == 3
    caption = Caption(source="x", text="a dog runs", tokens=["a", "dog", "runs"], gates=gates)
    assert explain.describe_resets(caption) == "Cells wiped and rewritten (reset) at: **runs** (word 3: 1 cell)."
    heat = explain.gate_heatmap(caption, [5, 1])
    marks = {(r["step"], r["cell"]): r["mark"] for r in heat}
    assert marks[(2, 5)] == "reset" and marks[(3, 1)] == "held" and marks[(0, 5)] == ""
    assert {r["word"] for r in heat} == {"1 a", "2 dog", "3 runs", "4 <end>"}
    change = [r["value"] for r in heat if r["quantity"] == "cell change" and r["cell"] == 5]
    assert change[0] is None and change[2] == pytest.approx(3.0, abs=0.1)
    gates["forget"][2, 5] = 0.5
    assert "No cell was reset" in explain.describe_resets(caption)


def test_attention_colours_share_one_scale_across_words():
    image = Image.new("RGB", (70, 70), (128, 128, 128))
    uniform = np.full((7, 7), 1 / 49)
    peaked = np.zeros((7, 7))
    peaked[3, 3] = 1.0
    alone = np.asarray(explain.attention_overlay(image, uniform), dtype=int)
    shared = np.asarray(explain.attention_overlay(image, uniform, vmax=peaked.max()), dtype=int)
    red, _, blue = shared[35, 35]
    assert blue > red + 50  # uniform attention is cold on the caption's scale ...
    red, _, blue = alone[35, 35]
    assert red > blue  # ... but was hot when every map was scaled to its own maximum
    legend = explain.attention_legend(0.05, 81)
    assert legend.mode == "RGB" and legend.width > 4 * legend.height


def test_alternatives_choice_survives_greedy_and_back(app):
    sidebar_slider(app, "Alternatives (n-best)").set_value(2).run()
    sidebar_slider(app, "Beam size").set_value(1).run()
    assert "Alternatives (n-best)" not in [s.label for s in app.sidebar.slider]
    sidebar_slider(app, "Beam size").set_value(3).run()
    assert sidebar_slider(app, "Alternatives (n-best)").value == 2
    sidebar_slider(app, "Beam size").set_value(2).run()  # fewer beams than alternatives: clamped
    assert sidebar_slider(app, "Alternatives (n-best)").value == 2
    assert not app.exception


def test_captioner_app_command_line():
    import argparse

    from captioner.cli import app as app_cli

    parser = argparse.ArgumentParser()
    app_cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["app", "--server.port", "8502", "--checkpoint", "m.safetensors"])
    cmd, env = app_cli.command(args)
    assert cmd[1:] == ["-m", "streamlit", "run", str(APP), "--server.port", "8502"]
    assert env[ENV] == str(Path("m.safetensors").resolve())
    assert app_cli.run(args) == 2  # the checkpoint does not exist: an error, no app started


def test_the_sidebar_switches_between_the_shipped_models(monkeypatch):
    """Without $CAPTIONER_CHECKPOINT the sidebar offers the shipped models, the default first, and the model
    info follows the choice."""
    from captioner.models.shipped import DEFAULT, list_models

    monkeypatch.delenv(ENV, raising=False)
    names = [m.name for m in list_models()]
    assert len(names) >= 2 and names[0] == DEFAULT
    at = AppTest.from_file(str(APP), default_timeout=120).run()
    assert not at.exception
    [chooser] = [s for s in at.sidebar.selectbox if s.label == "Model"]
    assert chooser.options == names and chooser.value == DEFAULT

    def shown() -> str:
        return " ".join(m.value for m in at.sidebar.markdown)

    first = Captioner.load(DEFAULT).model.info["name"]
    assert first in shown()
    other = names[1]
    chooser.set_value(other).run()
    assert not at.exception
    assert Captioner.load(other).model.info["name"] in shown() and first not in shown()


def test_the_decoding_controls_follow_the_chosen_model(monkeypatch):
    """Each model's sliders start at its own decode defaults, also after a value was changed for another model:
    with one set of widget keys, switching from the general model (length penalty 0.7) to the flickr8k one
    (0.5) kept 0.7, beside a model card saying 0.5."""
    from captioner.models.shipped import list_models

    monkeypatch.delenv(ENV, raising=False)
    names = [m.name for m in list_models()]
    penalties = {name: Captioner.load(name).decode_defaults.length_penalty for name in names}
    assert len(set(penalties.values())) > 1  # the shipped models differ, or this test shows nothing
    at = AppTest.from_file(str(APP), default_timeout=120).run()

    def choose(name: str) -> None:
        [chooser] = [s for s in at.sidebar.selectbox if s.label == "Model"]
        chooser.set_value(name).run()
        assert not at.exception

    for name in [*names[1:], names[0]]:
        choose(name)
        assert sidebar_slider(at, "Length penalty").value == pytest.approx(penalties[name]), name
    sidebar_slider(at, "Length penalty").set_value(1.5).run()
    choose(names[1])
    assert sidebar_slider(at, "Length penalty").value == pytest.approx(penalties[names[1]])


def test_the_general_models_card_names_both_datasets():
    """The card's first data line was cut from the data text at its first " (", which read "Trained on Flickr8k
    (7,328 images, ...)" for the model trained on Flickr8k and COCO photos."""
    from captioner.app_views import model_card
    from captioner.models.checkpoint import load_model
    from captioner.models.shipped import resolve

    model = load_model(resolve("general"))
    lines = model_card(model.info, model.decode_cfg)
    trained = next(line for line in lines if line.startswith("Trained on"))
    train, val = model.info["train_images"], model.info["val_images"]
    assert trained == f"Trained on {train:,} images, model selection on {val:,}."
    assert any("Flickr8k" in line and "coco\\_small" in line for line in lines)  # markdown-escaped


def test_format_characters_in_a_file_name_are_shown_visibly(app, photos):
    """U+202E (a right-to-left override) showed "photo<U+202E>gpj.png" as "photognp.jpg"; zero widths, BOMs and
    line separators were invisible too. C0 and C1 controls were already escaped."""
    upload(app, [("photo\u202egpj.png", photos[0]), ("a\u200bb\ufeffc\u2028d.jpg", photos[1])])
    headers = [s.value for s in app.main.subheader]
    assert headers == [r"1. photo\\u202egpj.png", r"2. a\\u200bb\\ufeffc\\u2028d.jpg"]


@pytest.mark.parametrize("field, value", [("train_images", "6000"), ("val_images", [1]), ("epoch", "four"),
                                          ("name", 5), ("data", ["x"])])
def test_a_model_card_of_the_wrong_types_is_shown_not_a_traceback(field, value):
    """A hand-written checkpoint's info ("6000" images, a metric of 5, a length penalty of "high") ended the app
    in a format error before the uploader was shown."""
    from captioner.app_views import model_card

    info = {"name": "m", "data": "d", "train_images": 10, "val_images": 2, "epoch": 1,
            "selection": {"metric": "CIDEr", "CIDEr": 0.5, "beam_size": 3, "length_penalty": 0.7}, field: value}
    lines = model_card(info, DecodeConfig())
    assert lines and all(isinstance(line, str) for line in lines)
    for selection in ({"metric": 5, "CIDEr": 0.5}, {"metric": "CIDEr", "CIDEr": 0.5, "length_penalty": "high"},
                      {"metric": "CIDEr", "CIDEr": "0.5", "beam_size": [3]}, {"CIDEr": float("nan")}):
        assert model_card({**info, "selection": selection}, DecodeConfig())
    per = {"dev_scores": {"a": {"CIDEr": "x", "beam_size": "3", "split": 5}}}
    assert model_card({**info, **per}, DecodeConfig())[-1] == "a 5: no scores (beam 3)."


def test_markdown_in_a_checkpoints_text_is_escaped():
    """A model name `[click](https://...)` showed a link in the sidebar, and a vocabulary word `![x](url)` loaded a
    remote image above its caption (trained vocabularies hold word characters only; a hand-made one need not)."""
    from captioner.app_views import escape_md, model_card

    name = "[Download the better model](https://evil.example/x) ![](https://evil.example/t.png)"
    [title, *_] = model_card({"name": name}, DecodeConfig())
    assert "](" not in title.replace("\\]", "") and "\\[" in title and "\\!" in title
    assert escape_md("# a_b *c*") == "\\# a\\_b \\*c\\*"


def test_the_gates_views_escape_a_checkpoints_words():
    """Only the caption heading was escaped; the gates tab put the same words raw into markdown ("While writing
    **![x](https://...)**"), so a hand-made vocabulary could still load a remote image."""
    from captioner.app_views import escape_md, model_card
    from captioner.explain import WordGates, describe_word

    word = "![x](https://evil.example/t.png)&NoBreak;"
    assert "![x](" not in describe_word(WordGates(0, word, 0.5, 0.5, 0.5, float("nan")))
    assert escape_md("a&b") == "a\\&b"
    assert model_card({"selection": {"CIDEr": 10**400}}, DecodeConfig())  # a 400-digit score: OverflowError
