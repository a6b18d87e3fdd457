"""`create_model`: a registered model built from its config, optionally with weights and as a feature
extractor. It sits above the registry, the model modules and the weight mapping, and imports all three."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from torch import nn

from ..errors import ConfigError
from . import pyramid_tnt, tnt  # noqa: F401  (register the variants)
from .features import FeatureExtractor, check_feature_options
from .hub import fetch_pretrained
from .pretrained import class_names_for, get_pretrained_tag, split_name
from .registry import get_model_entry, resolve_config
from .weights import load_pretrained, load_state_dict_into

__all__ = ["apply_token_merging", "create_model"]


def create_model(
    name: str,
    pretrained: bool | str | os.PathLike | None = None,
    *,
    revision: str | None = None,
    features_only: bool = False,
    out_indices: tuple[int, ...] | list[int] | int | None = None,
    feature_cls: str | None = None,
    output_fmt: str | None = None,
    merge_tokens: int | Sequence[int] = 0,
    **overrides: Any,
) -> nn.Module:
    """Build a registered model, optionally with weights (docs/pretrained.md).

    ``name``: from :func:`list_models`, optionally with a pretrained tag (``"tnt_s_patch16_224.in1k"``); a
    bare name means the default tag, which sets the preprocessing. ``pretrained``: False / None (random
    weights), True (the tag's published weights, cached or downloaded, at ``revision`` for hub weights),
    or a path to weights in any supported layout. Position tables are resampled to ``img_size``, a head
    of another size is fresh, other structures or widths are refused; a tag's ImageNet weights bring
    torchvision's class names. ``features_only`` (with ``out_indices``, ``feature_cls``, ``output_fmt``):
    a feature extractor, as timm's. ``merge_tokens``: token merging, ``r`` per block or one per block.
    ``overrides``: config fields (``num_classes``, ``img_size``, ``in_chans``, ``drop_path_rate``, ...).

    Raises:
        UnknownModelError: an unknown name or tag (the message lists close names or the tags).
        ConfigError: bad overrides or options, published weights asked for where there are none.
        CheckpointError: weights that cannot be fetched, read or fitted (the message says what to do).
    """
    arch, _ = split_name(name)
    entry, tag = get_model_entry(arch), get_pretrained_tag(name)
    _check_weights_options(arch, tag, pretrained, revision)
    output_fmt = _check_feature_options(features_only, out_indices, feature_cls, output_fmt)
    cfg = resolve_config(arch, **overrides)
    if pretrained is True:  # fetch (or find in the cache) before building: a bad tag costs no model
        sd, wrapper, path = fetch_pretrained(tag, revision=revision)
    model = entry.factory(cfg)
    model.model_name, model.pretrained_tag = arch, tag
    meta = tag.meta if tag is not None else entry.meta
    model.meta = meta.resolved(in_chans=cfg.in_chans, img_size=cfg.img_size)
    if pretrained is True:
        load_state_dict_into(model, sd, source=f"{tag.name} ({path})", wrapper=wrapper)
    elif pretrained:  # a path (pretrained=False / None / "" mean random weights)
        load_pretrained(model, pretrained)
    labelled = pretrained is True or (bool(pretrained) and "." in name)  # the tag says what the file is
    if labelled and tag is not None and cfg.num_classes == tag.num_classes:
        names = class_names_for(tag)
        model.class_names = list(names) if names is not None else None
    apply_token_merging(model, merge_tokens)
    if features_only:
        model = FeatureExtractor(model, out_indices=out_indices, output_fmt=output_fmt)
    return model


def _check_weights_options(arch: str, tag, pretrained, revision: str | None) -> None:
    if pretrained is not None and not isinstance(pretrained, bool | str | os.PathLike):
        raise ConfigError(f"pretrained must be True, False, None or a path, got {type(pretrained).__name__}")
    if pretrained is True and tag is None:
        raise ConfigError(
            f"{arch} has no published weights (see `tnt models --pretrained`); "
            "pass pretrained=PATH for a file"
        )
    if revision is not None and pretrained is not True:
        raise ConfigError("revision applies with pretrained=True (the hub weights of a tag)")


def _check_feature_options(features_only: bool, out_indices, feature_cls, output_fmt) -> str | None:
    """The feature options, checked; returns ``output_fmt`` with its default."""
    if features_only:
        output_fmt = output_fmt or "NCHW"
        check_feature_options(feature_cls=feature_cls, output_fmt=output_fmt)
        return output_fmt
    given = dict(out_indices=out_indices, feature_cls=feature_cls, output_fmt=output_fmt)
    unused = [k for k, v in given.items() if v is not None]
    if unused:
        raise ConfigError(f"{', '.join(unused)} only apply with features_only=True")
    return output_fmt


def apply_token_merging(model: nn.Module, merge_tokens: int | Sequence[int]) -> nn.Module:
    """``model.set_token_merging(merge_tokens)`` (TNT models), a :class:`ConfigError` for a model without
    it when merging is asked for (PyramidTNT); ``0`` leaves any model as it is. Returns ``model``."""
    if merge_tokens:
        if not hasattr(model, "set_token_merging"):
            name = getattr(model, "model_name", None) or type(model).__name__
            raise ConfigError(f"{name} does not support token merging (--merge-tokens); TNT models do")
        model.set_token_merging(merge_tokens)
    return model
