"""Resumable training state: written atomically with ``torch.save``, read with ``weights_only=True``.

A checkpoint holds only tensors and plain data (the config as a dict, counters, the run's metrics so
far), so loading it never unpickles arbitrary objects. Weights are the unwrapped, uncompiled model's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, read_failure
from ..models.saving import unwrap_model
from ..utils.files import atomic_write

__all__ = ["CHECKPOINT_NAME", "checkpoint_path", "load_training_state", "save_training_state"]

CHECKPOINT_NAME = "last.pt"
# 2: runs hold out a validation split of the training images (docs/training.md); a /1 run trained on all
# of them, so resuming it with the split would change its training set mid-run.
FORMAT = "tntvision-train/2"


def checkpoint_path(run_folder: str | Path) -> Path:
    """Where a run folder keeps its resumable state: ``checkpoints/last.pt``."""
    return Path(run_folder) / "checkpoints" / CHECKPOINT_NAME


def save_training_state(
    path: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    progress: dict[str, Any],
    config: dict[str, Any],
    ema: nn.Module | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> Path:
    """Write the training state to ``path`` atomically (a kill mid-write leaves the previous file whole).

    Args:
        progress: plain counters: ``epoch``, ``step`` (next step within it), ``images_seen``,
            ``wall_seconds``, ...
        config: the resolved training config as plain data.
    """
    state = {
        "format": FORMAT,
        "model": unwrap_model(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "progress": dict(progress),
        "config": config,
    }
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    return Path(path)


def load_training_state(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_training_state` onto the CPU (tensors and plain data only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint to resume from")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, foreign pickle, permissions, ...: torch raises many types
        raise CheckpointError(read_failure(path, "a training checkpoint", e)) from e
    if isinstance(state, dict) and state.get("format") == "tntvision-train/1":
        raise CheckpointError(
            f"{path}: written by an earlier tntvision that validated on the test set; it cannot be resumed "
            "(its model/ folder still loads)"
        )
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a tntvision training checkpoint")
    return state
