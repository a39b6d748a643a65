"""Every recipe in configs/ loads and dry-runs, on a tiny generated dataset in the format it names."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from captioner.cli import main
from captioner.config import load_config
from tests.conftest import write_images

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))
N_IMAGES = 40
WORDS = ["a", "dog", "cat", "runs", "sits", "on", "the", "grass", "red", "blue", "ball"]


def _captions(i: int) -> list[str]:
    return [f"a {WORDS[(i + k) % len(WORDS)]} {WORDS[(i * 3 + k) % len(WORDS)]} on the grass"
            for k in range(2)]


def make_dataset(fmt: str, root: Path) -> list[str]:
    """Write N_IMAGES images and their captions in `fmt`; return the --set overrides that point at them."""
    return [f"data.{key}={value}" for key, value in dataset_keys(fmt, root).items()]


def dataset_keys(fmt: str, root: Path) -> dict[str, str]:
    """Write N_IMAGES images and their captions in `fmt`; return the data keys that point at them (for coco also
    split lists, as coco_small has)."""
    images = write_images(root / "images", N_IMAGES)
    names = [p.name for p in images]
    pairs = [(n, c) for i, n in enumerate(names) for c in _captions(i)]
    if fmt == "flickr8k":
        (root / "images").rename(root / "Images")
        (root / "Flickr8k.token.txt").write_text("".join(f"{n}#{k}\t{c}\n" for k, (n, c) in enumerate(pairs)))
        (root / "Flickr_8k.trainImages.txt").write_text("\n".join(names[:30]) + "\n")
        (root / "Flickr_8k.devImages.txt").write_text("\n".join(names[30:]) + "\n")
        return {"root": str(root)}
    if fmt == "karpathy":
        entries = [{"filename": n, "split": "train" if i < 25 else "restval" if i < 30 else "val",
                    "sentences": [{"raw": c} for c in _captions(i)]} for i, n in enumerate(names)]
        annotations = root / "dataset.json"
        annotations.write_text(json.dumps({"images": entries}))
    elif fmt == "coco":
        annotations = root / "captions.json"
        annotations.write_text(json.dumps({
            "images": [{"id": i, "file_name": n} for i, n in enumerate(names)],
            "annotations": [{"id": k, "image_id": names.index(n), "caption": c}
                            for k, (n, c) in enumerate(pairs)]}))
    elif fmt == "csv":
        annotations = root / "captions.csv"
        with annotations.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["image", "caption"])
            writer.writerows(pairs)
    elif fmt == "jsonl":
        annotations = root / "captions.jsonl"
        annotations.write_text("".join(json.dumps({"image": n, "caption": c}) + "\n" for n, c in pairs))
    else:
        raise AssertionError(f"no generator for format {fmt}")
    keys = {"annotations": str(annotations), "images": str(root / "images")}
    if fmt == "coco":  # split lists, as coco_small's train.txt / dev.txt
        (root / "train.txt").write_text("\n".join(names[:30]) + "\n")
        (root / "dev.txt").write_text("\n".join(names[30:]) + "\n")
        return {**keys, "train_list": str(root / "train.txt"), "val_list": str(root / "dev.txt")}
    # A held-out share big enough that 40 images always leave some for validation.
    return {**keys, "val_fraction": "0.3"} if fmt in ("csv", "jsonl") else keys


def formats_of(config: Path) -> list[str]:
    """The reader of each dataset a recipe names (one, or those of `data.datasets`)."""
    data = load_config(config).data
    return [d.format for d in data.sources()]


def generated_recipe(config: Path, tmp_path: Path) -> Path:
    """A copy of `config` whose datasets are generated ones (each in its format), for a dry run."""
    raw = yaml.safe_load(config.read_text())
    if raw["data"].get("datasets"):
        for i, entry in enumerate(raw["data"]["datasets"]):
            entry.update(dataset_keys(entry["format"], tmp_path / f"data{i}"))
    else:
        for key in ("train_list", "val_list", "val_annotations", "val_fraction"):
            raw["data"].pop(key, None)
        raw["data"].update(dataset_keys(raw["data"]["format"], tmp_path / "data"))
    out = tmp_path / config.name
    out.write_text(yaml.safe_dump(raw))
    return out


def _dry_run(config: Path, overrides: list[str], tmp_path: Path) -> list[str]:
    sets = [*overrides, f"data.cache_dir={tmp_path / 'cache'}", f"train.out_dir={tmp_path / 'run'}",
            "data.min_word_count=1"]
    return ["train", "--config", str(config), "--dry-run", *[a for s in sets for a in ("--set", s)]]


def test_there_is_a_recipe_per_reader():
    formats = {f for c in CONFIGS for f in formats_of(c)}
    assert formats == {"flickr8k", "karpathy", "coco", "csv", "jsonl"}


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_recipe_dry_runs_on_generated_data(config, tmp_path, capsys):
    assert main(_dry_run(generated_recipe(config, tmp_path), [], tmp_path)) == 0
    out = capsys.readouterr().out
    resolved = yaml.safe_load(out)  # the report is the resolved config; the data summary is in comments
    listed = [d["format"] for d in resolved["data"]["datasets"]] or [resolved["data"]["format"]]
    assert listed == formats_of(config)
    assert resolved["train"]["out_dir"] == str(tmp_path / "run")
    lines = {line.split(":")[0].lstrip("# "): line for line in out.splitlines() if line.startswith("# ")}
    sources = load_config(config).data.sources()
    for source in sources:
        where = f"{source.label()} " if len(sources) > 1 else ""
        assert "0 missing" in lines[where + source.train_split]
        assert lines[where + source.val_split]
    assert "vocabulary" in lines
    assert not (tmp_path / "cache").exists()  # no features extracted
    assert not (tmp_path / "run").exists()  # nothing written


def test_dry_run_counts_what_training_reads(tmp_path, capsys):
    config = next(c for c in CONFIGS if c.stem == "flickr8k")
    overrides = make_dataset("flickr8k", tmp_path / "data")
    assert main(_dry_run(config, overrides, tmp_path)) == 0
    out = capsys.readouterr().out
    assert "# train: 30 images, 60 captions, 0 missing" in out
    assert "# dev: 10 images, 20 captions, 0 missing" in out
    assert "# vocabulary: 15 words" in out  # the 11 words and the 4 special tokens


def test_dry_run_reports_missing_images(tmp_path, capsys):
    config = next(c for c in CONFIGS if c.stem == "csv")
    overrides = make_dataset("csv", tmp_path / "data")
    for image in sorted((tmp_path / "data" / "images").iterdir())[:3]:
        image.unlink()
    assert main(_dry_run(config, overrides, tmp_path)) == 2
    assert "missing or empty" in capsys.readouterr().err
    assert main(_dry_run(config, [*overrides, "data.on_missing=skip"], tmp_path)) == 0
    out = capsys.readouterr().out
    counted = [int(line.split(", ")[-1].split()[0]) for line in out.splitlines() if line.endswith(" missing")]
    assert sum(counted) == 3  # across the train and the held-out split


def test_dry_run_without_the_data_is_a_clear_error(tmp_path, capsys):
    config = next(c for c in CONFIGS if c.stem == "csv")
    assert main(_dry_run(config, [f"data.annotations={tmp_path / 'nope.csv'}"], tmp_path)) == 2
    err = capsys.readouterr().err
    assert "data.annotations" in err and "does not exist" in err


def test_dry_run_refuses_the_run_folder_the_run_would_refuse(tmp_path, capsys):
    """A folder holding a finished run passed the dry run, and the run itself then refused to start."""
    config = next(c for c in CONFIGS if c.stem == "csv")
    overrides = make_dataset("csv", tmp_path / "data")
    args = _dry_run(config, overrides, tmp_path)
    assert main(args) == 0
    assert f"# run folder: {tmp_path / 'run'} (created by the run)" in capsys.readouterr().out

    run = tmp_path / "run"
    run.mkdir()
    assert main(args) == 0
    assert "(written into)" in capsys.readouterr().out  # an empty folder is the run's
    (run / "best.safetensors").write_bytes(b"a previous run's weights")
    (run / "metrics.jsonl").write_text('{"epoch": 1}\n')
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "already holds best.safetensors, metrics.jsonl" in err and "--resume" in err
    assert main([*args, "--resume"]) == 2  # nothing to resume from: the run would overwrite them
    assert "no train_state.safetensors to resume from" in capsys.readouterr().err

    (run / "train_state.safetensors").write_bytes(b"state")
    assert main([*args, "--resume"]) == 0
    assert "(the run there is resumed)" in capsys.readouterr().out
    assert sorted(p.name for p in run.iterdir()) == ["best.safetensors", "metrics.jsonl", "train_state.safetensors"]
