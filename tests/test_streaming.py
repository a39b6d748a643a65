"""`caption_iter` and `captioner caption` stream: lazy input, bounded memory, worker threads, clean Ctrl-C."""

from __future__ import annotations

import csv
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from captioner import Captioner
from captioner.cli import main
from captioner.models.encoder import build_encoder
from tests.conftest import write_images

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def captioner(tiny_model) -> Captioner:
    return Captioner(tiny_model, build_encoder("efficientnet_lite0", pretrained=False))


def test_caption_iter_pulls_inputs_lazily_from_an_endless_stream(tmp_path, captioner):
    paths = write_images(tmp_path, 3)
    pulled = 0

    def endless():
        nonlocal pulled
        for path in itertools.cycle(paths):
            pulled += 1
            yield path

    results = list(itertools.islice(captioner.caption_iter(endless(), batch_size=4, num_workers=2), 10))
    assert [r.source for r in results] == [str(p) for p in itertools.islice(itertools.cycle(paths), 10)]
    assert pulled <= 10 + 2 * 4  # the batch being yielded and the one decoding ahead, nothing more


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_num_workers_decides_who_decodes(tmp_path, captioner, monkeypatch, workers):
    paths = write_images(tmp_path, 7)
    seen: set[str] = set()
    original = Captioner._safe_preprocess

    def spy(self, indexed):
        seen.add(threading.current_thread().name)
        time.sleep(0.01)  # long enough that a pool of several threads gets to use them
        return original(self, indexed)

    monkeypatch.setattr(Captioner, "_safe_preprocess", spy)
    assert len(list(captioner.caption_iter(paths, batch_size=4, num_workers=workers))) == 7
    if workers == 0:
        assert seen == {threading.current_thread().name}
    else:
        assert 1 <= len(seen) <= workers and all(name.startswith("captioner-decode") for name in seen)


def test_cli_writes_each_batch_before_the_next_is_captioned(tmp_path, tiny_checkpoint, monkeypatch):
    write_images(tmp_path / "in", 7)
    out = tmp_path / "out.jsonl"
    partial = tmp_path / ".out.jsonl.partial"  # records go here until the run ends, then it is renamed onto out
    lines_seen = []
    original = Captioner._caption_batch

    def spy(self, loaded, on_error, search, *rest):
        lines_seen.append(len(partial.read_text().splitlines()) if partial.exists() else 0)
        return original(self, loaded, on_error, search, *rest)

    monkeypatch.setattr(Captioner, "_caption_batch", spy)
    assert main(["caption", str(tmp_path / "in"), "--checkpoint", str(tiny_checkpoint), "--format", "jsonl",
                 "--output", str(out), "--batch-size", "2", "--quiet"]) == 0
    assert lines_seen == [0, 2, 4, 6]  # batch k starts with the k earlier batches already on disk
    assert len(out.read_text().splitlines()) == 7 and not partial.exists()


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "text"])
def test_ctrl_c_stops_at_a_record_boundary(tmp_path, tiny_checkpoint, monkeypatch, capsys, fmt):
    write_images(tmp_path / "in", 9)
    out = tmp_path / f"out.{fmt}"
    from captioner.outputs import CaptionWriter

    original = CaptionWriter.write

    def write_then_ctrl_c(self, caption):
        original(self, caption)
        if self.count == 3:
            os.kill(os.getpid(), signal.SIGINT)  # arrives while the loop is running, as a real Ctrl-C does

    monkeypatch.setattr(CaptionWriter, "write", write_then_ctrl_c)
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN when run as a background job
    code = main(["caption", str(tmp_path / "in"), "--checkpoint", str(tiny_checkpoint), "--format", fmt,
                 "--output", str(out), "--batch-size", "2", "--n-best", "2"])
    assert code == 130
    assert "interrupted; 3 of 9 records written" in capsys.readouterr().err
    text = out.read_text()
    if fmt == "jsonl":
        records = [json.loads(line) for line in text.splitlines()]
        assert len(records) == 3 and all(r["caption"] and len(r["alternatives"]) == 2 for r in records)
    elif fmt == "csv":
        rows = list(csv.DictReader(text.splitlines()))
        assert len(rows) == 3 and all(r["caption"] and r["alternative_2"] for r in rows)
    else:
        lines = text.splitlines()
        assert len(lines) == 6 and lines[-1].split("\t")[1].startswith("  alt ")
    assert signal.getsignal(signal.SIGINT) is before  # handler restored


def test_real_sigint_to_the_console_script(tmp_path, tiny_checkpoint):
    write_images(tmp_path / "in", 400, size=(32, 32))
    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "captioner", "caption", str(tmp_path / "in"), "--checkpoint",
                             str(tiny_checkpoint), "--format", "jsonl", "--output", str(out), "--batch-size", "4",
                             "--precision", "reference"], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    partial = tmp_path / ".out.jsonl.partial"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (partial.exists() and partial.read_text().count("\n") >= 4):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    text = out.read_text()
    records = [json.loads(line) for line in text.splitlines()]
    assert proc.returncode == 130, err
    assert text.endswith("\n") and 4 <= len(records) < 400
    assert f"interrupted; {len(records)} of 400 records written" in err
