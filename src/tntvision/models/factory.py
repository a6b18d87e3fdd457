"""`create_model`: a registered model built from its config, optionally with weights and as a feature
extractor. It sits above the registry, the model modules and the weight mapping, and imports all three."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from ..errors import ConfigError
from . import pyramid_tnt, tnt  # noqa: F401  (register the variants)
from .features import FeatureExtractor, check_feature_options
from .registry import get_model_entry, resolve_config
from .weights import load_pretrained

__all__ = ["apply_token_merging", "create_model"]


def create_model(
    name: str,
    pretrained: str | None = None,
    *,
    features_only: bool = False,
    out_indices: tuple[int, ...] | list[int] | int | None = None,
    feature_cls: str | None = None,
    output_fmt: str | None = None,
    merge_tokens: int | Sequence[int] = 0,
    **overrides: Any,
) -> nn.Module:
    """Build a registered model.

    Args:
        name: a name from :func:`list_models`.
        pretrained: path to weights in any supported layout (ours, timm's or the authors', either
            structure); position tables are resampled, a head of another size is replaced by a fresh one,
            and weights of another structure or width are refused with a message.
        features_only: return a wrapper whose forward gives a list of NCHW feature maps.
        out_indices: with ``features_only``, which blocks to return (default: the last four, or all
            if fewer). An int ``n`` means the last ``n`` blocks.
        feature_cls: with ``features_only``, timm's name of the wrapper: ``"getter"`` (the
            ``forward_intermediates`` wrapper, the only one; None means it too).
        output_fmt: with ``features_only``, ``"NCHW"`` maps (the default) or ``"NLC"`` tokens.
        merge_tokens: token merging (ToMe) for TNT models: ``r`` patches (and their words) merged per
            block, or a list of one ``r`` per block; 0 (the default) is the plain model. See
            ``TNT.set_token_merging``.
        **overrides: config fields to change (``num_classes``, ``img_size``, ``in_chans``,
            ``drop_path_rate``, ...). Unknown names raise :class:`ConfigError`.
    """
    entry = get_model_entry(name)
    if features_only:
        output_fmt = output_fmt or "NCHW"
        check_feature_options(feature_cls=feature_cls, output_fmt=output_fmt)
    else:
        unused = [
            k
            for k, v in dict(out_indices=out_indices, feature_cls=feature_cls, output_fmt=output_fmt).items()
            if v is not None
        ]
        if unused:
            raise ConfigError(f"{', '.join(unused)} only apply with features_only=True")
    cfg = resolve_config(name, **overrides)
    model = entry.factory(cfg)
    model.model_name = name
    model.meta = entry.meta.resolved(in_chans=cfg.in_chans, img_size=cfg.img_size)
    if pretrained is not None:
        load_pretrained(model, pretrained)
    apply_token_merging(model, merge_tokens)
    if features_only:
        model = FeatureExtractor(model, out_indices=out_indices, output_fmt=output_fmt)
    return model


def apply_token_merging(model: nn.Module, merge_tokens: int | Sequence[int]) -> nn.Module:
    """``model.set_token_merging(merge_tokens)`` (TNT models), a :class:`ConfigError` for a model without
    it when merging is asked for (PyramidTNT); ``0`` leaves any model as it is. Returns ``model``."""
    if merge_tokens:
        if not hasattr(model, "set_token_merging"):
            name = getattr(model, "model_name", None) or type(model).__name__
            raise ConfigError(f"{name} does not support token merging (--merge-tokens); TNT models do")
        model.set_token_merging(merge_tokens)
    return model
