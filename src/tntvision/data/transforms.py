"""Image loading and preprocessing driven by a model's :class:`~tntvision.models.registry.ModelMeta`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from ..errors import DataError
from ..models.registry import ModelMeta

__all__ = ["ToModelMode", "eval_transform", "open_image", "to_model_mode"]

_INTERPOLATION = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}


def open_image(path: str | Path) -> Image.Image:
    """Open any image Pillow reads, with its EXIF orientation applied; :class:`DataError` if it is not one."""
    try:
        with Image.open(path) as img:
            img.load()
            return ImageOps.exif_transpose(img)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: not a readable image ({e})") from None


def to_model_mode(img: Image.Image, in_chans: int) -> Image.Image:
    """Convert any Pillow mode to 8-bit grey (1 channel) or RGB (3 channels).

    16-bit and float images are scaled to 8 bits by their value range instead of clipped; transparent
    pixels are composited on white.
    """
    if in_chans not in (1, 3):
        raise DataError(f"images can be converted to 1 or 3 channels, the model takes {in_chans}")
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img.convert("RGBA"))
    return img.convert("L" if in_chans == 1 else "RGB")


class ToModelMode:
    """Picklable transform form of :func:`to_model_mode` (DataLoader workers may be spawned)."""

    def __init__(self, in_chans: int) -> None:
        self.in_chans = in_chans

    def __call__(self, img: Image.Image) -> Image.Image:
        return to_model_mode(img, self.in_chans)

    def __repr__(self) -> str:
        return f"ToModelMode(in_chans={self.in_chans})"


def eval_transform(meta: ModelMeta) -> T.Compose:
    """PIL image (any mode) -> normalised (C, H, W) float tensor, as the model was evaluated.

    Resize the short side to ``size / crop_pct``, centre-crop ``size``, scale to [0, 1], normalise.
    """
    in_chans, height, width = meta.input_size
    resize = int(round(min(height, width) / meta.crop_pct))
    return T.Compose(
        [
            ToModelMode(in_chans),
            T.PILToTensor(),
            T.Resize(resize, interpolation=_INTERPOLATION[meta.interpolation], antialias=True),
            T.CenterCrop((height, width)),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(mean=list(meta.mean), std=list(meta.std)),
        ]
    )
