"""How a ``--checkpoint`` is opened: the commands that run a saved model of either kind (eval, predict,
serve) call :func:`load_checkpoint`; those that need a PyTorch model's insides (export, visualize,
``train --pretrained``) refuse an exported file up front (:func:`refuse_exported`, or export's own check)
and call :func:`tntvision.load_model`; ``bench --checkpoint`` times an exported file
(:func:`tntvision.tools.exported.bench_exported`).

A ``--checkpoint`` is a run folder, a ``model/`` folder or a weights file (read by
:func:`tntvision.load_model`, weights of the authors, timm or mmpretrain included), or an exported ``.onnx``
/ ``.pt2`` file (read by :func:`tntvision.tools.exported.load_exported`). Training checkpoints for
``--resume`` are another thing: :func:`tntvision.train.load_checkpoint`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch import nn

from ..errors import InputError
from ..models import load_model
from ..models.factory import apply_token_merging
from ..models.weights import is_exported_file, refuse_exported
from .exported import load_exported, resolve_runtime

__all__ = ["apply_token_merging", "load_checkpoint", "refuse_exported"]


def load_checkpoint(
    path: str | Path,
    *,
    autocast: bool = False,
    runtime: str | None = None,
    merge_tokens: int | Sequence[int] = 0,
) -> nn.Module:
    """``--checkpoint``: an exported ``.onnx`` / ``.pt2`` file, or what :func:`tntvision.load_model` reads.

    ``runtime`` is ``--runtime`` (see :func:`resolve_runtime`; refused before anything is read when it
    cannot run ``path``). ``autocast=True`` (the caller will run the model under autocast, ``--amp``) is
    refused for an exported file up front, before any work: the file runs in float32. ``merge_tokens``
    (``--merge-tokens``) turns on token merging (see :func:`apply_token_merging`).
    """
    resolve_runtime(path, runtime)
    if is_exported_file(path):
        if autocast:
            raise InputError(f"{Path(path).name}: autocast (--amp) applies to PyTorch checkpoints only")
        if merge_tokens:
            raise InputError(
                f"{Path(path).name}: token merging (--merge-tokens) of an exported file is fixed when it is "
                "exported (tnt export --merge-tokens)"
            )
        return load_exported(path, runtime=runtime)
    return apply_token_merging(load_model(path), merge_tokens)
