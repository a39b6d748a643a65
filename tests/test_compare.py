"""The paired comparison of two captionings (`captioner.evaluation.compare`, `scripts/compare_captions.py`)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from captioner.evaluation.compare import compare, per_image_cider
from captioner.evaluation.metrics import score_captions

ROOT = Path(__file__).resolve().parents[1]
SUBJECTS = ["dog", "cat", "horse", "child", "woman", "bird", "boat", "car"]
PLACES = ["grass", "snow", "beach", "road"]
REFERENCES = {f"img{i}.jpg": [f"a {s} runs on the {PLACES[i % 4]}", f"the {s} is on the {PLACES[i % 4]}",
                              f"a {s} plays in the {PLACES[i % 4]}"] for i, s in enumerate(SUBJECTS)}
GOOD = {k: refs[0] for k, refs in REFERENCES.items()}


def test_identical_captionings_differ_by_nothing():
    result = compare(GOOD, dict(GOOD), REFERENCES, resamples=200, use_java=False)
    assert result.images == 8 and result.changed == 0
    assert result.difference == result.low == result.high == 0.0 and result.score_a == result.score_b


def test_worse_captions_give_a_negative_difference_inside_its_interval():
    worse = dict(GOOD, **{k: "a red umbrella under a bridge" for k in list(GOOD)[:3]})
    result = compare(GOOD, worse, REFERENCES, resamples=500, use_java=False)
    assert result.changed == 3 and result.score_b < result.score_a
    assert result.low <= result.difference <= result.high < 0.5 * result.score_a
    assert result.difference == pytest.approx(result.score_b - result.score_a)
    # the per-image scores average to the corpus CIDEr-D that evaluation reports
    corpus = score_captions(worse, REFERENCES, metrics=["CIDEr"], use_java=False)["CIDEr"]
    assert sum(per_image_cider(worse, REFERENCES, use_java=False).values()) / 8 == pytest.approx(corpus)
    assert compare(GOOD, worse, REFERENCES, resamples=500, use_java=False) == result  # seeded: the same interval


def test_mismatched_inputs_are_refused():
    with pytest.raises(ValueError, match="different images"):
        compare(GOOD, {k: v for k, v in GOOD.items() if k != "img0.jpg"}, REFERENCES, use_java=False)
    with pytest.raises(ValueError, match="no references"):
        compare(GOOD, GOOD, {k: v for k, v in REFERENCES.items() if k != "img1.jpg"}, use_java=False)
    with pytest.raises(ValueError, match="resamples"):
        compare(GOOD, GOOD, REFERENCES, resamples=0, use_java=False)


def _script():
    spec = importlib.util.spec_from_file_location("compare_captions", ROOT / "scripts" / "compare_captions.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write(path: Path, captions: dict[str, str], failed: tuple[str, ...] = ()) -> Path:
    rows = [{"path": k, "caption": None if k in failed else c, "references": REFERENCES[k],
             "error": "cannot identify image file" if k in failed else None} for k, c in captions.items()]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_script_prints_the_row_and_leaves_out_failed_images(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("captioner.evaluation.metrics.java_available", lambda: False)
    a = _write(tmp_path / "a.jsonl", GOOD)
    b = _write(tmp_path / "b.jsonl", dict(GOOD, **{"img2.jpg": "a red umbrella"}), failed=("img5.jpg",))
    assert _script().main([str(a), str(b), "--resamples", "100"]) == 0
    out = capsys.readouterr().out
    row = out.splitlines()[2].split("|")
    assert row[1].strip() == "7" and row[5].strip() == "1"  # img5 left out; img2 changed
    assert float(row[4].split()[0]) < 0 and "1 images left out" in out


def test_script_names_a_broken_file(tmp_path, capsys):
    a = _write(tmp_path / "a.jsonl", GOOD)
    broken = tmp_path / "broken.jsonl"
    broken.write_text(a.read_text(encoding="utf-8") + '{"path": "img9.jpg", "capt\n', encoding="utf-8")
    script = _script()
    assert script.main([str(a), str(broken)]) == 2
    assert f"{broken}: line 9 is not a caption record" in capsys.readouterr().err
    assert script.main([str(a), str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    (tmp_path / "other.jsonl").write_bytes(b"\xff\xfe not utf-8\n")
    assert script.main([str(a), str(tmp_path / "other.jsonl")]) == 2
    assert script.main([str(a), str(a), "--resamples", "0"]) == 2 and "resamples" in capsys.readouterr().err


@pytest.mark.parametrize("record, reason", [
    ({"path": "img0.jpg", "caption": "a dog", "references": "a dog runs", "error": None}, "references"),  # not split
    ({"path": "img0.jpg", "caption": "a dog", "references": [], "error": None}, "references"),
    ({"path": "img0.jpg", "caption": float("nan"), "references": ["a dog"], "error": None}, "caption"),
    ({"path": 7, "caption": "a dog", "references": ["a dog"], "error": None}, "path"),
    ([1, 2], "list indices"),
])
def test_script_refuses_records_that_lie(tmp_path, capsys, record, reason):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(record) + "\n", encoding="utf-8")  # NaN written as JSON's non-standard NaN
    assert _script().main([str(bad), str(_write(tmp_path / "a.jsonl", GOOD))]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: line 1 is not a caption record" in err and reason in err


def test_script_survives_json_nested_too_deep(tmp_path, capsys):
    deep = tmp_path / "deep.jsonl"
    deep.write_text("[" * 100_000 + "]" * 100_000 + "\n", encoding="utf-8")
    assert _script().main([str(deep), str(deep)]) == 2
    assert "line 1 is not a caption record" in capsys.readouterr().err
