"""An exponential moving average of the decoder's weights, the model that is validated and shipped.

On Flickr8k the dev score of the raw weights swings by 0.01-0.02 CIDEr-D between consecutive epochs, and a
single cosine run overfits after a few epochs; the running average of the weights (Polyak averaging) is a
smoother point in the same basin, for the price of one copy of the weights and a lerp per step.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch


class WeightAverage:
    """Shadow copy of a module's floating-point weights, pulled towards the live ones after every step.

    The effective decay starts low and rises to `decay` as (1 + n) / (10 + n) after n updates, so the
    average is not dominated by the random initialisation in short runs.
    """

    def __init__(self, module: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        """Move the average towards the module's current weights."""
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        live = module.state_dict()
        for name, value in self.shadow.items():
            value.lerp_(live[name], 1.0 - decay)

    @torch.no_grad()
    def reset(self, module: torch.nn.Module) -> None:
        """Start averaging afresh from the module's current weights (a new training phase)."""
        self.updates = 0
        live = module.state_dict()
        for name, value in self.shadow.items():
            value.copy_(live[name])

    @contextmanager
    def applied(self, module: torch.nn.Module) -> Iterator[None]:
        """Inside the block the module holds the averaged weights; its own are restored afterwards."""
        live = {k: v.detach().clone() for k, v in module.state_dict().items() if k in self.shadow}
        if len(live) != len(self.shadow):  # another module (a DDP wrapper's names): load_state_dict would skip it all
            raise ValueError("the module's weights are not the ones this average was made from")
        module.load_state_dict(self.shadow, strict=False)
        try:
            yield
        finally:
            module.load_state_dict(live, strict=False)

    def state(self) -> dict[str, torch.Tensor]:
        """Tensors to save with a run, restored by `load`."""
        return {**{f"ema.{k}": v for k, v in self.shadow.items()},
                "ema_updates": torch.tensor(self.updates)}

    @torch.no_grad()
    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what `state` saved."""
        for name, value in self.shadow.items():
            value.copy_(tensors[f"ema.{name}"])
        self.updates = int(tensors["ema_updates"])


def averaged(ema: WeightAverage | None, module: torch.nn.Module) -> AbstractContextManager[None]:
    """`ema.applied(module)`, or a block that changes nothing when there is no average."""
    return nullcontext() if ema is None else ema.applied(module)
