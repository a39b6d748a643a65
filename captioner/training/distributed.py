"""PyTorch's own distributed engine for training: process group, device, and the few collectives we need.

Under `torchrun` (WORLD_SIZE > 1) a process group is started: NCCL when CUDA is there, gloo on the CPU.
Without torchrun everything degrades to one process and the helpers are no-ops. The `Dist` value is passed
explicitly; nothing here is global.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist


@dataclass(frozen=True)
class Dist:
    """This process's place in the job."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes checkpoints and logs."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def setup() -> Dist:
    """Join the torchrun job if there is one; pick the device (this rank's GPU, else the CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not tdist.is_initialized():
        tdist.init_process_group(backend="nccl" if cuda else "gloo")
    rank = tdist.get_rank() if tdist.is_initialized() else 0
    return Dist(rank=rank, world=world, local_rank=local_rank, device=device)


def teardown(dist: Dist) -> None:
    if dist.enabled and tdist.is_initialized():
        tdist.destroy_process_group()


def barrier(dist: Dist) -> None:
    if dist.enabled:
        tdist.barrier()


def broadcast(value: Any, dist: Dist) -> Any:
    """Rank 0's `value` on every rank (any picklable object; only rank 0's copy is read)."""
    if not dist.enabled:
        return value
    box = [value]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value: Any, dist: Dist) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank."""
    if not dist.enabled:
        return [value]
    out: list[Any] = [None] * dist.world
    tdist.all_gather_object(out, value)
    return out
