"""`tnt info`: parameter count, MACs and the resolved config of a model."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn
from torch.utils import flop_counter

from ..kernels import fused_kernels
from ..models import create_model

__all__ = ["count_macs", "count_params", "forward_macs", "model_info"]

_CPU_SDPA = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def _register_cpu_sdpa_flops() -> None:
    """torch's flop counter knows the CUDA attention kernels but not the CPU one; teach it (once)."""
    if _CPU_SDPA in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(_CPU_SDPA)
    def _cpu_sdpa_flop(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query, key, value)


def count_params(model: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@torch.no_grad()
def forward_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of ``model(x)`` in eval mode, counted by ``torch.utils.flop_counter``.

    Works for any module (timm's included); attention matmuls count, as in :func:`count_macs`.
    """
    _register_cpu_sdpa_flops()
    was_training = model.training
    model.eval()
    try:
        counter = flop_counter.FlopCounterMode(display=False)
        with counter, fused_kernels(False):
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


@torch.no_grad()
def count_macs(model: nn.Module, img_size: int | None = None) -> int:
    """Multiply-accumulates of one forward pass of one image, as the paper counts them.

    Counted with ``torch.utils.flop_counter`` (MACs = FLOPs / 2) with the word embedding run as the
    per-patch convolution of the paper (the fused GEMM we execute does more arithmetic for less time) and
    the inner transformer on the reference path (the fused op has no FLOP formula of its own).
    """
    size = img_size or model.cfg.img_size
    x = torch.zeros(1, model.cfg.in_chans, size, size, device=next(model.parameters()).device)
    embed = getattr(model, "pixel_embed", None)  # TNT's word embedding; PyramidTNT has a conv stem
    if embed is None:
        return forward_macs(model, x)
    fused = embed.fused
    embed.fused = False
    try:
        return forward_macs(model, x)
    finally:
        embed.fused = fused


def model_info(name: str, img_size: int | None = None) -> dict[str, Any]:
    """Name, parameter counts, MACs and resolved config of a registered model, as plain data."""
    overrides = {"img_size": img_size} if img_size else {}
    model = create_model(name, **overrides)
    return {
        "model": name,
        "params": count_params(model),
        "params_total": count_params(model, trainable_only=False),
        "macs": count_macs(model),
        "img_size": model.cfg.img_size,
        "config": dataclasses.asdict(model.cfg),
        "meta": dataclasses.asdict(model.meta),
    }
