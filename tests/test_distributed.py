"""Distributed training with torchrun (2 CPU processes, gloo) and sharded batch captioning."""

import json
import os
import subprocess
import sys

import pytest

from captioner.cli import main
from captioner.sharding import parse_shard, take_shard
from tests.conftest import write_images
from tests.synthetic import make_shapes_dataset
from tests.test_training import tiny_config


def read_rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_torchrun_two_processes_matches_one(tmp_path):
    csv_path = make_shapes_dataset(tmp_path / "images", copies=3)[0]
    # 16 images per step in both runs: 2 ranks x 8, or 1 process x 16.
    single = tiny_config(tmp_path, csv_path, out="single", epochs=8, batch_size=16)
    double = tiny_config(tmp_path, csv_path, out="double", epochs=8, batch_size=16)
    assert main(["train", "--config", str(single)]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", "29533", "-m", "captioner", "train", "--config", str(double)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("epoch 8 xe") == 1  # rank 0 alone logs
    one, two = read_rows(tmp_path / "single"), read_rows(tmp_path / "double")
    assert [r["epoch"] for r in two] == list(range(1, 9))
    # Stated tolerance: same data, same global batch, different dropout streams and reduction order.
    assert two[-1]["loss"] == pytest.approx(one[-1]["loss"], rel=0.25)
    assert max(r["CIDEr"] for r in two) > 1.0 and max(r["CIDEr"] for r in one) > 1.0
    assert abs(max(r["CIDEr"] for r in two) - max(r["CIDEr"] for r in one)) < 1.5
    assert (tmp_path / "double" / "best.safetensors").is_file()
    # Resume works the same under torchrun: every rank restores the state rank 0 wrote.
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", "29534", "-m", "captioner", "train", "--config", str(double),
                           "--resume", "--set", "train.epochs=9"],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("resumed after epoch 8") == 1 and proc.stdout.count("epoch 9 xe") == 1
    assert [r["epoch"] for r in read_rows(tmp_path / "double")] == list(range(1, 10))


def test_shards_are_disjoint_and_concatenate_to_the_whole():
    items = list(range(10))
    parts = [take_shard(items, i, 3) for i in range(3)]
    assert sum(parts, []) == items
    assert all(len(p) in (3, 4) for p in parts)
    with pytest.raises(ValueError):
        parse_shard("3/3")
    with pytest.raises(ValueError):
        parse_shard("x")


def test_cli_shards_concatenate_to_the_full_run(tmp_path, tiny_checkpoint):
    write_images(tmp_path / "many", 7)
    full = tmp_path / "full.jsonl"
    assert main(["caption", str(tmp_path / "many"), "--checkpoint", str(tiny_checkpoint), "--format", "jsonl",
                 "--output", str(full), "--quiet"]) == 0
    pieces = []
    for i in range(3):
        out = tmp_path / f"part{i}.jsonl"
        assert main(["caption", str(tmp_path / "many"), "--checkpoint", str(tiny_checkpoint), "--format", "jsonl",
                     "--output", str(out), "--shard", f"{i}/3", "--quiet"]) == 0
        pieces += out.read_text().splitlines()
    assert pieces == full.read_text().splitlines()
    assert main(["caption", str(tmp_path / "many"), "--checkpoint", str(tiny_checkpoint), "--shard", "3/3"]) == 2


def test_a_rank_0_failure_preparing_the_run_folder_stops_every_rank(tmp_path):
    """Rank 0 alone locks the run folder; when that failed (here its lock file is a folder), rank 1 was left in
    the broadcast and ended in a traceback from broadcast_object_list once rank 0 had died, naming nothing."""
    csv_path = make_shapes_dataset(tmp_path / "images", copies=1)[0]
    config = tiny_config(tmp_path, csv_path, out="run", epochs=1, batch_size=8)
    (tmp_path / "run" / ".captioner-train.lock").mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", "29535", "-m", "captioner", "train", "--config", str(config)],
                          capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert proc.returncode != 0
    assert "rank 0 could not prepare the run folder" in proc.stderr, proc.stderr[-3000:]  # rank 1's line
