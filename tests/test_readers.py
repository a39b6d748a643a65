"""Each dataset reader on fixtures written here, and the missing-image policy."""

import json

import pytest

from captioner.config import DataConfig
from captioner.data.readers import DatasetError
from captioner.data.splits import check_images, read_dataset
from tests.conftest import write_images


def test_flickr8k_layout(tmp_path):
    names = [p.name for p in write_images(tmp_path / "Images", 3)]
    (tmp_path / "Flickr8k.token.txt").write_text(
        "".join(f"{n}#{k}\tA caption {k} of {n} .\n" for n in names for k in range(5)))
    (tmp_path / "Flickr_8k.trainImages.txt").write_text("\n".join(names[:2]) + "\n")
    (tmp_path / "Flickr_8k.devImages.txt").write_text(names[2] + "\n")
    train = read_dataset(DataConfig(root=str(tmp_path)), "train")
    assert [s.image.name for s in train] == names[:2]
    assert len(train[0].captions) == 5 and train[0].captions[0].startswith("A caption 0")
    assert [s.image.name for s in read_dataset(DataConfig(root=str(tmp_path)), "dev")] == names[2:]
    with pytest.raises(DatasetError, match="test split list"):
        read_dataset(DataConfig(root=str(tmp_path)), "test")


def test_karpathy_json(tmp_path):
    write_images(tmp_path / "imgs" / "sub", 3)
    entries = [{"filename": f"img_00{i}.jpg", "filepath": "sub", "split": split,
                "sentences": [{"raw": f"caption {i}", "tokens": ["caption", str(i)]}]}
               for i, split in enumerate(["train", "restval", "val"])]
    (tmp_path / "dataset_x.json").write_text(json.dumps({"images": entries}))
    cfg = DataConfig(format="karpathy", annotations=str(tmp_path / "dataset_x.json"), images=str(tmp_path / "imgs"))
    train = read_dataset(cfg, "train")
    assert [s.captions for s in train] == [["caption 0"], ["caption 1"]]
    assert train[0].image == tmp_path / "imgs" / "sub" / "img_000.jpg"
    assert [s.captions for s in read_dataset(cfg, "dev")] == [["caption 2"]]


def test_coco_json(tmp_path):
    write_images(tmp_path, 2)
    data = {"images": [{"id": 7, "file_name": "img_000.jpg"}, {"id": 9, "file_name": "img_001.jpg"}],
            "annotations": [{"image_id": 7, "caption": "one"}, {"image_id": 9, "caption": "two"},
                            {"image_id": 7, "caption": "uno"}]}
    (tmp_path / "captions.json").write_text(json.dumps(data))
    cfg = DataConfig(format="coco", annotations=str(tmp_path / "captions.json"), images=str(tmp_path))
    samples = read_dataset(cfg, "test")
    assert {s.image.name: s.captions for s in samples} == {"img_000.jpg": ["one", "uno"], "img_001.jpg": ["two"]}


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_table_formats_and_deterministic_split(tmp_path, fmt):
    names = [p.name for p in write_images(tmp_path, 40)]
    path = tmp_path / f"caps.{fmt}"
    if fmt == "csv":
        path.write_text("image,caption\n" + "".join(f"{n},a picture {n}\n" for n in names))
    else:
        path.write_text("".join(json.dumps({"image": n, "caption": f"a picture {n}"}) + "\n" for n in names))
    cfg = DataConfig(format=fmt, annotations=str(path), val_fraction=0.25)
    train, val = read_dataset(cfg, "train"), read_dataset(cfg, "dev")
    assert len(train) + len(val) == 40 and 0 < len(val) < 20
    assert not {s.image for s in train} & {s.image for s in val}
    assert [s.image for s in read_dataset(cfg, "dev")] == [s.image for s in val]


def test_malformed_annotations_are_clear(tmp_path):
    bad = tmp_path / "caps.csv"
    bad.write_text("file,text\nx.jpg,hello\n")
    with pytest.raises(DatasetError, match="'image' and 'caption'"):
        read_dataset(DataConfig(format="csv", annotations=str(bad)), "train")
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        read_dataset(DataConfig(format="coco", annotations=str(tmp_path / "x.json")), "train")


def test_missing_images_listed_or_skipped(tmp_path):
    names = [p.name for p in write_images(tmp_path, 2)]
    path = tmp_path / "caps.csv"
    path.write_text("image,caption\n" + "".join(f"{n},a\n" for n in [*names, "gone.jpg", "gone2.jpg"]))
    samples = read_dataset(DataConfig(format="csv", annotations=str(path)), "test")
    with pytest.raises(DatasetError, match=r"2 image\(s\)[\s\S]*gone\.jpg[\s\S]*gone2\.jpg"):
        check_images(samples, "error")
    kept, missing = check_images(samples, "skip")
    assert len(kept) == 2 and [p.name for p in missing] == ["gone.jpg", "gone2.jpg"]


@pytest.mark.parametrize("fmt, name, content, message", [
    ("coco", "x.json", b'{"images": [], "caption": "caf\xe9"}', "not UTF-8"),
    ("jsonl", "x.jsonl", b'{"image": "a.jpg", "caption": "caf\xe9"}\n', "not UTF-8"),
    ("csv", "x.csv", b"image,caption\na.jpg,caf\xe9\n", "not UTF-8"),
    ("coco", "x.json", b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    ("jsonl", "x.jsonl", b"[" * 100_000 + b"\n", "nested too deeply"),
    ("csv", "x.csv", b'image,caption\na.jpg,"' + b"x" * 200_000 + b'"\n', "x.csv"),
    ("csv", "x.csv", b"image,caption\na.jpg\n", "caption"),  # a row short of a column
    ("jsonl", "x.jsonl", b'{"image": "a.jpg", "caption": null}\n', "caption"),
    ("coco", "x.json", (b'{"images": [{"id": 1, "file_name": "a.jpg"}], '
                        b'"annotations": [{"image_id": 1, "caption": NaN}]}'), "caption"),
    ("karpathy", "x.json", b'{"images": [{"filename": "a.jpg", "split": "test", "sentences": [{"raw": 5}]}]}',
     "caption"),
])
def test_hostile_annotation_files_are_dataset_errors(tmp_path, fmt, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DatasetError, match=message):
        read_dataset(DataConfig(format=fmt, annotations=str(path), images=str(tmp_path)), "test")


def test_flickr8k_files_that_are_not_utf8_are_dataset_errors(tmp_path):
    (tmp_path / "Flickr8k.token.txt").write_bytes(b"a.jpg#0\tcaf\xe9\n")
    (tmp_path / "Flickr_8k.testImages.txt").write_bytes(b"a.jpg\n")
    with pytest.raises(DatasetError, match="Flickr8k.token.txt: not UTF-8"):
        read_dataset(DataConfig(root=str(tmp_path)), "test")


def test_image_names_too_long_for_the_file_system_count_as_missing(tmp_path):
    path = tmp_path / "caps.csv"
    path.write_text("image,caption\n" + "a" * 300 + ".jpg,a dog\n")
    samples = read_dataset(DataConfig(format="csv", annotations=str(path)), "test")
    kept, missing = check_images(samples, "skip")
    assert not kept and len(missing) == 1
