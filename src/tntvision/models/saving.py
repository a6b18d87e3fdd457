"""Model folders: saving a model as ``model.safetensors`` + ``config.json`` and rebuilding it from one.

Reading and adapting the weights themselves (every layout, resampling, head reset) is
:mod:`tntvision.models.weights`; this module adds the architecture and class names around them.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from torch import nn

from ..utils.files import atomic_write, write_json
from .contract import resolved_meta
from .factory import create_model
from .pyramid_tnt import STEM_STRIDE, PyramidTNTConfig
from .registry import ModelMeta, get_model_entry, list_models
from .tnt import TNTConfig
from .weights import (
    CheckpointError,
    CheckpointInfo,
    PyramidCheckpointInfo,
    describe_pyramid_state_dict,
    describe_state_dict,
    is_pyramid_state_dict,
    load_pretrained,
    read_model_config,
    read_state_dict,
    refuse_exported,
    to_tntvision_keys,
)

__all__ = ["load_model", "model_from_weights", "save_model", "unwrap_model"]

FORMAT = "tntvision/1"


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain model under DDP / torch.compile / feature wrappers."""
    while True:
        for attr in ("module", "_orig_mod", "model"):
            inner = getattr(model, attr, None)
            if isinstance(inner, nn.Module) and hasattr(inner, "cfg") is not hasattr(model, "cfg"):
                model = inner
                break
        else:
            return model


def save_model(model: nn.Module, folder: str | Path, class_names: list[str] | None = None) -> Path:
    """Write ``folder/model.safetensors`` and ``folder/config.json``; returns the folder.

    ``config.json`` holds the registered name, the architecture config, the input metadata (size,
    mean/std, crop) and the class names, so :func:`load_model` can rebuild the model alone.
    """
    from safetensors.torch import save_file

    model = unwrap_model(model)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if class_names is not None and model.cfg.num_classes and len(class_names) != model.cfg.num_classes:
        raise ValueError(f"{len(class_names)} class names for a model with {model.cfg.num_classes} classes")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(folder / "model.safetensors", lambda tmp: save_file(state, tmp, metadata={"format": FORMAT}))
    meta = resolved_meta(model)
    config: dict[str, Any] = {
        "format": FORMAT,
        "model": getattr(model, "model_name", None),
        "config": dataclasses.asdict(model.cfg),
        "meta": dataclasses.asdict(meta),
        "class_names": list(class_names) if class_names is not None else None,
    }
    write_json(folder / "config.json", config)
    return folder


def _checkpoint_info(path: str | Path, *, use_ema: bool = True) -> CheckpointInfo | PyramidCheckpointInfo:
    sd, _ = read_state_dict(path, use_ema=use_ema)
    if is_pyramid_state_dict(sd):
        return describe_pyramid_state_dict(sd)
    return describe_state_dict(to_tntvision_keys(sd)[0])


def _match_variant(info: CheckpointInfo | PyramidCheckpointInfo) -> str:
    for name in list_models():
        cfg = get_model_entry(name).config
        inner = cfg.inner_block_indices()
        if isinstance(info, PyramidCheckpointInfo):
            if isinstance(cfg, PyramidTNTConfig) and (cfg.depths, cfg.outer_dims, cfg.inner_dims, inner) == (
                info.depths,
                info.outer_dims,
                info.inner_dims,
                info.inner_blocks,
            ):
                return name
            continue
        if isinstance(cfg, TNTConfig) and (
            (cfg.embed_dim, cfg.inner_dim, cfg.depth) == (info.embed_dim, info.inner_dim, info.depth)
            and (cfg.se_ratio > 0) == info.se
            and inner == info.inner_blocks
            and (info.legacy is None or cfg.legacy == info.legacy)
        ):
            return name
    raise CheckpointError(f"no registered model matches this checkpoint ({info.describe()}); name one")


def model_from_weights(
    path: str | Path, *, name: str | None = None, use_ema: bool = True, **overrides: Any
) -> nn.Module:
    """Build the model a bare weights file (ours, timm's or the authors') holds, and load it.

    The variant is matched from the weights' shapes unless ``name`` is given; the class count, input
    size (square grids) and channel count come from the weights unless ``overrides`` set them.
    """
    info = _checkpoint_info(path, use_ema=use_ema)
    name = name or _match_variant(info)
    found: dict[str, Any] = {"num_classes": info.num_classes, "in_chans": info.in_chans}
    if isinstance(info, PyramidCheckpointInfo):
        found["img_size"] = info.grid * STEM_STRIDE
    else:
        side = math.isqrt(info.num_patches)
        if side * side == info.num_patches:
            found["img_size"] = side * get_model_entry(name).config.patch_size
    model = create_model(name, **{**found, **overrides})
    load_pretrained(model, path, use_ema=use_ema)
    return model


def load_model(path: str | Path, **overrides: Any) -> nn.Module:
    """Rebuild a model from a run folder, a ``model/`` folder, or a weights file.

    A folder (or a file with ``config.json`` beside it) gives the exact architecture, metadata and class
    names (``model.class_names``); a bare weights file is matched to a registered variant by its shapes.
    ``overrides`` change config fields (e.g. ``num_classes`` to get a fresh head).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_file():
        refuse_exported(
            path,
            why="an exported model, not weights (eval, predict and bench take it; load_model reads weights)",
            option="load_model",
        )
    folder = path if path.is_dir() else path.parent
    if (
        path.is_dir()
        and not (folder / "config.json").is_file()
        and (folder / "model" / "config.json").is_file()
    ):
        folder = folder / "model"
    saved = read_model_config(folder)
    class_names = None
    if saved is not None:
        if not isinstance(saved, dict) or "config" not in saved:
            raise CheckpointError(f"{folder / 'config.json'}: not a tntvision model config")
        name = saved.get("model")
        config = {**saved["config"], **overrides}
        if name is None or name not in list_models():
            raise CheckpointError(f"{folder / 'config.json'}: unknown model {name!r}")
        try:
            model = create_model(name, **config)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{folder / 'config.json'}: {e}") from None
        if saved.get("meta"):
            meta = dict(saved["meta"])
            meta = {k: tuple(v) if isinstance(v, list) else v for k, v in meta.items()}
            # the saved preprocessing, at the size and channels of the model built (overrides included)
            model.meta = resolved_meta(model, ModelMeta(**meta))
        class_names = saved.get("class_names")
        weights = path if path.is_file() else folder / "model.safetensors"
        if class_names is not None and len(class_names) != model.num_classes:
            class_names = None  # the head was changed by an override
        load_pretrained(model, weights)
    else:
        model = model_from_weights(path, **overrides)
    model.class_names = class_names
    return model
