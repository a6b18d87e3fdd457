"""TNT (and any ``features_only`` model of the registry) as the backbone of torchvision's detectors.

:func:`tnt_fpn_backbone` returns a module with ``.out_channels`` whose forward maps images (B, 3, H, W) to
an ``OrderedDict`` of feature maps ``"0"``, ``"1"``, ``"2"``, ``"3"``, ``"pool"``: what torchvision's
``FasterRCNN``, ``MaskRCNN``, ``RetinaNet`` and ``FCOS`` take as ``backbone``::

    from torchvision.models.detection import FasterRCNN
    from tntvision.detection import tnt_fpn_backbone

    backbone = tnt_fpn_backbone("tnt_s_patch16_224", pretrained="tnt_s_81.5.pth.tar")
    detector = FasterRCNN(backbone, num_classes=91)

Two kinds of backbone (told apart by the ``reduction`` entries of the model's ``feature_info``):

- isotropic (every TNT: all blocks at the patch stride ``r``): the features of four evenly spaced blocks
  (blocks 3, 6, 9, 12 of 12) are resampled to strides 4, 8, 16 and 32 of the input by a "simple feature
  pyramid" neck (the recipe of the TNT paper's detection experiments, after BEiT/XCiT/ViTDet): level ``i``
  is scaled by ``2**(k0 - i)`` with ``k0 = round(log2(r / 4))``; an upscale by ``2**k`` is ``k`` stride-2
  transposed convs with norm + GELU between them, a downscale is a max pool, 1 is the identity. A patch
  size that is a power of two gives exactly strides 4, 8, 16, 32 (patch 16: 4x up, 2x up, identity, 2x
  down; patch 4: identity, 2x, 4x, 8x down); another gives the nearest ladder of doublings (patch 14: 3.5,
  7, 14, 28, as ViTDet does).
- hierarchical (reductions strictly increasing, e.g. PyramidTNT's stages at 8, 16, 32, 64): the maps go
  into the FPN as they are.

Padding rule: images of any size are padded on the right and bottom to a multiple of the backbone's
``size_divisible`` (an attribute of that name on the feature wrapper or its model when there is one, else
the largest reduction of the maps taken: the patch size of a TNT, 64 for a PyramidTNT's four stages), and
each map is cropped back to ``ceil(H / stride) x ceil(W / stride)``, the size a strided conv net (ResNet)
gives, so that the levels match what torchvision's anchor generator expects whatever padding its
``GeneralizedRCNNTransform`` did (it pads batches to 32, but nothing here relies on that).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.convnext import LayerNorm2d  # LayerNorm over the channels of (B, C, H, W)
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool

from .errors import ConfigError, InputError
from .models.factory import create_model
from .models.features import FeatureExtractor

__all__ = ["LayerNorm2d", "TNTFPNBackbone", "evenly_spaced_blocks", "tnt_fpn_backbone"]

NormName = Literal["layer", "group", "batch", "none"]
_NORMS = ("layer", "group", "batch", "none")
_TARGET_STRIDES = (4, 8, 16, 32)  # of the isotropic neck's four levels, relative to the input


def _norm_factory(norm: str, *, what: str) -> Callable[[int], nn.Module] | None:
    """``norm`` name -> a function of the channel count building the layer (None for ``"none"``)."""
    if norm == "layer":
        return LayerNorm2d
    if norm == "group":  # 32 groups, fewer when the channels are not a multiple of 32
        return lambda c: nn.GroupNorm(math.gcd(32, c), c)
    if norm == "batch":
        return nn.BatchNorm2d
    if norm == "none":
        return None
    raise ConfigError(f"{what} must be one of {', '.join(map(repr, _NORMS))}, got {norm!r}")


def evenly_spaced_blocks(depth: int, count: int = 4) -> tuple[int, ...]:
    """0-based indices of ``count`` evenly spaced blocks ending with the last: depth 12 -> (2, 5, 8, 11).

    Block ``floor((i + 1) * depth / count)`` (1-based) for i = 0 .. count-1, so depth 4 gives every block
    and depth 24 gives (5, 11, 17, 23).
    """
    if depth < count:
        raise ConfigError(f"a model of {depth} blocks has no {count} distinct blocks to take features from")
    return tuple((i + 1) * depth // count - 1 for i in range(count))


def _upsampler(channels: int, steps: int, norm: Callable[[int], nn.Module] | None) -> nn.Module:
    """``steps`` stride-2 transposed convs (2**steps up) with norm + GELU between them; identity for 0."""
    if steps == 0:
        return nn.Identity()
    layers: list[nn.Module] = []
    for i in range(steps):
        if i > 0:
            if norm is not None:
                layers.append(norm(channels))
            layers.append(nn.GELU())
        layers.append(nn.ConvTranspose2d(channels, channels, kernel_size=2, stride=2))
    return nn.Sequential(*layers)


class TNTFPNBackbone(nn.Module):
    """Feature extractor, neck (isotropic models only) and FPN; see the module docstring for the recipe.

    Attributes:
        body: the ``features_only`` wrapper (forward: list of (B, C_i, h_i, w_i) maps).
        neck: one module per map turning it to its level's stride (None for hierarchical models).
        fpn: torchvision's :class:`~torchvision.ops.FeaturePyramidNetwork`.
        out_channels: channels of every output map (what torchvision's detectors read).
        strides: stride in pixels of each FPN input level "0".."3" (the extra level is twice the last).
        size_divisible: inputs are padded to a multiple of this before the body runs.
    """

    def __init__(
        self,
        body: nn.Module,
        *,
        out_channels: int,
        neck: nn.ModuleList | None,
        scales: Sequence[tuple[int, int]],
        size_divisible: int,
        extra_blocks: ExtraFPNBlock,
        fpn_norm: Callable[[int], nn.Module] | None,
    ) -> None:
        super().__init__()
        self.body = body
        self.neck = neck
        # Each level's stride relative to the body's input as (num, den): the map of an H-pixel side has
        # ceil(H * den / num) cells. Kept as integers so that the crop sizes are exact.
        self._scales = [tuple(s) for s in scales]
        self.strides = [num / den if num % den else num // den for num, den in self._scales]
        self.size_divisible = size_divisible
        in_channels = [info["num_chs"] for info in body.feature_info]
        self.fpn = FeaturePyramidNetwork(
            in_channels, out_channels, extra_blocks=extra_blocks, norm_layer=fpn_norm
        )
        self.out_channels = out_channels

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """Images (B, C, H, W) of any size -> OrderedDict of (B, out_channels, h, w) maps, finest first."""
        if images.ndim != 4:
            raise InputError(f"expected images (B, C, H, W), got shape {tuple(images.shape)}")
        H, W = images.shape[-2:]
        d = self.size_divisible
        pad_h, pad_w = -H % d, -W % d
        if pad_h or pad_w:
            images = F.pad(images, (0, pad_w, 0, pad_h))  # right and bottom: (B, C, H', W'), multiples of d
        feats = self.body(images)  # list of (B, C_i, h_i, w_i)
        if self.neck is not None:
            feats = [layer(f) for layer, f in zip(self.neck, feats, strict=True)]
        levels: OrderedDict[str, torch.Tensor] = OrderedDict()
        for i, (f, (num, den)) in enumerate(zip(feats, self._scales, strict=True)):
            h, w = -(-H * den // num), -(-W * den // num)  # ceil(H / stride), ceil(W / stride)
            levels[str(i)] = f[..., :h, :w]  # (B, C_i, h, w): padding's extra cells dropped
        return self.fpn(levels)


def _model_size_divisible(body: nn.Module) -> int | None:
    for obj in (body, getattr(body, "model", None)):
        value = getattr(obj, "size_divisible", None)
        if value is not None:
            return int(value)
    return None


def tnt_fpn_backbone(
    name: str,
    pretrained: str | None = None,
    *,
    out_channels: int = 256,
    out_indices: Sequence[int] | None = None,
    trainable_blocks: int | None = None,
    neck_norm: NormName = "layer",
    fpn_norm: NormName = "none",
    extra_blocks: ExtraFPNBlock | None = None,
    **model_overrides: Any,
) -> TNTFPNBackbone:
    """A registered model as an FPN backbone for torchvision's detectors (see the module docstring).

    Args:
        name: a model name from :func:`tntvision.list_models`: a TNT (isotropic) or a hierarchical model
            whose ``features_only`` maps have increasing reductions (PyramidTNT).
        pretrained: weights for :func:`tntvision.create_model` (ours, timm's or the authors' files).
        out_channels: channels of every FPN output.
        out_indices: blocks to take features from: four for an isotropic model (default: four evenly
            spaced, see :func:`evenly_spaced_blocks`); for a hierarchical one, the model's own default
            (its four stages).
        trainable_blocks: how many of the model's last ``blocks`` keep training; the rest, the patch
            embedding and position tables included, are frozen (``requires_grad=False``). None (default):
            everything trains. Neck and FPN always train.
        neck_norm: norm between the transposed convs of the isotropic neck: ``"layer"`` (LayerNorm over
            channels, default: independent of the batch size, which is small in detection), ``"group"``
            (32 groups), ``"batch"`` (BatchNorm, as in BEiT/XCiT) or ``"none"``.
        fpn_norm: norm after the FPN's convs (same names; default ``"none"``, torchvision's default).
        extra_blocks: torchvision's extra FPN level; None (default) means ``LastLevelMaxPool()`` (the
            ``"pool"`` map at twice the last stride), as in torchvision's ``resnet_fpn_backbone``: five
            levels, as many as the default anchor generators of FasterRCNN, RetinaNet and FCOS have.
            ``LastLevelP6P7(out_channels, out_channels)`` adds "p6" and "p7" instead (six levels: give
            the detector an anchor generator with six sizes).
        **model_overrides: config fields for :func:`tntvision.create_model` (``img_size``, ``in_chans``,
            ``drop_path_rate``, ...).

    Raises:
        ConfigError: bad arguments (an unknown config field, an isotropic model without four distinct
            blocks, reductions that neither stay equal nor increase, ``trainable_blocks`` out of range,
            an unknown norm, ``extra_blocks`` that is not an ``ExtraFPNBlock``).
        UnknownModelError: an unknown model name.
    """
    _check_out_channels(out_channels)
    neck_factory = _norm_factory(neck_norm, what="neck_norm")
    fpn_factory = _norm_factory(fpn_norm, what="fpn_norm")
    extra_blocks = _extra_fpn_block(extra_blocks)
    out_indices = _block_indices(out_indices)
    body, model, isotropic = _feature_body(name, pretrained, out_indices, model_overrides)
    if isotropic:
        levels = _isotropic_levels(body, name=name, out_indices=out_indices, norm=neck_factory)
    else:
        levels = _hierarchical_levels(body, name=name)
    if trainable_blocks is not None:
        _freeze_all_but_last_blocks(model, trainable_blocks, name=name)
    return TNTFPNBackbone(
        body,
        out_channels=out_channels,
        neck=levels.neck,
        scales=levels.scales,
        size_divisible=levels.size_divisible,
        extra_blocks=extra_blocks,
        fpn_norm=fpn_factory,
    )


def _check_out_channels(out_channels: int) -> None:
    if isinstance(out_channels, bool) or not isinstance(out_channels, int) or out_channels <= 0:
        raise ConfigError(f"out_channels must be a positive int, got {out_channels!r}")


def _extra_fpn_block(extra_blocks: ExtraFPNBlock | None) -> ExtraFPNBlock:
    """``extra_blocks`` as given, checked; ``LastLevelMaxPool()`` for None."""
    if extra_blocks is None:
        return LastLevelMaxPool()
    if not isinstance(extra_blocks, ExtraFPNBlock):
        raise ConfigError(
            f"extra_blocks must be a torchvision ExtraFPNBlock (e.g. LastLevelMaxPool()), got "
            f"{type(extra_blocks).__name__}"
        )
    return extra_blocks


def _block_indices(out_indices: Sequence[int] | None) -> tuple[int, ...] | None:
    """``out_indices`` as a tuple of ints (None stays None)."""
    if out_indices is None:
        return None
    if isinstance(out_indices, int) or not all(isinstance(i, int) for i in out_indices):
        raise ConfigError(f"out_indices must be a sequence of block indices, got {out_indices!r}")
    return tuple(out_indices)


def _feature_body(
    name: str, pretrained: str | None, out_indices: tuple[int, ...] | None, model_overrides: dict[str, Any]
) -> tuple[nn.Module, nn.Module, bool]:
    """The ``features_only`` wrapper, its model (classifier dropped) and whether the model is isotropic.

    An isotropic model given no ``out_indices`` takes four evenly spaced blocks (create_model's default
    is the last four)."""
    body = create_model(name, pretrained, features_only=True, out_indices=out_indices, **model_overrides)
    model = getattr(body, "model", body)
    if hasattr(model, "reset_classifier"):
        model.reset_classifier(0)  # the classifier is never run: drop its weights
    all_info = getattr(model, "feature_info", None) or body.feature_info
    isotropic = len({info["reduction"] for info in all_info}) == 1
    if isotropic and out_indices is None:
        body = FeatureExtractor(model, out_indices=evenly_spaced_blocks(len(all_info)))
    return body, model, isotropic


class _Levels(NamedTuple):
    """How the body's maps become the FPN's input levels (the arguments of :class:`TNTFPNBackbone`)."""

    neck: nn.ModuleList | None
    scales: list[tuple[int, int]]  # each level's stride as (num, den)
    size_divisible: int


def _isotropic_levels(
    body: nn.Module,
    *,
    name: str,
    out_indices: tuple[int, ...] | None,
    norm: Callable[[int], nn.Module] | None,
) -> _Levels:
    """The simple feature pyramid: four maps at the patch stride ``r`` rescaled to strides 4, 8, 16, 32."""
    if len(body.feature_info) != 4:
        raise ConfigError(
            f"{name} is isotropic: the neck needs exactly 4 distinct blocks, got out_indices "
            f"{list(getattr(body, 'out_indices', out_indices or ()))}"
        )
    r = int(body.feature_info[0]["reduction"])
    k0 = math.floor(math.log2(r / _TARGET_STRIDES[0]) + 0.5)  # log2 of the finest level's scale
    steps = [k0 - i for i in range(4)]  # > 0: upscale by 2**steps, < 0: downscale, 0: identity
    channels = [int(info["num_chs"]) for info in body.feature_info]
    neck = nn.ModuleList(_neck_layer(c, s, norm) for c, s in zip(channels, steps, strict=True))
    scales = [(r, 2**s) if s >= 0 else (r * 2**-s, 1) for s in steps]  # stride = num / den
    return _Levels(neck, scales, _model_size_divisible(body) or r)


def _neck_layer(channels: int, steps: int, norm: Callable[[int], nn.Module] | None) -> nn.Module:
    """Scale a map by ``2**steps``: transposed convs up, a max pool down, the identity for 0."""
    if steps >= 0:
        return _upsampler(channels, steps, norm)
    return nn.MaxPool2d(kernel_size=2**-steps, stride=2**-steps, ceil_mode=True)


def _hierarchical_levels(body: nn.Module, *, name: str) -> _Levels:
    """A hierarchical model's maps go into the FPN as they are, at their own (increasing) strides."""
    reductions = [int(info["reduction"]) for info in body.feature_info]
    if any(b <= a for a, b in zip(reductions, reductions[1:], strict=False)):
        raise ConfigError(
            f"{name}: the feature maps' reductions {reductions} neither stay equal (isotropic) nor "
            "increase (hierarchical)"
        )
    return _Levels(None, [(red, 1) for red in reductions], _model_size_divisible(body) or max(reductions))


def _freeze_all_but_last_blocks(model: nn.Module, trainable: int, *, name: str) -> None:
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise ConfigError(f"{name} has no `blocks` list, so trainable_blocks cannot be applied")
    if isinstance(trainable, bool) or not isinstance(trainable, int) or not 0 <= trainable <= len(blocks):
        raise ConfigError(
            f"trainable_blocks must be an int in [0, {len(blocks)}] for {name}, got {trainable!r}"
        )
    if trainable == len(blocks):
        return
    model.requires_grad_(False)
    for block in blocks[len(blocks) - trainable :]:
        block.requires_grad_(True)
