"""Readers for captioning datasets. Each returns a list of `Sample(image path, reference captions)`.

Formats: the Flickr8k layout, Karpathy's split JSON (Flickr8k/Flickr30k/COCO), COCO captions JSON, and a plain
CSV or JSONL of (image, caption) rows. Which of them a split holds (split lists, hash splits, missing images) is
`captioner.data.splits`.
"""

from __future__ import annotations

import csv
import io
import json
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path


class DatasetError(ValueError):
    """A dataset cannot be read: missing files, malformed annotations, unknown split, missing images."""


@dataclass
class Sample:
    """One image and its reference captions."""

    image: Path
    captions: list[str]


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DatasetError(f"{what} {path} does not exist")
    return path


def _read_text(path: Path, what: str) -> str:
    """The UTF-8 text of `path`; a file in another encoding is a DatasetError naming it (not a traceback).

    A leading byte order mark (Excel's "CSV UTF-8", Notepad) is dropped: kept, it became part of the first
    column's name or the first image's, and the file was refused for lacking an 'image' column or captions."""
    try:
        return require_file(path, what).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc


def _parse_json(text: str, where: str) -> object:
    """`json.loads`, with its errors as DatasetErrors naming `where`; deep nesting overflows its recursion, and a
    number of more than 4,300 digits is a plain ValueError (Python's limit on int conversion)."""
    try:
        return json.loads(text)
    except ValueError as exc:  # json.JSONDecodeError is one
        raise DatasetError(f"{where}: not valid JSON ({exc})") from exc
    except RecursionError as exc:
        raise DatasetError(f"{where}: not valid JSON (nested too deeply)") from exc


def _load_json(path: Path) -> object:
    return _parse_json(_read_text(path, "annotation file"), str(path))


def _text(value: object, where: str, what: str = "caption") -> str:
    """A caption (or image name), which must be text: JSON null/NaN/numbers or a CSV row short of a cell would
    otherwise reach the tokenizer (or the path join) and fail there with a traceback, far from their file."""
    if not isinstance(value, str):
        raise DatasetError(f"{where}: the {what} must be text, got {str(value)[:60]}")
    return value


def _image_name(value: object, where: str) -> str:
    """An image name of a CSV or JSONL row: text, and not blank (joined to the image folder, a blank name is the
    folder itself)."""
    name = _text(value, where, "image name")
    if not name.strip():
        raise DatasetError(f"{where}: the image name is empty")
    return name


def _warn_blank(source: str | Path, count: int) -> None:
    """Say that `count` blank captions of `source` were dropped (nothing when there were none).

    Why drop and not refuse: one empty cell in a spreadsheet export should not stop a run over thousands of
    rows, but a blank reference must not reach the scorers (an image whose references were all blank crashed
    CIDEr-D with an empty `max()`) nor teach the decoder to stop at once. An image left with none is refused
    where a split names it (Flickr8k, Karpathy, split lists) and is absent otherwise."""
    if count:
        warnings.warn(f"{source}: {count} blank caption(s) ignored", UserWarning, stacklevel=3)


def _group(pairs: list[tuple[Path, str]], source: str | Path) -> list[Sample]:
    """(image, caption) rows as one Sample per image, in first-seen order; blank captions are dropped."""
    grouped: OrderedDict[Path, list[str]] = OrderedDict()
    for image, caption in pairs:
        caps = grouped.setdefault(image, [])  # first-seen order, a blank first caption included
        if caption.strip():
            caps.append(caption)
    _warn_blank(source, len(pairs) - sum(len(caps) for caps in grouped.values()))
    if grouped and not any(grouped.values()):
        raise DatasetError(f"{source}: every caption is blank")
    return [Sample(image, caps) for image, caps in grouped.items() if caps]


FLICKR8K_SPLITS = {"train": "Flickr_8k.trainImages.txt", "dev": "Flickr_8k.devImages.txt",
                   "val": "Flickr_8k.devImages.txt", "test": "Flickr_8k.testImages.txt"}


def read_flickr8k(root: str | Path, split: str) -> list[Sample]:
    """Flickr8k: `Images/`, `Flickr8k.token.txt` (`name.jpg#n<TAB>caption`) and `Flickr_8k.<split>Images.txt`."""
    root = Path(root)
    if split not in FLICKR8K_SPLITS:
        raise DatasetError(f"unknown flickr8k split {split!r}; choose one of {', '.join(FLICKR8K_SPLITS)}")
    # dict.fromkeys: a name listed twice is one image (scored once), as in `_listed`
    names = list(dict.fromkeys(line.strip() for line in _read_text(
        root / FLICKR8K_SPLITS[split], f"flickr8k {split} split list").splitlines() if line.strip()))
    captions: dict[str, list[str]] = {}
    tokens = root / "Flickr8k.token.txt"
    blank = 0
    for number, line in enumerate(_read_text(tokens, "flickr8k caption file").split("\n"), 1):
        if not line.strip():
            continue
        key, sep, caption = line.partition("\t")
        if not sep or "#" not in key:
            raise DatasetError(f"{tokens}:{number}: expected 'image.jpg#n<TAB>caption', got {line[:60]!r}")
        if caption.strip():
            captions.setdefault(key.rsplit("#", 1)[0], []).append(caption.strip())
        else:
            blank += 1
    _warn_blank(tokens, blank)
    without = [n for n in names if n not in captions]
    if without:
        raise DatasetError(f"{len(without)} images of the {split} split have no captions, e.g. {without[:3]}")
    return [Sample(root / "Images" / n, captions[n]) for n in names]


def read_karpathy(annotations: str | Path, images: str | Path, split: str) -> list[Sample]:
    """Karpathy's `dataset_*.json`: images with `filename`, optional `filepath`, `split` and `sentences`.

    `train` includes `restval`, as in the usual COCO recipe; `dev` is an alias of `val`. An image given by two
    entries of the split is one Sample with the sentences of both, as COCO's and the tables' rows of one file
    are: the second entry used to replace the first's references while the image was counted twice.
    """
    data = _load_json(Path(annotations))
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetError(f"{annotations}: expected an object with an 'images' list (Karpathy split format)")
    wanted = {"train": {"train", "restval"}, "dev": {"val"}}.get(split, {split})
    merged: OrderedDict[Path, list[str]] = OrderedDict()
    blank = 0
    for entry in data["images"]:
        picked = _karpathy_entry(entry, annotations, images, wanted)
        if picked is not None:
            path, caps, dropped = picked
            merged.setdefault(path, []).extend(caps)
            blank += dropped
    _warn_blank(annotations, blank)
    if not merged:
        raise DatasetError(f"{annotations}: no images in split {split!r}")
    return [Sample(path, caps) for path, caps in merged.items()]


def _karpathy_entry(entry: object, annotations: str | Path, images: str | Path,
                    wanted: set[str]) -> tuple[Path, list[str], int] | None:
    """(image path, its non-blank captions, how many were blank) of one Karpathy entry; None when the entry is
    of another split. Why refuse an entry without captions: BLEU's scorer asserts on an image without
    references (a traceback in evaluate)."""
    try:
        if entry["split"] not in wanted:
            return None
        path = Path(images) / entry.get("filepath", "") / entry["filename"]
        given = [_sentence(s, f"{annotations}: {path.name}") for s in entry["sentences"]]
    except (KeyError, TypeError, AttributeError) as exc:
        raise DatasetError(f"{annotations}: malformed image entry {str(entry)[:80]} ({exc})") from exc
    caps = [c for c in given if c.strip()]
    if not caps:
        raise DatasetError(f"{annotations}: {path.name} has no captions (its 'sentences' are empty or blank)")
    return path, caps, len(given) - len(caps)


def _sentence(sentence: dict, where: str) -> str:
    """One Karpathy sentence: its `raw` text, else its `tokens` (a list of words) joined by spaces."""
    if "raw" in sentence:
        return _text(sentence["raw"], where)
    tokens = sentence["tokens"]
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):  # a str became its letters
        raise DatasetError(f"{where}: a sentence's tokens must be a list of words, got {str(tokens)[:60]}")
    return _text(" ".join(tokens), where)


def _coco_files(images: list, annotations: str | Path) -> dict:
    """{image id: file_name} of COCO's `images`; an id given to two files is refused: with the last one winning,
    the captions of one image were silently attributed to the other and the first image was dropped."""
    files: dict = {}
    for img in images:
        known = files.setdefault(img["id"], img["file_name"])
        if known != img["file_name"]:
            raise DatasetError(f"{annotations}: image id {str(img['id'])[:40]} is given to both {str(known)[:80]} "
                               f"and {str(img['file_name'])[:80]}")
    return files


def read_coco(annotations: str | Path, images: str | Path) -> list[Sample]:
    """COCO captions JSON (`images` with id/file_name, `annotations` with image_id/caption)."""
    data = _load_json(Path(annotations))
    try:
        files = _coco_files(data["images"], annotations)
        pairs = [(Path(images) / files[a["image_id"]], a["caption"]) for a in data["annotations"]]
    except (KeyError, TypeError) as exc:
        raise DatasetError(f"{annotations}: not COCO captions format ({exc})") from exc
    return _group([(image, _text(caption, f"{annotations}: {image.name}")) for image, caption in pairs], annotations)


def read_table(annotations: str | Path, images: str | Path | None = None) -> list[Sample]:
    """CSV with `image,caption` columns, or JSONL with {"image": ..., "caption": ...} per line.

    Relative image paths are resolved against `images` (default: the annotation file's folder).
    """
    path = require_file(Path(annotations), "annotation file")
    base = Path(images) if images else path.parent
    pairs = []
    if path.suffix.lower() == ".jsonl":
        for number, line in enumerate(_read_text(path, "annotation file").split("\n"), 1):
            if not line.strip():
                continue
            row = _parse_json(line, f"{path}:{number}")
            try:
                where = f"{path}:{number}"
                pairs.append((base / _image_name(row["image"], where), _text(row["caption"], where)))
            except (KeyError, TypeError) as exc:
                raise DatasetError(f"{path}:{number}: expected {{\"image\": ..., \"caption\": ...}} ({exc})") from exc
    else:
        pairs = _read_csv(path, base)
    if not pairs:
        raise DatasetError(f"{path}: no rows")
    return _group(pairs, path)


def _read_csv(path: Path, base: Path) -> list[tuple[Path, str]]:
    """The (image, caption) rows of a CSV; bad bytes, an oversized cell or a short row name the file (and row)."""
    reader = csv.DictReader(io.StringIO(_read_text(path, "annotation file"), newline=""))
    try:
        if not reader.fieldnames or not {"image", "caption"} <= set(reader.fieldnames):
            raise DatasetError(f"{path}: CSV needs 'image' and 'caption' columns, found {reader.fieldnames}")
        return [(base / _image_name(row["image"], f"{path}:{reader.line_num}"),
                 _text(row["caption"], f"{path}:{reader.line_num}")) for row in reader]
    except csv.Error as exc:
        raise DatasetError(f"{path}: not a readable CSV ({exc})") from exc
