"""`captioner caption --output`: the files the command reads are never overwritten, a resume never empties the
records a killed run saved, a format mismatch is refused, and the exit code says what happened."""

from __future__ import annotations

import errno
import json

import pytest

from captioner.cli import main
from captioner.cli.output_file import PartialOutput
from tests.conftest import write_images


def _caption(checkpoint, *args):
    return main(["caption", *map(str, args), "--checkpoint", str(checkpoint), "--quiet"])


def test_an_output_that_is_the_checkpoint_is_refused_and_the_model_kept(tmp_path, tiny_checkpoint, capsys):
    """It replaced the model with its own captions, exit 0."""
    [img] = write_images(tmp_path / "in", 1)
    before = tiny_checkpoint.read_bytes()
    assert _caption(tiny_checkpoint, img, "--output", tiny_checkpoint) == 2
    assert "is the model's file" in capsys.readouterr().err
    assert tiny_checkpoint.read_bytes() == before
    calibration = tiny_checkpoint.with_suffix(".int8.json")  # read beside the checkpoint by --precision int8
    calibration.write_text("{}")
    assert _caption(tiny_checkpoint, img, "--output", calibration) == 2
    assert calibration.read_text() == "{}"


def test_an_evaluate_output_folder_holding_the_checkpoint_is_refused(tmp_path, tiny_checkpoint, capsys):
    from captioner.cli.evaluate import OUTPUT_FILES

    folder = tmp_path / "eval"
    folder.mkdir()
    victim = folder / OUTPUT_FILES[0]
    victim.write_bytes(tiny_checkpoint.read_bytes())
    data = tmp_path / "d.csv"
    [img] = write_images(tmp_path / "in", 1)
    data.write_text(f"image,caption\n{img},a red square\n")
    assert main(["evaluate", "--checkpoint", str(victim), "--format", "csv", "--data", str(data),
                 "--output", str(folder)]) == 2
    assert "which is the input file" in capsys.readouterr().err
    assert victim.read_bytes() == tiny_checkpoint.read_bytes()
    # The encoder's weights file is one of the model's files too.
    weights = folder / OUTPUT_FILES[1]
    weights.write_bytes(b"weights")
    assert main(["evaluate", "--checkpoint", str(tiny_checkpoint), "--encoder-weights", str(weights), "--format",
                 "csv", "--data", str(data), "--output", str(folder)]) == 2
    assert "which is the input file" in capsys.readouterr().err
    assert weights.read_bytes() == b"weights"


def test_130_failed_images_exit_1_not_as_an_interruption(tmp_path, tiny_checkpoint, capsys):
    """The failure count and the Ctrl-C code shared one number: 130 failures said "interrupted", exit 130."""
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(130):
        (bad / f"b{i:03d}.png").write_bytes(b"x")
    assert _caption(tiny_checkpoint, bad, "--format", "jsonl", "--output", tmp_path / "o.jsonl",
                    "--num-workers", "0") == 1
    err = capsys.readouterr().err
    assert "130 of 130 images failed" in err and "interrupted" not in err
    assert len((tmp_path / "o.jsonl").read_text().splitlines()) == 130


@pytest.mark.parametrize("first", ["jsonl", "csv"])
def test_a_text_resume_of_a_jsonl_or_csv_output_is_refused(tmp_path, tiny_checkpoint, capsys, first):
    """Text lines were appended to the JSON lines or CSV rows, exit 0."""
    write_images(tmp_path / "in", 2)
    out = tmp_path / f"o.{first}"
    assert _caption(tiny_checkpoint, tmp_path / "in", "--format", first, "--output", out) == 0
    before = out.read_bytes()
    assert _caption(tiny_checkpoint, tmp_path / "in", "--format", "text", "--output", out, "--resume") == 2
    assert "not a whole text output" in capsys.readouterr().err
    assert out.read_bytes() == before


def test_a_jsonl_line_nested_too_deeply_is_not_a_whole_output(tmp_path, tiny_checkpoint, capsys):
    out = tmp_path / "o.jsonl"
    out.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    [img] = write_images(tmp_path / "in", 1)
    assert _caption(tiny_checkpoint, img, "--format", "jsonl", "--output", out, "--resume") == 2
    assert "nested too deeply" in capsys.readouterr().err


def test_resuming_a_killed_runs_partial_file_never_empties_it(tmp_path, monkeypatch):
    """The partial file was reopened with "w" (emptied) and its records written back: a kill or a full disk in
    between lost every record the killed run had saved. Now the cut-off line is truncated away in place and the
    file appended to, so at every moment it holds the kept records."""
    target = tmp_path / "o.jsonl"
    records = "".join(json.dumps({"path": f"p/{i}.jpg", "caption": "a dog", "error": None}) + "\n"
                      for i in range(500))
    out = PartialOutput(target, "jsonl", resume=True)
    out.partial.write_text(records + '{"path": "p/cut', encoding="utf-8")
    import captioner.cli.output_file as output_file

    seen = []
    real_open = open

    def watching_open(file, mode="r", *args, **kwargs):
        stream = real_open(file, mode, *args, **kwargs)
        if str(file) == str(out.partial) and set(mode) & set("wa"):
            seen.append(out.partial.read_text(encoding="utf-8"))  # what a kill right now would leave
        return stream

    monkeypatch.setattr(output_file, "open", watching_open, raising=False)
    assert len(out.open()) == 500
    out.close(keep=False)
    assert seen == [records] and out.partial.read_text(encoding="utf-8") == records


def test_a_full_disk_at_the_first_write_of_a_resume_keeps_the_killed_runs_records(tmp_path, monkeypatch):
    """The old resume emptied the partial file and then wrote the kept records back: a full disk at that write
    left it empty. Now nothing is written back, so the first write (here failing) finds the records in place."""
    import captioner.cli.output_file as output_file

    target = tmp_path / "o.jsonl"
    out = PartialOutput(target, "jsonl", resume=True)
    records = "".join(json.dumps({"path": f"p/{i}.jpg", "caption": "a dog", "error": None}) + "\n"
                      for i in range(3))
    out.partial.write_text(records + '{"path": "p/cu', encoding="utf-8")
    real_open = open

    class FullDisk:
        def __init__(self, stream):
            self.stream = stream

        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.stream, name)

    def full_open(file, mode="r", *args, **kwargs):
        stream = real_open(file, mode, *args, **kwargs)
        return FullDisk(stream) if set(mode) & set("wa") else stream

    monkeypatch.setattr(output_file, "open", full_open, raising=False)
    try:
        out.open()
        out.stream.write('{"path": "p/3.jpg"}\n')
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        out.stream.stream.close()
    assert out.partial.read_text(encoding="utf-8") == records


def test_an_image_named_twice_is_captioned_once(tmp_path, tiny_checkpoint, monkeypatch):
    """A folder and a file inside it (or one folder twice) wrote two records of the same image."""
    images = write_images(tmp_path / "in", 2)
    out = tmp_path / "o.jsonl"
    monkeypatch.chdir(tmp_path)
    assert _caption(tiny_checkpoint, images[1], tmp_path / "in", "in/../in", "./in", "--format", "jsonl",
                    "--output", out) == 0
    paths = [json.loads(line)["path"] for line in out.read_text().splitlines()]
    assert paths == [str(images[1]), str(images[0])]


def test_a_text_resume_skips_blank_lines_as_before(tmp_path, tiny_checkpoint):
    images = write_images(tmp_path / "in", 2)
    out = tmp_path / "o.txt"
    assert _caption(tiny_checkpoint, images[0], "--output", out) == 0
    out.write_bytes(out.read_bytes() + b"\r\n  \n")  # blank lines an editor left
    assert _caption(tiny_checkpoint, tmp_path / "in", "--output", out, "--resume") == 0
    lines = [line for line in out.read_text().splitlines() if line.strip()]
    assert [line.split("\t")[0] for line in lines] == [str(images[0]), str(images[1])]


def test_a_csv_resume_of_a_cell_over_the_csv_limit_is_not_a_whole_output(tmp_path, tiny_checkpoint, capsys):
    """csv.Error is not a ValueError: it was a traceback."""
    out = tmp_path / "o.csv"
    out.write_text("path,caption,score,error\n" + "a.jpg," + "x" * 200_000 + ",,\n")
    [img] = write_images(tmp_path / "in", 1)
    assert _caption(tiny_checkpoint, img, "--format", "csv", "--output", out, "--resume") == 2
    assert "not a whole csv output" in capsys.readouterr().err
