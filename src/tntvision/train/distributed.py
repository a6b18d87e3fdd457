"""Process-group helpers for torchrun: gloo on CPU, nccl on CUDA; a no-op world of one without torchrun."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..evaluation import all_reduce_sum

__all__ = ["World", "all_reduce_sum", "init_distributed", "is_main_process", "shutdown"]


@dataclass(frozen=True)
class World:
    """This process's place in the job: ``rank`` of ``size`` processes, ``local_rank`` on its machine."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, writes the run folder and shows progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def init_distributed(device: torch.device) -> World:
    """Join torchrun's process group if its environment (``WORLD_SIZE`` > 1) is set.

    The backend is nccl for CUDA devices and gloo otherwise; each CUDA process takes the GPU
    ``LOCAL_RANK``. Rendezvous (single or multi node) is whatever torchrun set up in ``MASTER_ADDR`` /
    ``MASTER_PORT`` or its c10d rendezvous endpoint.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return World(rank=rank, size=size, local_rank=local_rank)


def is_main_process() -> bool:
    """Rank 0 of a torchrun job (``RANK`` unset or 0), or a process on its own."""
    return int(os.environ.get("RANK", "0")) == 0


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
