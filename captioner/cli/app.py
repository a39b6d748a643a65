"""`captioner app`: start the Streamlit app (`streamlit run app.py`) on a checkpoint."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import captioner
from captioner.escapes import shown
from captioner.models.shipped import UnknownModelError
from captioner.models.shipped import resolve as resolve_model

CHECKPOINT_ENV = "CAPTIONER_CHECKPOINT"  # read by app.py
ENCODER_WEIGHTS_ENV = "CAPTIONER_ENCODER_WEIGHTS"  # read by app.py, for the checkpoint of $CAPTIONER_CHECKPOINT

EPILOG = """\
examples:
  captioner app
  captioner app --checkpoint flickr8k
  captioner app --checkpoint runs/x/best.safetensors
  captioner app --server.port 8502 --server.headless true"""


def app_path() -> Path:
    """app.py beside the package (a source checkout or an editable install)."""
    return Path(captioner.__file__).resolve().parents[1] / "app.py"


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `app` and its options; unknown options go to `streamlit run`."""
    p = sub.add_parser("app", help="start the Streamlit app (upload images, see attention and LSTM gates)",
                       description="Start the Streamlit app. Options other than --checkpoint and "
                                   "--encoder-weights are passed to `streamlit run` (e.g. --server.port 8502).",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", metavar="MODEL",
                   help="a shipped model's name (`captioner models`: general, flickr8k) or a .safetensors file "
                        f"(sets ${CHECKPOINT_ENV}); default: ${CHECKPOINT_ENV} if set, else the general model")
    p.add_argument("--encoder-weights", metavar="FILE",
                   help="the encoder's weights file of the --checkpoint model, for encoders no installed package "
                        f"ships (resnet50; sets ${ENCODER_WEIGHTS_ENV})")
    p.set_defaults(func=run, streamlit_args=[])
    p.parse_known_args = _pass_unknown(p.parse_known_args)


def _pass_unknown(parse):
    """Keep the options this parser does not know as `streamlit_args` instead of failing on them: the top-level
    parser sees no unrecognised arguments, so `captioner app --server.port 8502` works with `parse_args`."""
    def parse_known_args(args=None, namespace=None):
        namespace, rest = parse(args, namespace)
        namespace.streamlit_args = [*namespace.streamlit_args, *(a for a in rest if a != "--")]
        return namespace, []
    return parse_known_args


def checkpoint_path(model: str) -> Path:
    """`--checkpoint` as an absolute path: a shipped model's name or a path, resolved as `caption` and
    `evaluate` resolve it (`captioner.models.shipped.resolve`); absolute because Streamlit runs in app.py's folder.

    Raises:
        UnknownModelError: neither a shipped name nor a path; the message lists the names.
    """
    return resolve_model(model).resolve()


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` cannot be a checkpoint, in the words of the checkpoint loader (`load_tensors`), or None.

    Checked here because the app reports a bad checkpoint only in the browser, after the server is up; what
    is inside the file is still the app's to check when it loads it."""
    from captioner.path_kind import CHECKPOINT_WORDS, file_problem

    problem = file_problem(path, **CHECKPOINT_WORDS)  # a FIFO or a device would block or never end the read
    return f"{path}: {problem}" if problem else None


def weights_problem(env: dict[str, str]) -> str | None:
    """Why `$CAPTIONER_ENCODER_WEIGHTS` cannot be used, or None. Why: without a checkpoint the app ignores it
    (the shipped models carry their encoders), and a missing file showed only in the browser."""
    from captioner.path_kind import file_problem

    if not env.get(CHECKPOINT_ENV):
        return ("--encoder-weights (or $CAPTIONER_ENCODER_WEIGHTS) is for the model of --checkpoint (or "
                "$CAPTIONER_CHECKPOINT): give one, or unset it")
    path = Path(env[ENCODER_WEIGHTS_ENV])
    problem = file_problem(path, missing="encoder weights file not found", folder="is a folder, not a weights file")
    return f"{path}: {problem}" if problem else None


def command(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """The `streamlit run` command line and its environment.

    Raises:
        FileNotFoundError: app.py is not there (an installed, not editable, package).
        UnknownModelError: `--checkpoint` is neither a shipped model's name nor a path.
    """
    path = app_path()
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: `captioner app` needs a source checkout or an editable "
                                "install (pip install -e .); or run `streamlit run app.py` in the repository")
    env = dict(os.environ)
    if args.checkpoint:
        env[CHECKPOINT_ENV] = str(checkpoint_path(args.checkpoint))
    elif env.get(CHECKPOINT_ENV):  # inherited: made absolute too, else read from app.py's folder, not the caller's
        env[CHECKPOINT_ENV] = str(checkpoint_path(env[CHECKPOINT_ENV]))
    if getattr(args, "encoder_weights", None):
        env[ENCODER_WEIGHTS_ENV] = args.encoder_weights
    if env.get(ENCODER_WEIGHTS_ENV):  # absolute for the same reason
        env[ENCODER_WEIGHTS_ENV] = os.path.abspath(env[ENCODER_WEIGHTS_ENV])
    return [sys.executable, "-m", "streamlit", "run", str(path), *getattr(args, "streamlit_args", [])], env


def run(args: argparse.Namespace) -> int:
    """Start Streamlit on app.py; exit 2 with one line, and no server, when the checkpoint cannot be one."""
    try:
        cmd, env = command(args)
    except (FileNotFoundError, UnknownModelError) as exc:
        print(f"captioner: error: {shown(exc)}", file=sys.stderr)
        return 2
    problem = checkpoint_problem(Path(env[CHECKPOINT_ENV])) if env.get(CHECKPOINT_ENV) else None
    if not problem and env.get(ENCODER_WEIGHTS_ENV):
        problem = weights_problem(env)
    if problem:
        print(f"captioner: error: {shown(problem)}", file=sys.stderr)
        return 2
    try:
        return subprocess.call(cmd, env=env, cwd=app_path().parent)  # cwd: .streamlit/config.toml applies
    except KeyboardInterrupt:
        return 130
