"""How long PyTorch's idle OpenMP threads keep spinning: shortened where captioning runs, before torch loads.

Why: captioning takes turns between two thread pools on the same cores. The encoder runs on its runtime's
threads (OpenVINO's TBB workers, or ONNX Runtime's, which are already told not to spin); the decoder, the resizing
and every other PyTorch operation run on PyTorch's OpenMP threads (libgomp). After each parallel region libgomp's
idle threads spin for `GOMP_SPINCOUNT` iterations before they sleep: 300,000 when unset, about 10 ms or more on a
Zen 4 EPYC. So an encoder call that follows any PyTorch operation shares its cores with a spinning thread. On a
2-core Zen 4 EPYC (2026-12-07), one image's OpenVINO bf16 encoder took about 11 ms right after a PyTorch
operation, against about 7 ms back to back or with `SPIN_COUNT`, and one image's whole caption went from a p50
of 26.5-33.7 ms to 25.0-27.9 ms (six alternating runs). The batch decoder's speed did not change: 30,000
iterations (about a millisecond there) still cover the gaps between its products. With 0 (what
`OMP_WAIT_POLICY=PASSIVE` means) every gap wakes the threads again, and the batch decoder took 4.6-5.8 ms an
image against 3.5-4.1. docs/performance.md has the measurements.

libgomp reads the variable once, when it is loaded (`import torch`). So the entry points that run the pipeline in
their own process call `limit_spinning` before they import torch: the `caption` and `evaluate` commands, the app
and the benchmarks. A program that uses the library can set `GOMP_SPINCOUNT=30000` itself (README, "Results").
"""

from __future__ import annotations

import os
import sys
from collections.abc import Container, MutableMapping

SPIN_COUNT = 30_000
"""Spin iterations of an idle libgomp thread before it sleeps (see the module docstring)."""

VARIABLE = "GOMP_SPINCOUNT"


def limit_spinning(environ: MutableMapping[str, str] | None = None,
                   modules: Container[str] | None = None) -> bool:
    """Set `GOMP_SPINCOUNT` to `SPIN_COUNT` in `environ` (default: this process's) and return True; or, if the
    user has set it or `OMP_WAIT_POLICY`, or torch is already among `modules` (default: `sys.modules`, where
    libgomp has read its settings), change nothing and return False."""
    environ = os.environ if environ is None else environ
    modules = sys.modules if modules is None else modules
    if "torch" in modules or VARIABLE in environ or "OMP_WAIT_POLICY" in environ:
        return False
    environ[VARIABLE] = str(SPIN_COUNT)
    return True
