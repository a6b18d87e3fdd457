"""`tnt visualize`: the paper's figures (see docs/architecture.md) for one image and one TNT model.

One forward pass of the model itself (``forward_intermediates`` inside
:func:`~tntvision.models.tnt.record_attention`, plus forward hooks that keep the word embeddings) gives
everything drawn here:

- ``inner_attention.png``: attention of chosen query words over the words of their patch (inner
  transformer), drawn over the patch's pixels;
- ``word_mosaic.png``: every patch's word features averaged over channels and laid out on the word grid,
  tiled over the patch grid;
- ``outer_attention.png``: attention of a chosen patch over all patches, drawn over the image;
- ``cls_attention.png``: attention of the class token over all patches, drawn over the image;
- ``feature_maps.png``: channels of the outputs of chosen blocks on the patch grid.

Attention is averaged over heads. Blocks are numbered from 1 as in the paper; patch and word positions
are (row, column) from the top-left, from 0. Figures are drawn with matplotlib's Agg canvas (no display).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import nn

from ..data import eval_transform, open_image
from ..errors import InputError
from ..models import record_attention
from ..utils.files import save_figure

__all__ = [
    "FIGURES",
    "Capture",
    "VisualizeReport",
    "capture",
    "default_blocks",
    "visualize",
    "visualize_stages",
]

FIGURES = ("inner_attention", "word_mosaic", "outer_attention", "cls_attention", "feature_maps")

_HEAT = "inferno"  # attention maps: dark = little, bright = much
_PANEL = 2.4  # inches per panel


@dataclass
class Capture:
    """What one forward pass of one image gives the figures; blocks are 0-based here.

    Attributes:
        image: the model's input with the normalisation undone, (H, W, C) in [0, 1].
        grid: patches per column and row, (gh, gw).
        words_per_side: the word grid of one patch is words_per_side x words_per_side.
        probs: class probabilities (classes,), or None for a model without a head.
        attn_in: block -> inner attention (N, heads, m, m) (only blocks with an inner transformer).
        attn_out: block -> outer attention (heads, 1+N, 1+N), class token first.
        words: -1 (embedding) or block -> word features (N, m, c) after it.
        features: block -> block output on the patch grid (d, gh, gw).
    """

    image: np.ndarray
    grid: tuple[int, int]
    words_per_side: int
    probs: torch.Tensor | None
    attn_in: dict[int, torch.Tensor] = field(default_factory=dict)
    attn_out: dict[int, torch.Tensor] = field(default_factory=dict)
    words: dict[int, torch.Tensor] = field(default_factory=dict)
    features: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass
class VisualizeReport:
    """Figures written (name -> path), figures left out (name -> reason), and the data they show."""

    figures: dict[str, Path]
    skipped: dict[str, str]
    capture: Capture
    prediction: tuple[str, float] | None

    def to_dict(self) -> dict:
        pred = None if self.prediction is None else {"label": self.prediction[0], "prob": self.prediction[1]}
        return {
            "figures": {k: str(v) for k, v in self.figures.items()},
            "skipped": dict(self.skipped),
            "prediction": pred,
        }


def default_blocks(depth: int) -> list[int]:
    """The paper's blocks 1 / 6 / 12 for depth 12, i.e. first, middle and last (1-based)."""
    return sorted({1, (depth + 1) // 2, depth})


@contextlib.contextmanager
def _keep_words(model: nn.Module) -> Iterator[dict[int, torch.Tensor]]:
    """Forward hooks keeping the words after the embedding (key -1) and after every block."""
    kept: dict[int, torch.Tensor] = {}
    handles = [
        model.pixel_embed.register_forward_hook(lambda _m, _i, out: kept.__setitem__(-1, out.detach()))
    ]
    for i, block in enumerate(model.blocks):
        handles.append(
            block.register_forward_hook(lambda _m, _i, out, i=i: kept.__setitem__(i, out[0].detach()))
        )
    try:
        yield kept
    finally:
        for h in handles:
            h.remove()


@torch.inference_mode()
def capture(model: nn.Module, x: torch.Tensor, *, blocks: Sequence[int]) -> Capture:
    """Run ``model`` once on one normalised image ``x`` (1, C, H, W) and keep what the figures need.

    ``blocks`` are 0-based; attention and words are kept for these, feature maps too.
    """
    if x.ndim != 4 or x.shape[0] != 1:
        raise InputError(f"capture takes one image (1, C, H, W), got shape {tuple(x.shape)}")
    blocks = sorted(set(blocks))  # the order forward_intermediates returns them in
    model = model.eval()
    with record_attention(model) as maps, _keep_words(model) as words:
        final, feats = model.forward_intermediates(x, blocks, output_fmt="NCHW")
        logits = model.forward_head(final)  # (1, classes) or (1, d) without a head
    mean = torch.tensor(model.meta.mean).view(-1, 1, 1)
    std = torch.tensor(model.meta.std).view(-1, 1, 1)
    image = (x[0] * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()  # (H, W, C)
    P = model.patch_size
    cap = Capture(
        image=image,
        grid=(x.shape[2] // P, x.shape[3] // P),
        words_per_side=model.pixel_embed.words_per_side,
        probs=logits[0].float().softmax(-1) if getattr(model, "num_classes", 0) else None,
    )
    cap.words[-1] = words[-1]
    for i, f in zip(blocks, feats, strict=True):
        cap.features[i] = f[0]  # (d, gh, gw)
        cap.attn_out[i] = maps[f"blocks.{i}.attn_out"][0]  # (heads, 1+N, 1+N)
        if model.blocks[i].has_inner:
            cap.attn_in[i] = maps[f"blocks.{i}.attn_in"]  # (N, heads, m, m): batch of one image
            cap.words[i] = words[i]
    return cap


# ------------------------------------------------------------------------------------------ drawing


def _show_image(ax, image: np.ndarray, extent: tuple[float, float, float, float] | None = None) -> None:
    if image.shape[2] == 1:
        ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=1, extent=extent, interpolation="nearest")
    else:
        ax.imshow(image, extent=extent, interpolation="nearest")


def _overlay(ax, heat: np.ndarray, extent: tuple[float, float, float, float], vmin: float, vmax: float):
    """Draw a heat map over what ``ax`` shows, stretched to ``extent`` (left, right, bottom, top).

    The colour scale runs from the smallest to the largest weight shown (not from 0): attention of an
    untrained or early block is close to uniform, and a 0-based scale would hide its structure.
    """
    return ax.imshow(
        heat,
        cmap=_HEAT,
        alpha=0.6,
        extent=extent,
        vmin=vmin,
        vmax=max(vmax, vmin + 1e-6),
        interpolation="nearest",
    )


def _clean(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def _save(fig: Figure, path: Path) -> Path:
    return save_figure(fig, path)


def _pred_text(prediction: tuple[str, float] | None) -> str:
    return "" if prediction is None else f"  (prediction: {prediction[0]}, p = {prediction[1]:.2f})"


def plot_inner_attention(
    cap: Capture, *, patch: tuple[int, int], words: Sequence[int], blocks: Sequence[int], path: Path
) -> Path:
    """Rows: blocks; columns: the image with the patch marked, then one query word each."""
    (gh, gw), s = cap.grid, cap.words_per_side
    H, W = cap.image.shape[:2]
    P = H // gh
    r, c = patch
    n = r * gw + c
    crop = cap.image[r * P : (r + 1) * P, c * P : (c + 1) * P]  # (P, P, C)
    fig = Figure(layout="constrained", figsize=(_PANEL * (len(words) + 1.3), _PANEL * len(blocks) + 0.6))
    axes = fig.subplots(len(blocks), len(words) + 1, squeeze=False)
    for row, b in enumerate(blocks):
        attn = cap.attn_in[b][n].mean(0).numpy()  # (m, m): query word -> key words, head average
        shown = attn[list(words)]  # (queries, m)
        vmin, vmax = float(shown.min()), float(shown.max())
        ax = axes[row, 0]
        _show_image(ax, cap.image)
        ax.add_patch(Rectangle((c * P - 0.5, r * P - 0.5), P, P, fill=False, ec="cyan", lw=2))
        ax.set_title(f"patch ({r}, {c})" if row == 0 else "")
        ax.set_ylabel(f"block {b + 1}", fontsize=12)
        _clean(ax)
        for col, q in enumerate(words, start=1):
            ax = axes[row, col]
            _show_image(ax, crop, extent=(0, s, s, 0))
            im = _overlay(ax, attn[q].reshape(s, s), (0, s, s, 0), vmin, vmax)
            ax.add_patch(Rectangle((q % s, q // s), 1, 1, fill=False, ec="cyan", lw=2))
            ax.set_xlim(0, s)
            ax.set_ylim(s, 0)
            if row == 0:
                ax.set_title(f"query word ({q // s}, {q % s})")
            _clean(ax)
        fig.colorbar(im, ax=axes[row, 1:].tolist(), fraction=0.04, pad=0.02, label="attention")
    fig.suptitle(
        f"Inner attention: query word (cyan) over the {s * s} words of patch ({r}, {c}), mean of heads",
        fontsize=12,
    )
    return _save(fig, path)


def _row_after_input(cap: Capture, panels: int) -> tuple[Figure, list]:
    """A one-row figure: the input image, then ``panels`` empty axes (with room for colour bars)."""
    fig = Figure(layout="constrained", figsize=(_PANEL * 1.25 * (panels + 1), _PANEL + 0.8))
    axes = fig.subplots(1, panels + 1, squeeze=False)[0]
    _show_image(axes[0], cap.image)
    axes[0].set_title("input")
    _clean(axes[0])
    return fig, axes


def plot_word_mosaic(cap: Capture, *, blocks: Sequence[int], path: Path) -> Path:
    """The image, then the word mosaic after the embedding and after each of ``blocks``."""
    (gh, gw), s = cap.grid, cap.words_per_side
    stages = [-1, *blocks]
    fig, axes = _row_after_input(cap, len(stages))
    for ax, stage in zip(axes[1:], stages, strict=True):
        w = cap.words[stage].mean(-1)  # (N, m): average over the c channels
        w = w.reshape(gh, gw, s, s).permute(0, 2, 1, 3)  # (gh, s, gw, s): word rows inside patch rows
        mosaic = w.reshape(gh * s, gw * s)
        im = ax.imshow(mosaic.numpy(), cmap="viridis", interpolation="nearest")
        ax.set_title("after the word embedding" if stage < 0 else f"after block {stage + 1}")
        _clean(ax)
        fig.colorbar(im, ax=ax, shrink=0.85, label="mean over channels")
    fig.suptitle(
        f"Word embeddings: each patch's {s}x{s} words averaged over channels, tiled {gh}x{gw}", fontsize=12
    )
    return _save(fig, path)


def _attention_row(
    cap: Capture, *, query: int, blocks: Sequence[int], title: str, path: Path, mark: tuple[int, int] | None
) -> Path:
    """One panel per block: attention of token ``query`` (0 = class token) over the patches, on the image."""
    gh, gw = cap.grid
    H, W = cap.image.shape[:2]
    P = H // gh
    fig, axes = _row_after_input(cap, len(blocks))
    for ax, b in zip(axes[1:], blocks, strict=True):
        attn = cap.attn_out[b].mean(0)[query, 1:]  # (N,): over the patches, head average
        heat = attn.reshape(gh, gw).numpy()
        _show_image(ax, cap.image)
        im = _overlay(ax, heat, (-0.5, W - 0.5, H - 0.5, -0.5), float(heat.min()), float(heat.max()))
        if mark is not None:
            ax.add_patch(Rectangle((mark[1] * P - 0.5, mark[0] * P - 0.5), P, P, fill=False, ec="cyan", lw=2))
        ax.set_title(f"block {b + 1}")
        _clean(ax)
        fig.colorbar(im, ax=ax, shrink=0.85, label="attention")
    fig.suptitle(title, fontsize=12)
    return _save(fig, path)


def plot_feature_maps(cap: Capture, *, blocks: Sequence[int], path: Path, channels: int = 8) -> Path:
    """Rows: blocks; columns: the ``channels`` channels that vary most over the patch grid, standardised."""
    fig = Figure(layout="constrained", figsize=(_PANEL * (channels + 0.5), _PANEL * len(blocks) + 0.6))
    axes = fig.subplots(len(blocks), channels, squeeze=False)
    gh, gw = cap.grid
    for row, b in enumerate(blocks):
        f = cap.features[b].flatten(1)  # (d, N)
        k = min(channels, f.shape[0])
        top = f.std(dim=1).topk(k).indices.tolist()
        z = (f[top] - f[top].mean(1, keepdim=True)) / f[top].std(1, keepdim=True).clamp_min(1e-6)  # (k, N)
        lim = float(z.abs().max())
        for col in range(channels):
            ax = axes[row, col]
            _clean(ax)
            if col >= k:
                ax.set_axis_off()
                continue
            im = ax.imshow(z[col].reshape(gh, gw).numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim)
            ax.set_title(f"channel {top[col]}", fontsize=9)
            if col == 0:
                ax.set_ylabel(f"block {b + 1}", fontsize=12)
        fig.colorbar(im, ax=axes[row].tolist(), fraction=0.02, pad=0.01, label="standardised")
    fig.suptitle(
        f"Feature maps on the {gh}x{gw} patch grid: the {channels} channels that vary most per block",
        fontsize=12,
    )
    return _save(fig, path)


# ------------------------------------------------------------------------------------------- driver


def _check_position(name: str, pos: tuple[int, int], limit: tuple[int, int]) -> tuple[int, int]:
    if len(pos) != 2 or not all(0 <= p < n for p, n in zip(pos, limit, strict=True)):
        raise InputError(f"{name} {tuple(pos)} is outside the {limit[0]}x{limit[1]} grid (0-based row, col)")
    return (int(pos[0]), int(pos[1]))


def visualize(
    model: nn.Module,
    image: str | Path,
    out: str | Path,
    *,
    blocks: Sequence[int] | None = None,
    patch: tuple[int, int] | None = None,
    words: Sequence[tuple[int, int]] | None = None,
    img_size: int | None = None,
    warn: Callable[[str], None] | None = None,
) -> VisualizeReport:
    """Draw the figures of :data:`FIGURES` for ``image`` into the folder ``out``.

    Args:
        model: a TNT model with ``.meta`` (trained or not); ``.class_names`` labels the prediction.
        image: any image file Pillow reads; preprocessed with the model's eval transform.
        blocks: 1-based blocks to show (default: first, middle, last, e.g. 1 / 6 / 12).
        patch: (row, col) of the patch whose inner attention and outer attention are drawn (default: the
            centre patch).
        words: (row, col) query words inside that patch (default: four spread over the word grid).
        img_size: square input size to use instead of the model's (a multiple of its patch size).
        warn: called with notes for the user (figures left out and why).

    Raises:
        InputError: a missing image; blocks, patch or words outside the model; an image size it does not
            accept.
        DataError: ``image`` is not a readable image.
    """
    if not hasattr(model, "blocks"):  # PyramidTNT: stages of different grids, no class token
        if patch is not None or words is not None:
            raise InputError("--patch and --words apply to isotropic TNT models; PyramidTNT draws stages")
        return visualize_stages(model, image, out, stages=blocks, img_size=img_size)
    depth = len(model.blocks)
    blocks0 = sorted({b - 1 for b in (blocks or default_blocks(depth))})
    if not all(0 <= b < depth for b in blocks0):
        raise InputError(f"blocks are numbered 1..{depth} for this model, got {list(blocks or [])}")
    meta = model.meta if img_size is None else model.meta.resolved(img_size=img_size)
    if img_size is not None and (img_size <= 0 or img_size % model.patch_size):
        raise InputError(
            f"image size {img_size} is not a positive multiple of the patch size {model.patch_size}"
        )
    if not Path(image).is_file():
        raise InputError(f"{image}: no such file")
    x = eval_transform(meta)(open_image(image)).unsqueeze(0)  # (1, C, H, W)
    cap = capture(model, x, blocks=blocks0)
    gh, gw = cap.grid
    s = cap.words_per_side
    patch = _check_position("patch", tuple(patch), cap.grid) if patch is not None else (gh // 2, gw // 2)
    if words is None:
        words = [(0, 0), (0, s - 1), (s // 2, s // 2), (s - 1, s - 1)]
    checked = [_check_position("word", tuple(w), (s, s)) for w in words]
    query = list(dict.fromkeys(r * s + c for r, c in checked))  # word indices, row-major, no repeats

    labels = getattr(model, "class_names", None)
    prediction = None
    if cap.probs is not None:
        p, i = cap.probs.max(0)
        label = labels[int(i)] if labels is not None and len(labels) == len(cap.probs) else f"class {int(i)}"
        prediction = (str(label), float(p))

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figures: dict[str, Path] = {}
    skipped: dict[str, str] = {}
    inner = [b for b in blocks0 if b in cap.attn_in]
    name = getattr(model, "model_name", None) or "this model"
    if inner:
        figures["inner_attention"] = plot_inner_attention(
            cap, patch=patch, words=query, blocks=inner, path=out / "inner_attention.png"
        )
    elif not any(blk.has_inner for blk in model.blocks):
        skipped["inner_attention"] = f"{name} has no inner transformer"
    else:
        have = [i + 1 for i, blk in enumerate(model.blocks) if blk.has_inner]
        skipped["inner_attention"] = (
            f"none of blocks {[b + 1 for b in blocks0]} has an inner transformer (blocks {have} do)"
        )
    figures["word_mosaic"] = plot_word_mosaic(cap, blocks=inner, path=out / "word_mosaic.png")
    figures["outer_attention"] = _attention_row(
        cap,
        query=1 + patch[0] * gw + patch[1],
        blocks=blocks0,
        title=f"Outer attention of patch {patch} (cyan) over all patches, mean of heads",
        path=out / "outer_attention.png",
        mark=patch,
    )
    figures["cls_attention"] = _attention_row(
        cap,
        query=0,
        blocks=blocks0,
        title="Class-token attention over the patches, mean of heads" + _pred_text(prediction),
        path=out / "cls_attention.png",
        mark=None,
    )
    figures["feature_maps"] = plot_feature_maps(cap, blocks=blocks0, path=out / "feature_maps.png")
    if warn is not None:
        for fig_name, reason in skipped.items():
            warn(f"skipped {fig_name}: {reason}")
    return VisualizeReport(figures=figures, skipped=skipped, capture=cap, prediction=prediction)


# ---------------------------------------------------------------------------------------- PyramidTNT


def _prediction(model: nn.Module, probs: torch.Tensor | None) -> tuple[str, float] | None:
    if probs is None:
        return None
    p, i = probs.max(0)
    labels = getattr(model, "class_names", None)
    label = labels[int(i)] if labels is not None and len(labels) == len(probs) else f"class {int(i)}"
    return (str(label), float(p))


def plot_stage_maps(cap: Capture, *, stages: Sequence[int], path: Path, channels: int = 5) -> Path:
    """Rows: stages. Column 1: the feature norm over channels, over the image; then the channels that vary
    most over the stage's grid, standardised."""
    cols = channels + 1
    fig = Figure(layout="constrained", figsize=(_PANEL * (cols + 0.5), _PANEL * len(stages) + 0.6))
    axes = fig.subplots(len(stages), cols, squeeze=False)
    H, W = cap.image.shape[:2]
    extent = (0, W, H, 0)
    for row, st in enumerate(stages):
        f = cap.features[st]  # (d, h, w)
        h, w = f.shape[1:]
        norm = f.norm(dim=0)  # (h, w)
        ax = axes[row, 0]
        _clean(ax)
        _show_image(ax, cap.image, extent)
        _overlay(ax, norm.numpy(), extent, float(norm.min()), float(norm.max()))
        ax.set_ylabel(f"stage {st + 1} ({h}x{w})", fontsize=12)
        ax.set_title("feature norm" if row == 0 else "", fontsize=9)
        flat = f.flatten(1)  # (d, h*w)
        k = min(channels, flat.shape[0])
        top = flat.std(dim=1).topk(k).indices.tolist()
        z = (flat[top] - flat[top].mean(1, keepdim=True)) / flat[top].std(1, keepdim=True).clamp_min(1e-6)
        lim = float(z.abs().max()) or 1.0
        for col in range(1, cols):
            ax = axes[row, col]
            _clean(ax)
            if col > k:
                ax.set_axis_off()
                continue
            ax.imshow(z[col - 1].reshape(h, w).numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim)
            ax.set_title(f"channel {top[col - 1]}", fontsize=9)
    fig.suptitle(f"Stage outputs: feature norm and the {channels} channels that vary most", fontsize=12)
    return _save(fig, path)


@torch.inference_mode()
def visualize_stages(
    model: nn.Module,
    image: str | Path,
    out: str | Path,
    *,
    stages: Sequence[int] | None = None,
    img_size: int | None = None,
) -> VisualizeReport:
    """``stage_maps.png`` for a hierarchical model (PyramidTNT): its stages' outputs for ``image``.

    ``stages`` are 1-based (default: all four); ``img_size`` a square size (a multiple of 8).
    """
    n = len(model.feature_info)
    stages0 = sorted({s - 1 for s in (stages or range(1, n + 1))})
    if not all(0 <= s < n for s in stages0):
        raise InputError(f"stages are numbered 1..{n} for this model, got {list(stages or [])}")
    if img_size is not None and (img_size <= 0 or img_size % model.size_divisible):
        raise InputError(f"image size {img_size} is not a positive multiple of {model.size_divisible}")
    if not Path(image).is_file():
        raise InputError(f"{image}: no such file")
    meta = model.meta if img_size is None else model.meta.resolved(img_size=img_size)
    x = eval_transform(meta)(open_image(image)).unsqueeze(0)  # (1, C, H, W)
    model = model.eval()
    final, feats = model.forward_intermediates(x, stages0, output_fmt="NCHW")
    logits = model.forward_head(final)
    mean = torch.tensor(model.meta.mean).view(-1, 1, 1)
    std = torch.tensor(model.meta.std).view(-1, 1, 1)
    cap = Capture(
        image=(x[0] * std + mean).clamp(0, 1).permute(1, 2, 0).numpy(),  # (H, W, C)
        grid=tuple(feats[0].shape[-2:]),
        words_per_side=4,
        probs=logits[0].float().softmax(-1) if getattr(model, "num_classes", 0) else None,
    )
    cap.features = {s: f[0] for s, f in zip(stages0, feats, strict=True)}  # (d, h, w) each
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = plot_stage_maps(cap, stages=stages0, path=out / "stage_maps.png")
    skipped = {name: "PyramidTNT: drawn as stage maps instead" for name in FIGURES}
    return VisualizeReport(
        figures={"stage_maps": path}, skipped=skipped, capture=cap, prediction=_prediction(model, cap.probs)
    )
