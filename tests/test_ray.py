"""`captioner caption --ray`: the records of a Ray Data run equal the local CLI's, record for record.

One local Ray (2 CPUs) is shared by the module: starting one costs seconds. Each `--ray` run starts its own
actors (one model each), so the runs are few and each checks several things.
"""

from __future__ import annotations

import base64
import csv
import inspect
import io
import json
import os
import pathlib
import shutil

import pytest

from captioner.cli import main
from tests.conftest import WORDS, make_model, write_images

pytest.importorskip("pyarrow")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")  # Ray's own, not ours

N_GOOD = 9


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from captioner.config import ModelConfig
    from captioner.models.checkpoint import save_model
    from captioner.models.vocab import Vocabulary

    vocab = Vocabulary.build([" ".join(WORDS)], min_count=1)
    cfg = ModelConfig(embed_dim=16, hidden_dim=24, attention_dim=12, feature_dim=20, dropout=0.0,
                      feature_dropout=0.0)
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_model(make_model(vocab, cfg), path)
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """9 good images (one in a subfolder, one with a non-UTF-8 name) and three bad files."""
    root = tmp_path_factory.mktemp("photos")
    good = write_images(root, N_GOOD - 2) + write_images(root / "sub", 1, fmt="PNG", suffix=".png")
    shutil.copy(good[1], os.path.join(os.fsencode(root), b"odd\xff.jpg"))
    jpeg = good[0].read_bytes()
    (root / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "text.jpg").write_text("not an image at all\n")
    (root / "zero.jpg").write_bytes(b"")
    return root


def _caption(photos, checkpoint, *args) -> int:
    return main(["caption", str(photos), "--checkpoint", str(checkpoint), "--n-best", "2", "--batch-size", "3",
                 "--threads", "1", "--quiet", *map(str, args)])


@pytest.fixture(scope="module")
def local(photos, checkpoint, tmp_path_factory):
    """The local CLI's outputs: {format: text}. Its csv is the jsonl records through the CLI's writer (what
    `--format csv` does: `CaptionWriter.write` renders `record(caption)`), which saves a model load."""
    from captioner.outputs import CaptionWriter

    out = tmp_path_factory.mktemp("local") / "o.jsonl"
    assert _caption(photos, checkpoint, "--format", "jsonl", "--output", out) == 1  # bad files: exit 1
    texts = {"jsonl": out.read_text(encoding="utf-8")}
    buffer = io.StringIO(newline="")
    writer = CaptionWriter(buffer, "csv", n_best=2)
    for rec in _jsonl(texts["jsonl"]):
        writer.write_record(rec)
    texts["csv"] = buffer.getvalue()
    return texts


@pytest.fixture(scope="module")
def cluster():
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="warning")  # a new one, always
    yield ray
    ray.shutdown()


def _jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def test_local_run_has_the_bad_files_as_error_records(local):
    records = _jsonl(local["jsonl"])
    assert len(records) == N_GOOD + 3
    bad = {os.path.basename(r["path"]): r for r in records if r["error"]}
    assert sorted(bad) == ["text.jpg", "truncated.jpg", "zero.jpg"]
    assert all(r["caption"] == "" and r["score"] is None for r in bad.values())
    assert sum("path_bytes" in r for r in records) == 1


def test_caption_batch_without_a_cluster(photos, checkpoint, local):
    """The callable class on a dict batch (paths) and a pandas batch (bytes), no Ray involved."""
    import pandas as pd

    from captioner.integrations.ray_data import CaptionBatch, to_record

    want = _jsonl(local["jsonl"])
    paths = [base64.b64decode(r["path_bytes"]) if "path_bytes" in r else os.fsencode(r["path"]) for r in want]
    fn = CaptionBatch(checkpoint=str(checkpoint), n_best=2, threads=1, batch_size=3)
    table = fn({"index": list(range(len(paths))), "path": paths})
    assert table.column_names[:2] == ["index", "path"] and "tags" not in table.column_names
    assert [to_record(row, n_best=2) for row in table.to_pylist()] == want
    # bytes in, no index: names from the path column; n_best 1 drops the alternatives, as the local record does
    frame = pd.DataFrame({"path": [os.fsdecode(p) for p in paths[:4]],
                          "bytes": [pathlib.Path(os.fsdecode(p)).read_bytes() for p in paths[:4]]})
    rows = [to_record(row, n_best=1) for row in fn(frame).to_pylist()]
    assert [r["path"] for r in rows] == [w["path"] for w in want[:4]]
    assert [r["caption"] for r in rows] == [w["caption"] for w in want[:4]]
    assert all("alternatives" not in r for r in rows)
    [empty] = fn({"bytes": [b""]}).to_pylist()
    assert empty["path"] == "<bytes #0>" and "empty" in empty["error"]


def test_ray_jsonl_with_two_actors_equals_the_local_run(cluster, photos, checkpoint, local, tmp_path, capsys):
    out = tmp_path / "ray.jsonl"
    assert _caption(photos, checkpoint, "--format", "jsonl", "--output", out, "--ray", "--ray-actors", "2") == 1
    assert out.read_text(encoding="utf-8") == local["jsonl"]  # byte for byte: same records, same order
    err = capsys.readouterr().err
    assert "3 of 12 images failed" in err and "Traceback" not in err


def test_ray_parquet_equals_the_jsonl_records(cluster, photos, checkpoint, local, tmp_path):
    import pyarrow.parquet as pq

    out = tmp_path / "ray.parquet"
    assert _caption(photos, checkpoint, "--format", "parquet", "--output", out, "--ray") == 1
    rows = pq.read_table(out).to_pylist()
    assert [{k: v for k, v in r.items() if not (k == "path_bytes" and v is None)} for r in rows] == _jsonl(
        local["jsonl"])
    assert not list(tmp_path.glob(".*.partial"))


def test_ray_csv_with_shard_and_resume_equals_the_local_run(cluster, photos, checkpoint, local, tmp_path):
    lines = local["csv"].splitlines(keepends=True)  # a header and 12 records; shard 0/2 is the first 6
    part = tmp_path / "ray.csv"
    part.write_bytes(("".join(lines[:5]) + lines[5][:7]).encode("utf-8"))  # 4 records and half of one
    assert _caption(photos, checkpoint, "--format", "csv", "--output", part, "--resume", "--shard", "0/2",
                    "--ray") == 0  # the bad files are all in the other shard
    assert part.read_bytes().decode("utf-8") == "".join(lines[:7])  # CRLF rows, as csv writes them


def test_a_failed_ray_job_exits_5_and_keeps_the_records_for_resume(photos, checkpoint, local, tmp_path,
                                                                   monkeypatch, capsys):
    pytest.importorskip("ray")
    from contextlib import nullcontext

    from captioner.cli import caption_ray

    def records(args, paths):  # three records, then the cluster goes away
        yield from _jsonl(local["jsonl"])[:3]
        raise caption_ray.RayJobError("actor died")

    monkeypatch.setattr(caption_ray, "records", records)
    monkeypatch.setattr(caption_ray, "cluster", lambda address: nullcontext())
    out = tmp_path / "o.jsonl"
    assert _caption(photos, checkpoint, "--format", "jsonl", "--output", out, "--ray") == 5
    err = capsys.readouterr().err
    assert "the Ray job failed: actor died" in err and "3 of 12 records written" in err and "--resume" in err
    assert not out.exists()
    kept = (tmp_path / ".o.jsonl.partial").read_text(encoding="utf-8")
    assert kept == "".join(local["jsonl"].splitlines(keepends=True)[:3])


@pytest.mark.parametrize("args, message", [
    (["--ray-actors", "2"], "--ray-actors needs --ray"),
    (["--ray", "--ray-actors", "0"], "--ray-actors must be >= 1"),
    (["--format", "parquet"], "parquet needs --output"),
    (["--format", "parquet", "--output", "x.parquet", "--resume"], "--resume does not work with --format parquet"),
])
def test_bad_ray_and_parquet_options_exit_2(photos, checkpoint, capsys, args, message):
    assert _caption(photos, checkpoint, *args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_a_path_given_as_the_ray_address_is_refused(photos, checkpoint, capsys):
    pytest.importorskip("ray")
    assert main(["caption", "--ray", str(photos), str(photos), "--checkpoint", str(checkpoint)]) == 2
    assert "not a cluster address" in capsys.readouterr().err


def test_an_unreachable_address_is_exit_2_at_once(photos, checkpoint, capsys, monkeypatch):
    ray = pytest.importorskip("ray")
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as in a fresh process, whatever ran before
    assert _caption(photos / "img_000.jpg", checkpoint, "--ray=127.0.0.1:1") == 2
    err = capsys.readouterr().err
    assert "cannot reach a Ray cluster at 127.0.0.1:1" in err and len(err.strip().splitlines()) == 1


def test_importing_captioner_does_not_import_ray():
    import subprocess
    import sys

    code = ("import captioner, captioner.cli, captioner.integrations, captioner.integrations.ray_data, sys; "
            "sys.exit(7 if 'ray' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], check=False, timeout=120).returncode == 0


def _has_tags() -> bool:
    from captioner.api import Captioner

    return "return_tags" in inspect.signature(Captioner.caption_iter).parameters


def test_caption_batch_with_tags(photos, checkpoint):
    if not _has_tags():
        pytest.skip("Captioner.caption_iter has no return_tags yet")
    from captioner.integrations.ray_data import CaptionBatch, to_record

    fn = CaptionBatch(checkpoint=str(checkpoint), threads=1, return_tags=True)
    paths = [str(photos / "img_000.jpg"), str(photos / "zero.jpg")]
    good, bad = [to_record(r) for r in fn({"path": paths}).to_pylist()]
    assert good["tags"] and all(set(t) == {"label", "probability"} for t in good["tags"])
    assert "tags" not in bad and bad["error"]
    assert list(good) == ["path", "caption", "score", "logprob", "tags", "error"]
    buffer = io.StringIO()
    from captioner.outputs import CaptionWriter

    writer = CaptionWriter(buffer, "csv", tags=True)
    writer.write_record(good)
    assert next(csv.DictReader(io.StringIO(buffer.getvalue())))["tags"].startswith(good["tags"][0]["label"])


def test_a_ray_errors_one_line_is_its_cause_not_the_retry_advice():
    """Ray 2.60 ends a task's error with advice on retries, which was all `--ray` printed of a failure."""
    from captioner.cli.caption_ray import _one_line

    text = ("Task failed.\nTraceback (most recent call last):\n  File \"x.py\", line 3, in f\n"
            "RuntimeError: you tried to allocate 40320000000 bytes\n\n"
            "To change retry attempts, backoff, use max_retries if you believe this to be transient.")
    assert _one_line(Exception(text)) == "RuntimeError: you tried to allocate 40320000000 bytes"

    class TaskError(Exception):
        cause = MemoryError("out of memory")

    assert _one_line(TaskError("To change retry attempts ...")) == "MemoryError: out of memory"
    assert _one_line(Exception("actor died")) == "actor died" and _one_line(Exception("")) == "Exception"
