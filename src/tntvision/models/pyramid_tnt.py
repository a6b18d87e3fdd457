"""PyramidTNT, Han et al. 2022 (arXiv:2201.00978): TNT with four stages, as a hierarchical backbone.

A convolutional stem turns the image into sentences of 8x8 pixels (stride 8), each holding 4x4 words. Four
stages follow; between stages a stride-2 convolution merges 2x2 neighbouring sentences into one (outer
tokens) and their 8x8 words into 4x4 (inner tokens), so sentences sit at strides 8, 16, 32 and 64 and every
sentence keeps 16 words. Only the first block of a stage (and the second in stages deeper than six) has an
inner transformer; its LayerNorms span all m*c word values of a sentence, not one word. The outer attention
reduces its keys and values spatially (ratios 4, 2, 1, 1) and adds a learned relative position table per
stage. Classification averages the tokens of the last stage.

Parameter names are the authors' (``tnt_pytorch/pyramid_tnt.py`` in huawei-noah/Efficient-AI-Backbones),
so their checkpoints load unchanged; BatchNorm buffers included.

Any input whose sides are multiples of 8 runs: the absolute sentence table and each stage's relative table
are resampled to the grid at hand (bicubic), and odd grids are padded the way the authors' word merge pads
them. Shapes below: B images, (h, w) a stage's sentence grid, N = h*w, m = 16 words, c / d = inner / outer
width of the stage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import ConfigError, InputError
from .contract import FeatureInfo, TimmContract
from .layers import DropPath, Mlp, check_images, fx_leaf, init_linear_and_norm, new_head, resample_pos_embed
from .pretrained import PretrainedTag, register_pretrained
from .registry import ModelMeta, get_model_entry, model_config, register_model
from .tnt import feature_take_indices

__all__ = ["PyramidTNT", "PyramidTNTConfig", "resample_relative_pos", "stage_grids"]

WORDS_PER_SIDE = 4  # words per sentence side, fixed by the stem (4x4 words of 2x2 pixels each)
STEM_STRIDE = 8  # pixels per sentence side in stage 0

# torch.fx leaves (as in tnt.py): calls a symbolic trace records as one node, since their Python branches
# depend on the input's size, which a trace cannot see. The functions marked @torch.fx.wrap below too.
torch.fx.wrap("resample_pos_embed")
torch.fx.wrap("fx_leaf")


# --------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class PyramidTNTConfig:
    """Architecture of one PyramidTNT variant, the single source of its defaults.

    Per-stage tuples have four entries. ``inner_blocks``: per stage, the 0-based blocks with an inner
    transformer; None gives the authors' rule (block 0, and block 1 in stages of more than six blocks).
    """

    img_size: int = 256
    in_chans: int = 3
    num_classes: int = 1000
    depths: tuple[int, ...] = (2, 8, 4, 2)
    outer_dims: tuple[int, ...] = (128, 256, 512, 512)
    inner_dims: tuple[int, ...] = (8, 16, 32, 32)
    outer_heads: tuple[int, ...] = (4, 8, 16, 16)
    inner_heads: tuple[int, ...] = (2, 4, 8, 8)
    sr_ratios: tuple[int, ...] = (4, 2, 1, 1)
    mlp_ratio: float = 4.0
    qkv_bias: bool = False
    inner_blocks: tuple[tuple[int, ...], ...] | None = None
    drop_rate: float = 0.0  # dropout before the head (not in the authors' model; 0 keeps it exact)
    pos_drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0

    def __post_init__(self) -> None:  # JSON gives lists: store tuples so configs compare and hash
        for name in ("depths", "outer_dims", "inner_dims", "outer_heads", "inner_heads", "sr_ratios"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        if self.inner_blocks is not None:
            blocks = tuple(tuple(sorted({int(i) for i in stage})) for stage in self.inner_blocks)
            object.__setattr__(self, "inner_blocks", blocks)

    def replace(self, **changes: Any) -> PyramidTNTConfig:
        return PyramidTNTConfig(**{**asdict(self), **changes}) if changes else self

    def inner_block_indices(self) -> tuple[tuple[int, ...], ...]:
        """Per stage, the blocks with an inner transformer."""
        if self.inner_blocks is not None:
            return self.inner_blocks
        return tuple((0, 1) if depth > 6 else (0,) for depth in self.depths)

    def validate(self) -> None:
        """Raise :class:`ConfigError` for a config that cannot build a model."""

        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        per_stage = ("depths", "outer_dims", "inner_dims", "outer_heads", "inner_heads", "sr_ratios")
        for name in per_stage:
            need(
                len(getattr(self, name)) == 4,
                f"{name} needs one entry per stage (4), got {getattr(self, name)}",
            )
        need(self.img_size > 0 and self.img_size % STEM_STRIDE == 0, "img_size must be a multiple of 8")
        need(self.in_chans > 0, f"in_chans must be positive, got {self.in_chans}")
        need(self.num_classes >= 0, f"num_classes must be >= 0, got {self.num_classes}")
        for i in range(4):
            need(self.depths[i] > 0, f"stage {i} needs at least one block")
            need(
                self.outer_dims[i] % self.outer_heads[i] == 0, f"stage {i}: outer_dims not divisible by heads"
            )
            need(
                self.inner_dims[i] % self.inner_heads[i] == 0, f"stage {i}: inner_dims not divisible by heads"
            )
            need(self.sr_ratios[i] >= 1, f"stage {i}: sr_ratios must be >= 1")
        if self.inner_blocks is not None:
            need(len(self.inner_blocks) == 4, "inner_blocks needs one tuple per stage (4)")
            for i, blocks in enumerate(self.inner_blocks):
                for j in blocks:
                    need(0 <= j < self.depths[i], f"inner_blocks: stage {i} has no block {j}")
        for name in ("drop_rate", "pos_drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate"):
            rate = getattr(self, name)
            need(0.0 <= rate < 1.0, f"{name} must be in [0, 1), got {rate}")


def stage_grids(height: int, width: int) -> list[tuple[int, int]]:
    """Sentence grid of each stage for an input of ``height`` x ``width`` pixels (multiples of 8)."""
    grids = [(height // STEM_STRIDE, width // STEM_STRIDE)]
    for _ in range(3):
        h, w = grids[-1]
        grids.append(((h + 1) // 2, (w + 1) // 2))  # stride-2 conv with padding 1: ceil
    return grids


@torch.fx.wrap
def resample_relative_pos(
    table: torch.Tensor,
    grid: tuple[int, int],
    kv_grid: tuple[int, int],
    *,
    old_grid: tuple[int, int],
    old_kv_grid: tuple[int, int],
) -> torch.Tensor:
    """A stage's relative table (1, heads, N, Nk) for another query grid and key/value grid.

    The table holds, per head, a bias for every (query sentence, reduced key sentence) pair, i.e. a 4-D map
    over two grids; it is resampled bicubically over the query grid, then over the key grid.
    """
    if tuple(grid) == tuple(old_grid) and tuple(kv_grid) == tuple(old_kv_grid):
        return table
    heads = table.shape[1]
    (qh, qw), (kh, kw) = old_grid, old_kv_grid
    if table.shape[2:] != (qh * qw, kh * kw):
        raise ValueError(
            f"relative table of shape {tuple(table.shape)} does not fit grids {old_grid}, {old_kv_grid}"
        )
    t = table.float().reshape(heads, qh, qw, kh * kw).permute(0, 3, 1, 2)  # (heads, Nk, qh, qw)
    if (qh, qw) != tuple(grid):
        t = F.interpolate(t, size=tuple(grid), mode="bicubic", align_corners=False)
    n_q = grid[0] * grid[1]
    t = t.reshape(heads, kh, kw, n_q).permute(0, 3, 1, 2)  # (heads, N, kh, kw)
    if (kh, kw) != tuple(kv_grid):
        t = F.interpolate(t, size=tuple(kv_grid), mode="bicubic", align_corners=False)
    return t.reshape(1, heads, n_q, kv_grid[0] * kv_grid[1]).to(table.dtype)  # (1, heads, N, Nk)


def kv_grid(grid: tuple[int, int], sr_ratio: int) -> tuple[int, int]:
    """The key/value grid after average pooling by ``sr_ratio`` (floor, as ``AvgPool2d``)."""
    return (grid[0] // sr_ratio, grid[1] // sr_ratio) if sr_ratio > 1 else (grid[0], grid[1])


# --------------------------------------------------------------------------------------------- layers


@torch.fx.wrap
def checked_stage_grids(x: torch.Tensor, in_chans: int, sr_ratios: Sequence[int]) -> list[tuple[int, int]]:
    """Every stage's sentence grid for images ``x``; raises :class:`InputError` for what the model can't
    take (sides not multiples of 8, or too small for the spatial reductions)."""
    H, W = check_images(x, in_chans, STEM_STRIDE, str(STEM_STRIDE))
    grids = stage_grids(H, W)
    for sr, (h, w) in zip(sr_ratios, grids, strict=True):
        if min(h, w) < sr:
            raise InputError(f"image size {H}x{W} is too small: its stage grids are {grids}")
    return grids


def min_image_side(sr_ratios: Sequence[int]) -> int:
    """The smallest multiple of 8 pixels whose stage grids are as large as each stage's reduction."""
    side = STEM_STRIDE
    while any(min(grid) < sr for sr, grid in zip(sr_ratios, stage_grids(side, side), strict=True)):
        side += STEM_STRIDE
    return side


@torch.fx.wrap
def _pad_to_even_grid(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Word image (B, 4h, 4w, c) of a grid of h x w sentences -> zero-padded at the bottom / right to an
    even number of sentences per side (returned as it is when both are even)."""
    ph, pw = grid[0] % 2, grid[1] % 2
    if ph or pw:
        s = WORDS_PER_SIDE
        x = F.pad(x, (0, 0, 0, pw * s, 0, ph * s))  # (B, 4h', 4w', c) with h', w' even
    return x


def _conv_bn_relu(cin: int, cout: int, *, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]


class Stem(nn.Module):
    """Image -> words (B*N, 16, c) and sentences (B, N, d) at stride 8 (the authors' ``patch_embed``).

    A shared conv (stride 2) feeds two branches: one conv gives the words (a 2x2-pixel word per output
    position, cut into 4x4 words per sentence), three convs (strides 2, 2, 1) give the sentences.
    """

    def __init__(self, *, in_chans: int, inner_dim: int, outer_dim: int) -> None:
        super().__init__()
        c = inner_dim
        self.common_conv = nn.Sequential(*_conv_bn_relu(in_chans, 2 * c, stride=2))
        self.inner_convs = nn.Sequential(*_conv_bn_relu(2 * c, c, stride=1))
        self.outer_convs = nn.Sequential(
            *_conv_bn_relu(2 * c, 4 * c, stride=2),
            *_conv_bn_relu(4 * c, 8 * c, stride=2),
            *_conv_bn_relu(8 * c, outer_dim, stride=1),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, _, H, W = x.shape
        h, w, s = H // STEM_STRIDE, W // STEM_STRIDE, WORDS_PER_SIDE
        x = self.common_conv(x)  # (B, 2c, H/2, W/2)
        words = self.inner_convs(x)  # (B, c, 4h, 4w)
        c = words.shape[1]
        words = words.view(B, c, h, s, w, s).permute(0, 2, 4, 3, 5, 1)  # (B, h, w, 4, 4, c)
        words = words.reshape(B * h * w, s * s, c)  # (B*N, 16, c), words row-major in a sentence
        sentences = self.outer_convs(x)  # (B, d, h, w)
        return words, sentences.flatten(2).transpose(1, 2)  # (B, N, d)


class SRAttention(nn.Module):
    """Multi-head attention with the authors' ``q`` / ``kv`` projections and optional spatial reduction.

    With ``sr_ratio > 1`` keys and values come from the token grid average-pooled by ``sr_ratio``, then a
    linear map and a LayerNorm. An additive bias (the stage's relative table) can be added to the scores.
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int,
        qkv_bias: bool,
        attn_drop: float,
        proj_drop: float,
        sr_ratio: int = 1,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.linear = nn.Linear(dim, dim)
            self.norm = nn.LayerNorm(dim)

    def forward(
        self, x: torch.Tensor, grid: tuple[int, int] | None = None, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        B, N, C = x.shape
        h, hd = self.num_heads, self.head_dim
        q = self.q(x).view(B, N, h, hd).transpose(1, 2)  # (B, h, N, hd)
        src = x
        if self.sr_ratio > 1:
            gh, gw = grid
            src = x.transpose(1, 2).reshape(B, C, gh, gw)  # (B, C, gh, gw)
            src = F.avg_pool2d(src, self.sr_ratio).flatten(2).transpose(1, 2)  # (B, Nk, C)
            src = self.norm(self.linear(src))
        kv = self.kv(src).view(B, -1, 2, h, hd).permute(2, 0, 3, 1, 4)  # (2, B, h, Nk, hd)
        k, v = kv.unbind(0)
        if bias is not None:
            bias = bias.to(q.dtype)
        p = self.attn_drop if self.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p)  # (B, h, N, hd)
        x = x.transpose(1, 2).reshape(B, N, C)  # (B, N, C)
        return self.proj_drop(self.proj(x))


class PyramidBlock(nn.Module):
    """Optional inner transformer over each sentence's words, then the outer transformer over sentences."""

    def __init__(
        self,
        *,
        outer_dim: int,
        inner_dim: int,
        outer_heads: int,
        inner_heads: int,
        mlp_ratio: float,
        qkv_bias: bool,
        proj_drop: float,
        attn_drop: float,
        drop_path: float,
        sr_ratio: int,
    ) -> None:
        super().__init__()
        m = WORDS_PER_SIDE**2
        kw = dict(qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.has_inner = inner_dim > 0
        if self.has_inner:  # LayerNorms over all m*c word values of a sentence
            self.inner_norm1 = nn.LayerNorm(m * inner_dim)
            self.inner_attn = SRAttention(inner_dim, num_heads=inner_heads, **kw)
            self.inner_norm2 = nn.LayerNorm(m * inner_dim)
            self.inner_mlp = Mlp(inner_dim, hidden_dim=int(inner_dim * mlp_ratio), drop=proj_drop)
            self.proj_norm1 = nn.LayerNorm(m * inner_dim)
            self.proj = nn.Linear(m * inner_dim, outer_dim, bias=False)
            self.proj_norm2 = nn.LayerNorm(outer_dim)
        self.outer_norm1 = nn.LayerNorm(outer_dim)
        self.outer_attn = SRAttention(outer_dim, num_heads=outer_heads, sr_ratio=sr_ratio, **kw)
        self.outer_norm2 = nn.LayerNorm(outer_dim)
        self.outer_mlp = Mlp(outer_dim, hidden_dim=int(outer_dim * mlp_ratio), drop=proj_drop)
        self.drop_path = DropPath(drop_path)

    @staticmethod
    def _sentence_norm(norm: nn.LayerNorm, words: torch.Tensor, batch: int) -> torch.Tensor:
        """LayerNorm over all words of a sentence: (B*N, m, c) -> (B*N, m, c)."""
        return norm(words.reshape(batch, -1, norm.normalized_shape[0])).view_as(words)

    def forward(
        self, words: torch.Tensor, sentences: torch.Tensor, grid: tuple[int, int], rel_pos: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # words (B*N, m, c); sentences (B, N, d)
        B = sentences.shape[0]
        if self.has_inner:
            words = words + self.drop_path(self.inner_attn(self._sentence_norm(self.inner_norm1, words, B)))
            h = fx_leaf(self.inner_mlp, self._sentence_norm(self.inner_norm2, words, B))  # (B*N, m, c)
            words = words + self.drop_path(h)
            flat = words.reshape(B, -1, self.proj.in_features)  # (B, N, m*c)
            sentences = sentences + self.proj_norm2(self.proj(self.proj_norm1(flat)))  # no drop path here
        sentences = sentences + self.drop_path(self.outer_attn(self.outer_norm1(sentences), grid, rel_pos))
        return words, sentences + self.drop_path(fx_leaf(self.outer_mlp, self.outer_norm2(sentences)))


class Stage(nn.Module):
    """A stage's blocks and its relative position table (1, heads, N, Nk) for its training-size grid."""

    def __init__(
        self, *, blocks: list[PyramidBlock], heads: int, grid: tuple[int, int], kv: tuple[int, int]
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.grid, self.kv_grid = grid, kv
        self.relative_pos = nn.Parameter(torch.randn(1, heads, grid[0] * grid[1], kv[0] * kv[1]))

    def relative_table(self, grid: tuple[int, int]) -> torch.Tensor:
        """The table for the grid at hand, resampled when it differs from the training grid."""
        sr = self.blocks[0].outer_attn.sr_ratio
        return resample_relative_pos(
            self.relative_pos, grid, kv_grid(grid, sr), old_grid=self.grid, old_kv_grid=self.kv_grid
        )


class SentenceMerge(nn.Module):
    """LayerNorm, then a 3x3 stride-2 conv over the sentence grid: (B, h*w, d) -> (B, h'*w', d')."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim_in)
        self.conv = nn.Sequential(nn.Conv2d(dim_in, dim_out, 3, stride=2, padding=1))

    def forward(self, sentences: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        B, _, d = sentences.shape
        x = self.norm(sentences).transpose(1, 2).reshape(B, d, grid[0], grid[1])  # (B, d, h, w)
        return self.conv(x).flatten(2).transpose(1, 2)  # (B, ceil(h/2)*ceil(w/2), d')


class WordMerge(nn.Module):
    """LayerNorm, then each 2x2 block of sentences' words (8x8) -> 4x4 words by a 3x3 stride-2 conv.

    An odd grid is padded with zero words (after the norm) on the bottom / right, as the authors do.
    """

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim_in)
        self.conv = nn.Sequential(nn.Conv2d(dim_in, dim_out, 3, stride=2, padding=1))

    def forward(self, words: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        h, w = grid
        s = WORDS_PER_SIDE
        c = words.shape[-1]
        x = self.norm(words).view(-1, h, w, s, s, c)  # (B, h, w, 4, 4, c)
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, h * s, w * s, c)  # (B, 4h, 4w, c): the word image
        x = _pad_to_even_grid(x, grid)  # (B, 4h', 4w', c) with h', w' even
        H2, W2 = (h + 1) // 2, (w + 1) // 2  # h' / 2, w' / 2
        x = x.view(-1, H2, 2 * s, W2, 2 * s, c).permute(0, 1, 3, 5, 2, 4)  # (B, h'/2, w'/2, c, 8, 8)
        x = self.conv(x.reshape(-1, c, 2 * s, 2 * s))  # (B*N', c', 4, 4)
        return x.flatten(2).transpose(1, 2)  # (B*N', 16, c')


# ---------------------------------------------------------------------------------------------- model


class PyramidTNT(TimmContract, nn.Module):
    """PyramidTNT with timm's backbone contract; ``forward_features`` gives the last stage's tokens."""

    first_conv = "patch_embed.common_conv.0"
    paper_ids = "arXiv:2201.00978"

    def __init__(self, cfg: PyramidTNTConfig | None = None, /, **overrides: Any) -> None:
        super().__init__()
        self.cfg = cfg = model_config(PyramidTNTConfig, cfg, overrides)
        self.model_name: str | None = None
        self.meta: ModelMeta | None = None
        self.class_names: list[str] | None = None
        self.pretrained_tag = None  # the PretrainedTag create_model resolved (tntvision.models.pretrained)
        self.load_report = None

        self.num_classes = cfg.num_classes
        self.num_features = self.head_hidden_size = cfg.outer_dims[-1]
        self.in_chans = cfg.in_chans
        self.size_divisible = STEM_STRIDE
        self.grad_checkpointing = False
        grids = stage_grids(cfg.img_size, cfg.img_size)
        self.grid_size = grids[0]

        self.patch_embed = Stem(
            in_chans=cfg.in_chans, inner_dim=cfg.inner_dims[0], outer_dim=cfg.outer_dims[0]
        )
        self.outer_pos = nn.Parameter(torch.zeros(1, grids[0][0] * grids[0][1], cfg.outer_dims[0]))
        self.inner_pos = nn.Parameter(torch.zeros(1, WORDS_PER_SIDE**2, cfg.inner_dims[0]))
        self.pos_drop = nn.Dropout(cfg.pos_drop_rate)

        rates = torch.linspace(0, cfg.drop_path_rate, sum(cfg.depths)).tolist()
        self.word_merges = nn.ModuleList()
        self.sentence_merges = nn.ModuleList()
        self.stages = nn.ModuleList()
        for i, depth in enumerate(cfg.depths):
            if i > 0:
                self.word_merges.append(WordMerge(cfg.inner_dims[i - 1], cfg.inner_dims[i]))
                self.sentence_merges.append(SentenceMerge(cfg.outer_dims[i - 1], cfg.outer_dims[i]))
            first = sum(cfg.depths[:i])
            blocks = [
                PyramidBlock(
                    outer_dim=cfg.outer_dims[i],
                    inner_dim=cfg.inner_dims[i] if j in cfg.inner_blocks[i] else 0,
                    outer_heads=cfg.outer_heads[i],
                    inner_heads=cfg.inner_heads[i],
                    mlp_ratio=cfg.mlp_ratio,
                    qkv_bias=cfg.qkv_bias,
                    proj_drop=cfg.proj_drop_rate,
                    attn_drop=cfg.attn_drop_rate,
                    drop_path=rates[first + j],
                    sr_ratio=cfg.sr_ratios[i],
                )
                for j in range(depth)
            ]
            kv = kv_grid(grids[i], cfg.sr_ratios[i])
            self.stages.append(Stage(blocks=blocks, heads=cfg.outer_heads[i], grid=grids[i], kv=kv))
        self.feature_info = FeatureInfo(
            dict(module=f"stages.{i}", num_chs=cfg.outer_dims[i], reduction=STEM_STRIDE * 2**i)
            for i in range(4)
        )
        self.norm = nn.LayerNorm(cfg.outer_dims[-1])
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = nn.Linear(cfg.outer_dims[-1], cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.init_weights()

    # ------------------------------------------------------------------------------------ init & misc

    def init_weights(self) -> None:
        """The authors' init: trunc-normal(.02) Linear weights and absolute tables, He-normal (fan-out)
        convs, zero biases, unit LayerNorms; relative tables standard normal."""
        nn.init.trunc_normal_(self.outer_pos, std=0.02)
        nn.init.trunc_normal_(self.inner_pos, std=0.02)
        init_linear_and_norm(self)
        for mod in self.modules():
            if isinstance(mod, nn.Conv2d):
                nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)

    @classmethod
    def min_input_size_of(cls, cfg: PyramidTNTConfig) -> tuple[int, int, int]:
        side = min_image_side(cfg.sr_ratios)
        return (cfg.in_chans, side, side)

    @classmethod
    def pool_size_of(cls, cfg: PyramidTNTConfig) -> tuple[int, int]:
        """The last stage's sentence grid at the config's input size."""
        return stage_grids(cfg.img_size, cfg.img_size)[-1]

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameters kept out of weight decay besides norms and biases (the authors' set)."""
        return {"outer_pos", "inner_pos"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Regexes grouping parameters into stem / stages / final norm (layer-wise lr decay)."""
        return dict(
            stem=r"^outer_pos|^inner_pos|^patch_embed",
            blocks=[(r"^stages\.(\d+)|^(?:word|sentence)_merges\.(\d+)", None), (r"^norm", (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward instead of storing them."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def set_lean_backward(self, enable: bool = True) -> None:
        """Keep less for backward by recomputing MLP activations (the default); same numbers either way."""
        for mod in self.modules():
            if isinstance(mod, Mlp):
                mod.lean_backward = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head by a fresh one with ``num_classes`` outputs (0: no head); pooling is the mean."""
        if global_pool not in (None, "avg"):
            raise ConfigError(f"PyramidTNT pools by the mean of its tokens ('avg'), got {global_pool!r}")
        self.num_classes = num_classes
        self.head = new_head(self.num_features, num_classes, like=self.norm.weight, training=self.training)
        self.cfg = self.cfg.replace(num_classes=num_classes)

    # ---------------------------------------------------------------------------------------- forward

    def _check_input(self, x: torch.Tensor) -> list[tuple[int, int]]:
        """Every stage's sentence grid for images ``x`` (see :func:`checked_stage_grids`)."""
        return checked_stage_grids(x, self.in_chans, self.cfg.sr_ratios)

    def _embed(self, x: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Images -> (words (B*N, 16, c), sentences (B, N, d)) with the absolute tables added."""
        words, sentences = self.patch_embed(x)
        # (1, N, d); the table as it is on its own grid
        pos = resample_pos_embed(self.outer_pos, grid, old_grid=self.grid_size, num_prefix=0)
        # the authors apply position dropout to the table, not to the tokens
        return words + self.inner_pos, sentences + self.pos_drop(pos)

    def _run_stage(
        self, i: int, words: torch.Tensor, sentences: torch.Tensor, grids: list[tuple[int, int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if i > 0:
            words = self.word_merges[i - 1](words, grids[i - 1])
            sentences = self.sentence_merges[i - 1](sentences, grids[i - 1])
        stage = self.stages[i]
        rel = stage.relative_table(grids[i])
        for blk in stage.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                words, sentences = checkpoint(blk, words, sentences, grids[i], rel, use_reentrant=False)
            else:
                words, sentences = blk(words, sentences, grids[i], rel)
        return words, sentences

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> normalised tokens of the last stage (B, N, d)."""
        grids = self._check_input(x)
        words, sentences = self._embed(x, grids[0])
        for i in range(len(self.stages)):
            words, sentences = self._run_stage(i, words, sentences, grids)
        return self.norm(sentences)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens (B, N, d) -> logits (B, classes), or the mean token (B, d) with ``pre_logits``."""
        x = self.head_drop(x.mean(dim=1))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        *,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Outputs of chosen stages (0-3) as (B, d, h, w) maps or (B, N, d) tokens.

        ``norm`` applies the final LayerNorm, which only fits the last stage's width; it is applied to the
        stages of that width and refused for a narrower one.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ConfigError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take = feature_take_indices(len(self.stages), indices)
        if norm and any(self.cfg.outer_dims[i] != self.num_features for i in take):
            raise ConfigError("norm=True fits only stages as wide as the last one")
        grids = self._check_input(x)
        words, sentences = self._embed(x, grids[0])
        last = max(take) if (stop_early and intermediates_only) else len(self.stages) - 1
        feats = []
        for i in range(last + 1):
            words, sentences = self._run_stage(i, words, sentences, grids)
            if i in take:
                y = self.norm(sentences) if norm else sentences  # (B, N, d)
                if output_fmt == "NCHW":
                    h, w = grids[i]
                    y = y.transpose(1, 2).reshape(y.shape[0], -1, h, w)  # (B, d, h, w)
                feats.append(y)
        if intermediates_only:
            return feats
        return self.norm(sentences), feats


# -------------------------------------------------------------------------------------------- variants


def build_pyramid_tnt(cfg: PyramidTNTConfig) -> PyramidTNT:
    """``PyramidTNT(cfg)``: the registry's factory is the class itself, this is for code that wants a
    function."""
    return PyramidTNT(cfg)


def _variant(img_size: int, depths: tuple[int, ...], dim: int, inner_dim: int, heads: int, inner_heads: int):
    """The authors' widths: stage widths and heads double twice, the last stage keeps the third's."""
    x4 = (1, 2, 4, 4)
    return PyramidTNTConfig(
        img_size=img_size,
        depths=depths,
        outer_dims=tuple(dim * k for k in x4),
        inner_dims=tuple(inner_dim * k for k in x4),
        outer_heads=tuple(heads * k for k in x4),
        inner_heads=tuple(inner_heads * k for k in x4),
    )


VARIANTS: dict[str, PyramidTNTConfig] = {
    "ptnt_ti_patch16_192": _variant(192, (2, 6, 3, 2), 80, 5, 2, 1),
    "ptnt_s_patch16_256": _variant(256, (2, 8, 4, 2), 128, 8, 4, 2),
    "ptnt_m_patch16_256": _variant(256, (2, 8, 6, 2), 192, 12, 4, 2),
    "ptnt_b_patch16_256": _variant(256, (2, 10, 6, 2), 256, 16, 4, 2),
}

for _name, _cfg in VARIANTS.items():
    register_model(_name, PyramidTNT, _cfg, ModelMeta(input_size=(3, _cfg.img_size, _cfg.img_size)))

# The authors publish PyramidTNT's ImageNet-1k weights on BaiduDisk only (tnt_pytorch/readme.md): a page
# behind a password, with no address a program can download from. The tags say where and how; a file
# fetched by hand loads with pretrained=PATH (docs/pretrained.md).
_BAIDU = {  # name: (reported top-1, BaiduDisk share, password)
    "ptnt_ti_patch16_192": (75.2, "https://pan.baidu.com/s/1xm3DSGcAJbvFQm4jmDAlnQ", "0r5t"),
    "ptnt_s_patch16_256": (82.0, "https://pan.baidu.com/s/1xha8x3DTlPq9-KeC6EPPow", "v5w5"),
    "ptnt_m_patch16_256": (83.5, "https://pan.baidu.com/s/1B9zkWkrUAETuiyr08ClY-w", "jqm3"),
    "ptnt_b_patch16_256": (84.1, "https://pan.baidu.com/s/1tT0mxRrZQx6facYsdPBt0g", "ns4t"),
}
for _name, (_top1, _page, _password) in _BAIDU.items():
    register_pretrained(
        PretrainedTag(
            _name,
            "in1k",
            source="manual",
            location=_page,
            top1=_top1,
            top1_by="the authors (tnt_pytorch/readme.md)",
            license="apache-2.0",
            layout="authors",
            meta=get_model_entry(_name).meta,
            origin_url="https://github.com/huawei-noah/Efficient-AI-Backbones/tree/master/tnt_pytorch",
            notes=f"the authors share them on BaiduDisk only: {_page} (password {_password})",
        )
    )
