"""The run folder (`train.out_dir`): a run never overwrites files it did not write, one run at a time holds it,
and its log and curves survive a kill while they are written (and are repaired by --resume)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from captioner.cli import main
from captioner.training import loop
from captioner.training.run_folder import LOCK
from tests.test_hostile_inputs import _shapes_config

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """The folder of a config (`cfg.yaml`) and its finished one-epoch run (`run/`), copied by tests that damage it."""
    base = tmp_path_factory.mktemp("finished")
    assert main(["train", "--config", str(_shapes_config(base))]) == 0
    return base


def _train(config: Path, *extra: str) -> int:
    return main(["train", "--config", str(config), *extra])


def _recipe_in(folder: Path, tmp_path: Path, **train: Any) -> Path:
    """A hand-written recipe (a comment, its own key order) saved as `folder/config.yaml`, training into `folder`:
    `out_dir: .` beside the recipe."""
    raw = yaml.safe_load(_shapes_config(tmp_path).read_text())
    raw["train"].update(out_dir=str(folder), **train)
    folder.mkdir(exist_ok=True)
    path = folder / "config.yaml"
    path.write_text("# my recipe: tuned by hand, keep these notes\n" + yaml.safe_dump(raw))
    return path


def _no_work(monkeypatch) -> None:
    """Make feature extraction fail the test: a folder that is not the run's must be refused before it."""
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the run went on to extract features in a folder it must refuse")

    monkeypatch.setattr(loop, "prepare_data", refuse)


def _listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def _rows(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ---- 1. files a run did not write are never overwritten ----------------------------------------------------------


@pytest.mark.parametrize("resume", [False, True])
def test_the_recipe_in_its_own_out_dir_is_refused_and_nothing_there_is_touched(tmp_path, monkeypatch, capsys,
                                                                              resume):
    """`out_dir: .` beside the recipe: its config.yaml was replaced by the resolved config (its notes lost) and
    every hidden .tmp file there deleted. Refused, with --resume too (there is no run there to resume)."""
    folder = tmp_path / "project"
    recipe = _recipe_in(folder, tmp_path)
    (folder / ".draft.tmp").write_text("another tool's temporary file")
    before = _listing(folder)
    _no_work(monkeypatch)
    assert _train(recipe, *(["--resume"] if resume else [])) == 2
    err = capsys.readouterr().err
    assert f"train.out_dir {folder}" in err and "config.yaml" in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert _listing(folder) == before  # the recipe byte for byte, the other tool's file, and no lock file left


@pytest.mark.parametrize("name", ["best.safetensors", "train_state.safetensors", "metrics.jsonl", "curves.png"])
def test_a_folder_holding_any_file_a_run_writes_is_refused_without_resume(tmp_path, monkeypatch, capsys, name):
    config = _shapes_config(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / name).write_bytes(b"the user's own file")
    _no_work(monkeypatch)
    assert _train(config) == 2
    err = capsys.readouterr().err
    assert f"train.out_dir {run} already holds {name}" in err and "--resume" in err, err
    assert _listing(run) == {name: b"the user's own file"}


def test_a_folder_of_other_files_is_trained_into_and_only_the_runs_own_temporary_files_are_removed(tmp_path):
    """Unrelated files (and the unlocked lock file a killed run leaves) do not make a folder a run; of the hidden
    .tmp files only the atomic writer's, for the run's own files, are a killed run's to delete."""
    config = _shapes_config(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    kept = {"notes.txt": b"mine", ".draft.tmp": b"another tool's", ".metrics.jsonl.tmp": b"not the writer's name",
            LOCK: b"999999 some-host\n"}
    for name, data in kept.items():
        (run / name).write_bytes(data)
    stale = [run / ".best.safetensors.k3x_9q2a.tmp", run / ".metrics.jsonl.a1b2c3d4.tmp"]
    for path in stale:
        path.write_bytes(b"\0" * 100)
    assert _train(config) == 0
    assert not any(path.exists() for path in stale)
    assert {name: (run / name).read_bytes() for name in kept if name != LOCK} == {k: v for k, v in kept.items()
                                                                                  if k != LOCK}
    assert not (run / LOCK).exists()  # taken over by this run, removed when it ended
    assert [row["epoch"] for row in _rows(run)] == [1]


def test_a_run_resumed_from_its_own_config_yaml_rewrites_it_but_keeps_one_edited_by_hand(finished, tmp_path,
                                                                                          capsys):
    """--resume of a real run: the config.yaml the run wrote is rewritten with the resolved config (the new
    number of epochs); one edited by hand, used as the recipe, is the user's and stays byte for byte."""
    run = tmp_path / "run"
    shutil.copytree(finished / "run", run)
    own = run / "config.yaml"
    assert _train(own, "--resume", "--set", f"train.out_dir={run}", "--set", "train.epochs=2") == 0
    assert yaml.safe_load(own.read_text())["train"]["epochs"] == 2
    edited = own.read_text().replace("epochs: 2", "epochs: 3  # one more")
    own.write_text(edited)
    assert _train(own, "--resume", "--set", f"train.out_dir={run}") == 0
    assert own.read_text() == edited and [row["epoch"] for row in _rows(run)] == [1, 2, 3]
    assert f"{own} is kept as it is" in capsys.readouterr().out


# ---- 2. one run at a time in a folder ----------------------------------------------------------------------------


def test_a_second_run_on_a_folder_in_use_is_refused_at_once(tmp_path, monkeypatch, capsys):
    """Started while the first extracts its features (so inside its process: flock is per open file, so this is
    the same refusal another process gets). Both were accepted and wrote their checkpoints in turn."""
    config = _shapes_config(tmp_path)
    real = loop.prepare_data
    second: list[int | None] = []

    def start_another_first(*args: Any, **kwargs: Any) -> Any:
        if not second:
            second.append(None)  # before the call: the second run comes back here when it is not refused
            second[0] = _train(config, "--set", "train.lr=0.0005")
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "prepare_data", start_another_first)
    assert _train(config) == 0
    assert second == [2]
    err = capsys.readouterr().err
    run = tmp_path / "run"
    errors = [line for line in err.splitlines() if "error" in line]  # the first run's progress bars are there too
    assert errors == [f"captioner: error: invalid config: train.out_dir {run} is in use by another training run "
                      f"(pid {os.getpid()})"], err
    assert [row["epoch"] for row in _rows(run)] == [1] and not (run / LOCK).exists()


def test_the_lock_of_a_killed_run_is_gone_with_it_and_resume_goes_on(tmp_path, capsys):
    """SIGKILL while the run holds its folder, before its first epoch: the kernel drops the flock, so the folder is
    not 'in use', and the run (its config.yaml alone) starts again there, with or without --resume."""
    config = _shapes_config(tmp_path)
    child = ("import os, signal, sys\n"
             "from captioner.training import loop\n"
             "loop.prepare_data = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n"
             "from captioner.cli import main\n"
             "sys.exit(main(['train', '--config', sys.argv[1]]))\n")
    proc = subprocess.run([sys.executable, "-c", child, str(config)], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    run = tmp_path / "run"
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (run / LOCK).exists() and (run / "config.yaml").exists()  # killed: nothing cleaned up
    assert _train(config) == 0
    assert "in use" not in capsys.readouterr().err
    assert [row["epoch"] for row in _rows(run)] == [1] and not (run / LOCK).exists()
    assert _train(config) == 2  # now it holds a run's state
    assert "already holds config.yaml, best.safetensors, train_state.safetensors" in capsys.readouterr().err
    assert _train(config, "--resume") == 0


# ---- 3. the log and the curves survive a kill while they are written ---------------------------------------------


def _after_epoch_2s_state(monkeypatch) -> list[int]:
    """A list that is filled once epoch 2's run state is on disk: what is written after it is its log and curves."""
    real, saved = loop.save_state, []

    def save_state(path: Path, decoder: Any, optimizer: Any, progress: Any, *args: Any, **kwargs: Any) -> None:
        real(path, decoder, optimizer, progress, *args, **kwargs)
        if progress.epoch == 2:
            saved.append(2)

    monkeypatch.setattr(loop, "save_state", save_state)
    return saved


def _kill_in_the_log(monkeypatch) -> None:
    """KeyboardInterrupt while epoch 2's metrics.jsonl is written: at its first row."""
    real, saved = json.dumps, _after_epoch_2s_state(monkeypatch)

    def dumps(obj: Any, *args: Any, **kwargs: Any) -> str:
        if saved and isinstance(obj, dict) and obj.get("phase"):
            raise KeyboardInterrupt("simulated kill while metrics.jsonl is written")
        return real(obj, *args, **kwargs)

    monkeypatch.setattr(json, "dumps", dumps)


def _kill_in_the_curves(monkeypatch) -> None:
    """KeyboardInterrupt halfway through epoch 2's curves.png (some bytes out, as a kill inside savefig leaves)."""
    from matplotlib.figure import Figure

    real, saved = Figure.savefig, _after_epoch_2s_state(monkeypatch)

    def savefig(self: Figure, fname: Any, *args: Any, **kwargs: Any) -> None:
        if not saved:
            return real(self, fname, *args, **kwargs)
        if hasattr(fname, "write"):
            fname.write(PNG)
        else:
            Path(fname).write_bytes(PNG)
        raise KeyboardInterrupt("simulated kill while curves.png is written")

    monkeypatch.setattr(Figure, "savefig", savefig)


@pytest.mark.parametrize(("kill", "logged"), [(_kill_in_the_log, [1]), (_kill_in_the_curves, [1, 2])],
                         ids=["metrics.jsonl", "curves.png"])
def test_a_kill_while_the_log_or_curves_are_written_leaves_whole_files(tmp_path, monkeypatch, kill, logged):
    """The log was rewritten in place (open("w")), so a kill there left it empty for good, and the curves could be
    left cut short. Now each file is replaced whole: what a kill leaves is the last epoch's or this one's, never
    a part, and --resume brings both up to date."""
    config = _shapes_config(tmp_path)
    run = tmp_path / "run"
    assert _train(config) == 0
    curves = (run / "curves.png").read_bytes()
    kill(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        _train(config, "--resume", "--set", "train.epochs=2")
    monkeypatch.undo()
    assert [row["epoch"] for row in _rows(run)] == logged
    assert (run / "curves.png").read_bytes() == curves  # epoch 1's, whole
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]
    assert _train(config, "--resume", "--set", "train.epochs=2") == 0
    assert [row["epoch"] for row in _rows(run)] == [1, 2]
    assert (run / "curves.png").read_bytes().startswith(PNG) and (run / "curves.png").read_bytes() != curves


def test_resume_rewrites_a_damaged_log_and_curves_from_the_run_state(finished, tmp_path):
    """A run killed in its last epoch's log write (by an older version) kept an empty metrics.jsonl: --resume had
    nothing left to train, so nothing rewrote it. The state's history is the record; the log is made from it."""
    from captioner.training.run_state import read_state

    run = tmp_path / "run"
    shutil.copytree(finished / "run", run)
    history = read_state(run / "train_state.safetensors").progress.history
    (run / "metrics.jsonl").write_bytes(b"")
    (run / "curves.png").write_bytes(PNG)  # cut short
    assert _train(finished / "cfg.yaml", "--resume", "--set", f"train.out_dir={run}") == 0
    assert _rows(run) == history
    image = (run / "curves.png").read_bytes()
    assert image.startswith(PNG) and len(image) > 1000


def test_resume_without_a_state_refuses_a_folder_holding_a_runs_weights(tmp_path, capsys):
    """--resume with the run state deleted (to save space, say) started a new run there, whose first epoch replaced
    best.safetensors."""
    config = _shapes_config(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.safetensors").write_bytes(b"the user's best model")
    (run / "metrics.jsonl").write_text('{"epoch": 1}\n')  # epochs were finished: their state was deleted
    assert _train(config, "--resume") == 2
    assert "holds best.safetensors, metrics.jsonl but no train_state.safetensors" in capsys.readouterr().err
    assert (run / "best.safetensors").read_bytes() == b"the user's best model"
