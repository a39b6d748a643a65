"""A tampered run state (`train_state.safetensors`) and run or cache folders that cannot be made.

Each is one error naming the file or the setting, exit 2: a tampered state before any feature is extracted, a
folder before anything is written. The run's JSON files stay strict JSON when its history holds a NaN.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from captioner.cli import main
from captioner.training import loop
from tests.test_hostile_inputs import _shapes_config

Edit = Callable[[dict[str, torch.Tensor], dict[str, Any]], None]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """The folder of a config and its finished one-epoch run (`run/`), copied by each test that tampers."""
    base = tmp_path_factory.mktemp("finished")
    assert main(["train", "--config", str(_shapes_config(base))]) == 0
    return base


def _copy_run(finished: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the finished run in `tmp_path/run`; returns (its config, its state file)."""
    run = tmp_path / "run"
    shutil.copytree(finished / "run", run)
    return finished / "cfg.yaml", run / "train_state.safetensors"


def _tamper(state: Path, edit: Edit) -> None:
    """Rewrite the state file with its tensors and metadata changed by `edit` (as run_state stores them)."""
    tensors = load_file(state)
    from safetensors import safe_open

    with safe_open(str(state), framework="pt") as fh:
        meta = json.loads(fh.metadata()["json"])
    edit(tensors, meta)
    save_file(tensors, state, metadata={"json": json.dumps(meta)})


def _resume(config: Path, run: Path, *sets: str) -> int:
    """`captioner train --config C --resume` of the run folder `run`."""
    args = ["train", "--config", str(config), "--resume", "--set", f"train.out_dir={run}"]
    for value in sets:
        args += ["--set", value]
    return main(args)


def _no_extraction(monkeypatch) -> None:
    """Make any feature extraction fail the test: the state must be refused before it."""
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("features were extracted before the tampered state was refused")

    monkeypatch.setattr(loop, "prepare_data", refuse)


def _set_progress(key: str, value: Any) -> Edit:
    return lambda tensors, meta: meta["progress"].__setitem__(key, value)


TAMPERED: dict[str, tuple[Edit, str]] = {
    "progress with an extra key": (_set_progress("surprise", 1), "surprise"),
    "epoch as a string": (_set_progress("epoch", "1"), "progress.epoch"),
    "negative step": (_set_progress("step", -3), "progress.step"),
    "progress as a list": (lambda t, m: m.__setitem__("progress", [1, 2]), "progress"),
    "history as a string": (_set_progress("history", "abc"), "progress.history"),
    "history row without an epoch": (_set_progress("history", [{"phase": "xe"}]), "progress.history"),
    "best score NaN": (_set_progress("best_score", float("nan")), "progress.best_score"),
    "best score +inf": (_set_progress("best_score", float("inf")), "progress.best_score"),
    "no param_groups": (lambda t, m: m.pop("param_groups"), "param_groups"),
    "param_groups without params": (lambda t, m: m["param_groups"][0].pop("params"), "param_groups"),
    "vocabulary not a list of words": (lambda t, m: m.__setitem__("vocab", "abc"), "vocab"),
    "no rng.torch": (lambda t, m: t.pop("rng.torch"), "rng.torch"),
    "rng.torch of the wrong size": (lambda t, m: t.__setitem__("rng.torch", t["rng.torch"][:100].clone()),
                                    "rng.torch"),
    "rng.generator as floats": (lambda t, m: t.__setitem__("rng.generator", t["rng.generator"].float()),
                                "rng.generator"),
    "optimizer slot of another name": (lambda t, m: t.__setitem__("optim.x.exp_avg", torch.zeros(1)), "optim.x"),
}


@pytest.mark.parametrize("case", list(TAMPERED))
def test_a_tampered_run_state_is_refused_before_extraction(finished, tmp_path, monkeypatch, capsys, case):
    edit, named = TAMPERED[case]
    config, state = _copy_run(finished, tmp_path)
    _tamper(state, edit)
    _no_extraction(monkeypatch)
    assert _resume(config, state.parent) == 2
    err = capsys.readouterr().err
    assert str(state) in err and named in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("case", ["param_groups of another size", "optimizer moment of another shape",
                                  "weight average missing"])
def test_a_state_that_does_not_fit_the_model_is_a_checkpoint_error(finished, tmp_path, capsys, case):
    """What only the built model can tell (it needs the features' width) is found once it is built: exit 2 too."""
    def edit(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        if case == "param_groups of another size":
            meta["param_groups"][0]["params"] = meta["param_groups"][0]["params"][:2]
        elif case == "optimizer moment of another shape":
            tensors["optim.0.exp_avg"] = torch.zeros(3, 3)

    config, state = _copy_run(finished, tmp_path)
    _tamper(state, edit)
    sets = ("train.ema_decay=0.9",) if case == "weight average missing" else ()
    if case == "weight average missing":  # a state with an average, then lost: the run would start a new one
        _tamper(state, lambda t, m: t.__setitem__("extra.ema.bogus", torch.zeros(1)))
    assert _resume(config, state.parent, "train.epochs=2", *sets) == 2
    err = capsys.readouterr().err
    assert str(state) in err and "Traceback" not in err, err


def _strict(text: str) -> Any:
    """json.loads that refuses NaN and Infinity, as strict JSON readers do."""
    def refuse(constant: str) -> None:
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_a_nan_in_the_history_is_written_as_null_and_the_state_stays_strict_json(finished, tmp_path):
    config, state = _copy_run(finished, tmp_path)
    _tamper(state, lambda t, m: m["progress"]["history"][0].__setitem__("CIDEr", float("nan")))
    assert _resume(config, state.parent, "train.epochs=2") == 0
    rows = [_strict(line) for line in (state.parent / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2] and rows[0]["CIDEr"] is None  # was a bare NaN
    from safetensors import safe_open

    with safe_open(str(state), framework="pt") as fh:
        meta = _strict(fh.metadata()["json"])
    assert meta["progress"]["history"][0]["CIDEr"] is None


def test_no_best_score_resumes_and_the_next_epoch_becomes_the_best(finished, tmp_path):
    """A state with no best (null, or -inf as an older state wrote it) resumes; the next epoch is kept as best."""
    config, state = _copy_run(finished, tmp_path)
    for value in (None, float("-inf")):
        _tamper(state, _set_progress("best_score", value))
        _tamper(state, _set_progress("best_epoch", 0))
        epochs = _strict(state.parent.joinpath("metrics.jsonl").read_text().splitlines()[-1])["epoch"] + 1
        assert _resume(config, state.parent, f"train.epochs={epochs}") == 0
        from captioner.models.checkpoint import load_tensors

        progress = load_tensors(state)[1]["progress"]
        assert progress["best_epoch"] == epochs and math.isfinite(progress["best_score"])


# ---- run and cache folders that cannot be made ------------------------------------------------------------------


def _dangling(tmp: Path) -> Path:
    (tmp / "dangling").symlink_to(tmp / "missing")
    return tmp / "dangling"


def _under_a_file(tmp: Path) -> Path:
    (tmp / "file").write_text("x")
    return tmp / "file" / "sub"


def _in_a_loop(tmp: Path) -> Path:
    (tmp / "loop").symlink_to(tmp / "loop")
    return tmp / "loop" / "sub"


def _under_a_dangling_link(tmp: Path) -> Path:
    return _dangling(tmp) / "sub"


FOLDERS: dict[str, Callable[[Path], Path]] = {"a dangling symbolic link": _dangling,
                                              "a folder under a regular file": _under_a_file,
                                              "a folder inside a symbolic link loop": _in_a_loop,
                                              "a folder under a dangling link": _under_a_dangling_link}


@pytest.mark.parametrize("key", ["train.out_dir", "data.cache_dir"])
@pytest.mark.parametrize("case", list(FOLDERS))
def test_a_run_or_cache_folder_that_cannot_be_made_is_a_config_error(tmp_path, capsys, key, case):
    config = _shapes_config(tmp_path)
    spot = tmp_path / "spot"
    spot.mkdir()
    folder = FOLDERS[case](spot)
    before = sorted(p.name for p in spot.iterdir())
    assert main(["train", "--config", str(config), "--set", f"{key}={folder}"]) == 2
    err = capsys.readouterr().err
    assert f"{key} {folder}" in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()  # nothing written
    assert sorted(p.name for p in spot.iterdir()) == before
