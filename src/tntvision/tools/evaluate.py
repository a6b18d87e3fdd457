"""`tnt eval`: accuracy, loss, per-class accuracy and a confusion matrix of a saved model on a data set.

The data set comes from :func:`tntvision.data.build_dataset` with the model's own eval transform (a data
set held in memory is cut into whole batches with the same preprocessing), and the numbers from
:func:`tntvision.evaluation.evaluate` (the loop training uses for its validation), so `tnt eval` and
training report the same thing for the same weights.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn
from torch.utils.data import DataLoader

from ..data import EvalBatches, build_dataset, eval_transform, has_image_tensor, has_val_split
from ..data.splits import held_out_split
from ..errors import DataError, InputError
from ..evaluation import evaluate
from ..utils.amp import amp_dtype, weight_dtype
from ..utils.devices import pin_memory, resolve_device
from ..utils.files import save_figure, write_json
from .checkpoints import ModelSource, as_source, open_model

__all__ = ["EvalResult", "evaluate_checkpoint", "plot_confusion", "report_folder"]

_WNID = re.compile(r"n\d{8}")
_RUN_FOLDER_MARKERS = ("config.yaml", "summary.json", "metrics.jsonl", "checkpoints")


@dataclass
class EvalResult:
    """Metrics of one evaluation; ``confusion[i, j]`` counts images of class i predicted as j."""

    top1: float
    top5: float
    loss: float
    n: int
    classes: list[str]
    confusion: np.ndarray
    split: str
    confusion_png: Path | None = None

    @property
    def per_class(self) -> dict[str, float | None]:
        """Accuracy (recall) of each class in percent; None for a class with no images."""
        counts = self.confusion.sum(axis=1)
        return {
            name: (100.0 * float(self.confusion[i, i]) / float(counts[i]) if counts[i] else None)
            for i, name in enumerate(self.classes)
        }

    def to_dict(self) -> dict:
        return {
            "top1": self.top1,
            "top5": self.top5,
            "loss": self.loss,
            "n": self.n,
            "split": self.split,
            "per_class": self.per_class,
            "confusion": self.confusion.tolist(),
            "classes": self.classes,
            "confusion_png": None if self.confusion_png is None else str(self.confusion_png),
        }


def report_folder(checkpoint: str | Path | ModelSource) -> Path:
    """Where evaluation figures of ``checkpoint`` go: its training run folder, else the model's folder;
    for a model given by name (``--model NAME[.TAG]``), a folder of that name in the working directory.

    A run folder holds ``model/`` beside ``config.yaml`` / ``summary.json`` / ``checkpoints/``; given the
    ``model/`` folder or a weights file inside it, the run folder above is used when there is one.
    """
    source = as_source(checkpoint)
    if source.named:
        return Path(source.model)
    path = Path(source.checkpoint)
    folder = path if path.is_dir() else path.parent
    if folder.name == "model" and any((folder.parent / m).exists() for m in _RUN_FOLDER_MARKERS):
        return folder.parent
    return folder


def _wordnet_ids(classes: list[str]) -> bool:
    """Whether ``classes`` are ImageNet-1k's 1000 WordNet ids (``n01440764``, ...), sorted."""
    return len(classes) == 1000 and classes == sorted(classes) and all(_WNID.fullmatch(c) for c in classes)


def _check_classes(model: nn.Module, classes: list[str], warn: Callable[[str], None] | None) -> None:
    """Refuse a data set whose classes the model's head cannot mean; note what cannot be checked."""
    if len(classes) != model.num_classes:
        raise DataError(f"the data set has {len(classes)} classes, the model predicts {model.num_classes}")
    names = getattr(model, "class_names", None)
    tag = getattr(model, "pretrained_tag", None)
    if names is not None and tag is not None and tag.labels == "imagenet-1k" and _wordnet_ids(classes):
        if warn is not None:  # ImageNet's val folder layout: one folder per WordNet id, sorted = class order
            warn("note: the folders are ImageNet's WordNet ids; their sorted order is the classes' order")
        return
    if names is None:
        if warn is not None:
            warn("note: the checkpoint has no class names; assuming the data set's class order")
    elif list(names) != list(classes):
        if sorted(names) == sorted(classes):
            raise DataError("the data set has the model's classes in another order: labels would not match")
        diff = sorted(set(classes) - set(names))[:5]
        raise DataError(f"the data set's classes differ from the model's (e.g. {diff})")


def plot_confusion(confusion: np.ndarray, classes: list[str], *, title: str, path: Path) -> Path:
    """Write a PNG of the confusion matrix, rows normalised to recall; counts printed up to 20 classes."""
    k = len(classes)
    counts = confusion.sum(axis=1, keepdims=True)
    recall = np.divide(confusion, counts, out=np.zeros(confusion.shape, dtype=float), where=counts > 0)
    side = min(4.0 + 0.45 * k, 16.0)
    fig = Figure(layout="constrained", figsize=(side + 1.5, side))
    ax = fig.subplots()
    im = ax.imshow(recall, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(im, ax=ax, shrink=0.8, label="fraction of the true class")
    if k <= 50:
        ax.set_xticks(range(k), classes, rotation=45, ha="right", fontsize=9 if k <= 20 else 6)
        ax.set_yticks(range(k), classes, fontsize=9 if k <= 20 else 6)
    if k <= 20:
        for i in range(k):
            for j in range(k):
                if confusion[i, j]:
                    colour = "white" if recall[i, j] > 0.5 else "black"  # readable on dark and light cells
                    ax.text(j, i, str(confusion[i, j]), ha="center", va="center", fontsize=8, color=colour)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    return save_figure(fig, path)


def evaluate_checkpoint(
    checkpoint: str | Path | ModelSource,
    data: str,
    *,
    split: str = "test",
    batch_size: int = 256,
    workers: int = 0,
    device: str | torch.device = "cpu",
    amp: str = "none",
    dtype: str = "float32",
    out: str | Path | None = None,
    progress: bool = True,
    runtime: str | None = None,
    merge_tokens: int | Sequence[int] = 0,
    warn: Callable[[str], None] | None = None,
) -> EvalResult:
    """Evaluate a saved model on a split of ``data`` and draw its confusion matrix.

    Args:
        checkpoint: a run folder, ``model/`` folder or weights file (see :func:`tntvision.load_model`), or
            an exported ``.onnx`` / ``.pt2`` file (see :mod:`tntvision.tools.exported`); or a
            :class:`~tntvision.tools.checkpoints.ModelSource` (a model by name, e.g. with published weights).
        data: ``"fashion-mnist"`` or an ImageFolder root (see :func:`tntvision.data.build_dataset`).
        split: ``"val"`` or ``"test"``. For data without a val split of its own (Fashion-MNIST), ``"val"``
            of a run folder is the validation its training held out (``val_split.json``).
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (see :func:`tntvision.utils.devices.resolve_device`;
            an exported file runs on the CPU only).
        amp: ``"none"`` (float32), ``"bfloat16"`` or ``"float16"`` autocast, as training may evaluate.
        dtype: ``"float32"`` or ``"bfloat16"``: the dtype weights and images are held in (bf16 inference
            without autocast's per-call weight casts).
        out: folder for ``confusion_<split>.png`` (default: :func:`report_folder` of ``checkpoint``).
        progress: show a progress bar on stderr.
        runtime: what runs an ``.onnx`` file: ``"onnxruntime"`` (default) or ``"openvino"``; ``"torch"``
            or None for anything else (see :func:`tntvision.tools.exported.resolve_runtime`).
        merge_tokens: token merging (TNT models): ``r`` per block, or a list with one per block.
        warn: called with notes for the user.

    Raises:
        DataError: a data set whose classes do not fit the model, or an empty one.
        InputError: a bad batch size or ``amp`` value.
        ConfigError: a ``runtime`` that cannot run ``checkpoint``, or CUDA asked for where there is none.
    """
    device = resolve_device(device)  # before anything is read
    autocast_dtype = amp_dtype(amp)
    weights = weight_dtype(dtype)
    if batch_size < 1 or workers < 0:
        raise InputError(f"batch size must be >= 1 and workers >= 0 (got {batch_size}, {workers})")
    model = open_model(
        checkpoint, autocast=autocast_dtype is not None, runtime=runtime, merge_tokens=merge_tokens
    )
    model = model.eval().to(device, weights)
    record = report_folder(checkpoint) / "val_split.json"  # of a run folder: the images training held out
    held_out = split == "val" and not has_val_split(data) and not as_source(checkpoint).named
    if held_out and record.is_file():  # the images its training held out
        dataset = held_out_split(data, record, transform=eval_transform(model.meta))
    else:
        dataset = build_dataset(data, split, transform=eval_transform(model.meta))
    classes = [str(c) for c in dataset.classes]
    _check_classes(model, classes, warn)
    if len(dataset) == 0:
        raise DataError(f"{data}: the {split} split holds no images")
    if has_image_tensor(dataset):  # held in memory (Fashion-MNIST): whole batches, same preprocessing
        loader = EvalBatches(dataset, meta=model.meta, batch_size=batch_size)
    else:
        loader = DataLoader(
            dataset, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=pin_memory(device)
        )
    if progress:
        from tqdm import tqdm

        loader = tqdm(loader, desc=f"eval {split}", unit="batch", file=sys.stderr, leave=False)
    metrics = evaluate(model, loader, device=device, amp_dtype=autocast_dtype, confusion=True)
    confusion = np.asarray(torch.as_tensor(metrics["confusion"]).cpu(), dtype=np.int64)  # (true, predicted)
    result = EvalResult(
        top1=float(metrics["top1"]),
        top5=float(metrics["top5"]),
        loss=float(metrics["loss"]),
        n=int(metrics["n"]),
        classes=classes,
        confusion=confusion,
        split=split,
    )
    folder = Path(out) if out is not None else report_folder(checkpoint)
    name = getattr(model, "model_name", None) or "model"
    title = f"{name} on {Path(data).name} {split}: top-1 {result.top1:.2f}% (n = {result.n})"
    png = folder / f"confusion_{split}.png"
    result.confusion_png = plot_confusion(confusion, classes, title=title, path=png)
    write_json(folder / f"eval_{split}.json", result.to_dict())
    return result
