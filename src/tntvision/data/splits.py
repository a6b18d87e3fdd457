"""The three splits of a training run: train, validation (model selection) and test (the final number).

Validation is the data's own ``val/`` split where it has one; otherwise (Fashion-MNIST, an ImageFolder tree
with ``train/`` and ``test/`` only) a seeded fraction of the training images is held out, so that the test
set is used only for the final summary and ``tnt eval``. Which images were held out is a function of
(number of training images, fraction, seed) alone, and is recorded in the run folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from ..errors import DataError
from .datasets import build_dataset, has_val_split
from .sampler import mix_seed

__all__ = ["RunSplits", "held_out_split", "hold_out", "hold_out_indices", "run_splits"]


def hold_out_indices(n: int, *, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, held out) sorted index tensors: a seeded ``round(fraction * n)`` of ``range(n)`` held out."""
    n_val = round(fraction * n)
    if not 0 < n_val < n:
        raise DataError(f"cannot hold out {fraction:g} of {n} training images for validation")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(seed, 0x5E1)))
    return order[n_val:].sort().values, order[:n_val].sort().values


def hold_out(dataset: Dataset, *, fraction: float, seed: int) -> tuple[Dataset, Dataset, dict[str, Any]]:
    """Split ``dataset`` (which has ``.subset``) into (train, val) and the record of what was held out."""
    kept, held = hold_out_indices(len(dataset), fraction=fraction, seed=seed)
    record = {
        "val_source": "held out of train",
        "val_fraction": fraction,
        "val_seed": seed,
        "train_images": len(kept),
        "val_images": len(held),
        "val_indices": held.tolist(),  # indices into the full training split, in its file order
    }
    return dataset.subset(kept, split="train"), dataset.subset(held, split="val"), record


def held_out_split(data: str, record_path: str | Path, *, transform=None) -> Dataset:
    """The validation images a run held out of ``data``'s training split, as its ``val_split.json`` says.

    Raises:
        DataError: no readable record, or one that does not fit ``data`` (another training set size).
    """
    try:
        record = json.loads(Path(record_path).read_text())
        indices = torch.tensor(record["val_indices"], dtype=torch.int64)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(
            f"{record_path}: no held-out validation split recorded ({type(e).__name__})"
        ) from None
    full = build_dataset(data, "train", transform=transform)
    if len(full) != record["train_images"] + len(indices) or (
        len(indices) and int(indices.max()) >= len(full)
    ):
        raise DataError(f"{record_path}: recorded for another training set than {data}'s {len(full)} images")
    return full.subset(indices, split="val")


@dataclass(frozen=True)
class RunSplits:
    """The data sets of a run and where its validation split came from (``record``)."""

    train: Dataset
    val: Dataset
    test: Dataset
    record: dict[str, Any]


def run_splits(data: str, *, val_fraction: float, val_seed: int, on_bad_image: str = "error") -> RunSplits:
    """Train, validation and test sets of ``data`` (see the module docstring), all with the same classes.

    Raises:
        DataError: missing or inconsistent data (see :func:`~tntvision.data.build_dataset`).
    """
    full = build_dataset(data, "train", on_bad_image=on_bad_image)
    test = build_dataset(data, "test", on_bad_image=on_bad_image)
    if has_val_split(data):
        train, val = full, build_dataset(data, "val", on_bad_image=on_bad_image)
        record: dict[str, Any] = {"val_source": f"{data}/val", "val_images": len(val)}
    else:
        train, val, record = hold_out(full, fraction=val_fraction, seed=val_seed)
    record["test_source"] = f"{data}/{getattr(test, 'split', 'test')}"
    for ds in (val, test):
        if list(ds.classes) != list(train.classes):
            raise DataError(f"{data}: train and {ds.split} have different classes")
    return RunSplits(train=train, val=val, test=test, record=record)
