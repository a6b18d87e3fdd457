"""How a ``--checkpoint`` is opened: the commands that run a saved model of either kind (eval, predict,
serve) call :func:`open_model`; those that need a PyTorch model's insides (export, visualize,
``train --pretrained``) refuse an exported file up front (:func:`refuse_exported`, or export's own check)
and call :func:`tntvision.load_model`; ``bench --checkpoint`` times an exported file
(:func:`tntvision.tools.exported.bench_exported`).

A ``--checkpoint`` is a run folder, a ``model/`` folder or a weights file (read by
:func:`tntvision.load_model`, weights of the authors, timm or mmpretrain included), or an exported ``.onnx``
/ ``.pt2`` file (read by :func:`tntvision.tools.exported.load_exported`). Training checkpoints for
``--resume`` are another thing: :func:`tntvision.train.load_training_state`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import ConfigError, InputError
from ..models import create_model, load_model
from ..models.factory import apply_token_merging
from ..models.weights import is_exported_file, refuse_exported
from .exported import load_exported, resolve_runtime

__all__ = ["ModelSource", "apply_token_merging", "open_model", "refuse_exported"]


@dataclass(frozen=True)
class ModelSource:
    """What a command runs, as its options name it, the way timm's scripts do:

    - ``checkpoint`` alone (``--checkpoint PATH``): a run folder, ``model/`` folder, weights file or
      exported file;
    - ``model`` with ``pretrained`` (``--model NAME[.TAG] --pretrained``): the tag's published weights,
      downloaded or cached (``revision``: the hub revision);
    - ``model`` with ``checkpoint`` (``--model NAME.TAG --checkpoint FILE``): a weights file fetched by
      hand, loaded into that model (which gives it the tag's preprocessing and class names);
    - ``model`` alone: random weights, where a command allows them (``visualize``, ``bench``).
    """

    checkpoint: str | Path | None = None
    model: str | None = None
    pretrained: bool = False
    revision: str | None = None

    def check(self, *, random_ok: bool = False) -> None:
        """Raise :class:`ConfigError` for a combination that names no model, or two."""
        if self.model is None:
            if self.pretrained or self.revision:
                raise ConfigError("--pretrained takes the published weights of --model NAME[.TAG]")
            if self.checkpoint is None:
                raise ConfigError("name a model: --checkpoint PATH, or --model NAME[.TAG] --pretrained")
            return
        if self.pretrained and self.checkpoint is not None:
            raise ConfigError("--pretrained (published weights) or --checkpoint FILE (a file), not both")
        if self.revision and not self.pretrained:
            raise ConfigError("--revision applies with --pretrained")
        if not (self.pretrained or self.checkpoint is not None or random_ok):
            raise ConfigError(
                f"--model {self.model} has random weights: add --pretrained for its published weights "
                "(see `tnt models --pretrained`) or --checkpoint FILE for a weights file"
            )
        refuse_exported(self.checkpoint, why="--model takes weights", option="--checkpoint")

    @property
    def named(self) -> bool:
        """Whether the model is built by name (``--model``), not read from a saved folder or file."""
        return self.model is not None

    def load_pytorch(self, **overrides: Any) -> nn.Module:
        """The PyTorch model (an exported file is refused); ``overrides`` change config fields (e.g.
        ``img_size``) as :func:`tntvision.load_model` and :func:`tntvision.create_model` take them."""
        self.check(random_ok=True)
        if self.model is None:
            return load_model(self.checkpoint, **overrides)
        weights = True if self.pretrained else self.checkpoint
        return create_model(self.model, pretrained=weights, revision=self.revision, **overrides)

    def __str__(self) -> str:
        if self.model is None:
            return str(self.checkpoint)
        how = "published weights" if self.pretrained else self.checkpoint or "random weights"
        return f"{self.model} ({how})"


def as_source(source: str | Path | ModelSource) -> ModelSource:
    """A ``--checkpoint`` path as a :class:`ModelSource`; a source as it is."""
    return source if isinstance(source, ModelSource) else ModelSource(checkpoint=source)


def open_model(
    path: str | Path | ModelSource,
    *,
    autocast: bool = False,
    runtime: str | None = None,
    merge_tokens: int | Sequence[int] = 0,
) -> nn.Module:
    """``--checkpoint``: an exported ``.onnx`` / ``.pt2`` file, or what :func:`tntvision.load_model` reads;
    or a :class:`ModelSource` (``--model NAME[.TAG] --pretrained`` and the like, which run in torch).

    ``runtime`` is ``--runtime`` (see :func:`resolve_runtime`; refused before anything is read when it
    cannot run ``path``). ``autocast=True`` (the caller will run the model under autocast, ``--amp``) is
    refused for an exported file up front, before any work: the file runs in float32. ``merge_tokens``
    (``--merge-tokens``) turns on token merging (see :func:`apply_token_merging`).
    """
    source = as_source(path)
    source.check()
    if source.named:
        if runtime not in (None, "torch"):
            raise ConfigError(f"--runtime {runtime} runs an .onnx file; --model runs in torch")
        return apply_token_merging(source.load_pytorch(), merge_tokens)
    path = source.checkpoint
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
