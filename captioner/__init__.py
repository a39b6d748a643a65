"""captioner: image captioning on the CPU with a pretrained CNN encoder, an attention LSTM and beam search.

    from captioner import Captioner
    cap = Captioner.load()                      # the shipped general model ("flickr8k": the other one)
    print(cap.caption(["dog.jpg"])[0].text)

The names below are loaded on first use (a module-level `__getattr__`, as in litgpt), so
`import captioner.cli` and `captioner --help` do not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from captioner.api import Captioner
    from captioner.config import ConfigError
    from captioner.images import ImageLoadError
    from captioner.models.checkpoint import CheckpointError
    from captioner.results import Alternative, Caption, Tag

_LAZY = {
    "Alternative": "captioner.results",
    "Caption": "captioner.results",
    "Captioner": "captioner.api",
    "CheckpointError": "captioner.models.checkpoint",
    "ConfigError": "captioner.config",
    "ImageLoadError": "captioner.images",
    "Tag": "captioner.results",
    "TagError": "captioner.models.tags",
    "UnknownModelError": "captioner.models.shipped",
}

__all__ = ["Alternative", "Caption", "Captioner", "CheckpointError", "ConfigError", "ImageLoadError", "Tag", "TagError",
           "UnknownModelError"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'captioner' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public names (also those not loaded yet) and the module's dunders; not the helpers this file imports
    (`importlib`, `Any`, `TYPE_CHECKING`, which a completer listed as the package's API)."""
    return sorted({*__all__, "__version__", *(name for name in globals() if name.startswith("__"))})
