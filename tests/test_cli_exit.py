"""How the `captioner` command ends (`captioner.cli.console`): it skips the interpreter's teardown, but never
what a normal exit does: exit handlers, buffered output, waiting for running threads, the exit code."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# stdout block-buffered, as for any command whose output goes to a file or a pipe
_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}


def _console(tmp_path: Path, prelude: str, argv: list[str], python_args: tuple[str, ...] = (),
             **kwargs) -> subprocess.CompletedProcess:
    """Run `prelude`, then `console()` as `captioner ARGV`, in a fresh `python PYTHON_ARGS script`."""
    script = tmp_path / "run.py"
    script.write_text(prelude + f"\nimport sys\nsys.argv = {['captioner', *argv]!r}\n"
                      "from captioner.cli import console\nconsole()\nprint('not reached')\n")
    return subprocess.run([sys.executable, *python_args, str(script)], capture_output="stdout" not in kwargs,
                          text=True, timeout=120, check=False, env=_ENV, **kwargs)


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
    """The thread writes its file only once the main thread has finished, which it never sees if the process
    is ended at once."""
    marker = tmp_path / "finished"
    prelude = ("import pathlib, threading, time\n"
               "def wait():\n"
               "    for _ in range(6000):\n"
               "        if not threading.main_thread().is_alive():\n"
               f"            pathlib.Path({str(marker)!r}).write_text('x')\n"
               "            return\n"
               "        time.sleep(0.01)\n"
               "threading.Thread(target=wait).start()\n")
    done = _console(tmp_path, prelude, ["models"])
    assert done.returncode == 0, done.stderr
    assert marker.read_text() == "x"


@pytest.mark.parametrize("closed", ["stdout", "stderr"])
def test_a_stream_closed_from_the_start_is_no_error(tmp_path, closed):
    """`captioner models >&-`: Python starts with that stream as None."""
    prelude = f"import os, sys\nos.close({1 if closed == 'stdout' else 2})\nsys.{closed} = None\n"
    done = _console(tmp_path, prelude, ["models"])
    assert done.returncode == 0, done.stderr


def test_a_profiler_gets_its_normal_exit(tmp_path):
    """cProfile writes its file after the command returns: the exit there is the normal one."""
    profile = tmp_path / "run.prof"
    done = _console(tmp_path, "", ["models"], python_args=("-m", "cProfile", "-o", str(profile)))
    assert done.returncode == 0, done.stderr
    assert profile.stat().st_size > 0


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
@pytest.mark.parametrize("when", ["during the command", "at the final flush"])
def test_output_that_cannot_be_written_is_an_error(tmp_path, when):
    """`captioner models > full-disk`: the write fails while the command runs (stdout unbuffered) or, with
    the whole list in stdout's buffer, at the final flush; either way the command says so once and exits 4
    (cannot write), as its other write failures do."""
    stream = ("io.TextIOWrapper(open(1, 'wb', buffering=0, closefd=False), write_through=True)"
              if when == "during the command" else "open(1, 'w', buffering=1 << 20, closefd=False)")
    prelude = f"import io, sys\nsys.stdout = {stream}\n"
    with open("/dev/full", "w") as full:
        done = _console(tmp_path, prelude, ["models"], stdout=full, stderr=subprocess.PIPE)
    assert done.returncode == 4, done.stderr
    assert done.stderr.count("cannot write") == 1 and "Traceback" not in done.stderr, done.stderr
