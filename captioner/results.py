"""What captioning returns: one `Caption` per image, with its n-best `Alternative`s and optional ImageNet `Tag`s.

Plain dataclasses apart from the model, so the writers (`captioner.outputs`), the app's views and
`captioner.explain` read them without importing torch or the API.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Alternative:
    """One of the n-best sentences."""

    text: str
    score: float
    logprob: float


@dataclass(frozen=True)
class Tag:
    """One ImageNet class the encoder's own classifier sees in the image, with its softmax probability."""

    label: str
    probability: float


@dataclass
class Caption:
    """The caption of one image. On a skipped failure `error` is set and `text` is empty."""

    source: str
    text: str = ""
    tokens: list[str] = field(default_factory=list)
    score: float = float("nan")
    logprob: float = float("nan")
    alternatives: list[Alternative] = field(default_factory=list)
    attention: np.ndarray | None = None
    """(L, g, g) attention over the encoder grid per generated token (<end> included when generated)."""
    gates: dict[str, np.ndarray] | None = None
    """input, forget, output gate activations and cell state, (L, H) each."""
    tags: list[Tag] | None = None
    """Top ImageNet labels from the encoder's classifier, most probable first; None unless asked for
    (`return_tags=True`). They come from the same image as the caption and may disagree with it."""
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict:
        """The JSON record `captioner caption` writes for this image (`captioner.outputs.record`: strict JSON,
        with the alternatives; without attention and gates arrays)."""
        from captioner.outputs import record  # outputs reads Caption; importing it here keeps one serialiser

        return record(self, n_best=max(2, len(self.alternatives)))
