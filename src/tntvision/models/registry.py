"""A strict model registry: names map to factories, duplicates and unknown arguments raise.

Unlike timm's registry (which warns and overwrites on a duplicate name), registering a name twice is an
error, and asking for an unknown name or argument raises with close matches suggested.

This module is the bottom of the models package: the model modules (tnt, pyramid_tnt) register into it,
weights.py maps checkpoints onto those models, and factory.py's `create_model` builds a registered model
and loads weights into it. Nothing here imports the layers above.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..errors import ConfigError, UnknownModelError
from ..utils.messages import did_you_mean

__all__ = [
    "ModelMeta",
    "UnknownModelError",
    "get_model_entry",
    "list_models",
    "model_config",
    "register_model",
]


@dataclass(frozen=True)
class ModelMeta:
    """What a model expects of its input, kept apart from the architecture (like timm's pretrained_cfg).

    Attributes:
        input_size: (channels, height, width) the variant is defined for.
        mean, std: per-channel normalisation applied after scaling pixels to [0, 1].
        crop_pct: evaluation resize = input size / crop_pct on the short side, then centre crop.
        interpolation: resize interpolation ("bicubic" or "bilinear").
    """

    input_size: tuple[int, int, int] = (3, 224, 224)
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    crop_pct: float = 0.9
    interpolation: str = "bicubic"

    @property
    def resize_size(self) -> int:
        """The short side images are resized to before the centre crop: floor(size / crop_pct).

        timm's rule (224 / 0.9 -> 248), by which the released weights were evaluated.
        """
        return math.floor(min(self.input_size[1:]) / self.crop_pct)

    def resolved(self, *, in_chans: int | None = None, img_size: int | None = None) -> ModelMeta:
        """This metadata adapted to another channel count or image size."""
        c, h, w = self.input_size
        mean, std = self.mean, self.std
        if in_chans is not None and in_chans != c:
            # Average the per-channel statistics when the channel count changes (e.g. RGB -> grey).
            mean = (sum(mean) / len(mean),) * in_chans
            std = (sum(std) / len(std),) * in_chans
            c = in_chans
        if img_size is not None:
            h = w = img_size
        return dataclasses.replace(self, input_size=(c, h, w), mean=mean, std=std)


@dataclass(frozen=True)
class _Entry:
    name: str
    factory: Callable[..., nn.Module]
    config: Any  # the variant's frozen config dataclass
    meta: ModelMeta


_REGISTRY: dict[str, _Entry] = {}


def register_model(name: str, factory: Callable[..., nn.Module], config: Any, meta: ModelMeta) -> None:
    """Register ``factory(config, **overrides)`` under ``name``; a name may be registered once only."""
    if name in _REGISTRY:
        raise ValueError(f"model name {name!r} is already registered")
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"config of {name!r} must be a dataclass instance, got {type(config).__name__}")
    _REGISTRY[name] = _Entry(name=name, factory=factory, config=config, meta=meta)


def list_models(pattern: str | None = None, *, pretrained: bool = False) -> list[str]:
    """Registered model names, sorted; ``pattern`` is a shell-style wildcard (``"tnt_s*"``).

    ``pretrained=True``: the names with tags of published weights instead (``tnt_s_patch16_224.in1k``),
    as timm's ``list_models(pretrained=True)`` gives them.
    """
    if pretrained:
        from .pretrained import list_pretrained  # (it imports this module)

        return list_pretrained(pattern)
    names = sorted(_REGISTRY)
    if pattern:
        names = [n for n in names if fnmatch.fnmatch(n, pattern)]
    return names


def _unknown_name_message(kind: str, name: str, known: list[str]) -> str:
    return f"unknown {kind} {name!r}{did_you_mean(name, known)}"


def get_model_entry(name: str) -> _Entry:
    """The registry entry of ``name``; raises :class:`UnknownModelError` with suggestions."""
    try:
        return _REGISTRY[name]
    except KeyError:
        msg = _unknown_name_message("model", name, list(_REGISTRY))
        raise UnknownModelError(msg + " (see `tnt models`)") from None


def resolve_config(name: str, **overrides: Any) -> Any:
    """The variant's config with ``overrides`` applied; unknown keys raise :class:`ConfigError`."""
    entry = get_model_entry(name)
    fields = {f.name for f in dataclasses.fields(entry.config)}
    for key in overrides:
        if key not in fields:
            raise ConfigError(_unknown_name_message(f"argument for {name}:", key, sorted(fields)))
    return dataclasses.replace(entry.config, **overrides)


def model_config(cls: type, cfg: Any | None, overrides: dict[str, Any]) -> Any:
    """A model's config: ``cfg`` (default: ``cls()``) with ``overrides`` (field names) applied, checked by
    its ``validate()``, and its inner blocks listed explicitly; :class:`ConfigError` for an unknown field."""
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ConfigError(f"unknown {cls.__name__.removesuffix('Config')} config field(s) {unknown}")
    cfg = (cfg if cfg is not None else cls()).replace(**overrides)
    cfg.validate()
    return cfg.replace(inner_blocks=cfg.inner_block_indices())
