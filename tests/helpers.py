"""Weights in other projects' key layouts, written from literal lists of their names and shapes.

The lists were read off the projects' own model files, not derived from tntvision's mapping tables, so a
wrong entry in those tables makes a test fail instead of cancelling out:
- the authors' ``tnt_pytorch/tnt.py`` (huawei-noah/Efficient-AI-Backbones): ``TNT``, ``Block``,
  ``Attention``, ``Mlp``, ``SE``, ``PatchEmbed``;
- mmpretrain's ``mmpretrain/models/backbones/tnt.py`` (``TNT``, ``TnTLayer``, ``TransformerBlock`` built
  from mmcv's ``MultiheadAttention`` and ``FFN``) inside an ``ImageClassifier`` with a ``LinearClsHead``.

Shapes use d (outer dim), c (inner dim), m (words per patch), n (patches), k (classes).
"""

from __future__ import annotations

import torch

# authors' name, timm's name (= ours), shape
AUTHORS_TOP = [
    ("cls_token", "cls_token", "1,1,d"),
    ("outer_tokens", None, "1,n,d"),  # registered, never used: no counterpart
    ("outer_pos", "patch_pos", "1,n+1,d"),
    ("inner_pos", "pixel_pos", "1,m,c"),  # timm: (1, c, sqrt m, sqrt m)
    ("patch_embed.proj.weight", "pixel_embed.proj.weight", "c,3,7,7"),
    ("patch_embed.proj.bias", "pixel_embed.proj.bias", "c"),
    ("proj_norm1.weight", "norm1_proj.weight", "mc"),
    ("proj_norm1.bias", "norm1_proj.bias", "mc"),
    ("proj.weight", "proj.weight", "d,mc"),
    ("proj.bias", "proj.bias", "d"),
    ("proj_norm2.weight", "norm2_proj.weight", "d"),
    ("proj_norm2.bias", "norm2_proj.bias", "d"),
    ("norm.weight", "norm.weight", "d"),
    ("norm.bias", "norm.bias", "d"),
    ("head.weight", "head.weight", "k,d"),
    ("head.bias", "head.bias", "k"),
]
AUTHORS_BLOCK = [
    ("inner_norm1.weight", "norm_in.weight", "c"),
    ("inner_norm1.bias", "norm_in.bias", "c"),
    ("inner_attn.qk.weight", "attn_in.qk.weight", "2c,c"),
    ("inner_attn.v.weight", "attn_in.v.weight", "c,c"),
    ("inner_attn.proj.weight", "attn_in.proj.weight", "c,c"),
    ("inner_attn.proj.bias", "attn_in.proj.bias", "c"),
    ("inner_norm2.weight", "norm_mlp_in.weight", "c"),
    ("inner_norm2.bias", "norm_mlp_in.bias", "c"),
    ("inner_mlp.fc1.weight", "mlp_in.fc1.weight", "4c,c"),
    ("inner_mlp.fc1.bias", "mlp_in.fc1.bias", "4c"),
    ("inner_mlp.fc2.weight", "mlp_in.fc2.weight", "c,4c"),
    ("inner_mlp.fc2.bias", "mlp_in.fc2.bias", "c"),
    ("proj_norm1.weight", "norm1_proj.weight", "mc"),
    ("proj_norm1.bias", "norm1_proj.bias", "mc"),
    ("proj.weight", "proj.weight", "d,mc"),  # no bias in the official structure
    ("proj_norm2.weight", "norm2_proj.weight", "d"),
    ("proj_norm2.bias", "norm2_proj.bias", "d"),
    ("outer_norm1.weight", "norm_out.weight", "d"),
    ("outer_norm1.bias", "norm_out.bias", "d"),
    ("outer_attn.qk.weight", "attn_out.qk.weight", "2d,d"),
    ("outer_attn.v.weight", "attn_out.v.weight", "d,d"),
    ("outer_attn.proj.weight", "attn_out.proj.weight", "d,d"),
    ("outer_attn.proj.bias", "attn_out.proj.bias", "d"),
    ("outer_norm2.weight", "norm_mlp.weight", "d"),
    ("outer_norm2.bias", "norm_mlp.bias", "d"),
    ("outer_mlp.fc1.weight", "mlp.fc1.weight", "4d,d"),
    ("outer_mlp.fc1.bias", "mlp.fc1.bias", "4d"),
    ("outer_mlp.fc2.weight", "mlp.fc2.weight", "d,4d"),
    ("outer_mlp.fc2.bias", "mlp.fc2.bias", "d"),
]
AUTHORS_SE = [  # Block(se > 0): SE(outer_dim, 0.25), fc = LayerNorm, Linear, ReLU, Linear, Tanh
    ("se_layer.fc.0.weight", "se.fc.0.weight", "d"),
    ("se_layer.fc.0.bias", "se.fc.0.bias", "d"),
    ("se_layer.fc.1.weight", "se.fc.1.weight", "d/4,d"),
    ("se_layer.fc.1.bias", "se.fc.1.bias", "d/4"),
    ("se_layer.fc.3.weight", "se.fc.3.weight", "d,d/4"),
    ("se_layer.fc.3.bias", "se.fc.3.bias", "d"),
]

# mmpretrain's names (legacy structure; no counterpart table: tests run their forward, see test_weights)
MMPRETRAIN_TOP = [
    ("backbone.cls_token", "1,1,d"),
    ("backbone.patch_pos", "1,n+1,d"),
    ("backbone.pixel_pos", "1,c,4,4"),
    ("backbone.pixel_embed.proj.weight", "c,3,7,7"),
    ("backbone.pixel_embed.proj.bias", "c"),
    ("backbone.norm1_proj.weight", "mc"),
    ("backbone.norm1_proj.bias", "mc"),
    ("backbone.projection.weight", "d,mc"),
    ("backbone.projection.bias", "d"),
    ("backbone.norm2_proj.weight", "d"),
    ("backbone.norm2_proj.bias", "d"),
    ("backbone.norm.weight", "d"),
    ("backbone.norm.bias", "d"),
    ("head.fc.weight", "k,d"),
    ("head.fc.bias", "k"),
]
MMPRETRAIN_LAYER = [
    ("inner_block.norm_attn.weight", "c"),
    ("inner_block.norm_attn.bias", "c"),
    ("inner_block.attn.attn.in_proj_weight", "3c,c"),  # qkv_bias=False: in_proj_bias is None
    ("inner_block.attn.attn.out_proj.weight", "c,c"),
    ("inner_block.attn.attn.out_proj.bias", "c"),
    ("inner_block.norm_ffn.weight", "c"),
    ("inner_block.norm_ffn.bias", "c"),
    ("inner_block.ffn.layers.0.0.weight", "4c,c"),
    ("inner_block.ffn.layers.0.0.bias", "4c"),
    ("inner_block.ffn.layers.1.weight", "c,4c"),
    ("inner_block.ffn.layers.1.bias", "c"),
    ("norm_proj.weight", "c"),
    ("norm_proj.bias", "c"),
    ("projection.weight", "d,mc"),
    ("projection.bias", "d"),
    ("outer_block.norm_attn.weight", "d"),
    ("outer_block.norm_attn.bias", "d"),
    ("outer_block.attn.attn.in_proj_weight", "3d,d"),
    ("outer_block.attn.attn.out_proj.weight", "d,d"),
    ("outer_block.attn.attn.out_proj.bias", "d"),
    ("outer_block.norm_ffn.weight", "d"),
    ("outer_block.norm_ffn.bias", "d"),
    ("outer_block.ffn.layers.0.0.weight", "4d,d"),
    ("outer_block.ffn.layers.0.0.bias", "4d"),
    ("outer_block.ffn.layers.1.weight", "d,4d"),
    ("outer_block.ffn.layers.1.bias", "d"),
]


def shape(spec: str, *, d: int, c: int, m: int, n: int, k: int) -> tuple[int, ...]:
    """``"2c,c"`` -> (2 * c, c) for the given dims."""
    sizes = {"1": 1, "3": 3, "7": 7, "4": 4, "c": c, "2c": 2 * c, "3c": 3 * c, "4c": 4 * c, "d": d}
    sizes.update({"2d": 2 * d, "3d": 3 * d, "4d": 4 * d, "d/4": d // 4, "mc": m * c, "m": m, "n": n})
    sizes.update({"n+1": n + 1, "k": k})
    return tuple(sizes[s] for s in spec.split(","))


def random_tensor(name: str, size: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Values no default init gives: norms' weights around 1 and their biases, all biases, non-zero."""
    t = torch.randn(size, generator=gen)
    if "norm" in name and name.endswith("weight"):
        return 1.0 + 0.3 * t
    return 0.3 * t if name.endswith("bias") or "norm" in name else 0.05 * t


def authors_state_dict(
    *,
    n: int,
    k: int,
    d: int = 384,
    c: int = 24,
    m: int = 16,
    depth: int = 12,
    se: bool = False,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A random state dict with exactly the keys and shapes the authors' TNT saves."""
    gen = torch.Generator().manual_seed(seed)
    dims = dict(d=d, c=c, m=m, n=n, k=k)
    out = {name: random_tensor(name, shape(s, **dims), gen) for name, _, s in AUTHORS_TOP}
    out["outer_tokens"] = torch.zeros(1, n, d)
    for i in range(depth):
        for name, _, s in AUTHORS_BLOCK + (AUTHORS_SE if se else []):
            out[f"blocks.{i}.{name}"] = random_tensor(name, shape(s, **dims), gen)
    return out


def authors_to_timm(
    sd: dict[str, torch.Tensor], *, depth: int = 12, se: bool = False
) -> dict[str, torch.Tensor]:
    """The same weights under timm's names, by the literal table above (the reference for parity)."""
    out = {}
    for name, theirs, _ in AUTHORS_TOP:
        if theirs is not None:
            out[theirs] = sd[name]
    side = round(sd["inner_pos"].shape[1] ** 0.5)
    out["pixel_pos"] = sd["inner_pos"].transpose(1, 2).reshape(1, -1, side, side)  # (1, c, side, side)
    for i in range(depth):
        for name, theirs, _ in AUTHORS_BLOCK + (AUTHORS_SE if se else []):
            out[f"blocks.{i}.{theirs}"] = sd[f"blocks.{i}.{name}"]
    return out


def mmpretrain_state_dict(*, n: int, k: int, d: int = 384, c: int = 24, depth: int = 12, seed: int = 0):
    """A random state dict with exactly the keys and shapes of mmpretrain's TNT classifier (4x4 words)."""
    gen = torch.Generator().manual_seed(seed)
    dims = dict(d=d, c=c, m=16, n=n, k=k)
    out = {name: random_tensor(name, shape(s, **dims), gen) for name, s in MMPRETRAIN_TOP}
    for i in range(depth):
        for name, s in MMPRETRAIN_LAYER:
            out[f"backbone.layers.{i}.{name}"] = random_tensor(name, shape(s, **dims), gen)
    return out


def fused_op(words, block, attn_scale=None, mlp_scale=None, *, backend: str = "cpu"):
    """The fused op ``backend`` on ``block``'s inner-transformer weights, without the rules that choose it."""
    from tntvision import kernels

    weights = kernels.InnerWeights.of(block)
    heads, eps = block.attn_in.num_heads, block.norm_in.eps
    return kernels.inner_op(words, weights, attn_scale, mlp_scale, num_heads=heads, eps=eps, backend=backend)
