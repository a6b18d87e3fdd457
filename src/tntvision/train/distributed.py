"""Process-group helpers for torchrun: gloo on CPU, nccl on CUDA (one GPU per process); a world of one
without a process group when not launched by torchrun."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import ConfigError
from ..evaluation import all_reduce_sum

__all__ = [
    "World",
    "all_reduce_sum",
    "backend_for",
    "init_distributed",
    "is_main_process",
    "launched_by_torchrun",
    "local_device",
    "shutdown",
]


@dataclass(frozen=True)
class World:
    """This process's place in the job: ``rank`` of ``size`` processes, ``local_rank`` on its machine,
    and the process group's ``backend`` (None: no process group, a process on its own)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, writes the run folder and shows progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether the model trains under DDP: in a process group, even one of a single process (torchrun
        with one process runs the very path N processes run: DDP, all-reduces over the backend)."""
        return self.backend is not None


def backend_for(device: torch.device) -> str:
    """The process group's backend for a job on ``device``: nccl for CUDA GPUs, gloo for the CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


def launched_by_torchrun(env: Mapping[str, str] | None = None) -> bool:
    """Whether this process is one of a torchrun job (or any launcher that sets up ``env://``: ``RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``)."""
    env = os.environ if env is None else env
    return all(k in env for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def local_device(device: torch.device, local_rank: int) -> torch.device:
    """The device this process trains on: a bare ``cuda`` is the GPU ``LOCAL_RANK`` of its machine (one GPU
    per process), anything else is kept.

    Raises:
        ConfigError: ``LOCAL_RANK`` names a GPU this machine does not show.
    """
    if device.type != "cuda" or device.index is not None:
        return device
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ConfigError(
            f"process with LOCAL_RANK {local_rank} has no GPU of its own: this machine shows {count} "
            "(one process per GPU: torchrun --nproc_per_node at most the GPU count)"
        )
    return torch.device("cuda", local_rank)


def init_distributed(device: torch.device) -> World:
    """Join torchrun's process group when launched by it (:func:`launched_by_torchrun`), even as its only
    process; without torchrun, a world of one with no process group.

    The backend is :func:`backend_for` the device (nccl for CUDA, gloo otherwise); a CUDA process first
    takes its own GPU (:func:`local_device`). Rendezvous (single or multi node) is whatever torchrun set up
    in ``MASTER_ADDR`` / ``MASTER_PORT`` or its c10d rendezvous endpoint.
    """
    if not launched_by_torchrun():
        return World()
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = backend_for(device)
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(local_device(device, local_rank))
        dist.init_process_group(backend=backend)
    return World(rank=rank, size=size, local_rank=local_rank, backend=str(dist.get_backend()))


def is_main_process() -> bool:
    """Rank 0 of a torchrun job (``RANK`` unset or 0), or a process on its own."""
    return int(os.environ.get("RANK", "0")) == 0


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
