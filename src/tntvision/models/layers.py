"""Building blocks shared by the TNT model family: attention, MLP, drop path, SE gate, position tables."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from .kernels import DROPOUT, exactly
from .merging import proportional_attention, size_bias

__all__ = [
    "Attention",
    "DropPath",
    "Mlp",
    "SqueezeExcite",
    "check_images",
    "drop_path_scale",
    "dropout_p",
    "explicit_attention",
    "fx_leaf",
    "init_linear_and_norm",
    "new_head",
    "resample_pos_embed",
]


# On the CPU, attention over at most this many tokens runs as explicit batched matmuls with a transposed
# softmax (TNT's inner attention on the reference path: 16 words, head dim 6). PyTorch's fused CPU kernel is
# built for long sequences and loses to two small bmm calls there; from 65 tokens on (the outer 197) it runs
# in every dtype: in bf16 it is 2-3x faster than the explicit path on CPUs with AMX and on par without.
SMALL_ATTN_TOKENS = 64


def explicit_attention(tokens: int, device: torch.device) -> bool:
    """Whether attention over ``tokens`` runs as :meth:`Attention.explicit` (static facts only): short
    sequences on the CPU. On a GPU every length goes to ``F.scaled_dot_product_attention``, which picks a
    fused kernel where one fits (the transposed softmax and the per-tile recompute are CPU choices)."""
    return tokens <= SMALL_ATTN_TOKENS and device.type == "cpu"


def _small_attn_t(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Transposed attention weights (B*h, keys, queries) from q, k (B*h, N, hd); softmax in fp32."""
    scores_t = torch.baddbmm(q.new_zeros(()), k, q.transpose(1, 2), beta=0.0, alpha=scale)  # (B*h, Nk, Nq)
    return scores_t.softmax(dim=1, dtype=torch.float32).to(q.dtype)


class _TileAttention(torch.autograd.Function):
    """softmax(q k^T * scale) v over per-head tiles (3, B*h, N, hd) -> (B*h, N, hd), lean in memory.

    Autograd would keep the (B*h, N, N) attention weights, 2.7x the size of q, k and v for TNT's 16-word
    tiles of head dim 6; this keeps only the tiles and recomputes the weights (two small ops) in backward.
    """

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, scale: float) -> torch.Tensor:
        q, k, v = qkv.unbind(0)
        ctx.save_for_backward(qkv)
        ctx.scale = scale
        return torch.bmm(_small_attn_t(q, k, scale).transpose(1, 2), v)  # (B*h, Nq, hd)

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


class Attention(nn.Module):
    """Multi-head self-attention with TNT's parameter layout.

    The authors' code (and timm) keep two projections, ``qk`` (dim -> 2*dim, q first) and ``v``; we keep
    those parameter names so every checkpoint loads unchanged, and run them as one fused qkv matmul.

    Two exact ways to attend, picked from static facts only (token count; never values):
    ``F.scaled_dot_product_attention`` for long sequences (the outer transformer), and :meth:`explicit`
    (two bmm calls, softmax over the key axis of transposed scores) for short ones (the inner transformer
    on the reference path, the outer one at small inputs). Both compute softmax(q k^T * scale) v.

    With ``lean_backward`` (the default) the short-sequence path saves only qkv for backward and
    recomputes the attention weights there; off, autograd keeps them (faster for small models whose
    memory does not matter). When ``keep_attn`` is set (see :func:`tntvision.models.tnt.record_attention`),
    the explicit path runs and the softmax weights are kept in ``last_attn`` as (B, heads, N, N) for
    visualisation.
    """

    # What each submodule must be for the fused op to compute the attention from its weights.
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
        self.lean_backward = True  # short sequences: keep only qkv for backward (see _TileAttention)

    def qkv_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The fused (3*dim, dim) qkv weight and bias: ``cat([qk, v])``, q rows first."""
        weight = torch.cat([self.qk.weight, self.v.weight], dim=0)
        bias = None if self.qk.bias is None else torch.cat([self.qk.bias, self.v.bias], dim=0)
        return weight, bias

    def explicit(self, qkv: torch.Tensor, dropout_p: float) -> torch.Tensor:
        """Attention from fused qkv (B, N, 3*C) as two bmm calls; returns (B, N, C) before ``proj``.

        For short sequences the scores are formed transposed, (B*h, keys, queries), and the softmax over
        keys reduces along dim 1 in fp32, vectorised across queries: for TNT's rows of 16 words that is
        ~3x faster than a softmax along rows of 16. Long sequences use the usual layout and a softmax in
        the input precision, as timm does.
        """
        B, N, C3 = qkv.shape
        h, hd = self.num_heads, self.head_dim
        # one copy puts every head's q, k, v in its own contiguous (N, hd) tile
        qkv = qkv.view(B, N, 3, h, hd).permute(2, 0, 3, 1, 4).reshape(3, B * h, N, hd)  # (3, B*h, N, hd)
        q, k, v = qkv.unbind(0)  # each (B*h, N, hd)
        lean = self.lean_backward and dropout_p == 0.0 and not self.keep_attn
        if N <= SMALL_ATTN_TOKENS and torch.is_grad_enabled() and lean:
            x = _TileAttention.apply(qkv, self.scale)  # same numbers, keeps only qkv for backward
        else:
            if N <= SMALL_ATTN_TOKENS:
                attn = _small_attn_t(q, k, self.scale).transpose(1, 2)  # (B*h, Nq, Nk)
            else:
                zero = qkv.new_zeros(())
                attn = torch.baddbmm(zero, q, k.transpose(1, 2), beta=0.0, alpha=self.scale).softmax(dim=-1)
            if self.keep_attn:
                self.last_attn = attn.detach().reshape(B, h, N, N)  # (B, h, queries, keys)
            if dropout_p > 0.0:  # on the (B*h, Nq, Nk) layout, so the mask is drawn in timm's order
                attn = F.dropout(attn.contiguous(), dropout_p)
            x = torch.bmm(attn, v)  # (B*h, N, hd)
        return x.view(B, h, N, hd).transpose(1, 2).reshape(B, N, C3 // 3)  # (B, N, C)

    def qkv(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, 3*C): one GEMM over the concatenated weights when ``qk`` and ``v`` are plain Linears;
        otherwise (an adapter, a quantized Linear, a hook) the modules themselves are called."""
        if exactly(self.qk, nn.Linear) and exactly(self.v, nn.Linear):
            return F.linear(x, *self.qkv_weight())
        return torch.cat([self.qk(x), self.v(x)], dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x)  # (B, N, 3*C)
        p = self.attn_drop if self.training else 0.0
        if self.keep_attn or explicit_attention(N, x.device):
            x = self.explicit(qkv, p)
        else:
            qkv = qkv.view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, h, N, hd)
            q, k, v = qkv.unbind(0)  # each (B, h, N, hd)
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=p)  # (B, h, N, hd)
            x = x.transpose(1, 2).reshape(B, N, C)  # (B, N, C)
        return self.proj_drop(self.proj(x))

    def forward_sized(self, x: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Proportional attention for merged tokens: ``log(size)`` added to every key's scores.

        ``x`` (B, N, C), ``size`` (B, N, 1) how many original tokens each one stands for. Returns the
        output (B, N, C) and the keys averaged over heads (B, N, hd), token merging's similarity metric.
        """
        B, N, C = x.shape
        h, hd = self.num_heads, self.head_dim
        qkv = self.qkv(x).view(B, N, 3, h, hd).permute(2, 0, 3, 1, 4)  # (3, B, h, N, hd)
        q, k, v = qkv.unbind(0)  # each (B, h, N, hd)
        p = self.attn_drop if self.training else 0.0
        if self.keep_attn:
            attn = (q @ k.transpose(-2, -1) * self.scale + size_bias(size, q.dtype)).softmax(dim=-1)
            self.last_attn = attn.detach()  # (B, h, N, N)
            y = F.dropout(attn, p) @ v  # (B, h, N, hd)
        else:
            y = proportional_attention(q, k, v, size, dropout_p=p)  # (B, h, N, hd)
        y = y.transpose(1, 2).reshape(B, N, C)  # (B, N, C)
        return self.proj_drop(self.proj(y)), k.mean(dim=1)


class _MlpFunction(torch.autograd.Function):
    """``fc2(gelu(fc1(x)))`` that keeps less for backward than autograd would.

    Autograd keeps x, fc1(x) and gelu(fc1(x)). This keeps x and fc1(x) and recomputes the GELU
    (one elementwise pass), or, with ``recompute_fc1``, only x and recomputes fc1 too: worth it where fc1
    is a cheap skinny GEMM with a wide output (TNT's inner MLP: 24 -> 96 per word). Works under autocast:
    backward recomputes in the precision forward ran in; gradients come back in each input's dtype.
    """

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


class Mlp(nn.Module):
    """Linear -> exact (erf) GELU -> dropout -> Linear -> dropout.

    Same numbers three ways: without autograd the GELU runs in place on the fc1 output (one big
    temporary fewer); when autograd records, ``lean_backward`` is on (the default) and there is no hidden
    dropout, :class:`_MlpFunction` keeps less for backward (``recompute_fc1`` picks how much less);
    otherwise the plain module chain.
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
        return exactly(self, Mlp, self.SLOTS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.is_plain():  # an adapter, a hook, another activation, a quantized Linear: call them
            return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))
        if not torch.is_grad_enabled():  # nothing else sees fc1's output: activate it in place
            return self.drop(self.fc2(self.drop(torch.ops.aten.gelu_(self.fc1(x)))))
        if self.lean_backward and (dropout_p(self.drop) == 0.0 or not self.training):
            fc1, fc2 = self.fc1, self.fc2
            return _MlpFunction.apply(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, self.recompute_fc1)
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
