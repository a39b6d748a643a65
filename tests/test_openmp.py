"""The OpenMP spin setting: set before torch loads by the entry points that caption, never over the user's own."""

import json
import subprocess
import sys
from pathlib import Path

from captioner.runtime import openmp
from tests.conftest import write_images

ROOT = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter: records, at each call of limit_spinning, whether torch had been imported, then
# runs the entry point given on the command line and prints what it saw.
PROBE = """
import json, os, sys
from captioner.runtime import openmp
calls = []
real = openmp.limit_spinning
def recording(*args, **kwargs):
    calls.append("torch" in sys.modules)
    return real(*args, **kwargs)
openmp.limit_spinning = recording
if sys.argv[1] == "app":
    import runpy
    runpy.run_path(sys.argv[2], run_name="app_module")  # definitions only: main() is not run
    code = 0
else:
    from captioner.cli import main
    code = main(sys.argv[1:])
print(json.dumps({"calls": calls, "value": os.environ.get("GOMP_SPINCOUNT"), "code": code,
                  "torch": "torch" in sys.modules}))
"""


def _probe(args: list[str], env_extra: dict[str, str] | None = None) -> dict:
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    env.update(env_extra or {})
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=180,
                          env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_sets_the_spin_count_when_nothing_is_set():
    env: dict[str, str] = {"PATH": "/bin"}
    assert openmp.limit_spinning(env, modules=()) is True
    assert env == {"PATH": "/bin", "GOMP_SPINCOUNT": str(openmp.SPIN_COUNT)}


def test_leaves_the_users_own_settings_alone():
    for given in ({"GOMP_SPINCOUNT": "5"}, {"OMP_WAIT_POLICY": "ACTIVE"}, {"OMP_WAIT_POLICY": "passive"}):
        env = dict(given)
        assert openmp.limit_spinning(env, modules=()) is False
        assert env == given


def test_does_nothing_once_torch_is_loaded():
    env: dict[str, str] = {}
    assert openmp.limit_spinning(env, modules={"torch": object()}) is False  # libgomp has read its settings
    assert env == {}
    assert "torch" in sys.modules  # this test process: the default arguments see it too
    assert openmp.limit_spinning() is False


def test_the_caption_command_sets_it_before_torch_loads(tmp_path, tiny_checkpoint):
    [image] = write_images(tmp_path, 1)
    seen = _probe(["caption", str(image), "--checkpoint", str(tiny_checkpoint)])
    assert seen == {"calls": [False], "value": str(openmp.SPIN_COUNT), "code": 0, "torch": True}


def test_a_users_value_reaches_the_command_unchanged(tmp_path, tiny_checkpoint):
    [image] = write_images(tmp_path, 1)
    seen = _probe(["caption", str(image), "--checkpoint", str(tiny_checkpoint)], {"GOMP_SPINCOUNT": "123"})
    assert seen == {"calls": [False], "value": "123", "code": 0, "torch": True}


def test_commands_that_do_not_caption_leave_it_unset(tmp_path):
    seen = _probe(["models"])
    assert seen["calls"] == [] and seen["value"] is None and seen["code"] == 0


def test_the_app_sets_it_before_torch_loads():
    seen = _probe(["app", str(ROOT / "app.py")])
    assert seen == {"calls": [False], "value": str(openmp.SPIN_COUNT), "code": 0, "torch": True}
