"""Checks of the public API's arguments, apart from the Captioner they guard.

Why a module of their own: each check turns what a caller may pass (numpy integers, floats, bools, NaN) into the
plain values the search takes, or a ValueError naming the argument at the call, and the rules are the config's
(`captioner.config.checks`), so they are read and changed together, not inside the captioning code.
"""

from __future__ import annotations

import dataclasses
import numbers

from captioner.config import MAX_BEAM_SIZE, MAX_DECODE_LENGTH, MAX_LENGTH_PENALTY, DecodeConfig


def count_argument(name: str, value: object, low: int) -> int:
    """`value` as a plain int >= `low`, else a ValueError naming `name`: the one check of every count argument.

    Any `numbers.Integral` is taken (numpy's integers, as indexing or `np.arange` hands them out), bools and
    floats are not: `batch_size=2.5` never equalled a batch's length, so the whole stream became one batch."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def check_decode(defaults: DecodeConfig, n_best: object, **overrides: object) -> tuple[DecodeConfig, int]:
    """The search's settings: `defaults` (the checkpoint's) with the `overrides` that are not None, and `n_best`,
    as plain ints and a float; a ValueError names the first argument out of range.

    beam_size and max_length have the config's upper bounds too (`MAX_BEAM_SIZE`, `MAX_DECODE_LENGTH`): above
    them the search's buffers fail to allocate, with an allocator traceback from deep inside it. The result is a
    `DecodeConfig`, so the API's settings obey the rules a training config's do (min_length <= max_length among
    them: above it, <end> was forbidden for the whole caption and every one ended unfinished)."""
    values = {name: getattr(defaults, name) if value is None else value for name, value in overrides.items()}
    lows = {"beam_size": 1, "max_length": 1, "min_length": 0, "no_repeat_ngram": 0}
    checked = {name: count_argument(name, values[name], low) for name, low in lows.items() if name in values}
    n_best = count_argument("n_best", n_best, 1)
    for name, high in (("beam_size", MAX_BEAM_SIZE), ("max_length", MAX_DECODE_LENGTH)):
        if name in checked and checked[name] > high:
            raise ValueError(f"{name} must be <= {high}, got {checked[name]}")
    if "length_penalty" in values:
        checked["length_penalty"] = length_penalty_argument(values["length_penalty"])
    final = {**dataclasses.asdict(defaults), **checked}
    if n_best > final["beam_size"]:
        raise ValueError(f"n_best ({n_best}) must not exceed beam_size ({final['beam_size']})")
    if final["min_length"] > final["max_length"]:
        raise ValueError(f"min_length ({final['min_length']}) must not exceed max_length ({final['max_length']})")
    return dataclasses.replace(defaults, **checked), n_best


def length_penalty_argument(value: object) -> float:
    """`value` as a float in [0, 2], the range `DecodeConfig.length_penalty` enforces (and the app's slider spans),
    else a ValueError: 40 once overflowed `length ** a` in the search, and no hypothesis was left."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= MAX_LENGTH_PENALTY:
        raise ValueError(f"length_penalty must be a number in [0, {MAX_LENGTH_PENALTY:g}] (as decode.length_penalty), "
                         f"got {value!r}")  # NaN fails the comparison too
    return float(value)
