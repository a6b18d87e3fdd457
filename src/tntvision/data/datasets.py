"""Data sets: the real Fashion-MNIST from its IDX files, and ImageFolder trees of any Pillow format.

Both yield ``(transform(PIL image), class index)`` and carry ``.classes`` (class names, index order), so
the same transforms (:func:`~tntvision.data.transforms.eval_transform`, ``train_transform``) serve both.
"""

from __future__ import annotations

import copy
import gzip
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..errors import DataError, read_failure
from .transforms import open_image

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FashionMNIST",
    "ImageFolder",
    "build_dataset",
    "fashion_mnist_dir",
    "has_val_split",
    "read_idx",
]

FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")


def fashion_mnist_dir() -> Path:
    """Where Fashion-MNIST is read from: ``$TNT_FASHION_MNIST_DIR``, else the Debian package's folder."""
    return Path(os.environ.get("TNT_FASHION_MNIST_DIR") or "/usr/share/datasets/fashion-mnist")


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (``.gz`` or plain), the format of MNIST and Fashion-MNIST, into an array.

    The header is two zero bytes, a type code, the number of dimensions, then one big-endian uint32 per
    dimension. Raises :class:`DataError` for a missing, truncated or malformed file.
    """
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # missing, permissions, a truncated .gz
        raise DataError(read_failure(path, "an IDX file", e)) from e
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    need = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != need:
        raise DataError(f"{path}: {len(raw) - header} data bytes, the header's shape {shape} needs {need}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _find_idx(folder: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    raise DataError(
        f"{folder}: no {stem}.gz; install the Debian package dataset-fashion-mnist (`make data`) "
        "or point TNT_FASHION_MNIST_DIR at the folder holding the IDX files"
    )


class FashionMNIST(Dataset):
    """Fashion-MNIST (60,000 train / 10,000 test 28x28 grey images, 10 classes), held in memory as uint8.

    Items are ``(transform(image), label)`` with the image a Pillow ``"L"`` image (the raw tensor with
    ``transform=None``). Fashion-MNIST has no validation split: training holds out part of ``"train"``
    (see :func:`tntvision.data.splits.hold_out`), and ``"val"`` is refused so that the test set is never
    mistaken for one.
    """

    classes = FASHION_MNIST_CLASSES

    def __init__(self, *, root: str | Path | None = None, split: str = "train", transform=None) -> None:
        if split == "val":
            raise DataError(
                "fashion-mnist has no val split: training holds out part of train (val_split.json in "
                "the run folder; `tnt eval --checkpoint RUN_FOLDER --split val` evaluates it), or use test"
            )
        if split not in _FASHION_FILES:
            raise DataError(f"fashion-mnist has splits train and test, not {split!r}")
        folder = Path(root) if root is not None else fashion_mnist_dir()
        if not folder.is_dir():
            raise DataError(
                f"{folder}: no such folder; install the Debian package dataset-fashion-mnist (`make data`) "
                "or set TNT_FASHION_MNIST_DIR"
            )
        images_stem, labels_stem = _FASHION_FILES[split]
        images = read_idx(_find_idx(folder, images_stem))
        labels = read_idx(_find_idx(folder, labels_stem))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(
                f"{folder}: images {images.shape} and labels {labels.shape} of split {split} do not match"
            )
        if len(labels) and int(labels.max()) >= len(self.classes):
            raise DataError(f"{folder}: label {int(labels.max())} out of range for 10 classes")
        self.split = split
        self.images = torch.from_numpy(images.copy())  # (N, 28, 28) uint8
        self.targets = torch.from_numpy(labels.astype(np.int64))  # (N,)
        self.transform = transform
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.targets)

    def subset(self, indices: torch.Tensor, *, split: str) -> FashionMNIST:
        """The images at ``indices`` (a 1-D index tensor) as a data set of their own, named ``split``."""
        part = copy.copy(self)
        part.images, part.targets, part.split = self.images[indices], self.targets[indices], split
        return part

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img = self.images[index]
        if self.transform is not None:
            img = self.transform(Image.fromarray(img.numpy(), mode="L"))
        return img, int(self.targets[index])


def _class_dirs(split_dir: Path) -> list[str]:
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _is_image_header(path: Path) -> bool:
    """Cheap check that Pillow recognises the file (reads the header only, not the pixels)."""
    try:
        with Image.open(path):
            return True
    except Exception:  # Pillow raises many types for foreign files; any of them means "not an image"
        return False


class ImageFolder(Dataset):
    """``root/<split>/<class>/*`` images of any format Pillow reads; class index = sorted folder order.

    Args:
        root: the data folder (holding ``train/`` and ``val/`` or ``test/``).
        split: ``"train"``, ``"val"`` or ``"test"``; ``"val"`` falls back to ``test/`` and vice versa.
        transform: applied to each Pillow image.
        on_bad_image: ``"error"`` refuses a file Pillow cannot open, naming it; ``"skip"`` leaves it out
            and counts it in ``.skipped``. Files are checked when listed (header only); one whose pixels
            fail to decode later is handled the same way when it is read (skip: the next good image).
    """

    def __init__(
        self, *, root: str | Path, split: str = "train", transform=None, on_bad_image: str = "error"
    ) -> None:
        if on_bad_image not in ("error", "skip"):
            raise DataError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
        root = Path(root)
        split_dir = _split_dir(root, split)
        self.classes = _class_dirs(split_dir)
        if not self.classes:
            raise DataError(f"{split_dir}: no class folders (expected {split_dir}/<class>/<image files>)")
        _check_same_classes(root, split_dir, self.classes)
        self.samples: list[tuple[str, int]] = []
        self.skipped = 0
        for label, name in enumerate(self.classes):
            files = sorted(
                p for p in (split_dir / name).rglob("*") if p.is_file() and not p.name.startswith(".")
            )
            for path in files:
                if _is_image_header(path):
                    self.samples.append((str(path), label))
                elif on_bad_image == "skip":
                    self.skipped += 1
                else:
                    raise DataError(
                        f"{path}: not an image Pillow can read (on_bad_image=skip skips such files)"
                    )
        if not self.samples:
            raise DataError(f"{split_dir}: no readable images in its class folders")
        self.split = split_dir.name
        self.transform = transform
        self.on_bad_image = on_bad_image
        self.targets = [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def subset(self, indices: torch.Tensor, *, split: str) -> ImageFolder:
        """The images at ``indices`` (a 1-D index tensor) as a data set of their own, named ``split``."""
        part = copy.copy(self)
        part.samples = [self.samples[i] for i in indices.tolist()]
        part.targets = [label for _, label in part.samples]
        part.split = split
        part.skipped = self.skipped if split == self.split else 0  # counted once, with the listed split
        return part

    def __getitem__(self, index: int) -> tuple[Any, int]:
        for offset in range(len(self.samples)):
            path, label = self.samples[(index + offset) % len(self.samples)]
            try:
                img = open_image(path)
            except DataError as e:
                if self.on_bad_image == "error":  # e says why: unreadable, damaged, too large
                    raise DataError(f"{e} (on_bad_image=skip skips such files)") from e
                continue  # skip: take the next readable image (the count of such files is reported)
            return (self.transform(img) if self.transform is not None else img), label
        raise DataError(f"no image of {self.split} can be decoded")


def _split_dir(root: Path, split: str) -> Path:
    if not root.exists():
        raise DataError(f"{root}: no such data folder (and not a known data set name: fashion-mnist)")
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    candidates = {"train": ["train"], "val": ["val", "test"], "test": ["test", "val"]}.get(split)
    if candidates is None:
        raise DataError(f"unknown split {split!r}; use train, val or test")
    for name in candidates:
        if (root / name).is_dir():
            return root / name
    if not any(root.iterdir()):
        raise DataError(f"{root}: the data folder is empty")
    raise DataError(f"{root}: no {' or '.join(n + '/' for n in candidates)} folder (ImageFolder layout)")


def _check_same_classes(root: Path, split_dir: Path, classes: list[str]) -> None:
    """Every split present must have the same class folders, or labels would mean different things."""
    for name in ("train", "val", "test"):
        other = root / name
        if other == split_dir or not other.is_dir():
            continue
        theirs = _class_dirs(other)
        if theirs != classes:
            only_here = sorted(set(classes) - set(theirs))
            only_there = sorted(set(theirs) - set(classes))
            raise DataError(
                f"{root}: {split_dir.name}/ and {name}/ have different classes "
                f"(only in {split_dir.name}/: {only_here or '-'}; only in {name}/: {only_there or '-'})"
            )


def _is_fashion_mnist(data: str) -> bool:
    return data.lower() in ("fashion-mnist", "fashion_mnist", "fashionmnist")


def has_val_split(data: str) -> bool:
    """Whether ``data`` has a validation split of its own: an ImageFolder ``val/`` (Fashion-MNIST: none)."""
    return not _is_fashion_mnist(data) and (Path(data) / "val").is_dir()


def build_dataset(
    data: str, split: str, *, transform: Callable | None = None, on_bad_image: str = "error"
) -> Dataset:
    """A data set by name (``"fashion-mnist"``) or ImageFolder root, with ``.classes``.

    Args:
        data: ``"fashion-mnist"`` (read from ``$TNT_FASHION_MNIST_DIR`` or the Debian package folder) or
            the path of a folder with ``train/`` and ``val/`` (or ``test/``) ImageFolder splits.
        split: ``"train"``, ``"val"`` or ``"test"`` (in an ImageFolder tree ``val/`` and ``test/`` stand in
            for each other; Fashion-MNIST has no ``val``).
        transform: applied to each Pillow image.
        on_bad_image: ImageFolder only; ``"error"`` or ``"skip"`` (see :class:`ImageFolder`).

    Raises:
        DataError: a missing or empty folder, a missing split, a split without classes or images, splits
            with different class sets, an unreadable image (with ``on_bad_image="error"``).
    """
    if _is_fashion_mnist(data):
        return FashionMNIST(split=split, transform=transform)
    return ImageFolder(root=data, split=split, transform=transform, on_bad_image=on_bad_image)
