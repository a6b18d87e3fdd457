"""Attention and MLP as the reference path runs them: the same numbers as the textbook modules, with less
kept for backward and the fastest exact kernel for the sequence length.

- :func:`attention`: short sequences on the CPU (TNT's 16-word sentences) as two batched matmuls with the
  softmax over the key axis of transposed scores, saving only q, k, v for backward (:class:`TileAttention`);
  everything else through ``F.scaled_dot_product_attention``.
- :func:`mlp`: ``fc2(gelu(fc1(x)))`` with the GELU in place when nothing records gradients, and
  :class:`MlpFunction` (which recomputes the GELU, or fc1 too) when autograd records.

The choice depends on static facts (token count, device, grad mode, dropout), never on values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MlpFunction", "SMALL_ATTN_TOKENS", "TileAttention", "attention", "attention_weights", "mlp"]

# On the CPU, attention over at most this many tokens runs as explicit batched matmuls (the fused CPU
# kernel of PyTorch is built for long sequences); docs/performance.md has the measurements.
SMALL_ATTN_TOKENS = 64


def explicit_attention(tokens: int, device: torch.device) -> bool:
    """Whether attention over ``tokens`` runs as two matmuls: short sequences on the CPU. On a GPU every
    length goes to ``F.scaled_dot_product_attention``, which picks a fused kernel where one fits."""
    return tokens <= SMALL_ATTN_TOKENS and device.type == "cpu"


def _scores_t_softmax(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Transposed attention weights (B*h, keys, queries) from q, k (B*h, N, hd); softmax in fp32."""
    scores_t = torch.baddbmm(q.new_zeros(()), k, q.transpose(1, 2), beta=0.0, alpha=scale)  # (B*h, Nk, Nq)
    return scores_t.softmax(dim=1, dtype=torch.float32).to(q.dtype)


class TileAttention(torch.autograd.Function):
    """softmax(q k^T * scale) v over per-head tiles (3, B*h, N, hd) -> (B*h, N, hd), keeping only the tiles
    for backward (autograd would keep the (B*h, N, N) weights too) and recomputing the weights there."""

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, scale: float) -> torch.Tensor:
        q, k, v = qkv.unbind(0)
        ctx.save_for_backward(qkv)
        ctx.scale = scale
        return torch.bmm(_scores_t_softmax(q, k, scale).transpose(1, 2), v)  # (B*h, Nq, hd)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (qkv,) = ctx.saved_tensors
        q, k, v = qkv.unbind(0)
        dt, scale = qkv.dtype, ctx.scale
        grad_out = grad_out.to(dt)
        scores_t = torch.baddbmm(q.new_zeros(()), k, q.transpose(1, 2), beta=0.0, alpha=scale)
        attn_t = scores_t.softmax(dim=1, dtype=torch.float32)  # (B*h, Nk, Nq)
        grad_v = torch.bmm(attn_t.to(dt), grad_out)  # A^T dO: (B*h, Nk, hd)
        grad_attn_t = torch.bmm(v, grad_out.transpose(1, 2)).float()  # (dO v^T)^T: (B*h, Nk, Nq)
        # softmax backward along the key axis (dim 1 of the transposed weights)
        grad_scores_t = (attn_t * (grad_attn_t - (grad_attn_t * attn_t).sum(1, keepdim=True))).to(dt)
        zero = q.new_zeros(())
        grad_q = torch.baddbmm(zero, grad_scores_t.transpose(1, 2), k, beta=0.0, alpha=scale)  # dS k
        grad_k = torch.baddbmm(zero, grad_scores_t, q, beta=0.0, alpha=scale)  # dS^T q
        return torch.stack([grad_q, grad_k, grad_v]), None


def _head_tiles(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, N, 3*C) -> (3, B*h, N, hd): one copy puts every head's q, k, v in its own contiguous tile."""
    B, N, C3 = qkv.shape
    hd = C3 // 3 // num_heads
    return qkv.view(B, N, 3, num_heads, hd).permute(2, 0, 3, 1, 4).reshape(3, B * num_heads, N, hd)


def _merge_heads(x: torch.Tensor, B: int, num_heads: int) -> torch.Tensor:
    """(B*h, N, hd) -> (B, N, h*hd)."""
    _, N, hd = x.shape
    return x.view(B, num_heads, N, hd).transpose(1, 2).reshape(B, N, num_heads * hd)


def attention(
    qkv: torch.Tensor, num_heads: int, scale: float, dropout_p: float, *, lean: bool
) -> torch.Tensor:
    """softmax(q k^T * scale) v from fused qkv (B, N, 3*C) -> (B, N, C), before the output projection.

    ``lean``: on the explicit path, keep only q, k, v for backward (when nothing drops out).
    """
    B, N, C3 = qkv.shape
    if not explicit_attention(N, qkv.device):
        q, k, v = qkv.view(B, N, 3, num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # each (B, h, N, hd)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)  # (B, h, N, hd)
        return x.transpose(1, 2).reshape(B, N, C3 // 3)  # (B, N, C)
    tiles = _head_tiles(qkv, num_heads)  # (3, B*h, N, hd)
    if lean and dropout_p == 0.0 and torch.is_grad_enabled():
        return _merge_heads(TileAttention.apply(tiles, scale), B, num_heads)
    q, k, v = tiles.unbind(0)
    attn = _scores_t_softmax(q, k, scale).transpose(1, 2)  # (B*h, Nq, Nk)
    if dropout_p > 0.0:  # on the (B*h, Nq, Nk) layout, so the mask is drawn in timm's order
        attn = F.dropout(attn.contiguous(), dropout_p)
    return _merge_heads(torch.bmm(attn, v), B, num_heads)


def attention_weights(
    qkv: torch.Tensor, num_heads: int, scale: float, dropout_p: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`attention` as an explicit softmax, returning the weights too: (B, N, C) and (B, h, N, N)."""
    B, N, _ = qkv.shape
    q, k, v = _head_tiles(qkv, num_heads).unbind(0)  # each (B*h, N, hd)
    if N <= SMALL_ATTN_TOKENS:
        attn = _scores_t_softmax(q, k, scale).transpose(1, 2)  # (B*h, Nq, Nk)
    else:
        attn = torch.baddbmm(q.new_zeros(()), q, k.transpose(1, 2), beta=0.0, alpha=scale).softmax(dim=-1)
    weights = attn.detach().reshape(B, num_heads, N, N)  # (B, h, queries, keys)
    if dropout_p > 0.0:
        attn = F.dropout(attn.contiguous(), dropout_p)
    return _merge_heads(torch.bmm(attn, v), B, num_heads), weights


class MlpFunction(torch.autograd.Function):
    """``fc2(gelu(fc1(x)))`` that keeps x and fc1(x) for backward and recomputes the GELU (autograd would
    keep its output too), or with ``recompute_fc1`` only x, recomputing fc1 as well: worth it where fc1 is
    a cheap GEMM with a wide output (TNT's inner MLP). Backward recomputes in the precision forward ran in
    (autocast included); gradients come back in each input's dtype."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, recompute_fc1: bool):
        h = F.linear(x, w1, b1)  # (..., hidden)
        ctx.recompute_fc1, ctx.dt = recompute_fc1, h.dtype
        if recompute_fc1:
            ctx.save_for_backward(x, w1, b1, w2, b2, None)
            g = torch.ops.aten.gelu_(h)  # h is not kept: activate in place
        else:
            ctx.save_for_backward(x, w1, b1, w2, b2, h)
            g = F.gelu(h)
        return F.linear(g, w2, b2)

    @staticmethod
    def backward(ctx, grad_out):
        dt = ctx.dt
        x, w1, b1, w2, b2, h = ctx.saved_tensors
        x2 = x.reshape(-1, x.shape[-1]).to(dt)  # (rows, in)
        # (rows, hidden): recomputed, or the kept fc1 output
        h = F.linear(x2, w1.to(dt), b1.to(dt)) if ctx.recompute_fc1 else h.reshape(-1, h.shape[-1])
        g = F.gelu(h)
        dout = grad_out.reshape(-1, grad_out.shape[-1]).to(dt)  # (rows, out)
        grad_w2 = (dout.t() @ g).to(w2.dtype)
        grad_b2 = dout.sum(0).to(b2.dtype)
        grad_h = torch.ops.aten.gelu_backward(dout @ w2.to(dt), h)  # (rows, hidden)
        grad_w1 = (grad_h.t() @ x2).to(w1.dtype)
        grad_b1 = grad_h.sum(0).to(b1.dtype)
        grad_x = (grad_h @ w1.to(dt)).view(x.shape).to(x.dtype)
        return grad_x, grad_w1, grad_b1, grad_w2, grad_b2, None


def mlp(
    x: torch.Tensor, fc1: nn.Linear, fc2: nn.Linear, drop: nn.Module, *, recompute_fc1: bool, lean: bool
) -> torch.Tensor:
    """``drop(fc2(drop(gelu(fc1(x)))))`` from the Linears' weights (the caller checked they are plain):
    the GELU in place when nothing records gradients, :class:`MlpFunction` when ``lean`` and nothing drops
    out, else the plain chain."""
    if not torch.is_grad_enabled():  # nothing else sees fc1's output: activate it in place
        return drop(fc2(drop(torch.ops.aten.gelu_(fc1(x)))))
    if lean and (not drop.training or not isinstance(drop, nn.Dropout) or drop.p == 0.0):
        return MlpFunction.apply(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, recompute_fc1)
    return drop(fc2(drop(F.gelu(fc1(x)))))
