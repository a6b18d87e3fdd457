"""Shared test helpers: the authors' key layout, made from ours (inverse of spec section 6)."""

import torch

from tntvision.models.weights import _AUTHOR_SEGMENTS

_OURS_TO_AUTHORS = {v: k for k, v in _AUTHOR_SEGMENTS.items()}


def to_authors_layout(
    sd: dict[str, torch.Tensor], num_patches: int, embed_dim: int
) -> dict[str, torch.Tensor]:
    """A state dict as the authors' tnt_pytorch code saves it (including the unused outer_tokens)."""
    out = {}
    for k, v in sd.items():
        if k == "pixel_pos":  # (1, c, s, s) -> (1, s*s, c)
            v = v.flatten(2).transpose(1, 2).contiguous()
        out[".".join(_OURS_TO_AUTHORS.get(seg, seg) for seg in k.split("."))] = v
    out["outer_tokens"] = torch.zeros(1, num_patches, embed_dim)
    return out
