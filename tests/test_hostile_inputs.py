"""Issue 20: nothing a user feeds the CLI or the API may crash a run, corrupt output or lose work."""

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from captioner.cli import main
from tests.conftest import write_images


def _caption(tmp_path, checkpoint, *args):
    return main(["caption", *map(str, args), "--checkpoint", str(checkpoint), "--quiet"])


def test_non_utf8_file_name_is_written_validly_and_losslessly(tmp_path, tiny_checkpoint, capsysbinary):
    [img] = write_images(tmp_path / "src", 1)
    folder = tmp_path / "dir"
    folder.mkdir()
    bad = os.path.join(os.fsencode(folder), b"bad\xff.jpg")
    shutil.copy(img, bad)
    shutil.copy(img, folder / "z.jpg")
    out = tmp_path / "o.jsonl"
    assert _caption(tmp_path, tiny_checkpoint, folder, "--format", "jsonl", "--output", out) == 0
    records = [json.loads(line) for line in out.read_bytes().decode("utf-8").splitlines()]
    assert len(records) == 2
    assert records[0]["path"] == f"{folder}/bad\\xff.jpg"
    assert base64.b64decode(records[0]["path_bytes"]) == bad
    assert "path_bytes" not in records[1] and records[1]["path"] == str(folder / "z.jpg")
    for fmt in ("text", "csv", "jsonl"):  # stdout too is valid UTF-8
        assert _caption(tmp_path, tiny_checkpoint, folder, "--format", fmt) == 0
        text = capsysbinary.readouterr().out.decode("utf-8")
        found = [json.loads(line)["path"] for line in text.splitlines()] if fmt == "jsonl" else [text]
        assert any("bad\\xff.jpg" in f for f in found)


def test_error_records_are_strict_json(tmp_path, tiny_checkpoint):
    [good] = write_images(tmp_path, 1)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    out = tmp_path / "o.jsonl"
    assert _caption(tmp_path, tiny_checkpoint, good, bad, "--format", "jsonl", "--output", out,
                    "--n-best", "2") == 1
    lines = out.read_text().splitlines()
    assert "NaN" not in out.read_text()
    records = [json.loads(line) for line in lines]
    assert records[1]["score"] is None and records[1]["error"]
    for r in records:
        json.dumps(r, allow_nan=False)


def test_record_and_to_json_line_are_strict():
    from captioner.outputs import record, to_json_line
    from captioner.results import Alternative, Caption

    rec = record(Caption(source="x", text="a", score=float("inf"),
                         alternatives=[Alternative("a", float("nan"), -1.0)]))
    assert rec["score"] is None and rec["logprob"] is None and rec["alternatives"][0]["score"] is None
    assert json.loads(to_json_line(rec)) == rec
    with pytest.raises(ValueError):
        to_json_line({"score": float("nan")})


@pytest.mark.parametrize("bad_args", [["--n-best", "5"], ["--batch-size", "0"], ["--max-length", "-1"],
                                      ["--threads", "-2"], ["--beam-size", "0"], ["--n-best", "0"],
                                      ["--threads", "99999999999"], ["--beam-size", "101"], ["--max-length", "1001"]])
def test_bad_arguments_exit_2_before_touching_the_output(tmp_path, tiny_checkpoint, capsys, bad_args):
    [img] = write_images(tmp_path, 1)
    out = tmp_path / "precious.jsonl"
    out.write_text("keep me\n")
    assert _caption(tmp_path, tiny_checkpoint, img, "--format", "jsonl", "--output", out, *bad_args) == 2
    err = capsys.readouterr().err
    assert bad_args[0] in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert out.read_text() == "keep me\n"
    assert not list(tmp_path.glob(".*.partial"))


def test_output_equal_to_an_input_is_refused(tmp_path, tiny_checkpoint, capsys):
    [img] = write_images(tmp_path, 1)
    before = img.read_bytes()
    assert _caption(tmp_path, tiny_checkpoint, img, "--output", img) == 2
    assert img.read_bytes() == before
    assert "input" in capsys.readouterr().err


def test_output_that_is_a_folder_is_one_line_exit_4(tmp_path, tiny_checkpoint, capsys):
    [img] = write_images(tmp_path, 1)
    folder = tmp_path / "out.jsonl"
    folder.mkdir()
    assert _caption(tmp_path, tiny_checkpoint, img, "--format", "jsonl", "--output", folder) == 4
    err = capsys.readouterr().err
    assert "is a folder" in err and str(folder) in err and len(err.strip().splitlines()) == 1
    assert not list(folder.iterdir()) and not list(tmp_path.glob(".*.partial"))


def test_output_replaced_atomically_only_at_the_end(tmp_path, tiny_checkpoint):
    write_images(tmp_path / "in", 3)
    out = tmp_path / "o.jsonl"
    out.write_text("old\n")
    assert _caption(tmp_path, tiny_checkpoint, tmp_path / "in", "--format", "jsonl", "--output", out) == 0
    assert len(out.read_text().splitlines()) == 3 and not list(tmp_path.glob(".*.partial"))


def test_api_rejects_out_of_range_decode_arguments(tmp_path, tiny_checkpoint):
    from captioner.api import Captioner

    [img] = write_images(tmp_path, 1)
    cap = Captioner.load(tiny_checkpoint, precision="reference")
    for kwargs, name in [({"beam_size": 0}, "beam_size"), ({"max_length": 0}, "max_length"),
                         ({"length_penalty": float("nan")}, "length_penalty"), ({"n_best": 9}, "n_best"),
                         ({"batch_size": 0}, "batch_size"), ({"beam_size": 101}, "beam_size"),
                         ({"max_length": 1001}, "max_length")]:
        with pytest.raises(ValueError, match=name):
            cap.caption_iter([img], **kwargs)  # raised at the call, not at the first record


def test_missing_explicit_path_is_reported_and_the_rest_captioned(tmp_path, tiny_checkpoint, capsys):
    [img] = write_images(tmp_path, 1)
    assert _caption(tmp_path, tiny_checkpoint, tmp_path / "nope.jpg", img) == 1
    captured = capsys.readouterr()
    assert "nope.jpg: no such file" in captured.err and str(img) in captured.out


def test_closed_stdout_ends_quietly(tmp_path, tiny_checkpoint):
    write_images(tmp_path / "in", 40, size=(32, 32))
    cmd = (f"{sys.executable} -m captioner caption {tmp_path / 'in'} --checkpoint {tiny_checkpoint} "
           f"--precision reference --batch-size 2 --quiet | head -1")
    proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert len(proc.stdout.splitlines()) == 1
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


def _run_and_kill(tmp_path, checkpoint, sig, out, n):
    partial = out.with_name(f".{out.name}.partial")
    proc = subprocess.Popen([sys.executable, "-m", "captioner", "caption", str(tmp_path / "in"), "--checkpoint",
                             str(checkpoint), "--format", "jsonl", "--output", str(out), "--batch-size", "2",
                             "--precision", "reference", "--quiet"], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (partial.exists() and partial.read_text().count("\n") >= 4):
        time.sleep(0.02)
    proc.send_signal(sig)
    proc.communicate(timeout=60)
    return proc.returncode


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_resume_after_interruption_equals_an_uninterrupted_run(tmp_path, tiny_checkpoint, sig):
    n = 80
    write_images(tmp_path / "in", n, size=(32, 32))
    full = tmp_path / "full.jsonl"
    assert _caption(tmp_path, tiny_checkpoint, tmp_path / "in", "--format", "jsonl", "--output", full,
                    "--precision", "reference", "--batch-size", "2") == 0
    out = tmp_path / "o.jsonl"
    code = _run_and_kill(tmp_path, tiny_checkpoint, sig, out, n)
    assert code == (130 if sig == signal.SIGINT else -signal.SIGKILL)
    left = out if sig == signal.SIGINT else out.with_name(".o.jsonl.partial")
    assert 4 <= len(left.read_text().splitlines()) < n
    with open(left, "a") as fh:  # a record cut by the kill
        fh.write('{"path": "half')
    assert _caption(tmp_path, tiny_checkpoint, tmp_path / "in", "--format", "jsonl", "--output", out,
                    "--precision", "reference", "--batch-size", "2", "--resume") == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    want = [json.loads(line) for line in full.read_text().splitlines()]
    # the killed run used one thread, this process more: sums may differ in the last float bits
    assert [(r["path"], r["caption"]) for r in got] == [(r["path"], r["caption"]) for r in want]
    assert [r["score"] for r in got] == pytest.approx([r["score"] for r in want], rel=1e-5)


def _evaluate(checkpoint, annotations, *args):
    return main(["evaluate", "--checkpoint", str(checkpoint), "--format", "jsonl", "--data", str(annotations),
                 "--precision", "reference", *map(str, args)])


@pytest.mark.parametrize("bad_args", [["--batch-size", "0"], ["--beam-size", "0"], ["--max-images", "-1"],
                                      ["--beam-size", "101"]])
def test_evaluate_bad_arguments_exit_2(tmp_path, tiny_checkpoint, capsys, bad_args):
    [img] = write_images(tmp_path, 1)
    annotations = tmp_path / "a.jsonl"
    annotations.write_text(json.dumps({"image": img.name, "caption": "a dog"}) + "\n")
    assert _evaluate(tiny_checkpoint, annotations, *bad_args) == 2
    err = capsys.readouterr().err
    assert bad_args[0] in err and len(err.strip().splitlines()) == 1


def test_evaluate_output_that_is_a_file_is_refused_before_captioning(tmp_path, tiny_checkpoint, capsys):
    [img] = write_images(tmp_path, 1)
    annotations = tmp_path / "a.jsonl"
    annotations.write_text(json.dumps({"image": img.name, "caption": "a dog"}) + "\n")
    (tmp_path / "eval").write_text("keep me\n")
    assert _evaluate(tiny_checkpoint, annotations, "--output", tmp_path / "eval") == 2
    assert "--output" in capsys.readouterr().err and (tmp_path / "eval").read_text() == "keep me\n"


def test_evaluate_with_no_image_to_score_is_an_error_not_a_hang(tmp_path, tiny_checkpoint, capsys):
    annotations = tmp_path / "a.jsonl"
    annotations.write_text(json.dumps({"image": "gone.jpg", "caption": "a dog"}) + "\n")
    assert _evaluate(tiny_checkpoint, annotations) == 2  # the only image is missing: nothing to score
    assert "no images to score" in capsys.readouterr().err
    (tmp_path / "gone.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    assert _evaluate(tiny_checkpoint, annotations) == 1  # the only image cannot be decoded
    assert "none of the 1 images could be captioned" in capsys.readouterr().err


# ---- configs -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override, key", [
    ("train.grad_clip=-1", "train.grad_clip"), ("train.lr=.inf", "train.lr"), ("train.lr=.nan", "train.lr"),
    ("data.max_caption_length=0", "data.max_caption_length"), ("train.min_lr_ratio=5", "train.min_lr_ratio"),
    ("train.warmup_steps=-1", "train.warmup_steps"), ("train.num_workers=-1", "train.num_workers"),
    ("train.val_max_images=-1", "train.val_max_images"), ("data.max_images=-1", "data.max_images"),
    ("train.weight_decay=-1", "train.weight_decay"), ("train.patience=-1", "train.patience"),
    ("train.scst_samples=0", "train.scst_samples"), ("model.hidden_dim=20000", "model.hidden_dim"),
    ("train.scst_samples=101", r"train.scst_samples must be <= 100"),
    ("train.attention_reg=.nan", "train.attention_reg"),
])
def test_out_of_range_config_values_are_refused_by_key(tmp_path, override, key):
    from captioner.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_alias_bomb_is_refused_quickly_with_a_short_message(tmp_path):
    from captioner.config import ConfigError, load_config

    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i, name in enumerate("bcdefghi"):
        prev = "abcdefghi"[i]
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    bomb = tmp_path / "bomb.yaml"
    # the anchors live inside a value (an unknown key would be refused before anything looks at it)
    bomb.write_text("model:\n  encoder: [" + ", ".join(line.split(": ", 1)[1] for line in lines) + "]\n")
    start = time.monotonic()
    with pytest.raises(ConfigError) as info:
        load_config(bomb)
    assert time.monotonic() - start < 5 and len(str(info.value)) < 1000


def test_bounded_message_for_a_huge_wrong_typed_value():
    from captioner.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError) as info:
        config_from_dict({"model": {"encoder": list(range(50_000))}})
    assert len(str(info.value)) < 1000


@pytest.mark.parametrize("content, message", [
    (b"", "empty"), (b"train:\n  lr: 0.1\n  lr: 0.2\n", "duplicate key"), (b"train:\n  out_dir: caf\xe9\n", "UTF-8"),
])
def test_bad_yaml_files_are_config_errors(tmp_path, content, message):
    from captioner.config import ConfigError, load_config

    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_out_dir_or_cache_dir_that_is_a_file_and_bad_set_values(tmp_path):
    from captioner.config import ConfigError, load_config

    existing = tmp_path / "file"
    existing.write_text("x")
    for override in (f"train.out_dir={existing}", f"data.cache_dir={existing}"):
        with pytest.raises(ConfigError, match="is a file"):
            load_config(None, [override])
    with pytest.raises(ConfigError, match="override"):
        load_config(None, ["train.lr=[1, 2"])


# ---- training --------------------------------------------------------------------------------------------------


def test_non_finite_loss_stops_before_the_update(tiny_model, monkeypatch):
    from types import SimpleNamespace

    import torch

    from captioner.config import Config
    from captioner.training import loop

    monkeypatch.setattr(loop, "caption_loss", lambda *a: torch.tensor(float("nan"), requires_grad=True))
    optimizer = torch.optim.AdamW(tiny_model.decoder.parameters(), lr=0.1)
    before = {k: v.clone() for k, v in tiny_model.decoder.state_dict().items()}
    batch = SimpleNamespace(captions=torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(loop.TrainingError, match="nan"):
        loop.train_step(tiny_model, tiny_model.decoder, optimizer, batch, Config())
    after = tiny_model.decoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_training_error_exits_3(tmp_path, monkeypatch, capsys):
    from captioner.training import loop

    def broken_fit(cfg, resume=False):
        raise loop.TrainingError("training loss became nan")

    monkeypatch.setattr(loop, "fit", broken_fit)
    config = tmp_path / "c.yaml"
    config.write_text(f"train:\n  out_dir: {tmp_path / 'run'}\n")
    assert main(["train", "--config", str(config)]) == 3
    err = capsys.readouterr().err
    assert "loss became nan" in err and "Traceback" not in err


def test_stale_checkpoint_temp_files_are_removed_when_a_run_opens(tmp_path):
    from captioner.config import config_from_dict
    from captioner.training.distributed import Dist
    from captioner.training.run_folder import open_run

    run = tmp_path / "run"
    run.mkdir()
    stale = run / ".train_state.safetensors.abc123.tmp"
    stale.write_bytes(b"\0" * 1000)
    keep = run / "best.safetensors"
    keep.write_bytes(b"x")
    open_run(config_from_dict({"train": {"out_dir": str(run)}}), True, Dist())
    assert not stale.exists() and keep.exists()


def test_disk_full_while_writing_output_is_one_line_exit_4(tmp_path, tiny_checkpoint, monkeypatch, capsys):
    import errno

    from captioner.outputs import CaptionWriter

    def full(self, caption):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(CaptionWriter, "write", full)
    [img] = write_images(tmp_path, 1)
    out = tmp_path / "o.jsonl"
    out.write_text("old\n")
    assert _caption(tmp_path, tiny_checkpoint, img, "--output", out) == 4
    err = capsys.readouterr().err
    assert "No space left" in err and "Traceback" not in err
    assert out.read_text() == "old\n"  # the previous output is untouched


# ---- checkpoints -----------------------------------------------------------------------------------------------


def _rewrite_meta(src, dst, change):
    from captioner.models.checkpoint import load_tensors, save_tensors

    tensors, meta = load_tensors(src)
    save_tensors(dst, tensors, change(meta))


@pytest.mark.parametrize("change, reason", [
    (lambda m: [], "JSON object"), (lambda m: None, "JSON object"),
    (lambda m: {**m, "model": {**m["model"], "hidden_dim": 20000}}, "hidden_dim"),
    (lambda m: {**m, "encoder_dim": 10**12}, "encoder_dim"),
    (lambda m: {**m, "model": {**m["model"], "hidden_dim": 32}}, "do not match"),
    (lambda m: {**m, "vocab": "abc"}, "vocab"),
    (lambda m: {**m, "decode": {**m["decode"], "length_penalty": 10**400}}, "length_penalty"),
])
def test_hostile_checkpoint_metadata_is_a_checkpoint_error(tmp_path, tiny_checkpoint, change, reason):
    from captioner.models.checkpoint import CheckpointError, load_model

    bad = tmp_path / "bad.safetensors"
    _rewrite_meta(tiny_checkpoint, bad, change)
    with pytest.raises(CheckpointError, match=reason):
        load_model(bad)


def test_deeply_nested_metadata_is_a_checkpoint_error(tmp_path, tiny_checkpoint):
    import torch
    from safetensors.torch import save_file

    from captioner.models.checkpoint import CheckpointError, load_tensors

    bad = tmp_path / "deep.safetensors"
    save_file({"x": torch.zeros(1)}, str(bad), metadata={"json": "[" * 100_000 + "]" * 100_000})
    with pytest.raises(CheckpointError):
        load_tensors(bad)


def test_checkpoint_cannot_name_a_file_to_open(tmp_path, tiny_checkpoint, monkeypatch):
    from captioner import api

    seen = []
    real = api.build_encoder
    monkeypatch.setattr(api, "build_encoder",
                        lambda name, weights, **kw: seen.append(weights) or real(name, None, **kw))
    bad = tmp_path / "named.safetensors"
    _rewrite_meta(tiny_checkpoint, bad, lambda m: {**m, "model": {**m["model"], "encoder_weights": "/etc/passwd"}})
    api.Captioner.load(bad, precision="reference")
    assert seen == [None]


# ---- damaged JPEGs that libjpeg decodes without an error (issue 20 item 9) -----------------------------------


def _photo(size=(320, 240), seed=0):
    """A photo-like image: smooth colour waves under noise (no flat areas, nothing exactly grey)."""
    import numpy as np
    from PIL import Image

    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    waves = np.stack([128 + 90 * np.sin(x / 29 + c) * np.cos(y / 17 - c) for c in range(3)], -1)
    noise = np.random.default_rng(seed).normal(0, 16, waves.shape)
    return Image.fromarray(np.clip(waves + noise, 0, 255).astype(np.uint8))


def _jpeg(image, **kwargs) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90, **kwargs)
    return buffer.getvalue()


def _patch_frame_size(data: bytes, width: int, height: int) -> bytes:
    import struct

    sof = next(i for i in range(len(data) - 1) if data[i] == 0xFF and data[i + 1] in (0xC0, 0xC2))
    return data[: sof + 5] + struct.pack(">HH", height, width) + data[sof + 9:]


def _damaged_jpegs() -> dict[str, bytes]:
    """Each decodes with PIL without an error to a mostly grey image (checked in the test below)."""
    baseline, progressive = _jpeg(_photo()), _jpeg(_photo(), progressive=True)
    return {
        "half_plus_eoi.jpg": baseline[: len(baseline) // 2] + b"\xff\xd9",
        "sof_7000x9000.jpg": _patch_frame_size(baseline, 7000, 9000),
        "sof_640x480.jpg": _patch_frame_size(baseline, 640, 480),  # too few blocks' data, not absurdly few
        # cut inside its first AC scans (PIL's progression: DC, then AC bands; the last scan is ~the back half)
        "progressive_cut_plus_eoi.jpg": progressive[: len(progressive) // 3] + b"\xff\xd9",
        "progressive_dc_cut_plus_eoi.jpg": progressive[: len(progressive) // 50] + b"\xff\xd9",
    }


def _good_jpegs() -> dict[str, bytes]:
    from PIL import Image

    grey_bottom = _photo()
    grey_bottom.paste((128, 128, 128), (0, 120, 320, 240))  # a photo of a grey wall, in exactly the fill colour
    return {
        "grey.jpg": _jpeg(Image.new("RGB", (320, 240), (128, 128, 128))),
        "grey_progressive.jpg": _jpeg(Image.new("RGB", (320, 240), (128, 128, 128)), progressive=True),
        "grey_gray.jpg": _jpeg(Image.new("L", (320, 240), 128)),
        "grey_bottom.jpg": _jpeg(grey_bottom),
        "photo.jpg": _jpeg(_photo()),
        "photo_progressive.jpg": _jpeg(_photo(), progressive=True),
    }


@pytest.mark.parametrize("name", sorted(_damaged_jpegs()))
def test_damaged_jpeg_is_refused_not_captioned_as_grey(tmp_path, name):
    import io

    import numpy as np
    from PIL import Image

    from captioner.images import ImageLoadError, open_image

    data = _damaged_jpegs()[name]
    with Image.open(io.BytesIO(data)) as plain:  # PIL alone: no error, and much of the picture is grey
        plain.draft("RGB", (224, 224))
        grey = (np.asarray(plain.convert("RGB")) == 128).all(-1).mean()
    if name == "progressive_cut_plus_eoi.jpg":  # the DC scan is whole: no grey, the lower part lacks detail
        assert grey == 0
    else:
        assert grey > 0.2
    path = tmp_path / name
    path.write_bytes(data)
    for item in (path, data):
        for target_size in (224, 1000):  # with and without reduced-size decoding
            with pytest.raises(ImageLoadError, match="incomplete scan data") as info:
                open_image(item, target_size)
            assert "grey" in info.value.reason or "need at least" in info.value.reason
    with pytest.raises(ImageLoadError, match=f"{name}: damaged JPEG"):
        open_image(path)


def test_frame_header_claiming_far_more_pixels_than_the_data_holds_is_refused_before_decoding(monkeypatch):
    from PIL import ImageFile

    from captioner.images import ImageLoadError, open_image

    decoded = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size))
    with pytest.raises(ImageLoadError, match=r"7000x9000 pixels, which need at least [\d,]+ bytes"):
        open_image(_damaged_jpegs()["sof_7000x9000.jpg"])
    assert decoded == []


@pytest.mark.parametrize("name", sorted(_good_jpegs()))
def test_complete_jpegs_in_the_fill_colour_still_load_unchanged(name):
    import io

    from PIL import Image

    from captioner.images import open_image

    data = _good_jpegs()[name]
    with Image.open(io.BytesIO(data)) as plain:
        want = plain.convert("RGB").tobytes()
    for target_size in (224, 1000):  # 1000: full size, so the pixels can be compared with PIL's own decode
        image = open_image(data, target_size)
        assert image.size == (320, 240) and image.mode == "RGB"
    assert image.tobytes() == want


def test_normal_photos_are_decoded_once_a_grey_one_twice(monkeypatch):
    """The cheap test (the bottom-right pixel) keeps the second decode off ordinary photos."""
    from PIL import ImageFile

    from captioner.images import open_image

    loads = []
    original = ImageFile.ImageFile.load

    def load(self):  # counts decodes: PIL calls load() again on loaded images, which have no tiles left
        if self.tile:
            loads.append(self.size)
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    good = _good_jpegs()
    open_image(good["photo.jpg"])
    assert len(loads) == 1
    open_image(good["grey.jpg"])
    assert len(loads) == 3


def test_damaged_jpegs_are_error_captions_in_the_api(tmp_path, tiny_checkpoint):
    from captioner.api import Captioner

    folder = tmp_path / "in"
    folder.mkdir()
    for name, data in {**_damaged_jpegs(), **_good_jpegs()}.items():
        (folder / name).write_bytes(data)
    paths = sorted(folder.iterdir())
    results = Captioner.load(tiny_checkpoint, precision="reference").caption(paths, batch_size=4, on_error="skip")
    assert [r.source for r in results] == [str(p) for p in paths]
    for path, result in zip(paths, results, strict=True):
        if path.name in _damaged_jpegs():
            assert not result.ok and result.text == ""
            assert result.error.startswith(f"{path}: damaged JPEG, incomplete scan data"), result.error
        else:
            assert result.ok and result.text, result.error


def test_damaged_jpegs_are_error_records_and_exit_1_in_the_cli(tmp_path, tiny_checkpoint, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    damaged = _damaged_jpegs()
    for name, data in damaged.items():
        (folder / name).write_bytes(data)
    (folder / "photo.jpg").write_bytes(_good_jpegs()["photo.jpg"])
    out = tmp_path / "o.jsonl"
    assert _caption(tmp_path, tiny_checkpoint, folder, "--format", "jsonl", "--output", out) == 1
    records = {json.loads(line)["path"]: json.loads(line) for line in out.read_text().splitlines()}
    assert records[str(folder / "photo.jpg")]["error"] is None and records[str(folder / "photo.jpg")]["caption"]
    for name in damaged:
        record = records[str(folder / name)]
        assert not record["caption"] and "damaged JPEG, incomplete scan data" in record["error"]
    err = capsys.readouterr().err
    assert all(any(name in line and "incomplete scan data" in line for line in err.splitlines()) for name in damaged)
    assert f"{len(damaged)} of {len(damaged) + 1} images failed" in err


# ---- found by red-teaming (docs/robustness.md, the rows after issue 20's) ---------------------------------------


def test_text_output_keeps_one_line_a_record_for_names_with_newlines_and_tabs(tmp_path, tiny_checkpoint):
    [a, b, c] = write_images(tmp_path / "src", 3)
    folder = tmp_path / "in"
    folder.mkdir()
    for src, name in ((a, "new\nline.jpg"), (b, "tab\there.jpg"), (c, "cr\rhere.jpg")):
        shutil.copy(src, folder / name)
    out = tmp_path / "o.txt"
    args = (folder, "--format", "text", "--output", out, "--precision", "reference", "--n-best", "2")
    assert _caption(tmp_path, tiny_checkpoint, *args) == 0
    first = out.read_bytes().decode("utf-8")
    lines = first.split("\n")[:-1]
    assert len(lines) == 6 and all(line.count("\t") == 1 and "\r" not in line for line in lines)
    assert {line.split("\t")[0] for line in lines} == {f"{folder}/new\\nline.jpg", f"{folder}/tab\\there.jpg",
                                                        f"{folder}/cr\\rhere.jpg"}
    assert _caption(tmp_path, tiny_checkpoint, *args, "--resume") == 0  # all done: nothing appended twice
    assert out.read_bytes().decode("utf-8") == first


def test_int8_calibration_that_is_deep_or_holds_unusable_ranges_is_a_calibration_error(tmp_path):
    from captioner.runtime.int8 import CalibrationError, read_calibration

    def ranges(low, high):
        array = lambda v: {"CLS": "numpy.array", "data": [v], "dtype": "float32"}  # noqa: E731
        return {"format": 1, "encoder": "enc", "ranges": {"CLS": "TensorsData", "data": {
            "t": {"CLS": "TensorData", "lowest": array(low), "highest": array(high)}}}}

    path = tmp_path / "m.int8.json"
    path.write_text(json.dumps(ranges(0.0, 6.0)))
    assert set(read_calibration(path, "enc")["data"]) == {"t"}
    for payload, reason in ((ranges(0.0, float("nan")), "not finite"), (ranges(float("-inf"), 1.0), "not finite"),
                            (ranges(0.0, 1e5), "not finite"), (ranges(7.0, 6.0), "above")):
        text = json.dumps(payload)
        path.write_text(text.replace('"float32"', '"float16"') if "100000" in text else text)
        with pytest.raises(CalibrationError, match=reason):
            read_calibration(path, "enc")
    int8_bound = ranges(0.0, 6.0)
    int8_bound["ranges"]["data"]["t"]["lowest"] = {"CLS": "numpy.array", "data": [-300], "dtype": "int8"}
    path.write_text(json.dumps(int8_bound))  # was an OverflowError traceback from ONNX Runtime's quantiser
    with pytest.raises(CalibrationError, match="does not fit its dtype"):
        read_calibration(path, "enc")
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CalibrationError, match="nested too deeply"):
        read_calibration(path, "enc")


def test_blank_captions_are_dropped_with_a_warning_and_an_image_left_without_any_is_refused(tmp_path):
    from captioner.data.readers import DatasetError, read_coco, read_flickr8k, read_karpathy, read_table

    karpathy = tmp_path / "k.json"
    two = [{"filename": "a.jpg", "split": "test", "sentences": [{"raw": "a dog"}, {"tokens": [" "]}]},
           {"filename": "b.jpg", "split": "test", "sentences": [{"raw": "a cat"}]}]
    karpathy.write_text(json.dumps({"images": two}))
    with pytest.warns(UserWarning, match=r"k\.json: 1 blank caption\(s\) ignored"):
        assert [s.captions for s in read_karpathy(karpathy, tmp_path, "test")] == [["a dog"], ["a cat"]]
    for sentences, reason in (([], "no captions"), ([{"raw": "  "}], "no captions"), ([{"tokens": "a dog"}], "tokens")):
        karpathy.write_text(json.dumps({"images": [{"filename": "a.jpg", "split": "test", "sentences": sentences}]}))
        with pytest.raises(DatasetError, match=reason), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            read_karpathy(karpathy, tmp_path, "test")
    coco = tmp_path / "c.json"
    coco.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
                                "annotations": [{"image_id": 1, "caption": ""}, {"image_id": 2, "caption": "a cat"},
                                                {"image_id": 1, "caption": "a dog"}]}))
    with pytest.warns(UserWarning, match="1 blank"):
        assert [(s.image.name, s.captions) for s in read_coco(coco, tmp_path)] == [("a.jpg", ["a dog"]),
                                                                                    ("b.jpg", ["a cat"])]
    coco.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": []}))
    assert read_coco(coco, tmp_path) == []  # no captions at all: not "every caption is blank"
    table = tmp_path / "t.csv"
    table.write_text("image,caption\na.jpg,a dog\nb.jpg,\nc.jpg, \n")
    with pytest.warns(UserWarning, match=r"t\.csv: 2 blank"):
        assert [s.image.name for s in read_table(table)] == ["a.jpg"]  # b and c are left without captions
    table.write_text("image,caption\nb.jpg,\n")
    with pytest.raises(DatasetError, match="every caption is blank"), pytest.warns(UserWarning):
        read_table(table)
    table.write_text("image,caption\n ,a dog\n")
    with pytest.raises(DatasetError, match=r"t\.csv:2: the image name is empty"):
        read_table(table)
    root = tmp_path / "f8k"
    root.mkdir()
    (root / "Flickr_8k.devImages.txt").write_text("a.jpg\nb.jpg\n")
    (root / "Flickr8k.token.txt").write_text("a.jpg#0\ta dog\na.jpg#1\t \nb.jpg#0\t\n")
    with pytest.raises(DatasetError, match=r"1 images of the dev split have no captions, e.g. \['b.jpg'\]"), \
            pytest.warns(UserWarning, match="2 blank"):
        read_flickr8k(root, "dev")


def test_blank_references_are_ignored_by_evaluate_not_a_scorer_traceback(tmp_path, tiny_checkpoint, capsys):
    [a, b] = write_images(tmp_path, 2)
    annotations = tmp_path / "a.jsonl"
    rows = [{"image": a.name, "caption": " "}, {"image": a.name, "caption": "a dog"}, {"image": b.name, "caption": ""},
            {"image": b.name, "caption": "a cat"}]
    annotations.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.warns(UserWarning, match="2 blank"):
        assert _evaluate(tiny_checkpoint, annotations) == 0
    assert "Traceback" not in capsys.readouterr().err


def test_text_resume_refuses_two_names_it_would_write_the_same(tmp_path, tiny_checkpoint, capsys):
    [a, b] = write_images(tmp_path / "src", 2)
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(a, folder / "a\\nb.jpg")  # a backslash and an n
    shutil.copy(b, folder / "a\nb.jpg")  # a newline: both are written a\nb.jpg
    out = tmp_path / "o.txt"
    out.write_text("precious\n")
    args = (folder, "--format", "text", "--output", out, "--precision", "reference", "--resume")
    assert _caption(tmp_path, tiny_checkpoint, *args) == 2
    err = capsys.readouterr().err
    assert "are written the same in the text format" in err
    assert repr(f"{folder}/a\\nb.jpg") in err and repr(f"{folder}/a\nb.jpg") in err  # repr tells them apart
    assert out.read_text() == "precious\n"
    assert _caption(tmp_path, tiny_checkpoint, *args[:-1], "--format", "jsonl") == 0  # other formats: no clash


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_resume_refuses_an_undecodable_byte_and_the_characters_that_write_it(tmp_path, tiny_checkpoint, capsys, fmt):
    [a, b] = write_images(tmp_path / "src", 2)
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(a, os.path.join(os.fsencode(folder), b"x\xff.jpg"))  # the byte 0xff
    shutil.copy(b, folder / "x\\xff.jpg")  # the four characters \xff: both are written x\xff.jpg
    out = tmp_path / f"o.{fmt}"
    args = (folder, "--format", fmt, "--output", out, "--precision", "reference")
    assert _caption(tmp_path, tiny_checkpoint, *args) == 0
    first = out.read_bytes()
    assert _caption(tmp_path, tiny_checkpoint, *args, "--resume") == 2  # it took the second for done
    err = capsys.readouterr().err
    assert f"are written the same in the {fmt} format" in err and "rename one of them" in err
    assert "x\\udcff.jpg'" in err and "x\\\\xff.jpg'" in err
    assert out.read_bytes() == first


def test_coco_image_id_given_to_two_files_is_refused(tmp_path):
    from captioner.data.readers import DatasetError, read_coco

    coco = tmp_path / "c.json"
    images = [{"id": 1, "file_name": "a.jpg"}, {"id": 1, "file_name": "b.jpg"}]
    coco.write_text(json.dumps({"images": images, "annotations": [{"image_id": 1, "caption": "a dog"}]}))
    with pytest.raises(DatasetError, match="image id 1 is given to both a.jpg and b.jpg"):
        read_coco(coco, tmp_path)
    coco.write_text(json.dumps({"images": images[:1] * 2, "annotations": [{"image_id": 1, "caption": "a dog"}]}))
    assert [s.captions for s in read_coco(coco, tmp_path)] == [["a dog"]]  # the same entry twice is harmless


def test_byte_order_mark_of_a_text_annotation_or_split_list_is_ignored(tmp_path):
    from captioner.data.readers import read_table
    from captioner.data.splits import read_split_list

    bom = b"\xef\xbb\xbf"
    table = tmp_path / "t.csv"
    table.write_bytes(bom + b"image,caption\r\na.jpg,a dog\r\n")  # Excel's "CSV UTF-8"
    assert [(s.image.name, s.captions) for s in read_table(table)] == [("a.jpg", ["a dog"])]
    listed = tmp_path / "dev.txt"
    listed.write_bytes(bom + b"a.jpg\r\nb.jpg\r\n")
    assert read_split_list(listed) == ["a.jpg", "b.jpg"]


def test_integer_too_large_for_a_float_key_is_a_config_error():
    from captioner.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"train\.lr"):
        load_config(None, ["train.lr=1" + "0" * 400])


def test_checkpoint_path_that_is_a_folder_says_so(tmp_path):
    from captioner.models.checkpoint import CheckpointError, load_model

    folder = tmp_path / "model.safetensors"
    folder.mkdir()
    with pytest.raises(CheckpointError, match="is a folder"):
        load_model(folder)


def test_number_of_more_than_4300_digits_is_a_data_config_or_checkpoint_error(tmp_path):
    import torch
    from safetensors.torch import save_file

    from captioner.config import ConfigError, load_config
    from captioner.data.readers import DatasetError, read_coco
    from captioner.models.checkpoint import CheckpointError, load_tensors

    digits = "1" * 5000  # Python refuses to convert it to an int: a plain ValueError, outside every except
    coco = tmp_path / "c.json"
    coco.write_text(f'{{"images": [{{"id": {digits}, "file_name": "a.jpg"}}], "annotations": []}}')
    with pytest.raises(DatasetError, match="not valid JSON"):
        read_coco(coco, tmp_path)
    config = tmp_path / "c.yaml"
    config.write_text(f"train:\n  lr: {digits}\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(config)
    checkpoint = tmp_path / "c.safetensors"
    save_file({"x": torch.zeros(1)}, str(checkpoint), metadata={"json": f'{{"format": "captioner", "x": {digits}}}'})
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_tensors(checkpoint)


def test_csv_resume_drops_a_record_cut_inside_a_quoted_name(tmp_path, tiny_checkpoint):
    [a, b] = write_images(tmp_path / "src", 2)
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(a, folder / "new\nline.jpg")
    shutil.copy(b, folder / "z.jpg")
    full, out = tmp_path / "full.csv", tmp_path / "o.csv"
    args = (folder, "--format", "csv", "--precision", "reference")
    assert _caption(tmp_path, tiny_checkpoint, *args, "--output", full) == 0
    header = full.read_bytes().split(b"\n")[0]
    (tmp_path / ".o.csv.partial").write_bytes(header + b'\n"' + os.fsencode(folder) + b"/new\n")  # cut by a kill
    assert _caption(tmp_path, tiny_checkpoint, *args, "--output", out, "--resume") == 0
    assert out.read_bytes() == full.read_bytes()


# ---- red-team pass 2: the app and training ---------------------------------------------------------------------


def _shapes_config(tmp_path, **data):
    """A tiny training recipe over the synthetic shapes (24 images): one epoch of a small decoder."""
    import yaml

    from tests.synthetic import make_shapes_dataset

    csv_path = make_shapes_dataset(tmp_path / "images", copies=1)[0]
    cfg = {"model": {"embed_dim": 16, "hidden_dim": 24, "attention_dim": 12, "feature_dim": 20, "dropout": 0.0,
                     "feature_dropout": 0.0},
           "data": {"format": "csv", "annotations": str(csv_path), "min_word_count": 1, "val_fraction": 0.25,
                    "cache_dir": str(tmp_path / "cache"), **data},
           "train": {"out_dir": str(tmp_path / "run"), "epochs": 1, "batch_size": 8, "warmup_steps": 1,
                     "patience": 0},
           "decode": {"beam_size": 2, "max_length": 6}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_a_vocabulary_left_without_words_is_a_data_error_not_a_validation_traceback(tmp_path, capsys):
    config = _shapes_config(tmp_path, min_word_count=1000)  # no word of the captions is that frequent
    for extra in (["--dry-run"], []):
        assert main(["train", "--config", str(config), *extra]) == 2
        err = capsys.readouterr().err
        assert "data.min_word_count=1000" in err and "vocabulary would be empty" in err, err
        assert "Traceback" not in err
    assert not (tmp_path / "run" / "train_state.safetensors").exists()


@pytest.mark.parametrize("index", ['[1, 2]', '{"rows": [0]}', '{"rows": null}', '{"rows": {"k": "0"}}',
                                   '{"rows": {"k": -2}}', '{"rows": {"k": true}}'])
def test_a_feature_store_index_of_the_wrong_shape_is_named_and_its_rows_recomputed(tmp_path, index, capsys):
    import numpy as np

    from captioner.data.feature_store import FeatureStore

    store = FeatureStore(tmp_path / "store")
    writer = store.writer(2)
    writer.add(["k", "j"], np.ones((2, 3, 4), dtype=np.float16))
    writer.close()
    [index_file] = (tmp_path / "store").glob("shard-*.index.json")
    index_file.write_text(index)
    assert FeatureStore(tmp_path / "store").index() == {}  # was a TypeError / AttributeError, or a row at -2
    assert str(index_file).removesuffix(".index.json") in capsys.readouterr().err
    assert not index_file.exists()


def test_a_shard_copied_in_from_another_encoders_cache_is_not_used(tmp_path, capsys):
    import shutil

    import torch

    from captioner.data.features import FeatureCache
    from captioner.models.encoder import build_encoder

    paths = write_images(tmp_path / "images", 2)
    encoder = build_encoder("efficientnet_lite0", image_size=96)
    plain, mirrored = FeatureCache(tmp_path / "cache", encoder), FeatureCache(tmp_path / "cache", encoder, True)
    mirrored.extract(paths, progress=False)
    for shard in mirrored.folder.glob("shard-*"):  # same rows keys (they name the image), other features
        shutil.copy(shard, plain.folder / shard.name)
    plain = FeatureCache(tmp_path / "cache", encoder)
    assert not plain.is_cached(paths[0])
    assert "not this cache's" in capsys.readouterr().err
    plain.extract(paths, progress=False)
    with torch.inference_mode():
        expected = encoder(torch.stack([encoder.preprocess(_open_for(p, encoder)) for p in paths]))
    assert torch.allclose(plain.load(paths).float(), expected, atol=2e-2)


def _open_for(path, encoder):
    from captioner.images import open_image

    return open_image(path, encoder.preprocess.size)


def test_an_image_gone_after_the_check_is_skipped_or_named_not_a_traceback(tmp_path, monkeypatch, capsys):
    from captioner.data import features

    config = _shapes_config(tmp_path)
    gone = sorted((tmp_path / "images").glob("*.png"))[3]
    real = features.FeatureCache.extract

    def delete_first(self, images, **kwargs):  # deleted between the split's check and its extraction
        gone.unlink(missing_ok=True)
        return real(self, images, **kwargs)

    monkeypatch.setattr(features.FeatureCache, "extract", delete_first)
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"{gone}: cannot be read" in err and "Traceback" not in err, err  # was a FileNotFoundError
    shutil.copy(sorted((tmp_path / "images").glob("*.png"))[0], gone)
    assert main(["train", "--config", str(config), "--set", "data.on_missing=skip",
                 "--set", f"train.out_dir={tmp_path / 'run2'}"]) == 0
    assert "skipping 1 unreadable images" in capsys.readouterr().out  # the training log


def test_an_image_changed_while_or_after_it_is_encoded_is_never_given_stale_features(tmp_path, monkeypatch):
    from captioner.data import features
    from captioner.data.readers import DatasetError
    from captioner.models.encoder import build_encoder

    a, b = write_images(tmp_path / "images", 2)
    cache = features.FeatureCache(tmp_path / "cache", build_encoder("efficientnet_lite0", image_size=96))
    real = features.open_image

    def rewritten_while_read(path, size):
        image = real(path, size)
        if path == a:
            shutil.copy(b, a)  # another picture, another size and time: another key
        return image

    monkeypatch.setattr(features, "open_image", rewritten_while_read)
    cache.extract([a, b], progress=False)
    assert not cache.is_cached(a)  # was: a's old pixels stored under its new key, reused by every later run
    with pytest.raises(DatasetError, match=r"1 image\(s\) changed after their features were extracted, e\.g\. "
                       + str(a)):
        cache.load([a, b])  # was a StoreError (ValueError) traceback
    a.unlink()
    with pytest.raises(DatasetError, match="disappeared after its features were extracted"):
        cache.load([a, b])


def test_a_validation_split_left_empty_by_on_missing_skip_stops_the_run_before_any_extraction(tmp_path, capsys):
    import csv

    config = _shapes_config(tmp_path, on_missing="skip", val_list=str(tmp_path / "dev.txt"))
    table = tmp_path / "images" / "captions.csv"
    names = sorted({row["image"] for row in csv.DictReader(table.open())})
    (tmp_path / "dev.txt").write_text("\n".join(names[:3]) + "\n")
    for name in names[:3]:
        (tmp_path / "images" / name).unlink()
    assert main(["train", "--config", str(config)]) == 2
    assert "the dev split has no usable images" in capsys.readouterr().err
    assert not list((tmp_path / "cache").glob("*/shard-*"))  # the training split used to be encoded first


def test_csv_resume_keeps_every_record_after_a_stray_quote_in_an_unquoted_field(tmp_path, tiny_checkpoint):
    """A hand-edited row `…/a"b.jpg,…` (csv reads that quote as a literal; our writer would have quoted the
    field) made the quote count odd, so it and every record after it were dropped and captioned again, the
    edit lost."""
    [a, b, c] = write_images(tmp_path / "src", 3)
    folder = tmp_path / "in"
    folder.mkdir()
    for src, name in ((a, 'a"b.jpg'), (b, "b.jpg"), (c, "c.jpg")):
        shutil.copy(src, folder / name)
    full, out = tmp_path / "full.csv", tmp_path / "o.csv"
    args = (folder, "--format", "csv", "--precision", "reference")
    assert _caption(tmp_path, tiny_checkpoint, *args, "--output", full) == 0
    header, quoted, second, third, end = full.read_bytes().split(b"\r\n")
    assert quoted.startswith(b'"') and not end
    caption_and_scores = quoted.split(b'.jpg",', 1)[1].split(b",", 1)[1]
    edited = os.fsencode(folder) + b'/a"b.jpg,a caption written by hand,' + caption_and_scores
    (tmp_path / ".o.csv.partial").write_bytes(b"\r\n".join([header, edited, second, b""]))
    assert _caption(tmp_path, tiny_checkpoint, *args, "--output", out, "--resume") == 0
    assert out.read_bytes() == b"\r\n".join([header, edited, second, third, b""])  # only c.jpg captioned


@pytest.mark.parametrize("raw, kept", [
    # a stray quote inside an unquoted field is a literal character: every record is whole
    (b'path,caption\r\nphotos/a"b.jpg,a dog runs\r\nphotos/c.jpg,a cat\r\n', None),
    (b'path,caption\r\nphotos/a"b.jpg,a "big" dog\r\nphotos/c.jpg,a cat\r\n', None),
    # a quote after a quoted field's closing quote is literal too (csv's non-strict reading)
    (b'path,caption\r\n"photos/a,b.jpg"x"y,a dog\r\nphotos/c.jpg,a cat\r\n', None),
    # a doubled quote inside a quoted field is an escaped quote, also beside a newline
    (b'path,caption\r\n"photos/say ""hi"".jpg",a dog\r\n"photos/""\nz"".jpg",a cat\r\n', None),
    # a record cut inside a quoted field that holds a newline is dropped, also after a stray quote
    (b'path,caption\r\nphotos/a.jpg,a dog\r\n"photos/new\n', b'path,caption\r\nphotos/a.jpg,a dog\r\n'),
    (b'path,caption\r\nphotos/a"b.jpg,a dog\r\n"photos/new\n', b'path,caption\r\nphotos/a"b.jpg,a dog\r\n'),
    (b'path,caption\r\n"photos/new\nline.jpg","a dog\n', b'path,caption\r\n'),
    (b'path,caption\r\n"photos/a ""\nb.jpg""\n', b'path,caption\r\n'),  # the last "" is escaped: still open
])
def test_whole_csv_records_follow_the_csv_modules_reading(raw, kept):
    import csv
    import io

    from captioner.cli.output_file import _whole_csv_records

    kept = raw if kept is None else kept
    assert _whole_csv_records(raw) == kept
    rows = list(csv.reader(io.StringIO(kept.decode(), newline="")))
    whole = list(csv.reader(io.StringIO(raw.decode(), newline="")))
    assert rows == whole[:len(rows)]  # the records kept are whole, as csv reads them


def test_an_output_that_is_a_fifo_is_written_through_and_never_replaced_by_a_file(tmp_path, tiny_checkpoint):
    """`--output /dev/null` (or a named pipe) used to get a temporary file renamed onto it: the device node
    itself was replaced by a regular file (as root, /dev/null stopped being a device)."""
    import stat
    import threading

    [img] = write_images(tmp_path / "src", 1)
    fifo = tmp_path / "out.txt"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    assert _caption(tmp_path, tiny_checkpoint, img, "--precision", "reference", "--output", fifo) == 0
    reader.join(30)
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    assert got and got[0].decode().startswith(f"{img}\t")
    assert not list(tmp_path.glob(".*partial"))
    assert _caption(tmp_path, tiny_checkpoint, img, "--output", fifo, "--resume") == 2  # nothing to resume from


def test_an_output_that_is_a_symbolic_link_stays_one_and_its_file_gets_the_records(tmp_path, tiny_checkpoint):
    [img] = write_images(tmp_path / "src", 1)
    (tmp_path / "data").mkdir()
    real, link = tmp_path / "data" / "captions.jsonl", tmp_path / "latest.jsonl"
    real.write_text("old\n")
    link.symlink_to(real)
    args = (img, "--precision", "reference", "--format", "jsonl", "--output", link)
    assert _caption(tmp_path, tiny_checkpoint, *args) == 0
    assert link.is_symlink() and json.loads(real.read_text())["path"] == str(img)  # was: the link replaced


@pytest.mark.skipif(not os.path.exists("/dev/full") or not __import__("stat").S_ISCHR(os.stat("/dev/full").st_mode),
                    reason="needs Linux's /dev/full")
def test_an_output_device_that_is_full_is_named_exit_4_and_stays_a_device(tmp_path, tiny_checkpoint, capsys):
    import stat

    [img] = write_images(tmp_path / "src", 1)
    assert _caption(tmp_path, tiny_checkpoint, img, "--precision", "reference", "--output", "/dev/full") == 4
    err = capsys.readouterr().err
    assert "cannot write --output /dev/full: [Errno 28]" in err and "Traceback" not in err, err
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)  # was replaced by a regular file holding the records


def test_an_output_path_that_cannot_name_a_file_is_exit_4_not_a_traceback(tmp_path, tiny_checkpoint, capsys):
    [img] = write_images(tmp_path / "src", 1)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "loopA").symlink_to(tmp_path / "loopB")
    (tmp_path / "loopB").symlink_to(tmp_path / "loopA")
    for output, reason in ((tmp_path / "afile" / "x.txt", "Not a directory"),
                           (tmp_path / "loopA" / "x.txt", "Too many levels of symbolic links")):
        assert _caption(tmp_path, tiny_checkpoint, img, "--precision", "reference", "--output", output) == 4
        err = capsys.readouterr().err
        assert "cannot write" in err and reason in err and "Traceback" not in err, err


def test_an_output_in_a_folder_that_does_not_exist_names_the_folder_exit_4(tmp_path, tiny_checkpoint, capsys):
    """It was exit 2 with "[Errno 2] No such file or directory: '.../.x.txt.partial'", the hidden temporary file."""
    [img] = write_images(tmp_path / "src", 1)
    output = tmp_path / "nodir" / "x.txt"
    assert _caption(tmp_path, tiny_checkpoint, img, "--precision", "reference", "--output", output) == 4
    err = capsys.readouterr().err
    assert err == (f"captioner: error: cannot write --output {output}: [Errno 2] its folder {output.parent} "
                   "does not exist\n")
    assert not (tmp_path / "nodir").exists()
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")  # a dangling link as the folder: the same line, not exit 2
    gone = tmp_path / "gone" / "x.txt"
    assert _caption(tmp_path, tiny_checkpoint, img, "--precision", "reference", "--output", gone) == 4
    assert "its folder" in capsys.readouterr().err


def test_an_output_name_near_the_length_limit_is_written_and_resumed(tmp_path, tiny_checkpoint):
    """A 250-byte name is valid, but `.NAME.partial` is not (255 bytes at most): it was an OSError traceback."""
    from captioner.cli.output_file import PartialOutput

    images = write_images(tmp_path / "src", 2)
    out = tmp_path / ("a" * 246 + ".txt")
    args = ("--precision", "reference", "--output", out)
    assert _caption(tmp_path, tiny_checkpoint, images[0], *args) == 0
    assert out.read_text().startswith(f"{images[0]}\t")
    # A run killed after its first record leaves the temporary file; --resume must find it under the same name.
    partial = PartialOutput(out, "text").partial
    assert len(os.fsencode(partial.name)) <= 255
    partial.write_text(f"{images[0]}\tkept from the interrupted run\n")
    out.unlink()
    assert _caption(tmp_path, tiny_checkpoint, *images, *args, "--resume") == 0
    lines = out.read_text().splitlines()
    assert lines[0] == f"{images[0]}\tkept from the interrupted run" and len(lines) == 2
    assert lines[1].startswith(f"{images[1]}\t") and not partial.exists()


def test_calibrate_int8_skips_unreadable_images_and_refuses_a_zero_count(tmp_path, tiny_checkpoint):
    """A listed image that is missing or not an image, and `--count 0`, ended the script in tracebacks."""
    pytest.importorskip("onnxruntime")
    folder = tmp_path / "images"
    write_images(folder, 2)
    (folder / "notes.jpg").write_text("not an image")
    listed = tmp_path / "train.txt"
    listed.write_text("img_000.jpg\nimg_001.jpg\nnotes.jpg\ngone.jpg\n")
    script = [sys.executable, str(Path(__file__).parents[1] / "scripts" / "calibrate_int8.py"),
              "--images", str(folder), "--list", str(listed), "--checkpoint", str(tiny_checkpoint)]
    done = subprocess.run(script, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "skipped" in done.stderr and "notes.jpg" in done.stderr and "gone.jpg" in done.stderr, done.stderr
    assert "ranges from 2 images" in done.stdout and "Traceback" not in done.stderr
    refused = subprocess.run([*script, "--count", "0"], capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "--count and --batch-size must be >= 1" in refused.stderr


def test_output_to_the_commands_own_stdout_file_keeps_what_the_shell_wrote(tmp_path, tiny_checkpoint):
    """`captioner caption x --output /dev/stdout >> log.txt`: the link led to log.txt, and a new file renamed
    onto it lost the shell's earlier lines (and its later writes went to the replaced file)."""
    [img] = write_images(tmp_path / "src", 1)
    log = tmp_path / "log.txt"
    log.write_text("OLD LINE\n")
    with open(log, "a") as out:
        done = subprocess.run([sys.executable, "-m", "captioner", "caption", str(img), "--checkpoint",
                               str(tiny_checkpoint), "--precision", "reference", "--quiet", "--output", "/dev/stdout"],
                              stdout=out, stderr=subprocess.PIPE, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    first, record, *rest = log.read_text().split("\n")
    assert first == "OLD LINE" and record.startswith(f"{img}\t") and rest == [""]


def test_an_input_name_too_long_to_look_up_is_an_input_error_not_cannot_write(tmp_path, tiny_checkpoint, capsys):
    """`Path.exists()` raises ENAMETOOLONG instead of answering: such names came out as "cannot write", exit 4
    (an image among others was not even reported as missing)."""
    [img] = write_images(tmp_path / "src", 1)
    long = tmp_path / ("b" * 300)
    assert _caption(tmp_path, tiny_checkpoint, img, f"{long}.jpg", "--precision", "reference") == 1
    out, err = capsys.readouterr()
    assert out.startswith(f"{img}\t") and "1 given path(s) not found" in err and "cannot write" not in err
    assert _caption(tmp_path, f"{long}.safetensors", img) == 2
    assert "cannot read (File name too long)" in capsys.readouterr().err
    assert main(["train", "--config", f"{long}.yaml", "--dry-run"]) == 2
    assert "cannot be read (File name too long)" in capsys.readouterr().err


def test_a_held_out_share_with_no_image_says_how_to_fill_the_dev_split(tmp_path, capsys):
    """The README's three-row CSV: data.val_fraction (5%) of three images is none, and the dry run said only "the
    dev split has no usable images"."""
    images = write_images(tmp_path / "images", 3)
    table = tmp_path / "captions.csv"
    table.write_text("image,caption\n" + "".join(f"{p.name},a dog runs on the grass\n" for p in images))
    overrides = ["data.format=csv", f"data.annotations={table}", f"data.images={tmp_path / 'images'}",
                 f"train.out_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}", "data.min_word_count=1"]
    args = ["train", "--config", "configs/csv.yaml", "--dry-run"] + [item for o in overrides for item in ("--set", o)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "the dev split has no images: it holds out val_fraction (0.05)" in err
    assert "raise data.val_fraction, or name the validation images with data.val_annotations or data.val_list" in err
    (tmp_path / "dev.txt").write_text(images[0].name + "\n")
    assert main(args + ["--set", f"data.val_list={tmp_path / 'dev.txt'}"]) == 0  # the advice works


def test_csv_names_that_spreadsheets_run_as_formulas_are_text_and_resume(tmp_path, tiny_checkpoint, monkeypatch):
    [a, b] = write_images(tmp_path / "src", 2)
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(a, folder / '=HYPERLINK("http:x",1).png')
    shutil.copy(b, folder / "-b.png")
    monkeypatch.chdir(folder)
    full, out = tmp_path / "full.csv", tmp_path / "o.csv"
    names = ['=HYPERLINK("http:x",1).png', "-b.png"]
    args = ("--format", "csv", "--precision", "reference")
    assert main(["caption", *args, "--checkpoint", str(tiny_checkpoint), "--quiet", "--output", str(full),
                 "--", *names]) == 0
    import csv

    rows = list(csv.reader(full.open(newline="")))
    assert [r[0] for r in rows[1:]] == ["'" + n for n in names]
    header, first = full.read_bytes().split(b"\n")[:2]
    (tmp_path / ".o.csv.partial").write_bytes(header + b"\n" + first + b"\n")  # killed after one record
    assert main(["caption", *args, "--checkpoint", str(tiny_checkpoint), "--quiet", "--output", str(out),
                 "--resume", "--", *names]) == 0
    assert out.read_bytes() == full.read_bytes()  # the first name was found done, not captioned twice


def test_names_holding_terminal_escape_sequences_are_shown_not_run(tmp_path, tiny_checkpoint, capsys):
    [a, b] = write_images(tmp_path / "src", 2)
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(a, folder / "\x1b]52;c;cHduZWQ=\x07clip.jpg")  # OSC 52: sets the clipboard in some terminals
    shutil.copy(b, folder / "\x9b2Kc1\x7f.jpg")  # C1 CSI and DEL
    (folder / "\x1b[2Kbroken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    out = tmp_path / "o.txt"
    args = ["caption", str(folder), "--format", "text", "--precision", "reference", "--n-best", "2",
            "--checkpoint", str(tiny_checkpoint)]
    assert main([*args, "--output", str(out)]) == 1  # the broken file failed, the others were captioned
    assert main(args) == 1  # the same records on stdout
    written, (stdout, err) = out.read_text(encoding="utf-8"), capsys.readouterr()
    assert stdout == written
    for shown in (written, err):
        assert not any(c in shown for c in "\x1b\x9b\x7f\x07"), shown
    lines = written.split("\n")[:-1]
    assert {line.split("\t")[0] for line in lines} == {f"{folder}/\\x1b]52;c;cHduZWQ=\\x07clip.jpg",
                                                        f"{folder}/\\x9b2Kc1\\x7f.jpg", f"{folder}/\\x1b[2Kbroken.jpg"}
    assert f"failed: {folder}/\\x1b[2Kbroken.jpg" in err
    assert main([*args, "--output", str(out), "--resume"]) == 0  # all three found done
    assert out.read_text(encoding="utf-8") == written


def test_evaluate_and_training_name_a_missing_image_with_its_controls_shown(tmp_path, tiny_checkpoint, capsys):
    from captioner.training.prepare import _listed

    images = write_images(tmp_path, 2)
    gone = "\x1b[2Kgone\x9b.jpg"
    annotations = tmp_path / "a.jsonl"
    annotations.write_text("".join(json.dumps({"image": n, "caption": "a dog runs"}) + "\n"
                                   for n in [p.name for p in images] + [gone]))
    (tmp_path / "dev.txt").write_text("".join(f"{p.name}\n" for p in images) + gone + "\n")
    assert main(["evaluate", "--checkpoint", str(tiny_checkpoint), "--format", "jsonl", "--data", str(annotations),
                 "--precision", "reference", "--split", "dev", "--split-list", str(tmp_path / "dev.txt"),
                 "--output", str(tmp_path / "scores")]) == 0
    err = capsys.readouterr().err
    assert "skipping 1 missing images, e.g. " in err and "\\x1b[2Kgone\\x9b.jpg" in err
    assert "\x1b" not in err and "\x9b" not in err
    listed = _listed([(tmp_path / gone, "not found\x1b[2K")])  # a training run's unreadable images
    assert listed == f"\n  {tmp_path}/\\x1b[2Kgone\\x9b.jpg: not found\\x1b[2K"


def test_error_lines_show_the_controls_of_the_names_they_quote(tmp_path, tiny_checkpoint, capsys):
    """The lines on stderr of a training run whose data lists a missing image, of an evaluation whose every
    image failed, and of a caption run given a path that does not exist: the names' escapes are shown."""
    images = write_images(tmp_path / "images", 3)
    gone = "\x1b[2Kgone\x9b.jpg"
    table = tmp_path / "captions.csv"
    table.write_text("image,caption\n" + "".join(f"{n},a dog runs on the grass\n" for n in
                                                 [p.name for p in images] + [gone]))
    overrides = ["data.format=csv", f"data.annotations={table}", f"data.images={tmp_path / 'images'}",
                 f"train.out_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}", "data.min_word_count=1"]
    assert main(["train", "--config", "configs/csv.yaml", "--dry-run",
                 *[item for o in overrides for item in ("--set", o)]]) == 2
    train_err = capsys.readouterr().err
    assert "missing or empty" in train_err and "\\x1b[2Kgone\\x9b.jpg" in train_err
    assert len(train_err.strip().splitlines()) > 1  # the message's own list stays a list

    bad = tmp_path / "ev" / "\x1b[2Kbad\x9b.jpg"
    bad.parent.mkdir()
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    annotations = tmp_path / "ev" / "a.jsonl"
    annotations.write_text(json.dumps({"image": bad.name, "caption": "a dog"}) + "\n")
    (tmp_path / "ev" / "dev.txt").write_text(bad.name + "\n")
    assert main(["evaluate", "--checkpoint", str(tiny_checkpoint), "--format", "jsonl", "--data", str(annotations),
                 "--precision", "reference", "--split", "dev", "--split-list", str(tmp_path / "ev" / "dev.txt"),
                 "--output", str(tmp_path / "scores")]) == 1
    evaluate_err = capsys.readouterr().err
    assert "none of the 1 images could be captioned" in evaluate_err and "\\x1b[2Kbad\\x9b.jpg" in evaluate_err

    [img] = write_images(tmp_path / "one", 1)
    assert _caption(tmp_path, tiny_checkpoint, img, tmp_path / gone) == 1
    caption_err = capsys.readouterr().err
    assert "\\x1b[2Kgone\\x9b.jpg: no such file or directory" in caption_err
    for err in (train_err, evaluate_err, caption_err):
        assert "\x1b" not in err and "\x9b" not in err, err
