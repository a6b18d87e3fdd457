"""Batches cut straight from a data set held in memory as a uint8 tensor (Fashion-MNIST), no DataLoader.

For 28 px images the per-image path (Pillow image -> transforms -> collate, in a worker process) costs more
CPU than it is worth on a small machine, and its worker competes with training for the cores. Here a
batch is one index into the image tensor, and the training augmentation (random crop of the zero-padded
image, horizontal flip) is drawn per sample but applied to the whole batch at once.

Reproducibility is the same contract as :class:`~tntvision.data.sampler.ShardedSampler`: the order of
an epoch comes from the sampler, and the augmentation of step ``s`` is drawn for the whole global batch
from a generator seeded by (seed, epoch, s); each rank applies its own share. So a run resumed mid-epoch,
or split over processes, sees exactly the batches an uninterrupted single-process run sees.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from ..models.registry import ModelMeta
from .sampler import ShardedSampler, mix_seed
from .transforms import _INTERPOLATION

__all__ = ["EvalBatches", "TrainBatches", "has_image_tensor", "prepare_images"]


def has_image_tensor(dataset: object) -> bool:
    """True if ``dataset`` keeps its images as a uint8 tensor (N, H, W) or (N, C, H, W) in ``.images``."""
    images = getattr(dataset, "images", None)
    return isinstance(images, torch.Tensor) and images.dtype == torch.uint8 and images.ndim in (3, 4)


def _images_and_targets(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """The uint8 image tensor and the (N,) int64 labels of a data set held in memory."""
    if not has_image_tensor(dataset):
        raise TypeError(f"{type(dataset).__name__} does not hold its images as a uint8 tensor")
    return dataset.images, torch.as_tensor(dataset.targets)


def _as_nchw(images: torch.Tensor, in_chans: int) -> torch.Tensor:
    """uint8 (B, H, W) or (B, C, H, W) -> (B, in_chans, H, W); grey is repeated to RGB, RGB taken to luma."""
    x = images[:, None] if images.ndim == 3 else images  # (B, C, H, W)
    if x.shape[1] == in_chans:
        return x
    if x.shape[1] == 1:
        return x.expand(-1, in_chans, -1, -1)  # grey -> RGB as Pillow's convert("RGB") does
    if in_chans == 1 and x.shape[1] == 3:
        return TF.rgb_to_grayscale(x)  # ITU-R 601-2 luma, as Pillow's convert("L")
    raise ValueError(f"cannot turn {x.shape[1]}-channel images into {in_chans} channels")


def prepare_images(images: torch.Tensor, meta: ModelMeta, *, train: bool) -> torch.Tensor:
    """uint8 images -> uint8 (B, C, H, W) at the model's channels and size, before augmentation.

    ``train=False`` follows the evaluation transform (short side to size / crop_pct, centre crop);
    ``train=True`` resizes to the input size as the small-image ``crop="pad"`` recipe does. Images already
    at the model's size pass through untouched.
    """
    in_chans, height, width = meta.input_size
    x = _as_nchw(images, in_chans)  # (B, C, H0, W0)
    interp = _INTERPOLATION[meta.interpolation]
    if train:
        if tuple(x.shape[-2:]) != (height, width):
            x = TF.resize(x, [height, width], interpolation=interp, antialias=True)
        return x
    resize = meta.resize_size
    if min(x.shape[-2:]) != resize:
        x = TF.resize(x, [resize], interpolation=interp, antialias=True)
    if tuple(x.shape[-2:]) != (height, width):
        x = TF.center_crop(x, [height, width])
    return x


def _normalise(x: torch.Tensor, meta: ModelMeta) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 in [0, 1], normalised: the last two steps of the eval transform."""
    x = TF.to_dtype(x, torch.float32, scale=True)
    return TF.normalize(x, mean=list(meta.mean), std=list(meta.std))


def _crop_and_flip(
    x: torch.Tensor, *, padding: int, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor
) -> torch.Tensor:
    """Per-sample crop of the zero-padded images at offsets (dy, dx), then mirror where ``flip``.

    x: (B, C, H, W); dy, dx: (B,) offsets in [0, 2 * padding]; flip: (B,) bool. Returns (B, C, H, W).
    """
    B, C, H, W = x.shape
    if padding > 0:
        padded = F.pad(x, (padding, padding, padding, padding))  # (B, C, H + 2p, W + 2p)
        rows = dy[:, None] + torch.arange(H)  # (B, H)
        cols = dx[:, None] + torch.arange(W)  # (B, W)
        cols = torch.where(flip[:, None], cols.flip(1), cols)  # mirrored crop = crop, then flip
        b = torch.arange(B)[:, None, None]  # (B, 1, 1)
        # advanced indexing on dims 0, 2, 3 -> (B, H, W, C); move channels back
        return padded.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


class TrainBatches:
    """One epoch (or its rest) of this rank's training batches ``(x float (B, C, H, W), y (B,))``.

    Args:
        dataset: has ``.images`` (uint8, see :func:`has_image_tensor`) and ``.targets`` (N,).
        sampler: gives the epoch's order, the global batch, this rank and the step to start from; call
            its ``set_epoch`` before iterating, as with a DataLoader.
        meta: the model's input size, channels, normalisation.
        padding: the random crop's zero padding in pixels (0: no crop).
        hflip: probability of mirroring a sample.
    """

    def __init__(
        self, dataset, sampler: ShardedSampler, *, meta: ModelMeta, padding: int = 0, hflip: float = 0.0
    ) -> None:
        self.images, self.targets = _images_and_targets(dataset)
        self.sampler = sampler
        self.meta = meta
        self.padding = padding
        self.hflip = hflip

    def __len__(self) -> int:
        return self.sampler.steps_per_epoch - self.sampler.start_step

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        s = self.sampler
        G, p = s.global_batch, self.padding
        order = s.epoch_order()  # (steps_per_epoch * G,) data set indices
        for step in range(s.start_step, s.steps_per_epoch):
            # the whole global batch's augmentation, so every rank count draws the same numbers
            g = torch.Generator().manual_seed(mix_seed(s.seed, s.epoch, step, 3))
            dy, dx = torch.randint(0, 2 * p + 1, (2, G), generator=g)  # (G,) each
            flip = torch.rand(G, generator=g) < self.hflip  # (G,)
            mine = slice(s.rank, None, s.world)
            index = order[step * G : (step + 1) * G][mine]  # (G / world,)
            x = prepare_images(self.images[index], self.meta, train=True)  # uint8 (B, C, H, W)
            x = _crop_and_flip(x, padding=p, dy=dy[mine], dx=dx[mine], flip=flip[mine])
            yield _normalise(x, self.meta), self.targets[index]


class EvalBatches:
    """Evaluation batches ``(x, y)`` of a data set held in memory, this rank's share (every world-th image).

    The preprocessing is the evaluation transform's (see :func:`prepare_images`), so the numbers match the
    per-image path.
    """

    def __init__(self, dataset, *, meta: ModelMeta, batch_size: int, rank: int = 0, world: int = 1) -> None:
        self.images, self.targets = _images_and_targets(dataset)
        self.meta = meta
        self.batch_size = batch_size
        self.index = torch.arange(rank, len(self.targets), world)  # this rank's images

    def __len__(self) -> int:
        return -(-len(self.index) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for index in self.index.split(self.batch_size):
            x = prepare_images(self.images[index], self.meta, train=False)  # uint8 (B, C, H, W)
            yield _normalise(x, self.meta), self.targets[index]
