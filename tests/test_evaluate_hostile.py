"""`captioner evaluate` on hostile inputs: outputs that are inputs or not folders, line breaks inside references,
unknown split names and Karpathy images listed twice."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from captioner.cli import main
from captioner.config import DataConfig
from captioner.data.readers import DatasetError
from captioner.data.splits import read_dataset
from captioner.evaluation.metrics import java_available, score_captions, tokenize_for_eval
from tests.conftest import write_images


@pytest.fixture
def no_model(monkeypatch):
    """Make loading a model fail loudly: the refusals below must come before it."""
    def load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("captioner.api.Captioner.load", load)


def _annotations(folder: Path, n: int = 3, name: str = "a.jsonl", caption: str = "a dog runs") -> Path:
    """A jsonl annotation file of `n` images written into `folder`."""
    images = write_images(folder, n)
    path = folder / name
    path.write_text("".join(json.dumps({"image": p.name, "caption": caption}) + "\n" for p in images))
    return path


def _evaluate(checkpoint, annotations, *args, fmt: str = "jsonl") -> int:
    return main(["evaluate", "--checkpoint", str(checkpoint), "--format", fmt, "--data", str(annotations),
                 "--precision", "reference", *map(str, args)])


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# ---- 1: an output file that is an input --------------------------------------------------------------------


def test_evaluate_refuses_to_overwrite_its_annotation_file(tmp_path, tiny_checkpoint, no_model, capsys):
    annotations = _annotations(tmp_path, 27, name="captions.jsonl")  # img_026 is in the dev split (its hash)
    before = annotations.read_bytes()
    assert _evaluate(tiny_checkpoint, annotations, "--split", "dev", "--output", tmp_path) == 2
    assert "captions.jsonl" in _one_line(capsys)
    assert annotations.read_bytes() == before


def test_evaluate_refuses_to_overwrite_its_split_list_through_a_link(tmp_path, tiny_checkpoint, no_model, capsys):
    annotations = _annotations(tmp_path)
    listed = tmp_path / "dev.txt"
    listed.write_text("img_000.jpg\n")
    out = tmp_path / "eval"
    out.mkdir()
    (out / "scores.json").symlink_to(listed)
    assert _evaluate(tiny_checkpoint, annotations, "--split-list", listed, "--output", out) == 2
    assert "dev.txt" in _one_line(capsys)
    assert listed.read_text() == "img_000.jpg\n"


# ---- 2: --output that cannot be the folder, written atomically ----------------------------------------------


def test_evaluate_output_below_a_file_is_refused_before_the_model(tmp_path, tiny_checkpoint, no_model, capsys):
    annotations = _annotations(tmp_path)
    (tmp_path / "afile").write_text("keep me\n")
    assert _evaluate(tiny_checkpoint, annotations, "--output", tmp_path / "afile" / "sub") == 4  # as caption's
    assert "afile is not a folder" in _one_line(capsys)
    assert (tmp_path / "afile").read_text() == "keep me\n"


def test_evaluate_output_that_is_a_dangling_link_is_refused(tmp_path, tiny_checkpoint, no_model, capsys):
    annotations = _annotations(tmp_path)
    (tmp_path / "eval").symlink_to(tmp_path / "gone")
    assert _evaluate(tiny_checkpoint, annotations, "--output", tmp_path / "eval") == 2
    assert "symbolic link to nothing" in _one_line(capsys)


def test_evaluate_output_file_that_is_a_fifo_is_refused_not_a_hang(tmp_path, tiny_checkpoint, no_model, capsys):
    annotations = _annotations(tmp_path)
    out = tmp_path / "eval"
    out.mkdir()
    fifo = out / "scores.json"
    os.mkfifo(fifo)
    # A reader that never blocks: without the check the write would have gone into the pipe, not hung the test.
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        assert _evaluate(tiny_checkpoint, annotations, "--output", out) == 2
    finally:
        os.close(reader)
    assert "(a FIFO)" in _one_line(capsys)


def test_evaluate_output_that_cannot_be_written_whole_leaves_the_old_files(tmp_path, tiny_checkpoint):
    """A write that fails half-way (here the file-size limit: EFBIG) keeps the previous scores.json and
    captions.jsonl as they were: each is written to a temporary file and renamed onto it."""
    annotations = _annotations(tmp_path, caption="a dog runs " * 300)  # captions.jsonl: references over the limit
    out = tmp_path / "eval"
    out.mkdir()
    (out / "scores.json").write_text("old scores\n")
    (out / "captions.jsonl").write_text("old captions\n")
    code = ("import sys; import captioner.evaluation.metrics as m; m.java_available = lambda: False; "
            "from captioner.cli import main; sys.exit(main(sys.argv[1:]))")
    args = ["evaluate", "--checkpoint", str(tiny_checkpoint), "--format", "jsonl", "--data", str(annotations),
            "--precision", "reference", "--output", str(out)]

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, preexec_fn=limit,
                          env=env, cwd=Path(__file__).parent.parent, timeout=300)
    assert done.returncode == 4, done.stderr
    assert "Traceback" not in done.stderr
    assert (out / "scores.json").read_text() == "old scores\n"
    assert (out / "captions.jsonl").read_text() == "old captions\n"
    assert sorted(p.name for p in out.iterdir()) == ["captions.jsonl", "scores.json"]  # no temporary file left


# ---- 3: line breaks inside captions -------------------------------------------------------------------------

LINE_BREAKS = ["\r", "\v", "\f", "\x85", "\u2028", "\u2029", "\x1c", "\x1d", "\x1e", "\r\n"]
CONTROLS = ["\x00", "\x07", "\x1b", "\x7f", "\x9b"]


def _shifted(char: str) -> dict[str, list[str]]:
    return {"img1": [f"a{char}red circle"], "img2": ["a blue square"], "img3": ["green triangle"]}


@pytest.mark.skipif(not java_available(), reason="needs Java (the PTB tokenizer)")
def test_java_tokenizer_keeps_each_caption_on_its_image():
    chars = LINE_BREAKS + CONTROLS
    got = tokenize_for_eval({f"{n}": [f"a{c}red circle", "a blue square"] for n, c in enumerate(chars)}, use_java=True)
    assert got == {f"{n}": ["a red circle", "a blue square"] for n in range(len(chars))}
    assert tokenize_for_eval(_shifted("\u2028"), use_java=True) == tokenize_for_eval(_shifted(" "), use_java=True)


@pytest.mark.skipif(not java_available(), reason="needs Java (the PTB tokenizer)")
def test_scores_with_a_line_break_in_a_reference_are_those_without():
    predictions = {"img1": "a red circle", "img2": "a blue square", "img3": "a green triangle"}
    broken = score_captions(predictions, _shifted("\u2028"), metrics=("Bleu_1", "CIDEr"), use_java=True)
    assert broken == score_captions(predictions, _shifted(" "), metrics=("Bleu_1", "CIDEr"), use_java=True)


@pytest.mark.parametrize("char", LINE_BREAKS + CONTROLS)
def test_python_tokenizer_makes_line_breaks_and_controls_spaces(char):
    assert tokenize_for_eval(_shifted(char), use_java=False) == tokenize_for_eval(_shifted(" "), use_java=False)
    candidate = tokenize_for_eval({"img1": [f"a{char}dog"]}, use_java=False)
    assert candidate == {"img1": ["a dog"]}


# ---- 4: unknown split names ---------------------------------------------------------------------------------


@pytest.mark.parametrize("extra", [[], ["--split-list", "LIST"]])
def test_evaluate_refuses_an_unknown_split(tmp_path, tiny_checkpoint, no_model, capsys, extra):
    annotations = _annotations(tmp_path)
    (tmp_path / "dev.txt").write_text("img_000.jpg\n")
    extra = [str(tmp_path / "dev.txt") if a == "LIST" else a for a in extra]
    assert _evaluate(tiny_checkpoint, annotations, "--split", "bogus", *extra) == 2
    assert "unknown jsonl split 'bogus'; choose one of train, dev, val, test" in _one_line(capsys)


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "coco"])
def test_readers_refuse_an_unknown_split_and_keep_the_known_ones(tmp_path, fmt):
    names = [p.name for p in write_images(tmp_path, 8)]
    path = tmp_path / f"caps.{'json' if fmt == 'coco' else fmt}"
    if fmt == "csv":
        path.write_text("image,caption\n" + "".join(f"{n},a picture\n" for n in names))
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps({"image": n, "caption": "a picture"}) + "\n" for n in names))
    else:
        path.write_text(json.dumps({"images": [{"id": i, "file_name": n} for i, n in enumerate(names)],
                                    "annotations": [{"image_id": i, "caption": "a picture"} for i in range(8)]}))
    cfg = DataConfig(format=fmt, annotations=str(path), images=str(tmp_path), val_fraction=0.5)
    with pytest.raises(DatasetError, match="unknown .* split 'bogus'; choose one of train, dev, val, test"):
        read_dataset(cfg, "bogus")
    sizes = {split: len(read_dataset(cfg, split)) for split in ("train", "dev", "val", "test")}
    assert sizes["train"] + sizes["dev"] == sizes["test"] == 8 and sizes["dev"] == sizes["val"]


# ---- 5: an image listed twice -------------------------------------------------------------------------------


def _karpathy(tmp_path: Path) -> DataConfig:
    write_images(tmp_path, 2)
    entries = [{"filename": "img_000.jpg", "split": "test", "sentences": [{"raw": "a red square"}]},
               {"filename": "img_001.jpg", "split": "test", "sentences": [{"raw": "a dark picture"}]},
               {"filename": "img_000.jpg", "split": "test", "sentences": [{"raw": "a square in red"}]},
               {"filename": "img_000.jpg", "split": "train", "sentences": [{"raw": "another split"}]}]
    (tmp_path / "dataset.json").write_text(json.dumps({"images": entries}))
    return DataConfig(format="karpathy", annotations=str(tmp_path / "dataset.json"), images=str(tmp_path))


def test_karpathy_image_listed_twice_in_a_split_keeps_both_references(tmp_path):
    samples = read_dataset(_karpathy(tmp_path), "test")
    assert [(s.image.name, s.captions) for s in samples] == [("img_000.jpg", ["a red square", "a square in red"]),
                                                           ("img_001.jpg", ["a dark picture"])]


def test_evaluate_counts_an_image_listed_twice_once(tmp_path, tiny_checkpoint, capsys, monkeypatch):
    monkeypatch.setattr("captioner.evaluation.metrics.java_available", lambda: False)
    cfg = _karpathy(tmp_path)
    out = tmp_path / "eval"
    assert _evaluate(tiny_checkpoint, cfg.annotations, "--output", out, fmt="karpathy") == 0
    report = json.loads((out / "scores.json").read_text())
    lines = (out / "captions.jsonl").read_text().splitlines()
    assert report["images"] == len(lines) == 2 and report["failed"] == 0
    assert json.loads(lines[0])["references"] == ["a red square", "a square in red"]


def test_flickr8k_split_list_naming_an_image_twice_is_one_image(tmp_path):
    write_images(tmp_path / "Images", 2)
    (tmp_path / "Flickr8k.token.txt").write_text("img_000.jpg#0\ta dog\nimg_001.jpg#0\ta cat\n")
    (tmp_path / "Flickr_8k.testImages.txt").write_text("img_000.jpg\nimg_001.jpg\nimg_000.jpg\n")
    samples = read_dataset(DataConfig(root=str(tmp_path)), "test")
    assert [s.image.name for s in samples] == ["img_000.jpg", "img_001.jpg"]


@pytest.mark.parametrize("penalty", ["50", "-0.5", "nan"])
def test_evaluate_refuses_a_length_penalty_outside_the_search_range_before_the_model(tmp_path, tiny_checkpoint,
                                                                                      no_model, capsys, penalty):
    """`--length-penalty 50` was an IndexError traceback after loading the model (length ** 50 overflowed)."""
    annotations = _annotations(tmp_path, 3)
    assert _evaluate(tiny_checkpoint, annotations, "--split", "dev", "--length-penalty", penalty) == 2
    assert "--length-penalty must be in [0, 2]" in _one_line(capsys)


def test_no_data_is_named_as_such_before_the_model_loads(no_model, capsys):
    """Without --data it said that Flickr_8k.testImages.txt does not exist."""
    assert main(["evaluate", "--max-images", "5"]) == 2
    assert capsys.readouterr().err.strip() == ("captioner: error: --data (or --annotations) is required: the "
                                               "dataset folder or annotation file to score")


def test_a_flickr8k_folder_without_the_split_list_asked_for_names_the_splits_it_has(tmp_path, no_model, capsys):
    """The default split is test; a copy of Flickr8k with only train and dev lists (as ../shared/data holds) got
    only "... Flickr_8k.testImages.txt does not exist"."""
    images = write_images(tmp_path / "Images", 2)
    (tmp_path / "Flickr8k.token.txt").write_text("".join(f"{p.name}#0\ta dog runs\n" for p in images))
    (tmp_path / "Flickr_8k.trainImages.txt").write_text(images[0].name + "\n")
    (tmp_path / "Flickr_8k.devImages.txt").write_text(images[1].name + "\n")
    assert main(["evaluate", "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "has no test split list (Flickr_8k.testImages.txt); it has train, dev: pass --split dev" in err
    assert len(err.splitlines()) == 1


def test_annotations_alone_with_the_default_flickr8k_format_is_one_line(no_model, tmp_path, capsys):
    """--format defaults to flickr8k, which reads a folder: `--annotations x.json` alone was a TypeError traceback."""
    assert main(["evaluate", "--annotations", str(tmp_path / "x.json")]) == 2
    assert "--format flickr8k reads a dataset folder: give it as --data" in capsys.readouterr().err
