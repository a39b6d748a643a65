"""What every config section shares: the error type, the hard limits, and small checks that list problems.

Each section's `__post_init__` collects every problem it finds before raising, so one run of a bad recipe names
them all (`raise_problems`), not just the first.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration is invalid; the message lists every problem found."""


MAX_WIDTH = 8192
"""Largest layer width a config (or a checkpoint's config) may ask for: the models here use 16 to 2048."""
MAX_BEAM_SIZE = 100
"""Most beams a decode may ask for, in a config, the API or the CLI: the search holds every beam's copy of the
grid features, so `--beam-size 1000000` asked for gigabytes and failed with an allocator traceback."""
MAX_DECODE_LENGTH = 1000
"""Most words a decode may ask for, in a config, the API or the CLI: buffers are sized by it up front
(`--max-length 1000000000` tried to allocate 24 GB)."""
MAX_LENGTH_PENALTY = 2.0
"""Largest length penalty a decode may ask for, in a config, the API, the CLI or the search itself (the app's
slider spans 0-2). Why a bound: length ** 40 overflows float32 from length 10 on, -inf / inf is NaN, which
`topk` ranks first, and the search kept no hypothesis (an IndexError in the API); up to 2, length ** a stays
below 1e6 at the longest allowed caption."""


def finite(obj: Any, section: str) -> list[str]:
    """Problems for every float field of `obj` that is nan or infinite."""
    return [f"{section}.{f.name} must be a finite number, got {getattr(obj, f.name)}"
            for f in dataclasses.fields(obj)
            if isinstance(getattr(obj, f.name), float) and not math.isfinite(getattr(obj, f.name))]


def at_least(obj: Any, section: str, lows: dict[str, int]) -> list[str]:
    """Problems for every field of `obj` named in `lows` that is below its lowest value."""
    return [f"{section}.{name} must be >= {low}, got {getattr(obj, name)}" for name, low in lows.items()
            if getattr(obj, name) < low]


def not_a_file(value: str, key: str) -> list[str]:
    """A problem when the folder `key` names is an existing file (a run or cache folder given a file)."""
    return [f"{key} {value} exists and is a file, not a folder"] if value and Path(value).is_file() else []


def config_error(*problems: str) -> ConfigError:
    """One ConfigError for `problems`: "invalid config: PROBLEM" on one line when there is one (the CLI's errors
    before any work are one line), else a line per problem."""
    if len(problems) == 1:
        return ConfigError(f"invalid config: {problems[0]}")
    return ConfigError("invalid config:\n  - " + "\n  - ".join(problems))


def raise_problems(problems: list[str]) -> None:
    """Raise one ConfigError listing every problem, when there is any."""
    if problems:
        raise config_error(*problems)
