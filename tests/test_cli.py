import csv
import json
import subprocess
import sys

import pytest

from captioner.cli import main
from tests.conftest import write_images


def test_caption_folder_jsonl(tmp_path, tiny_checkpoint, capsys):
    images = write_images(tmp_path / "photos" / "nested", 3) + write_images(tmp_path / "photos", 2, fmt="PNG",
                                                                           suffix=".png")
    out = tmp_path / "out.jsonl"
    code = main(["caption", str(tmp_path / "photos"), "--checkpoint", str(tiny_checkpoint), "--format", "jsonl",
                 "--output", str(out), "--batch-size", "2", "--n-best", "2"])
    assert code == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["path"] for r in records) == sorted(str(p) for p in images)
    assert all(r["caption"] and r["error"] is None and len(r["alternatives"]) == 2 for r in records)
    assert "img/s" in capsys.readouterr().err  # progress bar with a rate: more than one batch


def test_caption_csv_with_a_bad_file(tmp_path, tiny_checkpoint, capsys):
    good = write_images(tmp_path, 2)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    out = tmp_path / "out.csv"
    code = main(["caption", *map(str, good), str(bad), "--checkpoint", str(tiny_checkpoint), "--format", "csv",
                 "--output", str(out)])
    assert code == 1
    rows = list(csv.DictReader(out.open()))
    assert [r["path"] for r in rows] == [str(good[0]), str(good[1]), str(bad)]
    assert rows[0]["caption"] and not rows[0]["error"]
    assert rows[2]["error"] and not rows[2]["caption"]
    assert "broken.jpg" in capsys.readouterr().err


def test_missing_path_and_missing_checkpoint(tmp_path, tiny_checkpoint, capsys):
    assert main(["caption", str(tmp_path / "nope.jpg"), "--checkpoint", str(tiny_checkpoint)]) == 2
    [img] = write_images(tmp_path, 1)
    assert main(["caption", str(img), "--checkpoint", str(tmp_path / "none.safetensors")]) == 2
    capsys.readouterr()
    assert main(["caption", str(img), "--checkpoint", str(tiny_checkpoint), "--precision", "int8"]) == 2
    assert ".int8.json: no int8 calibration file" in capsys.readouterr().err


def test_console_script_text_output(tmp_path, tiny_checkpoint):
    images = write_images(tmp_path, 2)
    proc = subprocess.run([sys.executable, "-m", "captioner", "caption", str(tmp_path), "--checkpoint",
                           str(tiny_checkpoint)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(p) for p in images]
    assert all(line.split("\t")[1] for line in lines)


def test_parquet_output_equals_the_jsonl_records(tmp_path, tiny_checkpoint):
    pq = pytest.importorskip("pyarrow.parquet")
    good = write_images(tmp_path / "in", 3)
    (tmp_path / "in" / "zero.jpg").write_bytes(b"")
    args = ["caption", str(tmp_path / "in"), "--checkpoint", str(tiny_checkpoint), "--n-best", "2", "--quiet"]
    assert main([*args, "--format", "jsonl", "--output", str(tmp_path / "o.jsonl")]) == 1
    assert main([*args, "--format", "parquet", "--output", str(tmp_path / "o.parquet")]) == 1
    want = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    rows = pq.read_table(tmp_path / "o.parquet").to_pylist()
    assert [{k: v for k, v in r.items() if k != "path_bytes"} for r in rows] == want
    assert [r["path"] for r in rows] == [*map(str, good), str(tmp_path / "in" / "zero.jpg")]


def test_tags_in_every_format_and_resume(tmp_path, tiny_checkpoint):
    write_images(tmp_path / "in", 3)
    (tmp_path / "in" / "zero.jpg").write_bytes(b"")
    args = ["caption", str(tmp_path / "in"), "--checkpoint", str(tiny_checkpoint), "--tags", "--quiet"]
    out = {}
    for fmt in ("jsonl", "csv", "text"):
        assert main([*args, "--format", fmt, "--output", str(tmp_path / f"o.{fmt}")]) == 1
        out[fmt] = (tmp_path / f"o.{fmt}").read_text()
    records = [json.loads(line) for line in out["jsonl"].splitlines()]
    assert all(r["tags"] and r["tags"][0]["probability"] >= r["tags"][-1]["probability"] for r in records[:3])
    assert "tags" not in records[3] and records[3]["error"]
    rows = list(csv.DictReader(out["csv"].splitlines()))
    assert rows[0]["tags"] == ";".join(f"{t['label']}:{t['probability']:.3f}" for t in records[0]["tags"])
    assert rows[3]["tags"] == ""
    line = out["text"].splitlines()[0]
    assert line.split("\t")[2] == "[" + ", ".join(f"{t['label']} {t['probability']:.2f}"
                                                  for t in records[0]["tags"]) + "]"
    # --resume with the tags column: a cut csv is completed to the same file
    cut = tmp_path / "cut.csv"
    cut.write_text("".join(out["csv"].splitlines(keepends=True)[:3]))
    assert main([*args, "--format", "csv", "--output", str(cut), "--resume"]) == 1
    assert cut.read_text() == out["csv"]
    # ... but not without --tags (other columns)
    assert main([*args[:-2], "--quiet", "--format", "csv", "--output", str(cut), "--resume"]) == 2
