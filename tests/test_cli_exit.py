"""How the `captioner` command ends (`captioner.cli.console`): it skips the interpreter's teardown, but never
what a normal exit does: exit handlers, buffered output, waiting for running threads, the exit code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def _console(tmp_path: Path, prelude: str, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    script = tmp_path / "run.py"
    script.write_text(prelude + f"\nimport sys\nsys.argv = {['captioner', *argv]!r}\n"
                      "from captioner.cli import console\nconsole()\nprint('not reached')\n")
    return subprocess.run([sys.executable, str(script)], capture_output="stdout" not in kwargs, text=True,
                          timeout=120, check=False, **kwargs)


def test_exit_handlers_run_and_buffered_output_is_written(tmp_path):
    prelude = ("import atexit\natexit.register(lambda: print('handler ran'))\n"
               "print('buffered before', end=' ')\n")
    done = _console(tmp_path, prelude, ["models"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("buffered before") and "general" in done.stdout
    assert done.stdout.rstrip().endswith("handler ran") and "not reached" not in done.stdout


def test_the_command_exit_code_is_kept(tmp_path):
    done = _console(tmp_path, "", ["caption", str(tmp_path / "missing.jpg")])
    assert done.returncode == 2 and "missing.jpg" in done.stderr


def test_a_running_thread_is_waited_for(tmp_path):
    marker = tmp_path / "finished"
    prelude = ("import pathlib, threading, time\n"
               f"threading.Thread(target=lambda: (time.sleep(0.5), pathlib.Path({str(marker)!r}).write_text('x')))"
               ".start()\n")
    done = _console(tmp_path, prelude, ["models"])
    assert done.returncode == 0, done.stderr
    assert marker.read_text() == "x"


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
@pytest.mark.parametrize("buffered", [False, True])
def test_output_that_cannot_be_written_is_an_error(tmp_path, buffered):
    """`captioner models > full-disk`: the write fails while the command runs or, when the whole list fits in
    stdout's buffer (`buffered`), at the final flush; either way the command says so once and exits 4 (cannot
    write), as its other write failures do."""
    prelude = "import os, sys\nsys.stdout = open(1, 'w', buffering=1 << 20, closefd=False)\n" if buffered else ""
    with open("/dev/full", "w") as full:
        done = _console(tmp_path, prelude, ["models"], stdout=full, stderr=subprocess.PIPE)
    assert done.returncode == 4
    assert done.stderr.count("cannot write") == 1 and "Traceback" not in done.stderr, done.stderr
