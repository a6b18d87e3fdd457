"""Transformer iN Transformer (TNT), Han et al., NeurIPS 2021 (arXiv:2103.00112).

An image is cut into patches ("visual sentences") and every patch into smaller "visual words". Each block
runs an inner transformer over the words of every patch (shared weights, all patches at once), adds a
projection of a patch's words into that patch's embedding, then runs an outer transformer over the patch
embeddings and a class token.

Parameter names follow timm's official-structure TNT (itself a renaming of the authors' code), so timm's
state dicts load as they are; `weights.py` maps the authors' and mmpretrain's names and the legacy structure.

Shapes below: B images, N = gh*gw patches, m = words per patch, c = inner (word) dim, d = outer dim.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import ConfigError
from ..kernels import exactly, run_inner
from .contract import FeatureInfo, TimmContract
from .layers import (
    Attention,
    DropPath,
    Mlp,
    SqueezeExcite,
    check_images,
    fx_leaf,
    init_linear_and_norm,
    new_head,
    resample_pos_embed,
)
from .merging import TokenSizes, bipartite_soft_matching, merge_schedule, merge_weighted, merge_words
from .pretrained import PretrainedTag, register_pretrained
from .registry import ModelMeta, model_config, register_model

__all__ = ["TNT", "TNTBlock", "TNTConfig", "WordEmbed", "record_attention"]

# torch.fx leaves: a symbolic trace (torchvision's create_feature_extractor, timm's fx features) records
# each call of these as one node instead of tracing into it. Their Python branches depend on shapes, the
# device, grad mode and whether the fused kernel is built, which a trace cannot see; run as nodes they
# still decide at run time, as in eager mode.
torch.fx.wrap("check_images")
torch.fx.wrap("resample_pos_embed")
torch.fx.wrap("fx_leaf")
torch.fx.wrap("run_inner")


# --------------------------------------------------------------------------------------------- blocks


class WordEmbed(nn.Module):
    """Image -> visual words (B*N, m, c), word position table included.

    Official structure: a ``k x k`` / stride ``s`` / pad ``k//2`` conv runs on each patch on its own (zero
    padding at every patch border). That equals one linear map of the flattened patch (C*P*P values) to
    its m*c word features, whose weight is built from the conv kernel: for word (i, j) the kernel sits at
    offset (i*s - pad, j*s - pad) inside the patch, clipped at the border. We run that single GEMM
    (``fused=True``) when ``proj`` is exactly a plain ``nn.Conv2d``; ``fused=False`` (or a hook, a
    parametrization or another module in ``proj``) runs the per-patch conv the way the paper writes it (a
    test oracle, and what MAC counts are taken from).

    Legacy structure: the conv runs over the whole image and words are cut from its output afterwards,
    so border words see pixels of the neighbouring patch.
    """

    def __init__(
        self,
        *,
        patch_size: int,
        in_chans: int,
        inner_dim: int,
        word_stride: int,
        word_kernel: int,
        legacy: bool,
    ) -> None:
        super().__init__()
        pad = word_kernel // 2
        side = (patch_size + 2 * pad - word_kernel) // word_stride + 1  # words per patch side
        if legacy and patch_size % word_stride:
            raise ConfigError(f"legacy structure needs patch_size ({patch_size}) divisible by word_stride")
        self.patch_size = patch_size
        self.words_per_side = side
        self.num_words = side * side
        self.inner_dim = inner_dim
        self.legacy = legacy
        self.fused = not legacy
        self.proj = nn.Conv2d(in_chans, inner_dim, word_kernel, stride=word_stride, padding=pad)
        if not legacy:
            self.register_buffer("fold_index", self._fold_index(in_chans), persistent=False)

    def _fold_index(self, in_chans: int) -> torch.Tensor:
        """Index into ``cat([conv.weight.flatten(), 0])`` giving the (m*c, C*P*P) folded weight."""
        c, P, side = self.inner_dim, self.patch_size, self.words_per_side
        k, s, pad = self.proj.kernel_size[0], self.proj.stride[0], self.proj.padding[0]
        zero_slot = c * in_chans * k * k
        i, j, o, ci, py, px = torch.meshgrid(
            *(torch.arange(n) for n in (side, side, c, in_chans, P, P)), indexing="ij"
        )
        ky, kx = py - (i * s - pad), px - (j * s - pad)  # kernel tap that pixel (py, px) meets
        inside = (ky >= 0) & (ky < k) & (kx >= 0) & (kx < k)
        flat = ((o * in_chans + ci) * k + ky.clamp(0, k - 1)) * k + kx.clamp(0, k - 1)
        idx = torch.where(inside, flat, torch.full_like(flat, zero_slot))  # (side, side, c, C, P, P)
        return idx.reshape(side * side * c, in_chans * P * P)  # rows word-major: word*c + channel

    def folded_weight(self) -> torch.Tensor:
        """The (m*c, C*P*P) linear weight equal to the per-patch conv (differentiable in the kernel)."""
        w = self.proj.weight.flatten()
        return torch.cat([w, w.new_zeros(1)])[self.fold_index]

    def forward(self, x: torch.Tensor, word_pos: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        P, side, c = self.patch_size, self.words_per_side, self.inner_dim
        gh, gw = H // P, W // P
        pos = word_pos.reshape(c, side * side).t()  # (m, c) from (1, c, side, side)
        if self.legacy:
            y = self.proj(x)  # (B, c, gh*side, gw*side)
            y = y.view(B, c, gh, side, gw, side).permute(0, 2, 4, 3, 5, 1)  # (B, gh, gw, side, side, c)
            return y.reshape(B * gh * gw, side * side, c) + pos  # (B*N, m, c)
        patches = x.view(B, C, gh, P, gw, P).permute(0, 2, 4, 1, 3, 5)  # (B, gh, gw, C, P, P)
        # the GEMM reads the conv's weights instead of calling it: only for exactly a plain Conv2d (a hook,
        # a parametrization or another module there runs the per-patch conv, which calls it)
        if self.fused and exactly(self.proj, nn.Conv2d) and self.proj.padding_mode == "zeros":
            patches = patches.reshape(B * gh * gw, C * P * P)  # (B*N, C*P*P)
            bias = self.proj.bias.repeat(side * side)  # (m*c,), word-major
            words = F.linear(patches, self.folded_weight(), bias)  # (B*N, m*c)
            # the table is added outside the GEMM so that under autocast the words stay in the table's
            # precision (fp32), as in the reference: LayerNorm over rows of c is also faster in fp32
            return words.view(B * gh * gw, side * side, c) + pos  # (B*N, m, c)
        patches = patches.reshape(B * gh * gw, C, P, P)  # (B*N, C, P, P)
        words = self.proj(patches).flatten(2).transpose(1, 2)  # (B*N, m, c)
        return words + pos


class TNTBlock(nn.Module):
    """Inner transformer over words, words -> patch projection, outer transformer over patches.

    ``inner_dim == 0`` gives a plain ViT block (the paper's TNT-S variants with fewer inner blocks); words
    then pass through unchanged.
    """

    def __init__(
        self,
        *,
        dim: int,
        inner_dim: int,
        num_words: int,
        num_heads: int,
        inner_num_heads: int,
        mlp_ratio: float,
        inner_mlp_ratio: float,
        qkv_bias: bool,
        proj_drop: float,
        attn_drop: float,
        drop_path: float,
        legacy: bool,
        se_ratio: float,
    ) -> None:
        super().__init__()
        self.has_inner = inner_dim > 0
        self.legacy = legacy
        attn_kw = dict(qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        if self.has_inner:
            self.norm_in = nn.LayerNorm(inner_dim)
            self.attn_in = Attention(inner_dim, num_heads=inner_num_heads, **attn_kw)
            self.norm_mlp_in = nn.LayerNorm(inner_dim)
            # recompute_fc1: the inner fc1 (c -> 4c per word) is a cheap GEMM with the widest output
            self.mlp_in = Mlp(
                inner_dim, hidden_dim=int(inner_dim * inner_mlp_ratio), drop=proj_drop, recompute_fc1=True
            )
            if legacy:  # LN per word, flatten, Linear with bias, no LN after
                self.norm1_proj = nn.LayerNorm(inner_dim)
                self.proj = nn.Linear(num_words * inner_dim, dim, bias=True)
                self.norm2_proj = None
            else:  # LN over all m*c values of a patch, Linear without bias, LN
                self.norm1_proj = nn.LayerNorm(num_words * inner_dim)
                self.proj = nn.Linear(num_words * inner_dim, dim, bias=False)
                self.norm2_proj = nn.LayerNorm(dim)
        self.norm_out = nn.LayerNorm(dim)
        self.attn_out = Attention(dim, num_heads=num_heads, **attn_kw)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, hidden_dim=int(dim * mlp_ratio), drop=proj_drop)
        self.se = SqueezeExcite(dim, hidden_ratio=se_ratio) if se_ratio > 0 else None
        self.drop_path = DropPath(drop_path)
        self.merge_r = 0  # token merging: patches this block merges (TNT.set_token_merging)
        self.merge_words = True  # and whether their words merge too (not when no later block reads them)

    def forward(
        self, words: torch.Tensor, patches: torch.Tensor, sizes: TokenSizes | None = None
    ) -> tuple[torch.Tensor, ...]:
        """words (B*N, m, c) and patches (B, 1+N, d), the class token first -> the same, updated. With token
        merging (``sizes``), the outer attention weighs tokens by size, ``merge_r`` patches merge, and the
        updated ``sizes`` come back third."""
        if self.has_inner:
            words = run_inner(self, words)  # (B*N, m, c): the inner transformer, fused or reference
            add = self.words_to_patches(words, patches.shape[0])  # (B, N, d)
            # the class token (row 0) gets none: one add of [zeros, add] costs less, with its backward, than
            # adding to the slice of the other rows and concatenating the class token back (and unlike
            # F.pad it exports to every ONNX opset)
            add = torch.cat([add.new_zeros(add.shape[0], 1, add.shape[2]), add], dim=1)  # (B, 1+N, d)
            patches = patches + add
        if sizes is None:
            patches = patches + self.drop_path(fx_leaf(self.attn_out, self.norm_out(patches)))
        else:
            words, patches, sizes = self.attend_and_merge(words, patches, sizes)
        patches = patches + self.drop_path(self.outer_mlp(patches))  # (B, 1+N, d)
        return (words, patches) if sizes is None else (words, patches, sizes)

    def inner_reference(self, words: torch.Tensor) -> torch.Tensor:
        """The inner transformer as the paper writes it, calling the block's modules: words (S, m, c)."""
        words = words + self.drop_path(self.attn_in(self.norm_in(words)))
        return words + self.drop_path(self.mlp_in(self.norm_mlp_in(words)))

    def words_to_patches(self, words: torch.Tensor, batch: int) -> torch.Tensor:
        """The projection of each patch's words that is added to its embedding: (B, N, d)."""
        if self.norm2_proj is None:  # legacy
            return self.proj(self.norm1_proj(words).reshape(batch, -1, self.proj.in_features))
        flat = words.reshape(batch, -1, self.proj.in_features)  # (B, N, m*c), word-major
        return self.norm2_proj(self.proj(self.norm1_proj(flat)))

    def outer_mlp(self, patches: torch.Tensor) -> torch.Tensor:
        """The outer MLP branch (B, 1+N, d), with the SE gate where the variant has one."""
        h = fx_leaf(self.mlp, self.norm_mlp(patches))
        return h + self.se(h) if self.se is not None else h

    def attend_and_merge(
        self, words: torch.Tensor, patches: torch.Tensor, sizes: TokenSizes
    ) -> tuple[torch.Tensor, torch.Tensor, TokenSizes]:
        """Outer attention proportional to token sizes, then ``merge_r`` patches merged into others by the
        similarity of their keys, and their words with them (see :mod:`tntvision.models.merging`)."""
        y, keys = self.attn_out.forward_sized(self.norm_out(patches), sizes.size)
        patches = patches + self.drop_path(y)
        if self.merge_r == 0 or patches.shape[1] < 3:  # the class token and at least one pair
            return words, patches, sizes
        merge = bipartite_soft_matching(keys, self.merge_r, protected=1)
        if self.merge_words:
            words = merge_words(merge, words, sizes.size)  # (B*N', m, c)
        patches, size = merge_weighted(merge, patches, sizes.size)  # (B, 1+N', d), (B, 1+N', 1)
        return words, patches, sizes.merged(merge, size)


# ---------------------------------------------------------------------------------------------- model


class TNT(TimmContract, nn.Module):
    """Transformer iN Transformer, with timm's backbone contract (``pretrained_cfg`` and ``feature_info``
    included, see :mod:`tntvision.models.contract`).

    Accepts any input whose height and width are multiples of ``patch_size``; the patch position table is
    resampled on the fly for a grid other than the one it was built for.
    """

    first_conv = "pixel_embed.proj"
    paper_ids = "arXiv:2103.00112"

    def __init__(self, cfg: TNTConfig | None = None, /, **overrides: Any) -> None:
        """``TNT(cfg)``, ``TNT(cfg, num_classes=10)`` or ``TNT(embed_dim=192, ...)``.

        :class:`TNTConfig` is the single source of the architecture and its defaults; keyword overrides
        are its field names (an unknown one raises :class:`ConfigError`).
        """
        super().__init__()
        self.cfg = cfg = model_config(TNTConfig, cfg, overrides)
        # Identity and preprocessing: set by create_model / load_model (None for a bare TNT(...)).
        self.model_name: str | None = None
        self.meta: ModelMeta | None = None
        self.class_names: list[str] | None = None
        self.pretrained_tag = None  # the PretrainedTag create_model resolved (tntvision.models.pretrained)
        self.load_report = None  # what load_pretrained adapted (tntvision.models.weights.LoadReport)

        img_size, patch_size, in_chans = cfg.img_size, cfg.patch_size, cfg.in_chans
        embed_dim, inner_dim, depth = cfg.embed_dim, cfg.inner_dim, cfg.depth
        self.num_classes = cfg.num_classes
        self.global_pool = cfg.global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        self.patch_size = patch_size
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.in_chans = in_chans
        self.grad_checkpointing = False

        self.pixel_embed = WordEmbed(
            patch_size=patch_size,
            in_chans=in_chans,
            inner_dim=inner_dim,
            word_stride=cfg.word_stride,
            word_kernel=cfg.word_kernel,
            legacy=cfg.legacy,
        )
        side, m = self.pixel_embed.words_per_side, self.pixel_embed.num_words
        num_patches = self.grid_size[0] * self.grid_size[1]
        # Initial patch embedding from the words: LN(m*c) -> Linear (with bias) -> LN(d), both structures.
        self.norm1_proj = nn.LayerNorm(m * inner_dim)
        self.proj = nn.Linear(m * inner_dim, embed_dim)
        self.norm2_proj = nn.LayerNorm(embed_dim)

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.patch_pos = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))  # row 0: class token
        # shared by all patches; word_pos=False: a frozen zero table (the paper's "w/o pixel PE" ablation)
        self.pixel_pos = nn.Parameter(torch.zeros(1, inner_dim, side, side), requires_grad=cfg.word_pos)
        self.pos_drop = nn.Dropout(cfg.pos_drop_rate)

        self.blocks = nn.ModuleList(_blocks(cfg, num_words=m))
        self.feature_info = FeatureInfo(
            dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=patch_size) for i in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = nn.Linear(embed_dim, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.init_weights()

    # ------------------------------------------------------------------------------------ init & misc

    def init_weights(self) -> None:
        """The authors' init: trunc-normal(.02) Linear weights and tables, zero biases, unit LayerNorms.

        The word-embedding conv keeps PyTorch's default init, as in the authors' code.
        """
        for t in (self.cls_token, self.patch_pos, self.pixel_pos):
            nn.init.trunc_normal_(t, std=0.02)
        if not self.cfg.word_pos:  # drawn and then zeroed: the other weights are those of word_pos=True
            nn.init.zeros_(self.pixel_pos)
        init_linear_and_norm(self)

    @classmethod
    def min_input_size_of(cls, cfg: TNTConfig) -> tuple[int, int, int]:
        """One patch."""
        return (cfg.in_chans, cfg.patch_size, cfg.patch_size)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameters kept out of weight decay besides norms and biases."""
        return {"cls_token", "patch_pos", "pixel_pos"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Regexes grouping parameters into stem / blocks / final norm (layer-wise lr decay)."""
        return dict(
            stem=r"^cls_token|^patch_pos|^pixel_pos|^pixel_embed|^norm[12]_proj|^proj",
            blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward instead of storing them."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def set_lean_backward(self, enable: bool = True) -> None:
        """Keep less for backward by recomputing attention weights and MLP activations (default).

        It switches the :class:`Attention` / :class:`Mlp` modules that run in PyTorch: the outer blocks,
        and the inner transformers where they take the reference path (the fused op always recomputes).
        The same numbers either way: on saves memory, off is faster for small models (docs/performance.md).
        """
        for mod in self.modules():
            if isinstance(mod, (Attention, Mlp)):
                mod.lean_backward = enable

    @torch.jit.ignore
    def set_token_merging(self, r: int | Sequence[int]) -> None:
        """Merge ``r`` patch tokens, and their words, in every block (an int) or per block (a list).

        Training-free (ToMe, see :mod:`tntvision.models.merging`); ``0`` turns it off and the model runs
        exactly as without it. Each block merges at most half of its tokens; the class token never merges.
        Not saved with the weights: set it on the model you load.
        """
        schedule = merge_schedule(r, len(self.blocks))
        for i, (block, r_i) in enumerate(zip(self.blocks, schedule, strict=True)):
            block.merge_r = r_i
            block.merge_words = any(b.has_inner for b in self.blocks[i + 1 :])  # read by a later block

    @property
    def merge_r(self) -> tuple[int, ...]:
        """Patches each block merges (all zeros: token merging off)."""
        return tuple(block.merge_r for block in self.blocks)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head by a fresh one with ``num_classes`` outputs (0: no head)."""
        if global_pool is not None:
            if global_pool not in ("", "token", "avg"):
                raise ConfigError(f"global_pool must be '', 'token' or 'avg', got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = new_head(self.embed_dim, num_classes, like=self.norm.weight, training=self.training)
        self.cfg = self.cfg.replace(num_classes=num_classes, global_pool=self.global_pool)

    # ---------------------------------------------------------------------------------------- forward

    def _check_input(self, x: torch.Tensor) -> tuple[int, int]:
        """The patch grid (gh, gw) of images ``x``; :class:`InputError` for what the model cannot take."""
        P = self.patch_size
        H, W = check_images(x, self.in_chans, P, f"the patch size {P}")
        return H // P, W // P

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images -> (words (B*N, m, c), patches (B, 1+N, d)) with position tables added."""
        gh, gw = self._check_input(x)
        B = x.shape[0]
        words = self.pixel_embed(x, self.pixel_pos)  # (B*N, m, c)
        patches = words.reshape(B, gh * gw, -1)  # (B, N, m*c), word-major
        patches = self.norm2_proj(self.proj(self.norm1_proj(patches)))  # (B, N, d)
        patches = torch.cat([self.cls_token.expand(B, -1, -1), patches], dim=1)  # (B, 1+N, d)
        pos = resample_pos_embed(self.patch_pos, (gh, gw), old_grid=self.grid_size)  # as is on its own grid
        return words, self.pos_drop(patches + pos)

    def _run_block(
        self, block: TNTBlock, words: torch.Tensor, patches: torch.Tensor, sizes: TokenSizes | None
    ) -> tuple[torch.Tensor, torch.Tensor, TokenSizes | None]:
        """One block, its activations recomputed in backward under grad checkpointing."""
        args = (words, patches) if sizes is None else (words, patches, sizes)
        if self.grad_checkpointing and torch.is_grad_enabled():
            out = checkpoint(block, *args, use_reentrant=False)
        else:
            out = block(*args)
        return (*out, None) if sizes is None else out

    def _tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, TokenSizes | None]:
        """Images -> final tokens (B, 1+N', d) before the norm, and token merging's sizes (None without)."""
        words, patches = self._embed(x)
        sizes = TokenSizes.start(patches) if any(self.merge_r) else None
        for block in self.blocks:
            words, patches, sizes = self._run_block(block, words, patches, sizes)
        return patches, sizes

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> normalised tokens (B, 1+N, d), class token first.

        With token merging on, N is the number of tokens left after the last block.
        """
        return self.norm(self._tokens(x)[0])

    def forward_head(
        self, x: torch.Tensor, pre_logits: bool = False, *, token_size: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Tokens (B, 1+N, d) -> logits (B, classes), or pooled features (B, d) with ``pre_logits``.

        ``token_size`` (B, 1+N, 1), the sizes of merged tokens, makes average pooling size-weighted.
        """
        if self.global_pool == "avg":
            p = self.num_prefix_tokens
            if token_size is None:
                x = x[:, p:].mean(dim=1)
            else:
                w = token_size[:, p:].to(x.dtype)  # (B, N, 1)
                x = (x[:, p:] * w).sum(dim=1) / w.sum(dim=1)
        elif self.global_pool == "token":
            x = x[:, 0]
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens, sizes = self._tokens(x)
        return self.forward_head(self.norm(tokens), token_size=None if sizes is None else sizes.size)

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
        """Outputs of chosen blocks as feature maps, and optionally the final tokens.

        Args:
            indices: block indices (negative counts from the end), or an int n for the last n blocks;
                default: every block.
            norm: apply the final LayerNorm to each intermediate.
            stop_early: skip blocks after the last one asked for (only with ``intermediates_only``).
            output_fmt: ``"NCHW"`` (B, d, gh, gw) maps or ``"NLC"`` (B, N, d) tokens, class token dropped.
            intermediates_only: return only the list.

        With token merging on, the maps are unmerged to the patch grid (each patch gets the token it was
        merged into, as ToMe does for dense tasks); the final tokens stay merged (B, 1+N', d).
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ConfigError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take = feature_take_indices(len(self.blocks), indices)
        gh, gw = self._check_input(x)
        words, patches = self._embed(x)
        sizes = TokenSizes.start(patches) if any(self.merge_r) else None
        last = max(take) if (stop_early and intermediates_only) else len(self.blocks) - 1
        feats = []
        for i in range(last + 1):
            words, patches, sizes = self._run_block(self.blocks[i], words, patches, sizes)
            if i in take:
                y = self.norm(patches) if norm else patches
                if sizes is not None:  # every patch reads the token it was merged into (ToMe's unmerge)
                    y = sizes.unmerge(y)  # (B, 1+N, d)
                y = y[:, self.num_prefix_tokens :]  # (B, N, d)
                if output_fmt == "NCHW":
                    y = y.reshape(y.shape[0], gh, gw, -1).permute(0, 3, 1, 2).contiguous()  # (B, d, gh, gw)
                feats.append(y)
        if intermediates_only:
            return feats
        return self.norm(patches), feats


def _blocks(cfg: TNTConfig, *, num_words: int) -> list[TNTBlock]:
    """The ``depth`` blocks of a config, drop-path rates rising linearly to ``drop_path_rate``."""
    depth, rate = cfg.depth, cfg.drop_path_rate
    rates = torch.linspace(0, rate, depth).tolist() if depth > 1 else [rate]
    inner = cfg.inner_block_indices()
    return [
        TNTBlock(
            dim=cfg.embed_dim,
            inner_dim=cfg.inner_dim if i in inner else 0,
            num_words=num_words,
            num_heads=cfg.num_heads,
            inner_num_heads=cfg.inner_num_heads,
            mlp_ratio=cfg.mlp_ratio,
            inner_mlp_ratio=cfg.inner_mlp_ratio,
            qkv_bias=cfg.qkv_bias,
            proj_drop=cfg.proj_drop_rate,
            attn_drop=cfg.attn_drop_rate,
            drop_path=rates[i],
            legacy=cfg.legacy,
            se_ratio=cfg.se_ratio,
        )
        for i in range(depth)
    ]


def feature_take_indices(depth: int, indices: int | Sequence[int] | None) -> list[int]:
    """Normalise ``indices`` (None: all; int n: last n; list: negative from the end) to sorted blocks."""
    if indices is None:
        return list(range(depth))
    if isinstance(indices, int):
        if not 0 < indices <= depth:
            raise ConfigError(f"cannot take the last {indices} of {depth} blocks")
        return list(range(depth - indices, depth))
    out = []
    for i in indices:
        j = i + depth if i < 0 else i
        if not 0 <= j < depth:
            raise ConfigError(f"block index {i} out of range for {depth} blocks")
        out.append(j)
    return sorted(set(out))


@contextlib.contextmanager
def record_attention(model: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Keep the attention maps of forward passes run inside the ``with`` block.

    Yields a dict that each forward fills with module name (``blocks.3.attn_in``) -> softmax weights:
    inner attention (B*N, heads, m, m), outer attention (B, heads, 1+N, 1+N). The maps come from the
    model's own attention modules (an explicit softmax replaces the fused kernel while recording).
    """
    maps: dict[str, torch.Tensor] = {}
    mods = {name: mod for name, mod in model.named_modules() if isinstance(mod, Attention)}
    handles = []
    for name, mod in mods.items():
        mod.keep_attn = True
        handles.append(
            mod.register_forward_hook(lambda m, _i, _o, name=name: maps.__setitem__(name, m.last_attn))
        )
    try:
        yield maps
    finally:
        for handle in handles:
            handle.remove()
        for mod in mods.values():
            mod.keep_attn, mod.last_attn = False, None


# -------------------------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class TNTConfig:
    """Architecture of one TNT variant, the single source of its defaults; ``TNT(cfg)`` builds it.

    ``inner_blocks`` lists the 0-based blocks that have an inner transformer (None: every block; ``()``:
    none, a ViT on TNT's word-based patch embedding). ``se_ratio > 0`` adds the paper's SE gate to the outer
    MLP. ``legacy`` selects the structure of older checkpoints (docs/architecture.md, "The legacy structure").
    ``word_pos=False`` leaves out the word (pixel) position encoding, the paper's ablation: ``pixel_pos``
    stays in the state dict (same layout as every TNT) but is a frozen table of zeros, not trained (weights
    loaded into such a model load that table too).
    """

    img_size: int = 224
    patch_size: int = 16
    word_stride: int = 4
    word_kernel: int = 7
    in_chans: int = 3
    num_classes: int = 1000
    global_pool: str = "token"
    embed_dim: int = 384
    inner_dim: int = 24
    depth: int = 12
    num_heads: int = 6
    inner_num_heads: int = 4
    mlp_ratio: float = 4.0
    inner_mlp_ratio: float = 4.0
    qkv_bias: bool = False
    inner_blocks: tuple[int, ...] | None = None
    word_pos: bool = True
    se_ratio: float = 0.0
    legacy: bool = False
    drop_rate: float = 0.0
    pos_drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0

    def __post_init__(self) -> None:
        if self.inner_blocks is not None:  # any iterable of ints -> sorted tuple without repeats
            object.__setattr__(self, "inner_blocks", tuple(sorted({int(i) for i in self.inner_blocks})))

    def replace(self, **changes) -> TNTConfig:
        return TNTConfig(**{**asdict(self), **changes}) if changes else self

    def inner_block_indices(self) -> tuple[int, ...]:
        """The 0-based blocks with an inner transformer (``inner_blocks``, or every block when None)."""
        return tuple(range(self.depth)) if self.inner_blocks is None else self.inner_blocks

    def validate(self) -> None:
        """Raise :class:`ConfigError` for a config that cannot build a model."""

        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        need(self.patch_size > 0 and self.img_size > 0, "img_size and patch_size must be positive")
        need(
            self.img_size % self.patch_size == 0,
            f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}",
        )
        need(self.in_chans > 0, f"in_chans must be positive, got {self.in_chans}")
        need(self.num_classes >= 0, f"num_classes must be >= 0, got {self.num_classes}")
        need(self.global_pool in ("", "token", "avg"), f"global_pool {self.global_pool!r} unknown")
        need(self.embed_dim % self.num_heads == 0, "embed_dim must be divisible by num_heads")
        need(self.inner_dim % self.inner_num_heads == 0, "inner_dim must be divisible by inner_num_heads")
        need(self.word_kernel % 2 == 1, "word_kernel must be odd")
        for i in self.inner_blocks or ():
            need(0 <= i < self.depth, f"inner_blocks index {i} out of range for depth {self.depth}")
        for name in ("drop_rate", "pos_drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate"):
            rate = getattr(self, name)
            need(0.0 <= rate < 1.0, f"{name} must be in [0, 1), got {rate}")


def build_tnt(cfg: TNTConfig) -> TNT:
    """``TNT(cfg)``: the registry's factory is the class itself, this is for code that wants a function."""
    return TNT(cfg)


_IMAGENET = ModelMeta()  # mean = std = 0.5, bicubic, crop 0.9: the released weights' preprocessing
_FASHION = ModelMeta(
    input_size=(1, 28, 28), mean=(0.2860,), std=(0.3530,), crop_pct=1.0, interpolation="bilinear"
)

_TNT_S = TNTConfig(embed_dim=384, inner_dim=24, num_heads=6, inner_num_heads=4)
_TNT_MINI = TNTConfig(
    img_size=28,
    patch_size=4,
    word_stride=2,  # 2x2 words per 4x4 patch, each a 3x3 conv window at stride 2
    word_kernel=3,
    in_chans=1,
    num_classes=10,
    embed_dim=128,
    inner_dim=8,
    depth=4,
    num_heads=4,
    inner_num_heads=2,
    mlp_ratio=2.0,  # outer MLP 128 -> 256: as accurate as 4.0 and faster (docs/evidence.md)
)

VARIANTS: dict[str, tuple[TNTConfig, ModelMeta]] = {
    "tnt_ti_patch16_224": (TNTConfig(embed_dim=192, inner_dim=12, num_heads=3, inner_num_heads=2), _IMAGENET),
    "tnt_s_patch16_224": (_TNT_S, _IMAGENET),
    "tnt_b_patch16_224": (TNTConfig(embed_dim=640, inner_dim=40, num_heads=10, inner_num_heads=4), _IMAGENET),
    "tnt_s_legacy_patch16_224": (_TNT_S.replace(legacy=True), _IMAGENET),
    "tnt_s_se_patch16_224": (_TNT_S.replace(se_ratio=0.25), _IMAGENET),
    "tnt_mini_patch4_28": (_TNT_MINI, _FASHION),
    "vit_mini_patch4_28": (_TNT_MINI.replace(inner_blocks=()), _FASHION),
}

for _name, (_cfg, _meta) in VARIANTS.items():
    register_model(_name, TNT, _cfg, _meta)

# Published ImageNet-1k weights, each architecture's default first (docs/pretrained.md). top-1 is what the
# publisher reports, not measured here. timm's hub copies come first: a direct, versioned download in the
# layout timm and we share.
_TIMM_RESULTS = "timm (results/results-imagenet.csv)"
_AUTHORS = "https://github.com/huawei-noah/Efficient-AI-Backbones/tree/master/tnt_pytorch"
_AUTHORS_RELEASE = "https://github.com/huawei-noah/Efficient-AI-Backbones/releases/download/tnt/"
PRETRAINED = [
    PretrainedTag("tnt_s_patch16_224", "in1k", source="hf-hub", location="timm/tnt_s_patch16_224.in1k",
                  top1=81.506, top1_by=_TIMM_RESULTS, license="apache-2.0", layout="timm", meta=_IMAGENET,
                  origin_url=_AUTHORS),
    PretrainedTag("tnt_s_patch16_224", "authors_in1k", source="url",
                  location=_AUTHORS_RELEASE + "tnt_s_81.5.pth.tar",
                  top1=81.5, top1_by="the authors (tnt_pytorch/readme.md)", license="apache-2.0",
                  layout="authors", meta=_IMAGENET, origin_url=_AUTHORS),
    PretrainedTag("tnt_b_patch16_224", "in1k", source="hf-hub", location="timm/tnt_b_patch16_224.in1k",
                  top1=82.864, top1_by=_TIMM_RESULTS, license="apache-2.0", layout="timm", meta=_IMAGENET,
                  origin_url=_AUTHORS),
    PretrainedTag("tnt_b_patch16_224", "authors_in1k", source="url",
                  location=_AUTHORS_RELEASE + "tnt_b_82.9.pth.tar",
                  top1=82.9, top1_by="the authors (tnt_pytorch/readme.md)", license="apache-2.0",
                  layout="authors", meta=_IMAGENET, origin_url=_AUTHORS),
    PretrainedTag("tnt_s_legacy_patch16_224", "in1k", source="hf-hub",
                  location="timm/tnt_s_legacy_patch16_224.in1k", top1=81.512, top1_by=_TIMM_RESULTS,
                  license="apache-2.0", layout="timm", meta=_IMAGENET,
                  origin_url="https://github.com/huggingface/pytorch-image-models"),
    PretrainedTag("tnt_s_legacy_patch16_224", "mm_in1k", source="url",
                  location="https://download.openmmlab.com/mmclassification/v0/tnt/"
                  "tnt-small-p16_3rdparty_in1k_20210903-c56ee7df.pth",
                  hash_prefix="c56ee7df", top1=81.52, top1_by="mmpretrain (configs/tnt/README.md)",
                  license="apache-2.0", layout="mmpretrain", meta=_IMAGENET,
                  origin_url="https://github.com/open-mmlab/mmpretrain/tree/main/configs/tnt"),
]  # fmt: skip

for _tag in PRETRAINED:
    register_pretrained(_tag)
