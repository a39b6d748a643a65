"""A model whose encoder no installed package ships (resnet50) captions from the CLI, the API and the app once
its encoder's weights file is given (`--encoder-weights`, `$CAPTIONER_ENCODER_WEIGHTS`); without it the error
says how to give it. These models could be trained but not used outside Python."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from captioner import Captioner
from captioner.cli import main
from captioner.config import ModelConfig
from captioner.models.checkpoint import save_model
from captioner.models.encoder import EncoderError
from tests.conftest import make_model, write_images


@pytest.fixture(scope="module")
def resnet50_files(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny decoder over resnet50's 2048-wide features, and a resnet50 weights file (random, as safetensors)."""
    import torchvision
    from safetensors.torch import save_file

    from captioner.models.vocab import Vocabulary
    from tests.conftest import WORDS

    root = tmp_path_factory.mktemp("resnet50")
    torch.manual_seed(0)
    weights = root / "resnet50.safetensors"
    save_file({k: v.contiguous() for k, v in torchvision.models.resnet50(weights=None).state_dict().items()},
              str(weights))
    cfg = ModelConfig(encoder="resnet50", image_size=64, encoder_head=0, embed_dim=16, hidden_dim=24,
                      attention_dim=12, feature_dim=20, dropout=0.0, feature_dropout=0.0)
    checkpoint = root / "r50.safetensors"
    save_model(make_model(Vocabulary.build([" ".join(WORDS)], min_count=1), cfg, encoder_dim=2048), checkpoint)
    return checkpoint, weights


def test_without_its_weights_file_the_error_says_how_to_give_it(resnet50_files, tmp_path, capsys):
    checkpoint, _ = resnet50_files
    with pytest.raises(EncoderError, match="needs the weights file the model was trained with.*encoder_weights="):
        Captioner.load(checkpoint)
    image = write_images(tmp_path / "in", 1)[0]
    assert main(["caption", str(image), "--checkpoint", str(checkpoint)]) == 2
    err = capsys.readouterr().err
    assert str(checkpoint) in err and "--encoder-weights FILE" in err


def test_with_its_weights_file_the_cli_captions_as_the_api_does(resnet50_files, tmp_path, capsys):
    checkpoint, weights = resnet50_files
    images = write_images(tmp_path / "in", 3)
    out = tmp_path / "out.jsonl"
    assert main(["caption", str(tmp_path / "in"), "--checkpoint", str(checkpoint), "--encoder-weights", str(weights),
                 "--precision", "reference", "--format", "jsonl", "--output", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    api = Captioner.load(checkpoint, encoder_weights=weights, precision="reference").caption(images)
    assert [r["caption"] for r in records] == [c.text for c in api] and all(c.ok for c in api)


def test_a_damaged_weights_file_is_a_clear_error_naming_it(resnet50_files, tmp_path, capsys):
    checkpoint, weights = resnet50_files
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(weights.read_bytes()[:1000])
    image = write_images(tmp_path / "in", 1)[0]
    assert main(["caption", str(image), "--checkpoint", str(checkpoint), "--encoder-weights", str(cut)]) == 2
    assert f"{cut}: not a readable weights file" in capsys.readouterr().err


def test_the_app_command_passes_the_weights_file_as_an_absolute_path(monkeypatch):
    from captioner.cli import app as app_cli

    monkeypatch.delenv(app_cli.ENCODER_WEIGHTS_ENV, raising=False)
    parser = argparse.ArgumentParser()
    app_cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["app", "--checkpoint", "m.safetensors", "--encoder-weights", "r50.pth",
                              "--server.port", "8502"])
    cmd, env = app_cli.command(args)
    assert env[app_cli.ENCODER_WEIGHTS_ENV] == str(Path("r50.pth").resolve())
    assert cmd[-2:] == ["--server.port", "8502"]  # not passed on to streamlit


def test_the_app_command_refuses_weights_without_a_checkpoint_or_a_missing_file(tmp_path, resnet50_files,
                                                                                 monkeypatch, capsys):
    """The app ignored a weights file without a checkpoint, and showed a missing one only in the browser."""
    from captioner.cli import app as app_cli

    checkpoint, weights = resnet50_files
    monkeypatch.delenv(app_cli.CHECKPOINT_ENV, raising=False)
    monkeypatch.delenv(app_cli.ENCODER_WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(app_cli.subprocess, "call", lambda *a, **k: pytest.fail("the server was started"))
    assert main(["app", "--encoder-weights", str(weights)]) == 2
    assert "is for the model of --checkpoint" in capsys.readouterr().err
    assert main(["app", "--checkpoint", str(checkpoint), "--encoder-weights", str(tmp_path / "nope.pth")]) == 2
    assert "encoder weights file not found" in capsys.readouterr().err


def test_the_app_loads_the_model_of_its_environment_with_the_weights_file(resnet50_files, monkeypatch, tmp_path):
    from streamlit.testing.v1 import AppTest

    checkpoint, weights = resnet50_files
    monkeypatch.setenv("CAPTIONER_CHECKPOINT", str(checkpoint))
    monkeypatch.delenv("CAPTIONER_ENCODER_WEIGHTS", raising=False)
    app = AppTest.from_file(str(Path(__file__).parent.parent / "app.py"), default_timeout=120).run()
    assert any("CAPTIONER_ENCODER_WEIGHTS" in e.value for e in app.error)  # explained in the page, no traceback
    assert not app.exception
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(weights.read_bytes()[:1000])
    monkeypatch.setenv("CAPTIONER_ENCODER_WEIGHTS", str(cut))
    app = AppTest.from_file(str(Path(__file__).parent.parent / "app.py"), default_timeout=120).run()
    [error] = app.error
    assert "not a readable weights file" in error.value and "CAPTIONER_ENCODER_WEIGHTS" not in error.value
    monkeypatch.setenv("CAPTIONER_ENCODER_WEIGHTS", str(weights))
    app = AppTest.from_file(str(Path(__file__).parent.parent / "app.py"), default_timeout=120).run()
    assert not app.error and not app.exception
    assert app.get("file_uploader")  # the model loaded: the uploader is shown
