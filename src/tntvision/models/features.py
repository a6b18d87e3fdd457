"""``features_only=True``: a backbone that returns feature maps of chosen blocks (for detection etc.)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .contract import FeatureInfo
from .tnt import feature_take_indices

__all__ = ["FEATURE_CLASSES", "OUTPUT_FORMATS", "FeatureExtractor"]

# timm's names: "getter" is its wrapper around forward_intermediates, which this one is. timm's hook- and
# fx-based wrappers ("hook", "fx", "dict", ...) have no counterpart here.
FEATURE_CLASSES = ("getter",)
OUTPUT_FORMATS = ("NCHW", "NLC")  # (B, C, H, W) maps, or (B, H*W, C) tokens without the class token

# pretrained_cfg keys about the classifier, which a feature wrapper has not (as timm drops them)
_HEAD_KEYS = ("num_classes", "classifier", "global_pool", "label_names")


def check_feature_options(*, feature_cls: str | None, output_fmt: str) -> None:
    """Raise :class:`ConfigError` naming the supported values for a ``feature_cls`` or ``output_fmt``
    this wrapper does not implement."""
    if feature_cls is not None and feature_cls not in FEATURE_CLASSES:
        raise ConfigError(f"feature_cls {feature_cls!r} is not supported; supported: {list(FEATURE_CLASSES)}")
    if output_fmt not in OUTPUT_FORMATS:
        raise ConfigError(f"output_fmt {output_fmt!r} is not supported; supported: {list(OUTPUT_FORMATS)}")


class FeatureExtractor(nn.Module):
    """Wrap a model with ``forward_intermediates``; forward returns a list of maps of the chosen blocks.

    ``output_fmt="NCHW"`` gives (B, C, H, W) maps, ``"NLC"`` (B, H*W, C) tokens. ``feature_info`` (a
    :class:`~tntvision.models.contract.FeatureInfo`) lists, per returned map, its block, channel count
    and reduction (stride in pixels), like timm's feature wrappers; ``pretrained_cfg`` is the model's,
    without its classifier keys. Blocks after the last one asked for are not run.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        out_indices: int | Sequence[int] | None = None,
        output_fmt: str = "NCHW",
    ) -> None:
        super().__init__()
        check_feature_options(feature_cls=None, output_fmt=output_fmt)
        depth = len(model.feature_info)  # blocks of a TNT, stages of a PyramidTNT
        if out_indices is None:
            out_indices = min(4, depth)
        self.out_indices = feature_take_indices(depth, out_indices)
        self.output_fmt = output_fmt
        self.model = model
        self.feature_info = FeatureInfo(model.feature_info, self.out_indices)

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        return {k: v for k, v in self.model.pretrained_cfg.items() if k not in _HEAD_KEYS}

    @property
    def default_cfg(self) -> dict[str, Any]:
        return self.pretrained_cfg

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model.forward_intermediates(
            x, self.out_indices, stop_early=True, intermediates_only=True, output_fmt=self.output_fmt
        )
