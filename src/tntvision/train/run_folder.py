"""Every file a training run writes, in one place.

A run folder holds ``config.yaml`` (the resolved config), ``val_split.json`` (where the validation images
came from; which training images were held out), ``metrics.jsonl`` (one line per epoch),
``summary.json`` (final metrics), ``curves.png`` (loss and accuracy per epoch), ``checkpoints/last.pt``
(resumable state), ``model/`` (``model.safetensors`` + ``config.json`` with the class names) and, with
``tensorboard=true``, ``tensorboard/``. Every file is written atomically. Under torchrun only rank 0
writes: on the other ranks a :class:`RunFolder` made with ``writes=False`` does nothing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from ..errors import ConfigError
from ..models import save_model
from ..utils.files import save_figure, write_json, write_text
from .checkpoint import checkpoint_path, save_training_state
from .config import TrainConfig, to_dict

__all__ = ["RunFolder", "plot_curves"]


class RunFolder:
    """The run folder ``path``; ``writes=False`` makes every method a no-op (ranks other than 0)."""

    def __init__(self, path: str | Path, *, writes: bool = True) -> None:
        self.path = Path(path)
        self.writes = writes
        self._tensorboard = None

    @property
    def checkpoint(self) -> Path:
        return checkpoint_path(self.path)

    def check_creatable(self) -> None:
        """Refuse (:class:`ConfigError`) a folder that cannot be created, before anything is built.

        The nearest existing ancestor must be a writable folder; nothing is created here.
        """
        existing = self.path
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise ConfigError(f"{self.path}: cannot create the run folder ({existing} is not a folder)")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(f"{self.path}: cannot create the run folder ({existing} is not writable)")

    def start(self, cfg: TrainConfig, split_record: dict[str, Any]) -> None:
        """A new run: create the folder, write ``config.yaml`` and ``val_split.json``.

        Raises:
            ConfigError: the folder cannot be created or written (permissions, a file in the way, ...).
        """
        if not self.writes:
            return
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            write_text(self.path / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
            write_json(self.path / "val_split.json", split_record)
        except OSError as e:
            raise ConfigError(
                f"{e.filename or self.path}: cannot write the run folder ({e.strerror})"
            ) from None

    def save_state(self, **state: Any) -> None:
        """``checkpoints/last.pt``: see :func:`~tntvision.train.save_training_state` for ``state``."""
        if self.writes:
            save_training_state(self.checkpoint, **state)

    def write_epoch(self, history: list[dict[str, Any]], model: nn.Module, classes: list[str]) -> None:
        """After an epoch: ``metrics.jsonl``, ``model/``, ``curves.png`` and the TensorBoard scalars."""
        if not self.writes:
            return
        write_text(self.path / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))
        save_model(model, self.path / "model", class_names=classes)
        plot_curves(history, self.path / "curves.png")
        if self._tensorboard is not None:
            row = history[-1]
            for key, value in row.items():
                if isinstance(value, int | float):
                    self._tensorboard.add_scalar(key, value, global_step=row["images_seen"])
            self._tensorboard.flush()

    def write_summary(self, summary: dict[str, Any]) -> None:
        if self.writes:
            write_json(self.path / "summary.json", summary)

    def open_tensorboard(self) -> None:
        """Log each epoch's row to ``tensorboard/`` too (needs the tensorboard package)."""
        if self.writes:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(str(self.path / "tensorboard"))

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None


def plot_curves(history: list[dict[str, Any]], path: Path) -> Path:
    """Loss (train, val) and validation top-1 (model, EMA) per epoch -> a PNG."""
    from matplotlib.figure import Figure

    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(10, 4), layout="tight")
    ax_loss, ax_acc = fig.subplots(1, 2)
    ax_loss.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train")
    ax_loss.plot(epochs, [h.get("val_loss") for h in history], marker="o", label="val")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_acc.plot(epochs, [h.get("val_top1") for h in history], marker="o", label="val top-1")
    if any("ema_val_top1" in h for h in history):
        ax_acc.plot(epochs, [h.get("ema_val_top1") for h in history], marker="o", label="EMA val top-1")
    ax_acc.set(xlabel="epoch", ylabel="%", title="validation accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    return save_figure(fig, path)
