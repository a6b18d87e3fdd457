"""Checkpoint reading and adaptation: every TNT weight layout people have -> our model.

One entry point, :func:`load_pretrained`, reads a file safely (safetensors, or ``torch.load`` with
``weights_only=True``), unwraps training checkpoints, maps the authors' and mmpretrain's key names to ours
(docs/architecture.md, "Checkpoint layouts"), detects the structure (official / legacy) and the widths,
resamples the patch position table to the model's grid, adapts the first conv to another channel count,
replaces a head of another size by a fresh one, and refuses anything else with a message that says what
the checkpoint is and what was expected.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError, read_failure
from .layers import resample_pos_embed
from .pyramid_tnt import PyramidTNT, kv_grid, resample_relative_pos, stage_grids

__all__ = [
    "CheckpointError",
    "CheckpointInfo",
    "LoadReport",
    "PyramidCheckpointInfo",
    "adapt_state_dict",
    "describe_pyramid_state_dict",
    "describe_state_dict",
    "is_pyramid_state_dict",
    "load_pretrained",
    "load_state_dict_into",
    "read_state_dict",
    "to_tntvision_keys",
]

# Containers that training scripts wrap weights in, most preferred first (EMA weights are what the
# authors and timm evaluate).
_WRAPPERS = ("state_dict_ema", "model_ema", "ema", "state_dict", "model")
_STRIP_PREFIXES = ("module.", "_orig_mod.")

# Authors' (huawei-noah Efficient-AI-Backbones tnt_pytorch) name segment -> ours (= timm's).
_AUTHOR_SEGMENTS = {
    "outer_pos": "patch_pos",
    "inner_pos": "pixel_pos",
    "patch_embed": "pixel_embed",
    "proj_norm1": "norm1_proj",
    "proj_norm2": "norm2_proj",
    "inner_norm1": "norm_in",
    "inner_attn": "attn_in",
    "inner_norm2": "norm_mlp_in",
    "inner_mlp": "mlp_in",
    "outer_norm1": "norm_out",
    "outer_attn": "attn_out",
    "outer_norm2": "norm_mlp",
    "outer_mlp": "mlp",
    "se_layer": "se",
}
_AUTHOR_ONLY = {"outer_tokens"}  # a frozen zero tensor the authors register and never use

# mmpretrain (``mmpretrain/models/backbones/tnt.py``, legacy structure) inside an ImageClassifier: keys start
# with ``backbone.``, the head is ``head.fc``. Each ``layers.{i}`` holds an ``inner_block`` and an
# ``outer_block`` (mmcv transformer blocks: ``norm_attn``, ``attn.attn`` = torch's MultiheadAttention with
# q, k, v stacked in ``in_proj_weight``, ``norm_ffn``, ``ffn.layers.0.0`` = fc1, ``ffn.layers.1`` = fc2)
# and ``norm_proj`` / ``projection`` between them. mmcv block part -> ours, per transformer.
_MM_BLOCK_PARTS = {
    "inner_block": {"norm_attn": "norm_in", "attn.attn.out_proj": "attn_in.proj", "norm_ffn": "norm_mlp_in",
                    "ffn.layers.0.0": "mlp_in.fc1", "ffn.layers.1": "mlp_in.fc2"},
    "outer_block": {"norm_attn": "norm_out", "attn.attn.out_proj": "attn_out.proj", "norm_ffn": "norm_mlp",
                    "ffn.layers.0.0": "mlp.fc1", "ffn.layers.1": "mlp.fc2"},
}  # fmt: skip
_MM_ATTN = {"inner_block": "attn_in", "outer_block": "attn_out"}


@dataclass
class CheckpointInfo:
    """What a TNT state dict (in our key layout) is."""

    embed_dim: int
    inner_dim: int
    depth: int
    in_chans: int
    words_per_side: int
    num_patches: int
    num_classes: int  # 0 when there is no head
    legacy: bool | None  # None: no block has an inner transformer, so the structure cannot be told
    inner_blocks: tuple[int, ...]
    se: bool

    def describe(self) -> str:
        structure = {True: "legacy", False: "official", None: "unknown"}[self.legacy]
        return (
            f"{structure}-structure TNT with embed_dim={self.embed_dim}, inner_dim={self.inner_dim}, "
            f"depth={self.depth}, in_chans={self.in_chans}, {self.num_patches} patches, "
            f"{self.num_classes} classes{', SE' if self.se else ''}"
        )


@dataclass
class PyramidCheckpointInfo:
    """What a PyramidTNT state dict (the authors' key layout, which is ours) is."""

    depths: tuple[int, ...]
    outer_dims: tuple[int, ...]
    inner_dims: tuple[int, ...]
    inner_blocks: tuple[tuple[int, ...], ...]
    in_chans: int
    grid: int  # side of the (square) stage-0 sentence grid the absolute table was trained for
    num_classes: int

    def describe(self) -> str:
        return (
            f"PyramidTNT with depths={list(self.depths)}, outer_dims={list(self.outer_dims)}, "
            f"inner_dims={list(self.inner_dims)}, in_chans={self.in_chans}, {self.grid}x{self.grid} "
            f"sentences ({self.grid * 8} px), {self.num_classes} classes"
        )


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did to make the weights fit."""

    source: str = ""
    layout: str = ""  # "tntvision/timm", "authors" or "mmpretrain"
    wrapper: str | None = None
    dropped: list[str] = field(default_factory=list)
    resampled_pos: tuple[int, int] | None = None  # old grid, when the patch table was resampled
    adapted_in_chans: tuple[int, int] | None = None
    head_reset: bool = False

    def lines(self) -> list[str]:
        out = [
            f"loaded {self.source} ({self.layout} layout{', from ' + self.wrapper if self.wrapper else ''})"
        ]
        if self.dropped:
            out.append(f"dropped unused keys: {', '.join(self.dropped)}")
        if self.resampled_pos:
            out.append(
                f"resampled patch position table from a {self.resampled_pos[0]}x{self.resampled_pos[1]} grid"
            )
        if self.adapted_in_chans:
            out.append(
                f"adapted first conv from {self.adapted_in_chans[0]} to {self.adapted_in_chans[1]} channels"
            )
        if self.head_reset:
            out.append("classifier head has another size: replaced by a fresh one")
        return out


# ---------------------------------------------------------------------------------------------- read


def _resolve_weights_file(path: Path) -> Path:
    if path.is_dir():
        for cand in (path / "model.safetensors", path / "model" / "model.safetensors"):
            if cand.is_file():
                return cand
        raise CheckpointError(f"{path}: a folder without model.safetensors or model/model.safetensors")
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    return path


EXPORTED_SUFFIXES = (".onnx", ".pt2")  # exported graphs (tntvision.tools.export): no weights to train


def is_exported_file(path: str | Path) -> bool:
    """Whether ``path`` names an exported model (by its suffix)."""
    return Path(path).suffix.lower() in EXPORTED_SUFFIXES


def refuse_exported(path: str | Path | None, *, why: str, option: str = "--checkpoint") -> None:
    """Refuse an exported file where the PyTorch model itself is needed (its layers, its weights).

    ``option`` names what the user should pass the weights to (``"--pretrained"``; ``""`` for none).

    Raises:
        CheckpointError: ``path`` ends in ``.onnx`` / ``.pt2``; the message says ``why`` and what to pass.
    """
    if path is not None and is_exported_file(path):
        raise CheckpointError(
            f"{Path(path).name} is an exported graph: {why}; pass {option + ' ' if option else ''}the run "
            "folder, model/ folder or weights file it was exported from"
        )


def _is_safetensors(path: Path) -> bool:
    """Whether the file starts as safetensors does (an 8-byte header length, then a JSON object), whatever
    its name (release files named ``.pth`` / ``.bin`` may hold safetensors)."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False  # torch.load below reports it
    return (
        len(head) == 9 and head[8:] == b"{" and 0 < int.from_bytes(head[:8], "little") < path.stat().st_size
    )


def read_state_dict(path: str | Path, *, use_ema: bool = True) -> tuple[dict[str, torch.Tensor], str | None]:
    """Read tensors from a weights file (or a model/run folder) without unpickling arbitrary objects.

    Returns the flat state dict and the name of the wrapper it was taken from (``state_dict_ema`` ...).
    """
    path = _resolve_weights_file(Path(path))
    refuse_exported(path, why="it holds no trainable weights", option="")
    try:
        if path.suffix == ".safetensors" or _is_safetensors(path):
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        else:
            # argparse.Namespace: the training arguments timm-style scripts save beside the weights
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - OSError, a damaged file, a pickle weights-only loading refuses
        raise CheckpointError(read_failure(path, "a weights file", e)) from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    wrapper = None
    wrappers = _WRAPPERS if use_ema else tuple(w for w in _WRAPPERS if "ema" not in w)
    for key in wrappers:
        if isinstance(obj.get(key), dict) and obj[key]:
            obj, wrapper = obj[key], key
            break
    sd = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            continue  # epoch counters, args, ... next to the weights
        for prefix in _STRIP_PREFIXES:
            if k.startswith(prefix):
                k = k[len(prefix) :]
        sd[k] = v
    if not sd:
        raise CheckpointError(f"{path}: holds no tensors")
    return sd, wrapper


# ------------------------------------------------------------------------------------------- adapt


def _is_authors_layout(sd: dict[str, torch.Tensor]) -> bool:
    return (
        "outer_pos" in sd or "inner_pos" in sd or any(".inner_attn." in k or ".outer_attn." in k for k in sd)
    )


def _is_mmpretrain_layout(sd: dict[str, torch.Tensor]) -> bool:
    return "backbone.patch_pos" in sd or any(k.startswith("backbone.layers.") for k in sd)


def _from_mmpretrain_key(key: str) -> str | None:
    """Our name for an mmpretrain key (None: not part of the model); q/k/v are split by the caller."""
    if key.startswith("head.fc."):
        return "head." + key[len("head.fc.") :]
    if not key.startswith("backbone."):
        return None  # data_preprocessor buffers and other parts of the classifier
    key = key[len("backbone.") :]
    if key.startswith("projection."):
        return "proj." + key[len("projection.") :]
    if not key.startswith("layers."):
        return key  # pixel_embed.proj, norm1_proj, norm2_proj, cls_token, patch_pos, pixel_pos, norm
    _, index, rest = key.split(".", 2)
    for old, new in (("norm_proj.", "norm1_proj."), ("projection.", "proj.")):
        if rest.startswith(old):
            return f"blocks.{index}.{new}{rest[len(old) :]}"
    block, _, rest = rest.partition(".")
    for old, new in _MM_BLOCK_PARTS.get(block, {}).items():
        if rest.startswith(old + "."):
            return f"blocks.{index}.{new}{rest[len(old) :]}"
    return f"blocks.{index}.{block}.{rest}"  # unknown: reported as unexpected when loading


def _from_mmpretrain(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """mmpretrain's TNT classifier -> our keys; returns (state dict, dropped keys)."""
    out, dropped = {}, []
    for key, v in sd.items():
        m = re.fullmatch(
            r"backbone\.layers\.(\d+)\.(inner_block|outer_block)\.attn\.attn\.in_proj_(weight|bias)", key
        )
        if m is not None:  # (3c, ...) stacked q, k, v -> our qk (2c, ...) and v (c, ...)
            index, block, kind = m.groups()
            c = v.shape[0] // 3
            out[f"blocks.{index}.{_MM_ATTN[block]}.qk.{kind}"] = v[: 2 * c]
            out[f"blocks.{index}.{_MM_ATTN[block]}.v.{kind}"] = v[2 * c :]
            continue
        new = _from_mmpretrain_key(key)
        if new is None:
            dropped.append(key)
        else:
            out[new] = v
    return out, dropped


def to_tntvision_keys(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str, list[str]]:
    """Map a state dict in the authors', mmpretrain's or timm's layout to ours (timm's names).

    Returns (state dict, layout name, dropped keys).
    """
    if "patch_pos" in sd and "pixel_embed.proj.weight" in sd:
        return dict(sd), "tntvision/timm", []
    if _is_mmpretrain_layout(sd):
        out, dropped = _from_mmpretrain(sd)
        return out, "mmpretrain", dropped
    if not _is_authors_layout(sd):
        sample = ", ".join(list(sd)[:5])
        raise CheckpointError(f"not a TNT state dict (first keys: {sample})")
    out, dropped = {}, []
    for k, v in sd.items():
        if k in _AUTHOR_ONLY:
            dropped.append(k)
            continue
        k = ".".join(_AUTHOR_SEGMENTS.get(seg, seg) for seg in k.split("."))
        if k == "pixel_pos" and v.ndim == 3:  # (1, m, c) -> (1, c, side, side)
            side = math.isqrt(v.shape[1])
            v = v.permute(0, 2, 1).reshape(v.shape[0], v.shape[2], side, side)
        out[k] = v
    return out, "authors", dropped


def describe_state_dict(sd: dict[str, torch.Tensor]) -> CheckpointInfo:
    """Widths, depth and structure of a state dict in our key layout."""
    try:
        patch_pos, pixel_pos = sd["patch_pos"], sd["pixel_pos"]
        conv = sd["pixel_embed.proj.weight"]
    except KeyError as e:
        raise CheckpointError(f"not a TNT state dict: missing {e.args[0]!r}") from e
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    inner = tuple(sorted(i for i in blocks if f"blocks.{i}.attn_in.qk.weight" in sd))
    legacy = None
    if inner:
        legacy = f"blocks.{inner[0]}.norm2_proj.weight" not in sd
    head = sd.get("head.weight")
    return CheckpointInfo(
        embed_dim=patch_pos.shape[-1],
        inner_dim=pixel_pos.shape[1],
        depth=max(blocks) + 1 if blocks else 0,
        in_chans=conv.shape[1],
        words_per_side=pixel_pos.shape[-1],
        num_patches=patch_pos.shape[1] - 1,
        num_classes=head.shape[0] if head is not None else 0,
        legacy=legacy,
        inner_blocks=inner,
        se=any(".se." in k for k in sd),
    )


def _adapt_in_chans(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """First-conv weight (c, C, k, k) -> (c, in_chans, k, k), keeping the response to grey inputs."""
    C = weight.shape[1]
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    reps = math.ceil(in_chans / C)
    return weight.repeat(1, reps, 1, 1)[:, :in_chans] * (C / in_chans)


def _fit_first_conv_and_head(
    sd: dict[str, torch.Tensor], model: nn.Module, report: LoadReport, first_conv: str
) -> dict[str, torch.Tensor]:
    """Adapt ``sd[first_conv]`` to the model's channel count and drop a head of another size."""
    have, want = sd[first_conv].shape[1], model.cfg.in_chans
    if have != want:
        sd[first_conv] = _adapt_in_chans(sd[first_conv], want)
        report.adapted_in_chans = (have, want)
    head_shape = tuple(model.head.weight.shape) if isinstance(model.head, nn.Linear) else None
    if head_shape != (tuple(sd["head.weight"].shape) if "head.weight" in sd else None):
        sd.pop("head.weight", None)
        sd.pop("head.bias", None)
        report.head_reset = head_shape is not None
    return sd


def adapt_state_dict(
    sd: dict[str, torch.Tensor], model: nn.Module, report: LoadReport | None = None
) -> dict[str, torch.Tensor]:
    """Make a state dict (any supported layout) fit ``model``, or raise :class:`CheckpointError`."""
    report = report if report is not None else LoadReport()
    name = getattr(model, "model_name", None) or type(model).__name__
    if isinstance(model, PyramidTNT):
        return adapt_pyramid_state_dict(sd, model, report)
    if is_pyramid_state_dict(sd):
        info = describe_pyramid_state_dict(sd)
        raise CheckpointError(f"checkpoint is a {info.describe()}, not a TNT; load it with a ptnt_* model")
    sd, report.layout, report.dropped = to_tntvision_keys(sd)
    info = describe_state_dict(sd)
    cfg = model.cfg
    model_legacy = cfg.legacy if cfg.inner_blocks else None
    if info.legacy is not None and model_legacy is not None and info.legacy != model_legacy:
        want = "legacy" if model_legacy else "official"
        hint = (
            "tnt_s_legacy_patch16_224" if info.legacy else "tnt_s_patch16_224 (or another official variant)"
        )
        raise CheckpointError(
            f"checkpoint is a {info.describe()}, but {name} has the {want} structure; "
            f"weights of one structure do not fit the other (try {hint})"
        )
    widths = (info.embed_dim, info.inner_dim, info.depth)
    if widths != (cfg.embed_dim, cfg.inner_dim, cfg.depth) or info.se != (cfg.se_ratio > 0):
        raise CheckpointError(
            f"checkpoint is a {info.describe()}; {name} expects embed_dim={cfg.embed_dim}, "
            f"inner_dim={cfg.inner_dim}, depth={cfg.depth}{', SE' if cfg.se_ratio > 0 else ''}"
        )
    if tuple(info.inner_blocks) != tuple(cfg.inner_blocks):
        raise CheckpointError(
            f"checkpoint has inner transformers in blocks {list(info.inner_blocks)}, "
            f"{name} in blocks {list(cfg.inner_blocks)}"
        )
    if sd["pixel_pos"].shape != model.pixel_pos.shape:
        raise CheckpointError(
            f"checkpoint has {info.words_per_side}x{info.words_per_side} words per patch, "
            f"{name} has {model.pixel_embed.words_per_side}x{model.pixel_embed.words_per_side}"
        )
    if sd["patch_pos"].shape != model.patch_pos.shape:
        side = math.isqrt(info.num_patches)
        if side * side != info.num_patches:
            raise CheckpointError(
                f"checkpoint position table has {info.num_patches} patches, not a square grid"
            )
        sd["patch_pos"] = resample_pos_embed(sd["patch_pos"], model.grid_size, old_grid=(side, side))
        report.resampled_pos = (side, side)
    return _fit_first_conv_and_head(sd, model, report, "pixel_embed.proj.weight")


# ------------------------------------------------------------------------------------------ PyramidTNT


def is_pyramid_state_dict(sd: dict[str, torch.Tensor]) -> bool:
    """Whether ``sd`` holds a PyramidTNT (the authors' layout: a conv stem and ``stages.*``)."""
    return "patch_embed.common_conv.0.weight" in sd or any(k.startswith("stages.") for k in sd)


def describe_pyramid_state_dict(sd: dict[str, torch.Tensor]) -> PyramidCheckpointInfo:
    """Depths, widths and training grid of a PyramidTNT state dict."""
    try:
        outer_pos, stem = sd["outer_pos"], sd["patch_embed.common_conv.0.weight"]
        inner = [sd["inner_pos"].shape[-1]]
        inner += [sd[f"word_merges.{i}.conv.0.weight"].shape[0] for i in range(3)]
    except KeyError as e:
        raise CheckpointError(f"not a PyramidTNT state dict: missing {e.args[0]!r}") from e
    blocks: dict[int, set[int]] = {}
    for k in sd:
        if m := re.match(r"stages\.(\d+)\.blocks\.(\d+)\.", k):
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    stages = sorted(blocks)
    if stages != [0, 1, 2, 3]:
        raise CheckpointError(f"not a PyramidTNT state dict: blocks of stages {stages}, expected 0-3")
    outer = [sd[f"stages.{i}.blocks.0.outer_norm1.weight"].shape[0] for i in stages]
    inner_blocks = tuple(
        tuple(j for j in sorted(blocks[i]) if f"stages.{i}.blocks.{j}.inner_attn.q.weight" in sd)
        for i in stages
    )
    side = math.isqrt(outer_pos.shape[1])
    if side * side != outer_pos.shape[1]:
        raise CheckpointError(f"PyramidTNT position table has {outer_pos.shape[1]} sentences, not a square")
    head = sd.get("head.weight")
    return PyramidCheckpointInfo(
        depths=tuple(len(blocks[i]) for i in stages),
        outer_dims=tuple(outer),
        inner_dims=tuple(inner),
        inner_blocks=inner_blocks,
        in_chans=stem.shape[1],
        grid=side,
        num_classes=head.shape[0] if head is not None else 0,
    )


def adapt_pyramid_state_dict(
    sd: dict[str, torch.Tensor], model: nn.Module, report: LoadReport
) -> dict[str, torch.Tensor]:
    """Make a PyramidTNT state dict fit ``model``: tables resampled, first conv and head adapted."""
    name = getattr(model, "model_name", None) or type(model).__name__
    if not is_pyramid_state_dict(sd):
        raise CheckpointError(
            f"checkpoint is not a PyramidTNT (first keys: {', '.join(list(sd)[:4])}); {name} is"
        )
    sd = dict(sd)
    report.layout = "authors (PyramidTNT)"
    info, cfg = describe_pyramid_state_dict(sd), model.cfg
    have = (info.depths, info.outer_dims, info.inner_dims, info.inner_blocks)
    want = (cfg.depths, cfg.outer_dims, cfg.inner_dims, cfg.inner_blocks)
    if have != want:
        raise CheckpointError(
            f"checkpoint is a {info.describe()} with inner transformers in blocks "
            f"{[list(b) for b in info.inner_blocks]}; {name} has depths={list(cfg.depths)}, "
            f"outer_dims={list(cfg.outer_dims)}, inner_dims={list(cfg.inner_dims)}, "
            f"inner blocks {[list(b) for b in cfg.inner_blocks]}"
        )
    if sd["outer_pos"].shape != model.outer_pos.shape:
        old = stage_grids(info.grid * 8, info.grid * 8)
        sd["outer_pos"] = resample_pos_embed(sd["outer_pos"], model.grid_size, old_grid=old[0], num_prefix=0)
        for i, stage in enumerate(model.stages):
            key = f"stages.{i}.relative_pos"
            sr = cfg.sr_ratios[i]
            sd[key] = resample_relative_pos(
                sd[key], stage.grid, stage.kv_grid, old_grid=old[i], old_kv_grid=kv_grid(old[i], sr)
            )
        report.resampled_pos = (info.grid, info.grid)
    return _fit_first_conv_and_head(sd, model, report, "patch_embed.common_conv.0.weight")


def load_pretrained(model: nn.Module, path: str | Path, *, use_ema: bool = True) -> LoadReport:
    """Load weights from ``path`` (any supported layout) into ``model``; see the module docstring.

    Missing or unexpected keys after adaptation raise :class:`CheckpointError` listing them: they are
    never silently ignored.
    """
    sd, wrapper = read_state_dict(path, use_ema=use_ema)
    return load_state_dict_into(model, sd, source=str(path), wrapper=wrapper)


def load_state_dict_into(
    model: nn.Module, sd: dict[str, torch.Tensor], *, source: str, wrapper: str | None = None
) -> LoadReport:
    """:func:`load_pretrained` for a state dict already read (``source`` names it in messages)."""
    path = source
    report = LoadReport(source=source, wrapper=wrapper)
    sd = adapt_state_dict(sd, model, report)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if report.head_reset or (not isinstance(model.head, nn.Linear)):
        missing = [k for k in missing if not k.startswith("head.")]
    if missing or unexpected:
        parts = [
            f"{what} {len(keys)} keys ({', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''})"
            for what, keys in (("missing", missing), ("unexpected", unexpected))
            if keys
        ]
        name = getattr(model, "model_name", None) or "the model"
        raise CheckpointError(f"{path}: weights do not match {name}: " + "; ".join(parts))
    model.load_report = report
    return report


def read_model_config(folder: Path) -> dict | None:
    """The ``config.json`` written by :func:`tntvision.save_model`, or None."""
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        return None
    try:
        return json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: unreadable model config ({e})") from e
