"""Reproducible, resumable, rank-sharded sampling for training.

Every random choice of the data pipeline is a function of (seed, epoch, sample index): the order of an
epoch is a permutation drawn from (seed, epoch), and each sample's augmentation runs with torch's
generator seeded from (seed, epoch, index). So the data of a step does not depend on how many processes
or DataLoader workers there are, and a run resumed in the middle of an epoch sees exactly the samples and
augmentations the uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

__all__ = ["SeededDataset", "ShardedSampler", "mix_seed"]

_MASK = (1 << 63) - 1


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix64-style mixing, so neighbouring inputs give unrelated seeds)."""
    h = 0x9E3779B97F4A7C15
    for part in parts:
        h = (h ^ (int(part) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & _MASK


class ShardedSampler(Sampler):
    """Training order: a seeded permutation per epoch, cut to whole global batches, dealt out to ranks.

    Yields ``(index, sample_seed)`` pairs for :class:`SeededDataset`. With ``world`` processes and a global
    batch ``G``, rank ``r`` takes positions ``r, r + world, ...`` of the epoch's order, so that step ``s`` of
    all ranks together covers positions ``[s*G, (s+1)*G)``: the same samples one process would take.

    Args:
        num_samples: size of the data set.
        global_batch: samples per optimizer step over all ranks (a multiple of ``world``).
        seed: base seed of the run.
        rank, world: this process and the number of processes.
    """

    def __init__(
        self, num_samples: int, *, global_batch: int, seed: int, rank: int = 0, world: int = 1
    ) -> None:
        if global_batch % world:
            raise ValueError(f"global batch {global_batch} is not divisible by {world} processes")
        self.num_samples = num_samples
        self.global_batch = global_batch
        self.seed = seed
        self.rank = rank
        self.world = world
        self.epoch = 0
        self.start_step = 0

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch (the last partial global batch is dropped)."""
        return self.num_samples // self.global_batch

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Select the epoch's order; the next iteration begins at ``start_step`` (resuming mid-epoch)."""
        self.epoch = epoch
        self.start_step = start_step

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * (self.global_batch // self.world)

    def epoch_order(self) -> torch.Tensor:
        """The epoch's order over all ranks: (steps_per_epoch * global_batch,) data set indices."""
        g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        return torch.randperm(self.num_samples, generator=g)[: self.steps_per_epoch * self.global_batch]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = self.epoch_order()
        mine = order[self.start_step * self.global_batch + self.rank :: self.world].tolist()
        for index in mine:
            yield index, mix_seed(self.seed, self.epoch, index, 1)


class SeededDataset(Dataset):
    """Wraps a data set so item ``(index, seed)`` is ``dataset[index]`` read with torch seeded by ``seed``.

    Seeding the global generator here is safe in DataLoader workers (each has its own) and in the main
    process, where the training loop reseeds it for each step after taking the batch.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        # the CPU generator only: torch.manual_seed would also seed every accelerator (~100x slower)
        torch.random.default_generator.manual_seed(seed)
        return self.dataset[index]
