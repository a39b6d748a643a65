"""End-to-end training on a synthetic set, resume, and the evaluate command."""

import json

import pytest
import yaml

from captioner.cli import main
from tests.synthetic import make_shapes_dataset

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def tiny_config(tmp_path, csv_path, out="run", **train):
    cfg = {
        "model": {"embed_dim": 32, "hidden_dim": 96, "attention_dim": 32, "feature_dim": 64, "dropout": 0.1,
                  "feature_dropout": 0.1},
        "data": {"format": "csv", "annotations": str(csv_path), "min_word_count": 1, "val_fraction": 0.25,
                 "cache_dir": str(tmp_path / "cache")},
        "train": {"out_dir": str(tmp_path / out), "epochs": 12, "batch_size": 8, "lr": 0.005, "warmup_steps": 5,
                  "patience": 0, "seed": 1, **train},
        "decode": {"beam_size": 2, "max_length": 10},
    }
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shapes")
    return folder, make_shapes_dataset(folder / "images", copies=3)[0]


@pytest.fixture(scope="module")
def trained(shapes):
    folder, csv_path = shapes
    config = tiny_config(folder, csv_path, epochs=10, scst_epochs=2, scst_lr=0.0005)
    assert main(["train", "--config", str(config)]) == 0
    return folder / "run"


def test_training_learns_far_above_chance(trained):
    rows = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [row["phase"] for row in rows] == ["xe"] * 10 + ["scst"] * 2
    assert rows[9]["loss"] < rows[0]["loss"] / 2
    assert all(row["reward"] > 0 for row in rows[10:])  # mean CIDEr-D of the sampled captions
    best = max(row["CIDEr"] for row in rows)
    assert best > 2.0  # a constant or random caption scores near 0 here
    assert (trained / "best.safetensors").is_file() and (trained / "curves.png").stat().st_size > 0
    saved = yaml.safe_load((trained / "config.yaml").read_text())
    assert saved["train"]["epochs"] == 10 and saved["model"]["hidden_dim"] == 96


def test_evaluate_command(trained, shapes, tmp_path, capsys):
    _, csv_path = shapes
    code = main(["evaluate", "--checkpoint", str(trained / "best.safetensors"), "--format", "csv",
                 "--data", str(csv_path), "--split", "dev", "--beam-size", "2", "--output", str(tmp_path / "ev")])
    assert code == 0
    report = json.loads((tmp_path / "ev" / "scores.json").read_text())
    assert set(report["scores"]) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}
    assert report["scores"]["CIDEr"] > 1.0 and report["scores"]["Bleu_4"] > 0.3
    assert report["images"] > 0
    lines = (tmp_path / "ev" / "captions.jsonl").read_text().splitlines()
    assert len(lines) == report["images"]
    assert json.loads(capsys.readouterr().out)["scores"] == report["scores"]


def test_resume_matches_an_uninterrupted_run(shapes, tmp_path, monkeypatch):
    _, csv_path = shapes
    full = tiny_config(tmp_path, csv_path, out="full", epochs=4)
    assert main(["train", "--config", str(full)]) == 0

    from captioner import training

    real_checkpoint = training.checkpoint_epoch

    def killed_after_epoch_two(run, model, optimizer, progress, *args):
        real_checkpoint(run, model, optimizer, progress, *args)
        if progress.epoch == 2:
            raise KeyboardInterrupt("simulated kill")

    part = tiny_config(tmp_path, csv_path, out="part", epochs=4)
    monkeypatch.setattr(training, "checkpoint_epoch", killed_after_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        main(["train", "--config", str(part)])
    monkeypatch.setattr(training, "checkpoint_epoch", real_checkpoint)
    assert main(["train", "--config", str(part)]) == 2  # refuses to overwrite a run without --resume
    assert main(["train", "--config", str(part), "--resume"]) == 0
    full_rows = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    part_rows = [json.loads(x) for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in part_rows] == [1, 2, 3, 4]
    for a, b in zip(full_rows, part_rows):  # same seed: the resumed run ends where the uninterrupted one does
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["CIDEr"] == pytest.approx(b["CIDEr"], abs=1e-6)
