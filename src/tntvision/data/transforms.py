"""Image loading and preprocessing driven by a model's :class:`~tntvision.models.registry.ModelMeta`."""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from ..errors import DataError, ImageTooLargeError, read_failure
from ..models.registry import ModelMeta

__all__ = [
    "ToModelMode",
    "batch_mixer",
    "eval_transform",
    "open_image",
    "to_model_mode",
    "train_transform",
]

_INTERPOLATION = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}


def open_image(
    path: str | Path | BinaryIO, *, max_pixels: int | None = None, name: str | None = None
) -> Image.Image:
    """Open any image Pillow reads, with its EXIF orientation applied; :class:`DataError` if it is not one.

    Args:
        path: a file name, or a binary file object (an upload held in memory).
        max_pixels: refuse an image that declares more pixels than this, from its header, before any
            pixel is decoded (a decompression bomb: a small file that unpacks to gigabytes). None:
            Pillow's own limit (``Image.MAX_IMAGE_PIXELS``).
        name: what messages call the image (default: ``path``).
    """
    label = name or path
    try:
        with Image.open(path) as img:  # reads the header only; pixels are decoded by load()
            width, height = img.size
            if max_pixels is None or width * height <= max_pixels:
                img.load()
                return ImageOps.exif_transpose(img)
    except Image.DecompressionBombError as e:  # over twice Pillow's own limit, refused by Image.open
        raise ImageTooLargeError(f"{label}: {e}") from e
    except (PermissionError, FileNotFoundError, IsADirectoryError) as e:  # the file, not its content
        raise DataError(read_failure(label, "an image", e)) from e
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{label}: not a readable image ({e})") from e
    raise ImageTooLargeError(
        f"{label}: the image declares {width}x{height} pixels, more than the limit of {max_pixels:,}"
    )


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

    Resize the short side to ``meta.resize_size`` (floor of size / crop_pct), centre-crop ``size``, scale to
    [0, 1], normalise. The resize and crop run on the PIL image, with Pillow's resampling, as timm's eval
    transform does: the same pixels as ``timm.data.create_transform(**model.pretrained_cfg)``.
    """
    in_chans, height, width = meta.input_size
    return T.Compose(
        [
            ToModelMode(in_chans),
            T.Resize(meta.resize_size, interpolation=_INTERPOLATION[meta.interpolation], antialias=True),
            T.CenterCrop((height, width)),
            T.PILToTensor(),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(mean=list(meta.mean), std=list(meta.std)),
        ]
    )


def train_transform(
    meta: ModelMeta,
    *,
    crop: str = "random_resized",
    scale: tuple[float, float] = (0.08, 1.0),
    padding: int = 4,
    hflip: float = 0.5,
    randaugment_magnitude: int = 9,
    randaugment_ops: int = 2,
    random_erasing: float = 0.25,
) -> T.Compose:
    """PIL image (any mode) -> augmented, normalised (C, H, W) float tensor for training.

    The DeiT recipe: ``crop="random_resized"`` (area ``scale``, bicubic), horizontal flip, RandAugment,
    normalise, random erasing. ``crop="pad"`` is the small-image variant: resize to the input size, then
    a random crop of the zero-padded image (``padding`` px each side), which keeps 28 px objects whole.
    ``randaugment_magnitude=0`` or ``random_erasing=0`` turn those parts off. Randomness comes from torch's
    global generator, so seeding it before each sample makes the augmentation reproducible.

    torchvision's RandAugment has no magnitude noise (timm's ``mstd0.5``): the magnitude is fixed.
    """
    in_chans, height, width = meta.input_size
    interp = _INTERPOLATION[meta.interpolation]
    steps: list = [ToModelMode(in_chans), T.PILToTensor()]
    if crop == "random_resized":
        steps.append(T.RandomResizedCrop((height, width), scale=scale, interpolation=interp, antialias=True))
    elif crop == "pad":
        steps.append(T.Resize((height, width), interpolation=interp, antialias=True))
        if padding > 0:
            steps.append(T.RandomCrop((height, width), padding=padding))
    else:
        raise DataError(f"crop must be 'random_resized' or 'pad', got {crop!r}")
    if hflip > 0:
        steps.append(T.RandomHorizontalFlip(hflip))
    if randaugment_magnitude > 0 and randaugment_ops > 0:
        steps.append(
            # bilinear: the tensor kernels of RandAugment's affine ops have no bicubic
            T.RandAugment(
                num_ops=randaugment_ops,
                magnitude=randaugment_magnitude,
                interpolation=InterpolationMode.BILINEAR,
            )
        )
    steps += [T.ToDtype(torch.float32, scale=True), T.Normalize(mean=list(meta.mean), std=list(meta.std))]
    if random_erasing > 0:
        # Erase with per-pixel normal noise as DeiT does (timm's mode "pixel"); value="random" in v2.
        steps.append(T.RandomErasing(p=random_erasing, value="random"))
    return T.Compose(steps)


def batch_mixer(*, num_classes: int, mixup: float, cutmix: float, switch_prob: float = 0.5):
    """MixUp / CutMix on a batch ``(images, labels) -> (images, soft labels (B, K))``, or None if both off.

    ``mixup`` and ``cutmix`` are the Beta(alpha, alpha) parameters (0: off); with both on, each batch
    takes CutMix with probability ``switch_prob`` (DeiT: mixup 0.8, cutmix 1.0, switch 0.5).
    """
    parts = []
    if mixup > 0:
        parts.append(T.MixUp(alpha=mixup, num_classes=num_classes))
    if cutmix > 0:
        parts.append(T.CutMix(alpha=cutmix, num_classes=num_classes))
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    return T.RandomChoice(parts, p=[1.0 - switch_prob, switch_prob])
