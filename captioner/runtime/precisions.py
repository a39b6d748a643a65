"""The names of the arithmetic paths, kept free of heavy imports so the CLI can list them without loading torch."""

from __future__ import annotations

from typing import Literal

Precision = Literal["auto", "bf16", "bf16-decoder", "bf16-encoder", "fp32", "int8", "reference"]
PRECISIONS: tuple[str, ...] = ("auto", "bf16", "bf16-decoder", "bf16-encoder", "fp32", "int8", "reference")
