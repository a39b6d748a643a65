"""Progress lines of a training run: timestamped, on stdout, flushed, so a log file or a pipe sees them at once."""

from __future__ import annotations

import time


def log(message: str) -> None:
    """Timestamped progress line on stdout."""
    print(f"[captioner {time.strftime('%H:%M:%S')}] {message}", flush=True)
