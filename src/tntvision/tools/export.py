"""`tnt export`: a saved model -> an ONNX file or a ``torch.export`` archive (``.pt2``), optionally int8.

**ONNX** goes through ``torch.onnx.export(..., dynamo=True)``, the exporter PyTorch recommends (its default
since 2.9; the TorchScript-based one is deprecated): it captures the model with ``torch.export`` and
translates the graph with onnxscript's torchlib, which needs the ``onnxscript`` package
(``pip install 'tntvision[export]'``). Its optimizer then folds constants and removes redundant nodes,
rewrites that do not change the numbers (the "simplified" graph); the result is checked with
``onnx.checker`` (``full_check``: shape inference too). The legacy TorchScript exporter is not used (no
fallback): the dynamo one exports every registered model, within 1e-6 of PyTorch's logits
(tests/test_export.py).

**pt2** is ``torch.export.export`` + ``torch.export.save``: a zip archive of the graph (aten ops, JSON) and
the weights, loaded with ``torch.export.load`` and run by PyTorch alone.

Both run the model with the fused kernels **off** (:func:`tntvision.kernels.fused_kernels`): the
fused inner transformer (``torch.ops.tntvision.inner_transformer``) has no ONNX counterpart, and a ``.pt2``
graph that called it would load only where tntvision's compiled extension is built. The reference path
computes the same numbers, so the exported graph holds plain aten / ONNX ops only.

The batch dimension is dynamic (``Dim("batch")``); channels, height and width are fixed to the model's
input size, or to ``img_size``: the model is then rebuilt at that size and its position tables resampled
once, in PyTorch, before export (the file holds the resampled tables).

Model name, architecture config, class names and preprocessing (input size, mean, std, crop, interpolation)
travel inside the file as one JSON object (:func:`export_metadata`): under the key ``tntvision`` of the
ONNX model's ``metadata_props``, and as the extra file ``tntvision.json`` of the pt2 archive.
:func:`tntvision.tools.exported.load_exported` reads them back.

**int8** (``quantize="int8"``, ONNX only) uses onnxruntime's quantization tools: dynamic quantization by
default (weights int8 ahead of time, activations quantized per batch at run time), static QDQ with
calibration images from ``calibrate`` (activation ranges measured on images of that data set's train
split, MinMax). Only the GEMMs with a weight operand (every Linear layer: q/k/v, projections, MLPs, the
patch embedding, the head) are quantized; LayerNorm, softmax, GELU, the residual adds and the
activation-by-activation products of attention (q k^T, attn v) stay float, because int8 there costs
accuracy (softmax outputs and LayerNorm statistics need more than 8 bits) and saves little time.

Every file is written atomically (a temp file beside ``out``, then a rename): a failed export leaves no
file behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import kernels
from ..errors import ConfigError
from ..utils.deps import require
from ..utils.files import atomic_write
from .checkpoints import ModelSource
from .exported import METADATA_FORMAT, METADATA_KEY, is_exported_file, load_onnx_file, load_pt2_file

__all__ = [
    "FORMATS",
    "METADATA_KEY",
    "ExportResult",
    "calibration_batches",
    "export_metadata",
    "export_model",
    "require",
]

FORMATS = ("onnx", "pt2")
QUANTIZE = ("int8",)
INPUT_NAME, OUTPUT_NAME = "images", "logits"


@dataclass
class ExportResult:
    """What :func:`export_model` wrote; ``max_abs_diff`` is the file's logits against PyTorch's."""

    out: Path
    format: str
    model: str
    input_size: tuple[int, int, int]
    quantize: str | None
    exporter: str
    size_bytes: int
    max_abs_diff: float

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["out"] = str(self.out)
        return d


# ------------------------------------------------------------------------------------------ metadata


def export_metadata(model: nn.Module, *, quantize: str | None, exporter: str) -> dict[str, Any]:
    """The JSON object an exported file carries: enough to preprocess images and name the classes."""
    from .. import __version__

    meta = model.meta
    class_names = getattr(model, "class_names", None)
    return {
        "format": METADATA_FORMAT,
        "model": getattr(model, "model_name", None),
        "config": dataclasses.asdict(model.cfg),
        "num_classes": int(model.num_classes),
        "class_names": None if class_names is None else [str(c) for c in class_names],
        "meta": dataclasses.asdict(meta),
        "merge_tokens": list(getattr(model, "merge_r", ())),  # token merging per block, fixed in the file
        "input_name": INPUT_NAME,
        "quantize": quantize,
        "exporter": exporter,
        "torch": torch.__version__,
        "tntvision": __version__,
    }


# ------------------------------------------------------------------------------------------ the model


def _model_for_export(
    checkpoint: str | Path | ModelSource, img_size: int | None, merge_tokens: int | Sequence[int] = 0
) -> nn.Module:
    """The saved (or named) model in eval mode and fp32, rebuilt at ``img_size`` (position tables
    resampled), with token merging ``merge_tokens`` (fixed in the exported graph)."""
    from .checkpoints import apply_token_merging, as_source

    source = as_source(checkpoint)
    if not source.named and is_exported_file(source.checkpoint):
        raise ConfigError(f"{checkpoint}: already exported; --checkpoint takes a PyTorch checkpoint here")
    source.check()
    if img_size is None:
        model = source.load_pytorch()
    else:
        model = source.load_pytorch(img_size=img_size)
        model.meta = model.meta.resolved(img_size=img_size)
    return apply_token_merging(model, merge_tokens).eval().float()


def _example_input(model: nn.Module) -> torch.Tensor:
    """A batch of 2 (not 1: torch.export would specialise a batch of 1 to a constant)."""
    return torch.randn(2, *model.meta.input_size)


def _batch_dims() -> tuple[dict[int, Any]]:
    """dynamic_shapes for forward(x): dimension 0 is the batch, any size."""
    return ({0: torch.export.Dim("batch", min=1, max=1 << 20)},)


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    """Exporters and quantizers print progress; stdout is kept for results (``--json``)."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


# ------------------------------------------------------------------------------------------ onnx


def _onnx_model(model: nn.Module, x: torch.Tensor, *, opset: int | None) -> Any:
    """``model`` -> an optimised ``onnx.ModelProto`` with a dynamic batch (dynamo exporter)."""
    with kernels.fused_kernels(False), torch.no_grad(), _quiet_stdout():
        program = torch.onnx.export(
            model,
            (x,),
            dynamo=True,
            dynamic_shapes=_batch_dims(),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=opset,
            optimize=True,
            verbose=False,
        )
    return program.model_proto


def _weight_gemms(proto: Any) -> list[str]:
    """Names of the MatMul / Gemm nodes whose second operand is a weight (an initializer or constant).

    These are the Linear layers; q k^T and attn v multiply two activations and are left out.
    """
    constants = {t.name for t in proto.graph.initializer}
    constants |= {o for n in proto.graph.node if n.op_type == "Constant" for o in n.output}
    return [
        n.name
        for n in proto.graph.node
        if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in constants
    ]


def calibration_batches(
    data: str, meta: Any, *, images: int = 256, batch_size: int = 32, seed: int = 0
) -> list[np.ndarray]:
    """Up to ``images`` preprocessed images (float32 (b, C, H, W) arrays) from ``data``'s train split.

    A seeded random sample, preprocessed with the model's evaluation transform (the same path
    ``tnt eval`` takes), so the measured activation ranges are those the file will see.

    Raises:
        DataError: a missing or unreadable data set (see :func:`tntvision.data.build_dataset`).
        ConfigError: ``images`` below 1.
    """
    from torch.utils.data import DataLoader

    from ..data import EvalBatches, build_dataset, eval_transform, has_image_tensor

    if images < 1:
        raise ConfigError(f"calibration needs at least one image, got {images}")
    dataset = build_dataset(data, "train", transform=eval_transform(meta))
    g = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(dataset), generator=g)[:images].sort().values
    part = dataset.subset(index, split="calibration")
    if has_image_tensor(part):
        loader: Any = EvalBatches(part, meta=meta, batch_size=batch_size)
    else:
        loader = DataLoader(part, batch_size=batch_size, shuffle=False)
    return [x.numpy() for x, _ in loader]


class _CalibrationReader:
    """onnxruntime's CalibrationDataReader protocol (``get_next``) over a list of batches."""

    def __init__(self, batches: list[np.ndarray]) -> None:
        self._batches = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        x = next(self._batches, None)
        return None if x is None else {INPUT_NAME: x}


def _quantize(src: Path, dst: Path, *, nodes: list[str], calibration: list[np.ndarray] | None) -> None:
    """int8 ``src`` -> ``dst``: dynamic, or static QDQ when calibration batches are given."""
    q = require("onnxruntime.quantization", "--quantize int8")
    with _quiet_stdout():
        if calibration is None:
            q.quantize_dynamic(
                src,
                dst,
                op_types_to_quantize=["MatMul", "Gemm"],
                nodes_to_quantize=nodes,
                weight_type=q.QuantType.QInt8,
            )
        else:
            q.quantize_static(
                src,
                dst,
                _CalibrationReader(calibration),
                quant_format=q.QuantFormat.QDQ,
                op_types_to_quantize=["MatMul", "Gemm"],
                nodes_to_quantize=nodes,
                per_channel=True,
                activation_type=q.QuantType.QUInt8,
                weight_type=q.QuantType.QInt8,
                calibrate_method=q.CalibrationMethod.MinMax,
                # int8 inputs only: the GEMM outputs (into LayerNorm, GELU, residual adds) stay float
                extra_options={"OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm"]},
            )


def _write_onnx(
    model: nn.Module,
    tmp: str,
    *,
    opset: int | None,
    quantize: str | None,
    calibration: list[np.ndarray] | None,
) -> dict[str, Any]:
    """Export (and quantize) ``model`` into the file ``tmp``; returns the metadata written into it."""
    onnx = require("onnx", "ONNX export")
    proto = _onnx_model(model, _example_input(model), opset=opset)
    onnx.checker.check_model(proto, full_check=True)
    kind = None
    if quantize is not None:
        kind = f"{quantize}-{'dynamic' if calibration is None else 'static-qdq'}"
        nodes = _weight_gemms(proto)
        with tempfile.TemporaryDirectory(prefix="tntvision-export-") as work:
            fp32, int8 = Path(work) / "fp32.onnx", Path(work) / "int8.onnx"
            del proto.graph.value_info[:]  # optional shape hints; stale once the quantizer rewrites the graph
            onnx.save_model(proto, fp32)
            _quantize(fp32, int8, nodes=nodes, calibration=calibration)
            proto = onnx.load_model(int8)
        onnx.checker.check_model(proto)  # com.microsoft ops: no full (shape inference) check
    metadata = export_metadata(model, quantize=kind, exporter="torch.onnx.export(dynamo=True)")
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(metadata)
    proto.doc_string = f"{metadata['model']} exported by tntvision {metadata['tntvision']}"
    onnx.save_model(proto, tmp)
    return metadata


# ------------------------------------------------------------------------------------------ pt2


def _write_pt2(model: nn.Module, tmp: str) -> dict[str, Any]:
    """``torch.export`` ``model`` (fused kernels off: plain aten ops) into the archive ``tmp``."""
    x = _example_input(model)
    with kernels.fused_kernels(False), torch.no_grad():
        program = torch.export.export(model, (x,), dynamic_shapes=_batch_dims(), strict=False)
    metadata = export_metadata(model, quantize=None, exporter="torch.export.export")
    with open(tmp, "wb") as f:  # a file object: torch.export.save wants a .pt2 name otherwise
        torch.export.save(program, f, extra_files={f"{METADATA_KEY}.json": json.dumps(metadata)})
    return metadata


# ------------------------------------------------------------------------------------------ driver


def _check_args(
    *, format: str, out: Path, quantize: str | None, calibrate: str | None, opset: int | None
) -> None:
    if format not in FORMATS:
        raise ConfigError(f"unknown format {format!r}: choose one of {', '.join(FORMATS)}")
    if out.suffix != f".{format}":
        raise ConfigError(f"--out must end in .{format} for --format {format} (got {out.name})")
    if quantize is not None and quantize not in QUANTIZE:
        raise ConfigError(f"unknown quantization {quantize!r}: choose one of {', '.join(QUANTIZE)}")
    if quantize is not None and format != "onnx":
        raise ConfigError("--quantize applies to --format onnx (onnxruntime's int8 tools)")
    if calibrate is not None and quantize is None:
        raise ConfigError("--calibrate needs --quantize int8 (it gives static quantization its ranges)")
    if opset is not None and format != "onnx":
        raise ConfigError("--opset applies to --format onnx")
    if opset is not None and not 17 <= opset <= 25:
        raise ConfigError(f"--opset must be between 17 and 25 (the dynamo exporter's range), got {opset}")
    if out.is_dir():
        raise ConfigError(f"{out}: is a folder; --out names the file to write")


def export_model(
    checkpoint: str | Path | ModelSource,
    *,
    format: str,
    out: str | Path,
    img_size: int | None = None,
    opset: int | None = None,
    quantize: str | None = None,
    calibrate: str | None = None,
    calibration_images: int = 256,
    merge_tokens: int | Sequence[int] = 0,
    warn: Callable[[str], None] | None = None,
) -> ExportResult:
    """Export a saved model to ``out`` as ONNX or pt2 (module docstring), and check the file.

    Args:
        checkpoint: a run folder, ``model/`` folder or weights file (see :func:`tntvision.load_model`), or
            a :class:`~tntvision.tools.checkpoints.ModelSource` (a model by name, with published weights).
        format: ``"onnx"`` or ``"pt2"``; ``out`` must carry that suffix (the suffix is how
            ``--checkpoint`` recognises an exported file).
        img_size: export at this input size (default: the model's).
        opset: ONNX opset (default: the exporter's).
        quantize: ``"int8"`` (ONNX only): dynamic quantization, or static QDQ with ``calibrate``.
        calibrate: ``"fashion-mnist"`` or an ImageFolder root whose train images calibrate static int8.
        calibration_images: how many images calibration uses.
        merge_tokens: token merging (TNT models), fixed in the file: ``r`` per block or one per block.
        warn: called with notes for the user.

    Returns:
        What was written, with the largest |logit difference| between the file and the PyTorch model
        on a random batch (for int8 that is the quantization error, not a bug).

    Raises:
        ConfigError: a bad combination of options, or an ``out`` that is a folder.
        DependencyError: onnx / onnxscript / onnxruntime missing where they are needed.
        CheckpointError, DataError: an unreadable checkpoint or calibration data set.
        OSError: an ``out`` that cannot be written.
    """
    out = Path(out)
    _check_args(format=format, out=out, quantize=quantize, calibrate=calibrate, opset=opset)
    if format == "onnx":  # fail before the slow part when something is missing
        require("onnx", "ONNX export")
        require("onnxscript", "ONNX export (torch.onnx's dynamo exporter)")
        require("onnxruntime", "checking the ONNX file")
        if quantize is not None:
            require("onnxruntime.quantization", "--quantize int8")
    model = _model_for_export(checkpoint, img_size, merge_tokens)
    calibration = None
    if calibrate is not None:
        calibration = calibration_batches(calibrate, model.meta, images=calibration_images)
        if warn is not None:
            n = sum(len(b) for b in calibration)
            warn(f"calibrating int8 ranges on {n} images of {calibrate} (train split)")
    written: dict[str, Any] = {}

    def write(tmp: str) -> None:  # the file is checked before it is renamed into place

        if format == "onnx":
            written.update(_write_onnx(model, tmp, opset=opset, quantize=quantize, calibration=calibration))
            exported = load_onnx_file(Path(tmp))
        else:
            written.update(_write_pt2(model, tmp))
            exported = load_pt2_file(Path(tmp))
        written["max_abs_diff"] = _check_against(model, exported, quantized=quantize is not None)

    atomic_write(out, write)
    return ExportResult(
        out=out,
        format=format,
        model=str(written["model"]),
        input_size=tuple(model.meta.input_size),
        quantize=written["quantize"],
        exporter=written["exporter"],
        size_bytes=out.stat().st_size,
        max_abs_diff=written["max_abs_diff"],
    )


@torch.inference_mode()
def _check_against(model: nn.Module, exported: nn.Module, *, quantized: bool, batch: int = 3) -> float:
    """Largest |logit difference| of the exported file and the PyTorch model on random images.

    A float file that disagrees by more than 1e-3 (relative to the logits' scale) is a bug: RuntimeError,
    and no file is written. An int8 file's difference is its quantization error, reported only.
    """
    x = torch.randn(batch, *model.meta.input_size, generator=torch.Generator().manual_seed(0))
    with kernels.fused_kernels(False):
        want = model(x)  # (batch, classes)
    diff = float((exported(x) - want).abs().max())
    scale = max(1.0, float(want.abs().max()))
    if not quantized and not diff <= 1e-3 * scale:
        raise RuntimeError(f"the exported file's logits differ from PyTorch's by {diff:.3g} (a bug)")
    return diff
