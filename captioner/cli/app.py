"""`captioner app`: start the Streamlit app (`streamlit run app.py`) on a checkpoint."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import captioner

CHECKPOINT_ENV = "CAPTIONER_CHECKPOINT"  # read by app.py

EPILOG = """\
examples:
  captioner app
  captioner app --checkpoint runs/x/best.safetensors
  captioner app --server.port 8502 --server.headless true"""


def app_path() -> Path:
    """app.py beside the package (a source checkout or an editable install)."""
    return Path(captioner.__file__).resolve().parents[1] / "app.py"


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `app` and its options; unknown options go to `streamlit run`."""
    p = sub.add_parser("app", help="start the Streamlit app (upload images, see attention and LSTM gates)",
                       description="Start the Streamlit app. Options other than --checkpoint are passed to "
                                   "`streamlit run` (e.g. --server.port 8502).",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", metavar="FILE",
                   help=f"model to load (sets ${CHECKPOINT_ENV}); default: the shipped model")
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


def command(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """The `streamlit run` command line and its environment."""
    path = app_path()
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: `captioner app` needs a source checkout or an editable "
                                "install (pip install -e .); or run `streamlit run app.py` in the repository")
    env = dict(os.environ)
    if args.checkpoint:
        env[CHECKPOINT_ENV] = str(Path(args.checkpoint).resolve())
    return [sys.executable, "-m", "streamlit", "run", str(path), *getattr(args, "streamlit_args", [])], env


def run(args: argparse.Namespace) -> int:
    try:
        cmd, env = command(args)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.checkpoint and not Path(args.checkpoint).is_file():
        print(f"error: checkpoint file not found: {args.checkpoint}", file=sys.stderr)
        return 2
    try:
        return subprocess.call(cmd, env=env, cwd=app_path().parent)  # cwd: .streamlit/config.toml applies
    except KeyboardInterrupt:
        return 130
