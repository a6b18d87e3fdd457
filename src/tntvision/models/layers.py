"""Building blocks shared by the TNT model family: attention, MLP, drop path, SE gate, position tables."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from ..kernels.lean import attention, attention_weights, mlp
from ..kernels.rules import DROPOUT, cached_verdict, exactly
from .merging import proportional_attention, size_bias

__all__ = [
    "Attention",
    "DropPath",
    "Mlp",
    "SqueezeExcite",
    "check_images",
    "drop_path_scale",
    "dropout_p",
    "fx_leaf",
    "init_linear_and_norm",
    "new_head",
    "resample_pos_embed",
]


class Attention(nn.Module):
    """Multi-head self-attention with TNT's parameter layout: ``qk`` (dim -> 2*dim, q first) and ``v``, as in
    the authors' code and timm, run as one qkv GEMM.

    It attends as :func:`tntvision.kernels.lean.attention` does (the exact kernel for the sequence length,
    lean in memory when ``lean_backward``); with ``keep_attn`` set (see
    :func:`tntvision.models.tnt.record_attention`) through an explicit softmax, keeping the weights in
    ``last_attn`` (B, heads, N, N).
    """

    # What each submodule must be for the fused op (and the one-GEMM qkv) to read its weights.
    SLOTS = {"qk": nn.Linear, "v": nn.Linear, "proj": nn.Linear, "proj_drop": DROPOUT}

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
        self.lean_backward = True  # keep only q, k, v for backward on the short-sequence path

    def qkv_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The fused (3*dim, dim) qkv weight and bias: ``cat([qk, v])``, q rows first."""
        weight = torch.cat([self.qk.weight, self.v.weight], dim=0)
        bias = None if self.qk.bias is None else torch.cat([self.qk.bias, self.v.bias], dim=0)
        return weight, bias

    def qkv(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, 3*C): one GEMM over the concatenated weights when ``qk`` and ``v`` are plain Linears;
        otherwise (an adapter, a quantized Linear, a hook) the modules themselves are called."""
        plain = cached_verdict(self, "qkv", (self.qk, self.v), (), self._plain_qkv)
        return F.linear(x, *self.qkv_weight()) if plain else torch.cat([self.qk(x), self.v(x)], dim=-1)

    def _plain_qkv(self) -> bool:
        return exactly(self.qk, nn.Linear) and exactly(self.v, nn.Linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x)  # (B, N, 3*C)
        p = self.attn_drop if self.training else 0.0
        if self.keep_attn:
            x, self.last_attn = attention_weights(qkv, self.num_heads, self.scale, p)
        else:
            x = attention(qkv, self.num_heads, self.scale, p, lean=self.lean_backward)  # (B, N, C)
        return self.proj_drop(self.proj(x))

    def forward_sized(self, x: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Proportional attention for merged tokens (token merging): ``log(size)`` added to every key's
        scores. ``x`` (B, N, C), ``size`` (B, N, 1). Returns the output (B, N, C) and the keys averaged over
        heads (B, N, hd), the merge's similarity metric."""
        B, N, C = x.shape
        h, hd = self.num_heads, self.head_dim
        q, k, v = self.qkv(x).view(B, N, 3, h, hd).permute(2, 0, 3, 1, 4).unbind(0)  # each (B, h, N, hd)
        p = self.attn_drop if self.training else 0.0
        if self.keep_attn:
            attn = (q @ k.transpose(-2, -1) * self.scale + size_bias(size, q.dtype)).softmax(dim=-1)
            self.last_attn = attn.detach()  # (B, h, N, N)
            y = F.dropout(attn, p) @ v  # (B, h, N, hd)
        else:
            y = proportional_attention(q, k, v, size, dropout_p=p)  # (B, h, N, hd)
        y = y.transpose(1, 2).reshape(B, N, C)  # (B, N, C)
        return self.proj_drop(self.proj(y)), k.mean(dim=1)


class Mlp(nn.Module):
    """Linear -> exact (erf) GELU -> dropout -> Linear -> dropout.

    When it holds exactly these modules, :func:`tntvision.kernels.lean.mlp` computes it from their weights
    (the GELU in place without autograd, less kept for backward with it; ``recompute_fc1`` recomputes fc1
    too); otherwise (an adapter, a hook, another activation) the modules are called.
    """

    # What each submodule must be for the shortcuts (and the fused op) to compute the MLP from its weights.
    SLOTS = {"fc1": nn.Linear, "act": nn.GELU, "fc2": nn.Linear, "drop": DROPOUT}

    def __init__(self, dim: int, *, hidden_dim: int, drop: float = 0.0, recompute_fc1: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)
        self.recompute_fc1 = recompute_fc1
        self.lean_backward = True

    def is_plain(self) -> bool:
        """Whether this is exactly the module the shortcuts compute (fc1, the exact GELU, fc2, dropout,
        with no hook or parametrization anywhere): then they may read its weights instead of calling it."""
        modules = (self, *self._modules.values())
        extra = (getattr(self._modules.get("act"), "approximate", None),)
        return cached_verdict(self, "plain", modules, extra, lambda: exactly(self, Mlp, self.SLOTS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_plain():
            return mlp(
                x, self.fc1, self.fc2, self.drop, recompute_fc1=self.recompute_fc1, lean=self.lean_backward
            )
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def dropout_p(module: nn.Module) -> float:
    """The drop probability of a dropout slot (``nn.Dropout``; 0 for the ``nn.Identity`` that may stand
    in its place)."""
    return module.p if isinstance(module, nn.Dropout) else 0.0


def drop_path_scale(
    n: int, p: float, *, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Per-sample stochastic-depth scales (n,): 0 with probability ``p``, else ``1 / (1 - p)``.

    The one place that draws drop-path randomness, so the fused inner transformer (which takes the
    scales as input) consumes the random stream exactly as :func:`drop_path` does.
    """
    keep = 1.0 - p
    return torch.empty(n, dtype=dtype, device=device).bernoulli_(keep).div_(keep)


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero the residual branch of whole samples (dim 0) with probability ``p``."""
    if p == 0.0 or not training:
        return x
    scale = drop_path_scale(x.shape[0], p, dtype=x.dtype, device=x.device)
    return x * scale.view((x.shape[0],) + (1,) * (x.ndim - 1))  # (B, 1, ..., 1)


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


# ------------------------------------------------------------------------ shared by the model families


def init_linear_and_norm(model: nn.Module) -> None:
    """The authors' init for every Linear (trunc-normal .02, zero bias) and LayerNorm (ones, zeros)."""
    for mod in model.modules():
        if isinstance(mod, nn.Linear):
            nn.init.trunc_normal_(mod.weight, std=0.02)
            if mod.bias is not None:
                nn.init.zeros_(mod.bias)
        elif isinstance(mod, nn.LayerNorm):
            nn.init.ones_(mod.weight)
            nn.init.zeros_(mod.bias)


def new_head(num_features: int, num_classes: int, *, like: torch.Tensor, training: bool) -> nn.Module:
    """A fresh classifier (trunc-normal .02 weight, zero bias; ``Identity`` for 0 classes) on ``like``'s
    device and dtype, in the given mode: what ``reset_classifier`` puts in place of the old head."""
    head = nn.Linear(num_features, num_classes) if num_classes > 0 else nn.Identity()
    if num_classes > 0:
        nn.init.trunc_normal_(head.weight, std=0.02)
        nn.init.zeros_(head.bias)
    return head.to(device=like.device, dtype=like.dtype).train(training)


def check_images(x: torch.Tensor, in_chans: int, multiple: int, what: str) -> tuple[int, int]:
    """(H, W) of a batch of images (B, C, H, W) with ``in_chans`` channels and sides multiples of
    ``multiple`` (``what`` names it in the message); anything else raises :class:`InputError`."""
    if x.ndim != 4:
        raise InputError(f"expected images (B, C, H, W), got shape {tuple(x.shape)}")
    _, C, H, W = x.shape
    if in_chans != C:
        raise InputError(f"model takes {in_chans} input channels, got {C} (shape {tuple(x.shape)})")
    if H % multiple or W % multiple:
        raise InputError(f"image size {H}x{W} is not a multiple of {what}")
    if H == 0 or W == 0:
        raise InputError(f"image size {H}x{W} is empty")
    return H, W


def fx_leaf(module: nn.Module, *args: torch.Tensor) -> torch.Tensor:
    """``module(*args)``. Model files mark it with ``torch.fx.wrap``, so a symbolic trace records the call as
    one node instead of tracing into the module: for :class:`Attention` and :class:`Mlp`, whose forward
    picks its kernels from token counts and grad mode, which a trace cannot see (see docs/timm.md)."""
    return module(*args)
