"""How a ``--checkpoint`` is opened: every command that runs a saved model (eval, predict, bench, export,
serve) calls :func:`load_checkpoint`, and the commands that need a PyTorch model's insides call
:func:`refuse_exported`.

A ``--checkpoint`` is a run folder, a ``model/`` folder or a weights file (read by
:func:`tntvision.load_model`, weights of the authors, timm or mmpretrain included), or an exported ``.onnx``
/ ``.pt2`` file (read by :func:`tntvision.tools.exported.load_exported`). Training checkpoints for
``--resume`` are another thing: :func:`tntvision.train.load_checkpoint`.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..errors import InputError
from ..models import load_model
from ..models.weights import is_exported_file, refuse_exported
from .exported import load_exported, resolve_runtime

__all__ = ["load_checkpoint", "refuse_exported"]


def load_checkpoint(path: str | Path, *, autocast: bool = False, runtime: str | None = None) -> nn.Module:
    """``--checkpoint``: an exported ``.onnx`` / ``.pt2`` file, or what :func:`tntvision.load_model` reads.

    ``runtime`` is ``--runtime`` (see :func:`resolve_runtime`; refused before anything is read when it
    cannot run ``path``). ``autocast=True`` (the caller will run the model under autocast, ``--amp``) is
    refused for an exported file up front, before any work: the file runs in float32.
    """
    resolve_runtime(path, runtime)
    if is_exported_file(path):
        if autocast:
            raise InputError(f"{Path(path).name}: autocast (--amp) applies to PyTorch checkpoints only")
        return load_exported(path, runtime=runtime)
    return load_model(path)
