"""The `captioner` command helps: `--help` loads no torch, and every option says what it does."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from captioner.cli import build_parser


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _loads_torch(code: str) -> bool:
    """Run `code` in a fresh interpreter; True when torch ended up imported."""
    probe = code + "\nimport sys; sys.exit(7 if 'torch' in sys.modules else 0)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode in (0, 7), done.stderr
    return done.returncode == 7


def test_importing_the_cli_loads_no_torch():
    assert not _loads_torch("import captioner.cli")


def test_importing_the_package_loads_no_torch_until_a_name_is_used():
    assert not _loads_torch("import captioner; captioner.__version__")
    assert _loads_torch("from captioner import Captioner")


@pytest.mark.parametrize("argv", [["--help"], ["caption", "--help"], ["train", "--help"],
                                  ["evaluate", "--help"]])
def test_help_loads_no_torch(argv):
    code = f"from captioner.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass"
    assert not _loads_torch(code)


@pytest.mark.parametrize("command", sorted(_subcommands()))
def test_every_option_has_help(command):
    parser = _subcommands()[command]
    silent = [a.option_strings[0] if a.option_strings else a.dest for a in parser._actions
              if not isinstance(a, argparse._HelpAction) and not (a.help and a.help.strip())]
    assert not silent, f"captioner {command}: options without help text: {silent}"


def test_every_subcommand_has_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert {c.dest for c in sub._choices_actions if c.help} == set(sub.choices)


def test_train_help_names_the_sections_and_the_key_reference():
    text = _subcommands()["train"].format_help()
    for section in ("model", "data", "train", "decode"):
        assert section in text
    assert "docs/training.md" in text
    assert "--dry-run" in text


def test_the_package_lists_its_public_names_not_its_helpers():
    """dir(captioner) listed Any, TYPE_CHECKING, importlib and annotations beside the API."""
    import captioner

    public = [name for name in dir(captioner) if not name.startswith("_")]
    assert public == sorted(captioner.__all__)
