"""The one swap point for speed: a TNT block's inner transformer, through a fused op or the block's modules.

:func:`run_inner` decides (:func:`inner_backend`: the rules of :mod:`~tntvision.kernels.rules` about the
block's modules, kept until something they read changes, then the device, dtype and switches of
:func:`~tntvision.kernels.backend.fused_backend`), draws the drop-path scales in the reference path's
order and calls the C++ or Triton op with the block's weights by name, or runs the block's own modules.
"""

from __future__ import annotations

import torch
from torch import nn

from .backend import fused_backend
from .op import InnerWeights, compute_dtype
from .rules import cached_verdict, exactly

__all__ = ["inner_backend", "inner_op", "run_inner"]


def run_inner(block: nn.Module, words: torch.Tensor) -> torch.Tensor:
    """The inner transformer of ``block`` (a TNT block with one) over words (S, m, c) -> (S, m, c)."""
    backend = inner_backend(block, words)
    if backend is None:
        return block.inner_reference(words)
    attn_scale = mlp_scale = None
    p = block.drop_path.p
    if block.training and p > 0:  # drawn as the reference path draws them: the same random stream
        attn_scale, mlp_scale = (_drop_path_scale(words, p) for _ in range(2))
    return inner_op(words, InnerWeights.of(block), attn_scale, mlp_scale, num_heads=block.attn_in.num_heads,
                    eps=block.norm_in.eps, backend=backend)  # fmt: skip


def inner_op(
    words: torch.Tensor,
    weights: InnerWeights,
    attn_scale: torch.Tensor | None,
    mlp_scale: torch.Tensor | None,
    *,
    num_heads: int,
    eps: float,
    backend: str,
) -> torch.Tensor:
    """The fused op ``backend`` (``cpu`` or ``triton``) on words (S, m, c); ``attn_scale`` / ``mlp_scale``:
    per-sentence drop-path scales (S,) of the two branches, or None. The products run in
    :func:`~tntvision.kernels.op.compute_dtype`: the Triton op takes it as it is; the C++ op may compute
    its GEMMs in bf16 (``low_precision``), which it does where the CPU has AMX."""
    args = dict(weights.as_kwargs(), attn_scale=attn_scale, mlp_scale=mlp_scale, num_heads=num_heads, eps=eps)
    dtype = compute_dtype(words)
    if backend == "triton":
        return torch.ops.tntvision.inner_transformer_triton(words, **args, compute_dtype=dtype)
    return torch.ops.tntvision.inner_transformer(words, **args, low_precision=dtype == torch.bfloat16)


def inner_backend(block: nn.Module, words: torch.Tensor) -> str | None:
    """The fused op ``block``'s inner transformer may run as on ``words``: ``cpu``, ``triton``, or None for
    the reference path. Fused only when the block computes exactly what the op does (:func:`_plain_inner`,
    kept until something it reads changes) and nothing in it drops out while training."""
    attn, mlp = block.attn_in, block.mlp_in
    modules = (block.norm_in, block.norm_mlp_in, block.drop_path, attn, mlp, *attn._modules.values(),
               *mlp._modules.values())  # fmt: skip
    act = mlp._modules.get("act")
    extra = (getattr(attn, "keep_attn", None), getattr(block.norm_in, "eps", None),
             getattr(block.norm_mlp_in, "eps", None), getattr(act, "approximate", None))  # fmt: skip
    if not cached_verdict(block, "inner", modules, extra, lambda: _plain_inner(block)):
        return None
    if block.training and (attn.attn_drop or _p(attn.proj_drop) or _p(mlp.drop)):  # the op has no dropout
        return None
    return fused_backend(words)


def _plain_inner(block: nn.Module) -> bool:
    """Whether each slot of the inner transformer holds exactly what the op computes: LayerNorms of one
    eps, our ``Attention`` and ``Mlp`` of plain Linears, the exact GELU, dropout slots, our ``DropPath``;
    both qkv biases or neither; no recorded attention maps."""
    from ..models.layers import Attention, DropPath, Mlp  # the models import this package

    attn, mlp = block.attn_in, block.mlp_in
    return (
        exactly(block.norm_in, nn.LayerNorm)
        and exactly(block.norm_mlp_in, nn.LayerNorm)
        and exactly(attn, Attention, Attention.SLOTS)
        and exactly(mlp, Mlp, Mlp.SLOTS)
        and exactly(block.drop_path, DropPath)
        and (attn.qk.bias is None) == (attn.v.bias is None)  # the op takes both qkv biases or none
        and None not in (attn.proj.bias, mlp.fc1.bias, mlp.fc2.bias)
        and not attn.keep_attn
        and block.norm_in.eps == block.norm_mlp_in.eps
    )


def _p(module: nn.Module) -> float:
    """The drop probability of a dropout slot (0 for the ``nn.Identity`` that may stand there)."""
    return module.p if isinstance(module, nn.Dropout) else 0.0


def _drop_path_scale(words: torch.Tensor, p: float) -> torch.Tensor:
    """Per-sentence drop-path scales (S,) in the dtype the reference path draws them in (the autocast
    dtype under autocast)."""
    from ..models.layers import drop_path_scale

    device = words.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else words.dtype
    return drop_path_scale(words.shape[0], p, dtype=dtype, device=words.device)
