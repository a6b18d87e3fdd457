"""`tnt predict`: class predictions for image files and folders, with a saved model.

Images are opened with :func:`~tntvision.data.open_image` (EXIF orientation applied) and preprocessed with
:func:`~tntvision.data.eval_transform` from the model's own metadata (channels, size, crop, mean/std), so
any mode or size Pillow reads works. Folders are walked for files with an image extension (one Pillow
registers: .png, .jpg, .tiff, ...; others, such as a README, are left out); a file found there that cannot
be read is reported and skipped, while a file named explicitly must be an image.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from ..data import eval_transform, open_image
from ..errors import CheckpointError, DataError, InputError
from ..utils.devices import resolve_device

__all__ = [
    "Prediction",
    "PredictReport",
    "class_labels",
    "find_images",
    "image_extensions",
    "predict_images",
    "prepare_model",
    "top_k",
]


@dataclass(frozen=True)
class Prediction:
    """The top-k classes of one image, most probable first."""

    path: str
    labels: list[str]
    indices: list[int]
    probs: list[float]

    def to_dict(self) -> dict:
        top = [
            {"label": lab, "index": i, "prob": p}
            for lab, i, p in zip(self.labels, self.indices, self.probs, strict=True)
        ]
        return {"path": self.path, "top": top}


@dataclass
class PredictReport:
    """Predictions in input order, plus the image files in folders that could not be read (path, reason)."""

    predictions: list[Prediction] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "predictions": [p.to_dict() for p in self.predictions],
            "skipped": [{"path": path, "reason": reason} for path, reason in self.skipped],
        }


@functools.cache
def image_extensions() -> frozenset[str]:
    """The file name extensions Pillow registers for its formats, lower case with the dot (``.png``)."""
    return frozenset(Image.registered_extensions())


def _folder_images(folder: Path) -> list[Path]:
    """The files under ``folder`` with an image extension, sorted; hidden files and folders left out."""
    return [
        p
        for p in sorted(folder.rglob("*"))
        if p.is_file()
        and p.suffix.lower() in image_extensions()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    ]


def find_images(inputs: Sequence[str | Path]) -> list[tuple[Path, bool]]:
    """Expand files and folders into ``(file, named_explicitly)`` pairs, in a stable order.

    Folders are walked recursively in sorted order for files with an image extension (see
    :func:`image_extensions`); other files and hidden files and folders (``.DS_Store``, ``.git``) are left
    out. A file named explicitly is taken whatever its name. Raises :class:`InputError` for a path that
    does not exist or a folder with no image files.
    """
    if not inputs:
        raise InputError("no images given")
    files: list[tuple[Path, bool]] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_file():
            files.append((path, True))
        elif path.is_dir():
            found = _folder_images(path)
            if not found:
                raise InputError(f"{path}: folder holds no image files")
            files.extend((p, False) for p in found)
        else:
            raise InputError(f"{path}: no such file or folder")
    return files


def class_labels(model: nn.Module, *, warn: Callable[[str], None] | None = None) -> list[str]:
    """The model's class names, or the class indices as strings (reported through ``warn``)."""
    num_classes = getattr(model, "num_classes", 0)
    if not num_classes:
        raise CheckpointError("the model has no classifier head (num_classes = 0): nothing to predict")
    names = getattr(model, "class_names", None)
    if names is not None and len(names) == num_classes:
        return [str(n) for n in names]
    if warn is not None:
        warn(f"note: the checkpoint has no class names; labels are class indices 0..{num_classes - 1}")
    return [str(i) for i in range(num_classes)]


def prepare_model(
    model: nn.Module, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> nn.Module:
    """``model`` in eval mode on ``device`` with weights in ``dtype``: a converted copy when the dtype or
    the device changes, so the caller's model stays as it is. An exported model (no parameters) is
    returned as is: it takes float32 images and converts what it is given (on the CPU only: another
    device is an :class:`~tntvision.errors.InputError`)."""
    param = next(model.parameters(), None)  # None: an exported model (tools/exported.py), float32 only
    target = torch.device(device)
    moved = param is not None and (
        param.device.type != target.type or target.index not in (None, param.device.index)
    )
    if param is not None and (param.dtype != dtype or moved):
        model = copy.deepcopy(model)
    return model.eval().to(device, dtype)


def top_k(logits: torch.Tensor, labels: Sequence[str], k: int, paths: Sequence[str]) -> list[Prediction]:
    """The ``k`` most probable classes (capped at the number of classes) of each row of ``logits``
    (b, classes), softmax in float32; ``paths`` name the rows."""
    probs = logits.float().softmax(dim=-1)  # (b, classes)
    top_p, top_i = probs.topk(min(k, len(labels)), dim=-1)  # (b, k) each
    return [
        Prediction(path=path, labels=[labels[i] for i in i_row], indices=i_row, probs=p_row)
        for path, p_row, i_row in zip(paths, top_p.tolist(), top_i.tolist(), strict=True)
    ]


def _batches(
    files: list[tuple[Path, bool]], transform: Callable, batch_size: int, report: PredictReport
) -> Iterator[tuple[list[str], torch.Tensor]]:
    """Yield (paths, images (b, C, H, W)) batches, recording files from folders that cannot be read."""
    paths: list[str] = []
    tensors: list[torch.Tensor] = []
    for path, explicit in files:
        try:
            x = transform(open_image(path))  # (C, H, W)
        except DataError as e:
            if explicit:
                raise
            report.skipped.append((str(path), str(e).removeprefix(f"{path}: ")))
            continue
        paths.append(str(path))
        tensors.append(x)
        if len(tensors) == batch_size:
            yield paths, torch.stack(tensors)
            paths, tensors = [], []
    if tensors:
        yield paths, torch.stack(tensors)


@torch.inference_mode()
def predict_images(
    model: nn.Module,
    inputs: Sequence[str | Path],
    *,
    topk: int = 5,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    warn: Callable[[str], None] | None = None,
) -> PredictReport:
    """Top-k softmax predictions for every image in ``inputs`` (files and folders).

    Args:
        model: a classifier with ``.meta`` (input metadata) and optionally ``.class_names``, as
            :func:`tntvision.load_model` returns it.
        inputs: image files and folders; see :func:`find_images`.
        topk: classes per image; capped at the number of classes.
        batch_size: images per forward pass.
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (see :func:`tntvision.utils.devices.resolve_device`).
        dtype: the dtype weights and images are held in (``torch.bfloat16``: bf16 inference without
            autocast; probabilities are computed in fp32 from its logits).
        warn: called with notes for the user (missing class names, skipped files).

    Raises:
        ConfigError: CUDA asked for where there is none.
        InputError: a missing path, or ``topk`` / ``batch_size`` below 1; an exported file on a GPU.
        DataError: a file named explicitly that is not a readable image.
        CheckpointError: a model without a classifier head.
    """
    device = resolve_device(device)
    if topk < 1 or batch_size < 1:
        raise InputError(f"topk and batch size must be at least 1 (got {topk}, {batch_size})")
    files = find_images(inputs)  # path errors first: they end the command, the class-name note does not
    labels = class_labels(model, warn=warn)
    transform = eval_transform(model.meta)
    model = prepare_model(model, device=device, dtype=dtype)
    report = PredictReport()
    for paths, x in _batches(files, transform, batch_size, report):
        logits = model(x.to(device, dtype)).cpu()  # (b, classes)
        report.predictions.extend(top_k(logits, labels, topk, paths))
    if warn is not None:
        for path, reason in report.skipped:
            warn(f"skipped {path}: {reason}")
    return report
