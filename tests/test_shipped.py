"""Shipped models by name: resolution, unknown names, `captioner models`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from captioner.cli import main
from captioner.models.shipped import DEFAULT, SHIPPED, UnknownModelError, list_models, resolve, weights_dir


def test_names_resolve_to_the_package_weights_and_paths_stay_paths(tmp_path):
    assert resolve(None) == weights_dir() / SHIPPED[DEFAULT]
    for name, file in SHIPPED.items():
        assert resolve(name) == weights_dir() / file
    assert resolve("runs/x/best.safetensors") == Path("runs/x/best.safetensors")
    assert resolve(tmp_path / "general") == tmp_path / "general"  # a folder in it: a path, not the name


def test_an_unknown_name_lists_the_valid_ones():
    with pytest.raises(UnknownModelError) as info:
        resolve("genral")
    assert all(name in str(info.value) for name in SHIPPED)


def test_the_cli_reports_an_unknown_model_in_one_line(tmp_path, capsys):
    image = tmp_path / "a.jpg"
    image.write_bytes(b"not read")
    assert main(["caption", str(image), "--checkpoint", "genral"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'genral'" in err and "flickr8k" in err and "Traceback" not in err


def test_captioner_models_lists_every_installed_model(capsys):
    installed = [name for name in SHIPPED if (weights_dir() / SHIPPED[name]).is_file()]
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in installed) and f"* {DEFAULT}" in out
    assert main(["models", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["name"] for r in rows] == [m.name for m in list_models()]
    assert [r["default"] for r in rows].count(True) == 1
    for row in rows:
        assert row["size_mb"] > 1 and row["encoder"].startswith("efficientnet_lite")
        assert all(0 < s["CIDEr"] < 2 for s in row["dev_scores"].values())


def test_load_by_name_is_load_by_path():
    from captioner import Captioner

    by_name, by_path = Captioner.load("flickr8k"), Captioner.load(weights_dir() / SHIPPED["flickr8k"])
    assert by_name.vocab.itos == by_path.vocab.itos
    assert by_name.model.info == by_path.model.info


def test_a_relative_path_is_a_path_not_a_name():
    assert resolve("./general") == Path("general")
    assert resolve("models/general") == Path("models/general")


def test_captioner_models_imports_no_torch():
    import subprocess
    import sys

    code = "import sys; from captioner.cli import main; main(['models']); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[-1] == "False"


def test_evaluate_refuses_a_split_list_for_readers_with_their_own(tmp_path, capsys):
    listed = tmp_path / "dev.txt"
    listed.write_text("a.jpg\n")
    assert main(["evaluate", "--data", str(tmp_path), "--format", "flickr8k", "--split-list", str(listed)]) == 2
    assert "--split-list is for coco, csv and jsonl" in capsys.readouterr().err


def test_a_damaged_shipped_header_is_one_error(tmp_path, monkeypatch, capsys):
    (tmp_path / SHIPPED[DEFAULT]).write_bytes(b"\xff" * 64)  # not a safetensors file
    monkeypatch.setattr("captioner.models.shipped.weights_dir", lambda: tmp_path)
    assert main(["models"]) == 2
    err = capsys.readouterr().err
    assert "damaged shipped model header" in err and "Traceback" not in err
