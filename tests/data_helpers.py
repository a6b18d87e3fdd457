"""Tiny data sets the training and data tests make: Fashion-MNIST-format IDX files and ImageFolder trees.

Images of class k carry a bright bar at a class-specific place, so a model can learn them in a few steps.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
from PIL import Image


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write ``array`` (uint8) as an IDX file, gzipped when ``path`` ends in .gz."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def class_images(labels: np.ndarray, size: int, *, seed: int, channels: int = 0) -> np.ndarray:
    """(N, size, size[, channels]) uint8 images: noise plus a bright bar whose row depends on the label."""
    rng = np.random.default_rng(seed)
    shape = (len(labels), size, size) + ((channels,) if channels else ())
    images = rng.integers(0, 60, size=shape, dtype=np.uint8)
    num_classes = int(labels.max()) + 1 if len(labels) else 1
    for i, label in enumerate(labels):
        row = int(label) * (size - 3) // max(num_classes - 1, 1)
        images[i, row : row + 3] = 230
    return images


def make_fashion_mnist(folder: Path, *, n_train: int = 64, n_test: int = 32, seed: int = 0) -> Path:
    """A Fashion-MNIST-format folder (the four IDX .gz files) with ``n_train`` / ``n_test`` 28x28 images."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        rng.shuffle(labels)
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", class_images(labels, 28, seed=seed + n))
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", labels)
    return folder


def make_image_folder(
    root: Path,
    *,
    classes: tuple[str, ...] = ("cat", "dog", "fox"),
    per_class: int = 6,
    size: int = 32,
    splits: tuple[str, ...] = ("train", "val"),
    mode: str = "RGB",
    fmt: str = "png",
) -> Path:
    """``root/<split>/<class>/<i>.<fmt>`` images (``mode``: Pillow mode, e.g. RGB, L, RGBA)."""
    labels = np.repeat(np.arange(len(classes)), per_class)
    for s, split in enumerate(splits):
        images = class_images(labels, size, seed=s, channels=3)
        for i, (label, img) in enumerate(zip(labels, images, strict=True)):
            path = root / split / classes[label] / f"{i}.{fmt}"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img, mode="RGB").convert(mode).save(path)
    return root
