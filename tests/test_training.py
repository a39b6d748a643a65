"""End-to-end training on a synthetic set, resume, and the evaluate command."""

import json

import numpy as np
import pytest
import torch
import yaml

from captioner.api import Captioner
from captioner.cli import main
from captioner.runtime.choice import resolve_precision
from tests.synthetic import make_shapes_dataset

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def tiny_config(tmp_path, csv_path, out="run", data=None, **train):
    cfg = {
        "model": {"embed_dim": 32, "hidden_dim": 96, "attention_dim": 32, "feature_dim": 64, "dropout": 0.1,
                  "feature_dropout": 0.1},
        "data": {"format": "csv", "annotations": str(csv_path), "min_word_count": 1, "val_fraction": 0.25,
                 "cache_dir": str(tmp_path / "cache"), **(data or {})},
        "train": {"out_dir": str(tmp_path / out), "epochs": 12, "batch_size": 8, "lr": 0.005, "warmup_steps": 5,
                  "patience": 0, "seed": 1, **train},
        "decode": {"beam_size": 2, "max_length": 10},
    }
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def kill_after_epoch(monkeypatch, epoch: int):
    """Make a run stop as if killed right after epoch `epoch`'s checkpoint is on disk; returns what undoes it."""
    from captioner.training import loop as training

    real = training.checkpoint_epoch

    def killed(run, model, optimizer, progress, *args):
        real(run, model, optimizer, progress, *args)
        if progress.epoch == epoch:
            raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(training, "checkpoint_epoch", killed)
    return lambda: monkeypatch.setattr(training, "checkpoint_epoch", real)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shapes")
    return folder, make_shapes_dataset(folder / "images", copies=3)[0]


@pytest.fixture(scope="module")
def trained(shapes):
    folder, csv_path = shapes
    # The full-featured path: mirrored training images, word dropout, beam candidates for self-critical training,
    # and an encoder input other than 224 (a 5x5 grid).
    config = tiny_config(folder, csv_path, data={"mirror": True}, epochs=10, scst_epochs=2, scst_lr=0.0005,
                         scst_candidates="beam", word_dropout=0.1)
    raw = yaml.safe_load(config.read_text())
    raw["model"]["image_size"] = 160
    config.write_text(yaml.safe_dump(raw))
    assert main(["train", "--config", str(config)]) == 0
    return folder / "run"


def test_training_learns_far_above_chance(trained):
    rows = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [row["phase"] for row in rows] == ["xe"] * 10 + ["scst"] * 2
    assert rows[9]["loss"] < rows[0]["loss"] / 2
    assert all(row["reward"] > 0 for row in rows[10:])  # mean CIDEr-D of the candidates
    best = max(row["CIDEr"] for row in rows)
    assert best > 2.0  # a constant or random caption scores near 0 here
    assert (trained / "best.safetensors").is_file() and (trained / "curves.png").stat().st_size > 0
    saved = yaml.safe_load((trained / "config.yaml").read_text())
    assert saved["train"]["epochs"] == 10 and saved["model"]["hidden_dim"] == 96
    assert saved["model"]["image_size"] == 160
    grid = np.load(next((trained.parent / "cache").rglob("shard-*.npy")), mmap_mode="r", allow_pickle=False)
    assert grid.shape[1:] == (25, 1280)  # 160 / 32 = 5 cells a side
    assert Captioner.load(trained / "best.safetensors").encoder.preprocess.size == 160


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
    first = json.loads(lines[0])  # the record of `captioner caption --format jsonl`, plus the references
    assert {"path", "caption", "score", "error", "references"} <= set(first) and first["references"]
    assert json.loads(capsys.readouterr().out)["scores"] == report["scores"]
    assert report["precision"] == resolve_precision("auto")  # the default: what this CPU's auto picks


def test_evaluate_command_runs_the_precision_asked_for(trained, shapes, tmp_path, capsys):
    """`--precision reference` scores the training-time modules; their captions are the fp32 fast path's."""
    _, csv_path = shapes
    reports = {}
    for precision in ("reference", "fp32"):
        out = tmp_path / precision
        assert main(["evaluate", "--checkpoint", str(trained / "best.safetensors"), "--format", "csv", "--data",
                     str(csv_path), "--split", "dev", "--precision", precision, "--output", str(out)]) == 0
        reports[precision] = json.loads((out / "scores.json").read_text())
        assert reports[precision]["precision"] == precision
    assert reports["reference"]["scores"] == reports["fp32"]["scores"]
    with pytest.raises(SystemExit):
        main(["evaluate", "--checkpoint", str(trained / "best.safetensors"), "--precision", "fp16"])
    assert "invalid choice: 'fp16'" in capsys.readouterr().err


@pytest.mark.parametrize("ema_decay", [0.0, 0.9])
def test_resume_matches_an_uninterrupted_run(shapes, tmp_path, monkeypatch, ema_decay):
    """With weight averaging, the average is part of the saved state: a resume that lost it would score differently."""
    _, csv_path = shapes
    full = tiny_config(tmp_path, csv_path, out="full", epochs=4, ema_decay=ema_decay)
    assert main(["train", "--config", str(full)]) == 0

    part = tiny_config(tmp_path, csv_path, out="part", epochs=4, ema_decay=ema_decay)
    revive = kill_after_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        main(["train", "--config", str(part)])
    revive()
    assert main(["train", "--config", str(part)]) == 2  # refuses to overwrite a run without --resume
    assert main(["train", "--config", str(part), "--resume"]) == 0
    full_rows = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    part_rows = [json.loads(x) for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in part_rows] == [1, 2, 3, 4]
    for a, b in zip(full_rows, part_rows):  # same seed: the resumed run ends where the uninterrupted one does
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["CIDEr"] == pytest.approx(b["CIDEr"], abs=1e-6)
    if ema_decay:  # the state keeps the live weights and, apart, their average
        from captioner.models.checkpoint import load_tensors

        tensors, _ = load_tensors(tmp_path / "part" / "train_state.safetensors")
        averaged = [k for k in tensors if k.startswith("extra.ema.")]
        assert averaged and any(not torch.equal(tensors[k], tensors["model." + k[len("extra.ema."):]])
                                for k in averaged)


def test_the_encoder_head_starts_pretrained_and_trains_at_its_own_rate(shapes, tmp_path):
    """`model.encoder_head`: features are cached before the head, which the decoder starts from and tunes."""
    from captioner.models.checkpoint import load_tensors
    from tests.conftest import write_images

    _, csv_path = shapes
    config = tiny_config(tmp_path, csv_path, epochs=3, encoder_head_lr=0.5)
    raw = yaml.safe_load(config.read_text())
    raw["model"]["encoder_head"] = 1280
    config.write_text(yaml.safe_dump(raw))
    assert main(["train", "--config", str(config)]) == 0
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert np.load(next((tmp_path / "cache").rglob("shard-*.npy")), mmap_mode="r",
                   allow_pickle=False).shape[1:] == (49, 320)
    _, meta = load_tensors(tmp_path / "run" / "train_state.safetensors")
    decoder_group, head_group = meta["param_groups"]
    assert head_group["lr"] == pytest.approx(0.5 * decoder_group["lr"]) and decoder_group["lr"] > 0
    cap = Captioner.load(tmp_path / "run" / "best.safetensors")
    assert cap.encoder.feature_dim == 320
    tuned, pretrained = cap.decoder.encoder_head.weight, cap.encoder.head.weight
    assert not torch.equal(tuned, pretrained)  # trained...
    assert (tuned - pretrained).norm() < 0.5 * pretrained.norm()  # ...from the pretrained weights
    [image] = write_images(tmp_path / "new", 1)
    assert cap.caption([image])[0].text == Captioner.load(tmp_path / "run" / "best.safetensors",
                                                          precision="reference").caption([image])[0].text

    # Resumed with another rate for the head: the config's rate applies, not the one saved with the optimizer.
    raw["train"].update(epochs=4, encoder_head_lr=0.25)
    config.write_text(yaml.safe_dump(raw))
    assert main(["train", "--config", str(config), "--resume"]) == 0
    _, meta = load_tensors(tmp_path / "run" / "train_state.safetensors")
    decoder_group, head_group = meta["param_groups"]
    assert meta["progress"]["epoch"] == 4
    assert head_group["lr"] == pytest.approx(0.25 * decoder_group["lr"]) and decoder_group["lr"] > 0


def test_a_head_of_another_width_is_one_clear_error(shapes, tmp_path, capsys):
    from captioner.config import ConfigError, ModelConfig
    from captioner.models.decoder import build_decoder
    from captioner.training.loop import start_encoder_head

    _, csv_path = shapes
    config = tiny_config(tmp_path, csv_path, epochs=1)
    raw = yaml.safe_load(config.read_text())
    raw["model"]["encoder_head"] = 64
    config.write_text(yaml.safe_dump(raw))
    assert main(["train", "--config", str(config)]) == 2
    assert "model.encoder_head is 64 but efficientnet_lite0's last 1x1 convolution has 1280" in capsys.readouterr().err
    assert not list((tmp_path / "cache").rglob("*.npy"))  # refused before extracting anything

    decoder = build_decoder(ModelConfig(encoder_head=64), vocab_size=20, encoder_dim=320)
    with pytest.raises(ConfigError, match="model.encoder_head is 64 but the encoder has a 1280-wide head"):
        start_encoder_head(decoder, torch.nn.Linear(320, 1280))
    with pytest.raises(ConfigError, match="the encoder has no head"):
        start_encoder_head(decoder, None)


def test_a_run_resumed_after_its_early_stop_goes_straight_on(shapes, tmp_path, monkeypatch):
    """The early stop is decided from the saved progress, so resuming does not train one more XE epoch."""
    _, csv_path = shapes
    from captioner.training import validation

    calls = []

    def declining_scores(*args, **kwargs):  # the first epoch is the best; patience 1 stops after the second
        calls.append(1)
        return {"Bleu_1": 0.5, "Bleu_4": 0.1, "ROUGE_L": 0.3, "CIDEr": 1.0 / len(calls)}, None

    monkeypatch.setattr(validation, "evaluate_set", declining_scores)
    revive = kill_after_epoch(monkeypatch, 2)
    config = tiny_config(tmp_path, csv_path, epochs=6, patience=1, scst_epochs=1)
    with pytest.raises(KeyboardInterrupt):
        main(["train", "--config", str(config)])
    revive()
    assert main(["train", "--config", str(config), "--resume"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["phase"]) for r in rows] == [(1, "xe"), (2, "xe"), (7, "scst")]


def test_an_image_lost_between_the_plain_and_the_mirrored_pass_is_named(shapes, tmp_path, monkeypatch):
    from captioner.config import load_config
    from captioner.data.readers import DatasetError
    from captioner.training import prepare

    _, csv_path = shapes
    real_extract = prepare.FeatureCache.extract

    def mirrored_pass_fails(cache, images, **kwargs):
        if cache.mirrored:
            return [(images[0], "cannot identify image file")]
        return real_extract(cache, images, **kwargs)

    monkeypatch.setattr(prepare.FeatureCache, "extract", mirrored_pass_fails)
    cfg = load_config(tiny_config(tmp_path, csv_path, data={"mirror": True}))
    with pytest.raises(DatasetError, match="became unreadable") as info:
        prepare.prepare_data(cfg)
    assert "cannot identify image file" in str(info.value)


def _started_from(tmp_path, csv_path, start, out="run", model=None, **train):
    """A tiny recipe on the shapes data that starts from the checkpoint `start` (trained at image size 160)."""
    config = tiny_config(tmp_path, csv_path, out=out, init_from=str(start), **train)
    raw = yaml.safe_load(config.read_text())
    raw["model"].update({"image_size": 160, **(model or {})})
    config.write_text(yaml.safe_dump(raw))
    return config


def test_a_run_started_from_a_model_scores_it_first_keeps_its_words_and_resumes_without_it(
        trained, shapes, tmp_path, monkeypatch, capsys):
    """train.init_from: the starting model is epoch 0 (its weights, scored as when it was kept), its vocabulary
    is kept where the data's counts would give another, dropout may differ, self-critical epochs follow; a
    resumed run needs only its own state, not the starting model's file."""
    import shutil

    from captioner.models.checkpoint import load_model

    _, csv_path = shapes
    start = tmp_path / "start.safetensors"
    shutil.copy(trained / "best.safetensors", start)
    config = _started_from(tmp_path, csv_path, start, data={"min_word_count": 10_000}, model={"dropout": 0.3},
                           epochs=0, scst_epochs=2, scst_lr=1e-4)
    assert main(["train", "--config", str(config), "--dry-run"]) == 0
    started = load_model(start)
    assert f"# vocabulary: {len(started.vocab)} words, the starting model's" in capsys.readouterr().out

    revive = kill_after_epoch(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        main(["train", "--config", str(config)])
    revive()
    start.unlink()  # moved or updated since: the resumed run must not need it
    assert main(["train", "--config", str(config), "--resume"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["phase"]) for r in rows] == [(0, "init"), (1, "scst"), (2, "scst")]
    assert rows[0]["lr"] is None and rows[0]["loss"] is None
    before = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["CIDEr"] == pytest.approx(max(r["CIDEr"] for r in before), abs=1e-9)
    best = load_model(tmp_path / "run" / "best.safetensors")
    assert best.vocab.itos == started.vocab.itos and len(started.vocab) > 10  # min_word_count would leave 4


def test_a_starting_model_that_does_not_fit_is_refused_before_any_work(trained, shapes, tmp_path, capsys):
    _, csv_path = shapes
    start = trained / "best.safetensors"
    # hidden_dim differs, and image_size is left at the encoder's own (the model was trained at 160)
    config = tiny_config(tmp_path, csv_path, out="other", epochs=1, init_from=str(start))
    raw = yaml.safe_load(config.read_text())
    raw["model"]["hidden_dim"] = 48
    config.write_text(yaml.safe_dump(raw))
    for command in (["--dry-run"], []):
        assert main(["train", "--config", str(config), *command]) == 2
        err = capsys.readouterr().err
        assert "model.hidden_dim: 96, this config 48" in err and "model.image_size: 160, this config 0" in err
    assert not (tmp_path / "other").exists() and not (tmp_path / "cache").exists()

    pickled = tmp_path / "pickled.pt"
    torch.save({"w": torch.zeros(2)}, pickled)
    cases = {"nonesuch": "unknown model 'nonesuch'; shipped models: general, flickr8k",
             str(tmp_path / "missing.safetensors"): "missing.safetensors: checkpoint file not found",
             str(trained): f"{trained}: is a folder; did you mean {start}?",
             str(pickled): "pickle-based PyTorch file"}
    for value, reason in cases.items():
        raw["train"]["init_from"] = value
        config.write_text(yaml.safe_dump(raw))
        assert main(["train", "--config", str(config)]) == 2
        err = capsys.readouterr().err
        assert "train.init_from: " in err and reason in err, err
    assert not (tmp_path / "other").exists()


def test_no_epochs_at_all_is_refused():
    from captioner.config import ConfigError, TrainConfig

    with pytest.raises(ConfigError, match=r"train.epochs must be >= 1 \(or >= 0 with train.init_from\)"):
        TrainConfig(epochs=0)
    with pytest.raises(ConfigError, match="needs train.scst_epochs >= 1"):
        TrainConfig(epochs=0, init_from="general")
    assert TrainConfig(epochs=0, scst_epochs=1, init_from="general").epochs == 0
