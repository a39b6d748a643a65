"""Several datasets in one recipe: split lists, sampling weights, one vocabulary, per-dataset validation and the
selection score, on two generated datasets (a CSV and a COCO captions file with train/dev lists)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from captioner.cli import main
from captioner.config import ConfigError, DataConfig, load_config
from captioner.data.dataset import CaptionSet, epoch_order
from captioner.data.readers import DatasetError
from captioner.data.splits import read_dataset
from captioner.models.checkpoint import load_model
from tests.synthetic import make_shapes_dataset

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _coco(folder: Path, samples: list[tuple[str, list[str]]], images: Path) -> dict[str, str]:
    """A COCO captions file over `samples` (images in `images`) with train.txt / dev.txt lists; returns the keys."""
    folder.mkdir(parents=True, exist_ok=True)
    names = [n for n, _ in samples]
    data = {"images": [{"id": i, "file_name": n} for i, n in enumerate(names)],
            "annotations": [{"id": k, "image_id": i, "caption": c}
                            for k, (i, c) in enumerate((i, c) for i, (_, caps) in enumerate(samples) for c in caps)]}
    (folder / "captions.json").write_text(json.dumps(data))
    dev = names[::4]  # every fourth image, listed in reverse to check the list's order is kept
    (folder / "dev.txt").write_text("\n".join(reversed(dev)) + "\n")
    (folder / "train.txt").write_text("\n".join(n for n in names if n not in dev) + "\n")
    return {"format": "coco", "annotations": str(folder / "captions.json"), "images": str(images),
            "train_list": str(folder / "train.txt"), "val_list": str(folder / "dev.txt")}


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory):
    """A CSV dataset of the shapes on white, and a COCO one of those on black whose captions say "photo"."""
    root = tmp_path_factory.mktemp("two")
    _, samples = make_shapes_dataset(root / "images", copies=3)
    white = [s for s in samples if "_white_" in s[0]]
    black = [(n, [c.replace("picture", "photo") for c in caps]) for n, caps in samples if "_black_" in n]
    table = root / "white.csv"
    with table.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "caption"])
        writer.writerows((n, c) for n, caps in white for c in caps)
    first = {"name": "white", "format": "csv", "annotations": str(table), "images": str(root / "images"),
             "val_fraction": 0.25}
    second = {"name": "black", **_coco(root / "coco", black, root / "images")}
    return root, first, second


def _recipe(root: Path, datasets: list[dict], out: str, **train) -> Path:
    cfg = {
        "model": {"embed_dim": 32, "hidden_dim": 96, "attention_dim": 32, "feature_dim": 64, "dropout": 0.1,
                  "feature_dropout": 0.1},
        "data": {"datasets": datasets, "min_word_count": 1, "cache_dir": str(root / "cache")},
        "train": {"out_dir": str(root / out), "epochs": 4, "batch_size": 8, "lr": 0.005, "warmup_steps": 5,
                  "patience": 0, "seed": 1, **train},
        "decode": {"beam_size": 2, "max_length": 10},
    }
    path = root / f"{out}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_the_coco_reader_takes_split_lists_in_their_order(two_datasets):
    _, _, second = two_datasets
    cfg = DataConfig(**second)
    dev = read_dataset(cfg, "dev")
    listed = Path(second["val_list"]).read_text().split()
    assert [s.image.name for s in dev] == listed
    train = read_dataset(cfg, "train")
    assert not {s.image for s in train} & {s.image for s in dev}
    assert len(train) + len(dev) == 36  # 4 colours x 3 shapes x 3 copies on black
    assert all(len(s.captions) == 3 and "photo" in s.captions[2] for s in dev)


def test_a_listed_image_without_captions_is_an_error(two_datasets, tmp_path):
    _, _, second = two_datasets
    bad = tmp_path / "dev.txt"
    bad.write_text("not_there.png\n")
    with pytest.raises(DatasetError, match="not_there.png"):
        read_dataset(DataConfig(**{**second, "val_list": str(bad)}), "dev")
    with pytest.raises(DatasetError, match="no split list for the 'test' split"):
        read_dataset(DataConfig(**second), "test")


def test_a_train_list_and_a_dev_list_that_share_images_are_refused(two_datasets, tmp_path):
    """The run validated on images it trained on, and chose its best epoch by them, without a word."""
    _, _, second = two_datasets
    train = Path(second["train_list"]).read_text().split()
    leaky = tmp_path / "dev.txt"
    leaky.write_text("\n".join([*Path(second["val_list"]).read_text().split(), train[0], train[1]]) + "\n")
    cfg = DataConfig(**{**second, "val_list": str(leaky)})
    for split in ("train", "dev"):
        with pytest.raises(DatasetError, match=rf"share 2 image\(s\), e.g. .*{train[0]}.*images the model trained"):
            read_dataset(cfg, split)


def test_two_datasets_train_together_and_select_on_the_weighted_score(two_datasets):
    root, first, second = two_datasets
    datasets = [{**first, "selection_weight": 1.0}, {**second, "weight": 2.0, "selection_weight": 3.0}]
    assert main(["train", "--config", str(_recipe(root, datasets, "run"))]) == 0
    rows = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    for row in rows:
        for label in ("white", "black"):
            assert {f"{label}/CIDEr", f"{label}/Bleu_4"} <= set(row)
        assert math.isclose(row["selection"], (row["white/CIDEr"] + 3 * row["black/CIDEr"]) / 4, rel_tol=1e-9)
        assert "CIDEr" not in row  # no unlabeled score that could be mistaken for one dataset's
    best = max(range(4), key=lambda i: rows[i]["selection"])
    model = load_model(root / "run" / "best.safetensors")
    assert model.info["epoch"] == rows[best]["epoch"]
    assert model.info["data"] == "white+black"
    per = model.info["metrics"]["datasets"]
    assert per["black"]["CIDEr"] == rows[best]["black/CIDEr"] and per["black"]["split"] == "dev"
    assert model.info["metrics"]["selection"] == rows[best]["selection"]
    # One vocabulary over both datasets: "picture" only in the first, "photo" only in the second.
    assert {"picture", "photo"} <= set(model.vocab.itos)
    assert rows[-1]["black/CIDEr"] > 0.5 and rows[-1]["white/CIDEr"] > 0.5  # learnt both, far above chance
    assert (root / "run" / "curves.png").stat().st_size > 0


def test_a_dry_run_reports_every_dataset(two_datasets, capsys):
    root, first, second = two_datasets
    assert main(["train", "--config", str(_recipe(root, [first, second], "dry")), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "# black train: 27 images, 81 captions, 0 missing" in out
    assert "# black dev: 9 images, 27 captions, 0 missing" in out
    assert "# white train:" in out and "# white dev:" in out
    assert not (root / "dry").exists()


def test_sampling_weights_set_how_often_images_are_shown():
    data = CaptionSet([Path(f"{i}.jpg") for i in range(3)], torch.zeros(3, 1, 1), [["a"]] * 3,
                      weights=[1.0, 2.0, 0.5])
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(3)
    for _ in range(400):
        order = epoch_order(data, generator)
        counts += torch.bincount(torch.tensor(order), minlength=3)
    assert counts[0] == 400 and counts[1] == 800  # whole weights are exact
    assert 160 < counts[2] < 240  # 0.5: once in about half the epochs
    assert data.epoch_size() == 4
    plain = CaptionSet(data.images, data.features, data.references)  # no weights: the permutation as before
    assert epoch_order(plain, torch.Generator().manual_seed(3)) == torch.randperm(
        3, generator=torch.Generator().manual_seed(3)).tolist()


def test_recipe_errors_name_the_dataset(two_datasets, tmp_path):
    _, first, second = two_datasets

    def load(data: dict) -> None:
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump({"data": data}))
        load_config(path)

    with pytest.raises(ConfigError, match=r"data\.datasets\[1\]\.weight must be in \[0, 100\]"):
        load({"datasets": [first, {**second, "weight": -1}]})
    with pytest.raises(ConfigError, match="two datasets are named 'white'"):
        load({"datasets": [first, {**second, "name": "white"}]})
    with pytest.raises(ConfigError, match="data.root is set per dataset"):
        load({"root": "/data", "datasets": [first, second]})
    with pytest.raises(ConfigError, match=r"train_list/val_list are for coco"):
        load({"datasets": [{"format": "flickr8k", "root": "x", "train_list": "t.txt"}]})
    with pytest.raises(ConfigError, match="selection_weight > 0"):
        load({"datasets": [{**first, "selection_weight": 0}, {**second, "selection_weight": 0}]})
    with pytest.raises(ConfigError, match=r"data\.datasets: expected a list"):
        load({"datasets": {"format": "csv"}})


def test_a_type_error_inside_an_entry_is_named_once(two_datasets, tmp_path):
    _, first, second = two_datasets
    path = tmp_path / "typed.yaml"
    path.write_text(yaml.safe_dump({"data": {"datasets": [first, {**second, "weight": "abc"}]}}))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith("invalid config: data.datasets[1].weight: expected float")
    assert "datasets[1].datasets" not in str(info.value)
    with pytest.raises(ConfigError, match=r"data\.datasets\[0\]\.name must be"):
        load_config(path, ["data.datasets.1.weight=1", "data.datasets.0.name=a/b"])


def test_dotted_overrides_reach_into_the_list_of_datasets(two_datasets, tmp_path):
    _, first, second = two_datasets
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump({"data": {"datasets": [first, second]}}))
    cfg = load_config(path, ["data.datasets.1.weight=3", "data.datasets.0.max_images=5"])
    assert [d.weight for d in cfg.data.datasets] == [1.0, 3.0] and cfg.data.datasets[0].max_images == 5
    with pytest.raises(ConfigError, match="2 is not an entry of that list"):
        load_config(path, ["data.datasets.2.weight=1"])
    for key in ("9" * 5000, "\u00b2"):  # over int()'s digit limit, a Unicode digit: were ValueError tracebacks
        with pytest.raises(ConfigError, match="is not an entry of that list"):
            load_config(path, [f"data.datasets.{key}.weight=1"])


def test_one_split_list_leaves_the_other_split_the_rest(two_datasets):
    _, _, second = two_datasets
    only_train = DataConfig(**{**second, "val_list": ""})
    train, dev = read_dataset(only_train, "train"), read_dataset(only_train, "dev")
    assert [s.image.name for s in train] == Path(second["train_list"]).read_text().split()
    assert {s.image.name for s in dev} == set(Path(second["val_list"]).read_text().split())


def test_weighted_batches_draw_captions_and_flips_per_showing():
    """An image shown twice in an epoch gets its own captions and its own left-right flip each time."""
    from captioner.data.dataset import iterate_batches

    n = 4
    data = CaptionSet([Path(f"{i}.jpg") for i in range(n)], torch.zeros(n, 1, 2), [["x"] * 6] * n,
                      mirrored=torch.ones(n, 1, 2), weights=[3.0] * n)
    encoded = [[[1, 10 + k, 2] for k in range(6)] for _ in range(n)]  # six distinct captions per image
    batches = list(iterate_batches(data, encoded, 64, 1, torch.Generator().manual_seed(0),
                                   mirror_ids=list(range(20))))
    [batch] = batches
    assert batch.images.tolist().count(0) == 3 and len(batch.images) == 3 * n
    firsts = {}
    for row, image in enumerate(batch.images.tolist()):
        words = batch.captions[batch.image_index == row][:, 1].tolist()
        firsts.setdefault(image, set()).update(words)
    assert any(len(words) > 1 for words in firsts.values())  # not the same caption every time
    flips = batch.features[:, 0, 0].tolist()  # 1.0: the mirrored features were shown
    assert 0.0 in flips and 1.0 in flips
