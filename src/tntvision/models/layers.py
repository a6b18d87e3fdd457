"""Building blocks shared by the TNT model family: attention, MLP, drop path, SE gate, position tables."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Attention", "DropPath", "Mlp", "SqueezeExcite", "resample_pos_embed"]


class Attention(nn.Module):
    """Multi-head self-attention with TNT's parameter layout.

    The authors' code (and timm) keep two projections, ``qk`` (dim -> 2*dim, q first) and ``v``; we keep
    those parameter names so every checkpoint loads unchanged, and run them as one fused qkv matmul.
    Attention itself is ``F.scaled_dot_product_attention``.

    When ``keep_attn`` is set (see :func:`tntvision.models.tnt.record_attention`), the softmax weights are
    computed explicitly and kept in ``last_attn`` as (B, heads, N, N) for visualisation.
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int,
        qkv_bias: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qk = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.keep_attn = False
        self.last_attn: torch.Tensor | None = None

    def qkv_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The fused (3*dim, dim) qkv weight and bias: ``cat([qk, v])``, q rows first."""
        weight = torch.cat([self.qk.weight, self.v.weight], dim=0)
        bias = None if self.qk.bias is None else torch.cat([self.qk.bias, self.v.bias], dim=0)
        return weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = F.linear(x, *self.qkv_weight())  # (B, N, 3*C)
        qkv = qkv.view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, h, N, hd)
        q, k, v = qkv.unbind(0)  # each (B, h, N, hd)
        p = self.attn_drop if self.training else 0.0
        if self.keep_attn:
            attn = (q * self.scale) @ k.transpose(-2, -1)  # (B, h, N, N)
            attn = attn.softmax(dim=-1)
            self.last_attn = attn.detach()
            x = F.dropout(attn, p) @ v  # (B, h, N, hd)
        else:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=p)  # (B, h, N, hd)
        x = x.transpose(1, 2).reshape(B, N, C)  # (B, N, C)
        return self.proj_drop(self.proj(x))


class Mlp(nn.Module):
    """Linear -> exact (erf) GELU -> dropout -> Linear -> dropout."""

    def __init__(self, dim: int, *, hidden_dim: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero the residual branch of whole samples (dim 0) with probability ``p``."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)  # (B, 1, ..., 1)
    return x * mask.div_(keep)


class DropPath(nn.Module):
    """Module form of :func:`drop_path`. For TNT's words a sample is one (image, patch) pair."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop path rate must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class SqueezeExcite(nn.Module):
    """The paper's SE gate on the outer MLP output: ``x * tanh(MLP(LN(mean over tokens of x)))``.

    Keys follow the authors' code (``fc.0`` LayerNorm, ``fc.1`` / ``fc.3`` Linear) so their SE weights load.
    The block uses it as ``h + SE(h)``.
    """

    def __init__(self, dim: int, *, hidden_ratio: float = 0.25) -> None:
        super().__init__()
        hidden = int(dim * hidden_ratio)
        self.fc = nn.Sequential(
            nn.LayerNorm(dim),
            nn.Linear(dim, hidden),
            nn.ReLU(),
            nn.Linear(hidden, dim),
            nn.Tanh(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.fc(x.mean(dim=1, keepdim=True))  # (B, 1, C)
        return x * gate


def resample_pos_embed(
    pos: torch.Tensor,
    new_grid: tuple[int, int],
    *,
    old_grid: tuple[int, int] | None = None,
    num_prefix: int = 1,
) -> torch.Tensor:
    """Resample a (1, prefix + gh*gw, D) position table to another patch grid (bicubic, antialiased).

    The prefix rows (the class token's position) are kept as they are. ``old_grid`` defaults to the
    square grid that fits the table.
    """
    n_grid = pos.shape[1] - num_prefix
    if old_grid is None:
        side = math.isqrt(n_grid)
        if side * side != n_grid:
            raise ValueError(f"position table has {n_grid} grid rows, not a square; give old_grid")
        old_grid = (side, side)
    if old_grid[0] * old_grid[1] != n_grid:
        raise ValueError(f"position table has {n_grid} grid rows, which does not match grid {old_grid}")
    if tuple(old_grid) == tuple(new_grid):
        return pos
    prefix, grid = pos[:, :num_prefix], pos[:, num_prefix:]
    D = grid.shape[-1]
    grid = grid.reshape(1, old_grid[0], old_grid[1], D).permute(0, 3, 1, 2)  # (1, D, gh, gw)
    grid = F.interpolate(grid.float(), size=new_grid, mode="bicubic", antialias=True, align_corners=False)
    grid = grid.to(pos.dtype).permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], D)  # (1, gh*gw, D)
    return torch.cat([prefix, grid], dim=1)
