"""``features_only=True``: a backbone that returns feature maps of chosen blocks (for detection etc.)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .tnt import feature_take_indices

__all__ = ["FeatureExtractor"]


class FeatureExtractor(nn.Module):
    """Wrap a model with ``forward_intermediates``; forward returns a list of (B, C, H, W) maps.

    ``feature_info`` lists, per returned map, its block, channel count and reduction (stride in pixels),
    like timm's feature wrappers. Blocks after the last one asked for are not run.
    """

    def __init__(self, model: nn.Module, *, out_indices: int | Sequence[int] | None = None) -> None:
        super().__init__()
        depth = len(model.feature_info)  # blocks of a TNT, stages of a PyramidTNT
        if out_indices is None:
            out_indices = min(4, depth)
        self.out_indices = feature_take_indices(depth, out_indices)
        self.model = model
        self.feature_info = [model.feature_info[i] for i in self.out_indices]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model.forward_intermediates(
            x, self.out_indices, stop_early=True, intermediates_only=True, output_fmt="NCHW"
        )
