"""docs/training.md is generated from the config dataclasses: it must say what they say."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _generator():
    spec = importlib.util.spec_from_file_location("training_doc", ROOT / "scripts" / "training_doc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_training_doc_matches_the_dataclasses():
    expected = _generator().render()
    actual = (ROOT / "docs" / "training.md").read_text(encoding="utf-8")
    assert actual == expected, ("docs/training.md is out of date with captioner/config/; regenerate it "
                                "with `.venv/bin/python scripts/training_doc.py --write`")


def test_every_config_field_has_a_docstring():
    gen = _generator()
    undocumented = [f"{section}.{f.name}" for section, cls in gen.sections() for f in dataclasses.fields(cls)
                    if not gen.field_docs(cls).get(f.name)]
    assert not undocumented, f"config fields without a docstring under them: {undocumented}"


def test_every_section_and_key_is_in_the_doc():
    gen = _generator()
    text = (ROOT / "docs" / "training.md").read_text(encoding="utf-8")
    for section, cls in gen.sections():
        assert f"## `{section}`" in text
        for f in dataclasses.fields(cls):
            assert f"`{section}.{f.name}`" in text
