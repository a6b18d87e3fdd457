"""Exported files (``.onnx``, ``.pt2``) as checkpoints: a model `tnt eval` / `predict` / `bench` can use.

:func:`tntvision.tools.checkpoints.open_model` (what the commands call for ``--checkpoint``) reads a
file ending in ``.onnx`` or ``.pt2`` with :func:`load_exported`, here. The object returned for an exported
file is an :class:`ExportedModel`: an ``nn.Module`` without parameters whose forward takes float32 images
(B, C, H, W) and returns logits (B, classes) as a tensor, and which carries what a PyTorch checkpoint
carries (``meta``, ``class_names``, ``num_classes``, ``model_name``), read from the file's metadata
(:func:`tntvision.tools.export.export_metadata`).

- ``.onnx`` runs on the CPU in one of two runtimes (``runtime=``, ``--runtime``): onnxruntime (the
  default) or OpenVINO (``openvino.Core().compile_model``, the ``openvino`` extra). Both are an
  :data:`OnnxRunner` (float32 array in, logits out) behind the same :class:`ExportedModel`, and both use as
  many threads as torch does (``OMP_NUM_THREADS`` / ``torch.set_num_threads``), so runtimes are compared
  on equal terms. OpenVINO is told to compute in float32: on CPUs with bf16 support (AVX512_BF16, AMX)
  its default inference precision is bf16, which would silently make an fp32 file a bf16 one. The file is
  checked with ``onnx.checker`` first; a file that fails it is refused, whatever the runtime.
- ``.pt2`` is read with ``torch.export.load`` and runs in PyTorch. ``torch.export.load`` unpickles some
  payloads (tensor subclasses, custom objects, legacy weight files, and example inputs that a restricted
  ``weights_only`` load refuses). Files a user hands us are never unpickled, so :func:`check_pt2_archive`
  refuses an archive holding any of those before it is loaded.

An exported file is fixed to float32 inputs on the CPU at one image size; asking for another dtype, a
device, or autocast is a user error. :func:`resolve_runtime` decides which runtime runs a ``--checkpoint``
(``"torch"`` for PyTorch checkpoints and ``.pt2`` files, whose only runtime is PyTorch) and refuses a
``--runtime`` that cannot run it.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import CheckpointError, ConfigError, InputError, read_failure
from ..models.registry import ModelMeta
from ..models.weights import EXPORTED_SUFFIXES, is_exported_file
from ..utils.deps import require

__all__ = [
    "EXPORTED_SUFFIXES",
    "METADATA_FORMAT",
    "METADATA_KEY",
    "ONNX_RUNTIMES",
    "RUNTIMES",
    "ExportedModel",
    "OnnxRunner",
    "check_pt2_archive",
    "is_exported_file",
    "load_exported",
    "load_onnx_file",
    "load_pt2_file",
    "read_metadata",
    "resolve_runtime",
]

METADATA_KEY = "tntvision"  # ONNX metadata_props key; the pt2 extra file is METADATA_KEY + ".json"
METADATA_FORMAT = "tntvision-export/1"  # written by tntvision.tools.export
ONNX_RUNTIMES = ("onnxruntime", "openvino")  # what runs an .onnx file; the first is the default
RUNTIMES = (*ONNX_RUNTIMES, "torch")  # --runtime's choices; torch: PyTorch checkpoints and .pt2 files


def resolve_runtime(path: str | Path, runtime: str | None = None) -> str:
    """The runtime that runs the ``--checkpoint`` ``path`` with ``--runtime runtime`` (None: the default).

    ``.onnx``: ``"onnxruntime"`` (default) or ``"openvino"``. ``.pt2`` files and PyTorch checkpoints run
    in PyTorch only: ``"torch"`` (default, and the one value accepted, so that a script may pass it for
    every checkpoint).

    Raises:
        ConfigError: a runtime that does not run this kind of file (one line saying what does).
    """
    name = Path(path).name
    suffix = Path(path).suffix.lower()
    if runtime is not None and runtime not in RUNTIMES:
        raise ConfigError(f"unknown runtime {runtime!r}: choose one of {', '.join(RUNTIMES)}")
    if suffix == ".onnx":
        if runtime == "torch":
            raise ConfigError(
                f"--runtime torch runs PyTorch checkpoints and .pt2 files; {name} is an ONNX file: "
                f"pass --runtime {' or '.join(ONNX_RUNTIMES)} (default {ONNX_RUNTIMES[0]})"
            )
        return runtime or ONNX_RUNTIMES[0]
    if runtime not in (None, "torch"):
        what = "a torch.export archive" if suffix == ".pt2" else "a PyTorch checkpoint"
        raise ConfigError(
            f"--runtime {runtime} runs .onnx files; {name} is {what}, which runs in PyTorch: "
            "leave --runtime out (or pass --runtime torch)"
        )
    return "torch"


class ExportedModel(nn.Module):
    """A model read from an exported file: float32 images (B, C, H, W) -> logits (B, classes).

    Attributes:
        path: the file.
        metadata: the JSON object the file carries (model name, config, class names, preprocessing).
        meta: its preprocessing as :class:`~tntvision.models.registry.ModelMeta`.
        class_names, num_classes, model_name: as on a model :func:`tntvision.load_model` returns.
        runtime: ``"onnxruntime"``, ``"openvino"`` or ``"torch.export"``.
    """

    def __init__(
        self,
        *,
        path: Path,
        metadata: dict[str, Any],
        run: Callable[[torch.Tensor], torch.Tensor],
        runtime: str,
    ) -> None:
        super().__init__()
        self.path = path
        self.metadata = metadata
        self.runtime = runtime
        self._run = run  # a plain callable, not a submodule: the model has no parameters of its own
        try:
            meta = {k: tuple(v) if isinstance(v, list) else v for k, v in metadata["meta"].items()}
            self.meta = ModelMeta(**meta)
            self.num_classes = int(metadata["num_classes"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: unreadable tntvision metadata ({e})") from e
        names = metadata.get("class_names")
        self.class_names = list(names) if names is not None and len(names) == self.num_classes else None
        self.model_name = str(metadata.get("model") or path.stem)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expected = tuple(self.meta.input_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise InputError(
                f"{self.path.name} takes images (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}"
            )
        if torch.is_autocast_enabled("cpu"):
            raise InputError(f"{self.path.name}: autocast (--amp) applies to PyTorch checkpoints only")
        return self._run(x.detach().to("cpu", torch.float32).contiguous())

    def to(self, *args: Any, **kwargs: Any) -> ExportedModel:
        """Only float32 on the CPU: the file was exported for that (a no-op then; otherwise InputError)."""
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        if device is not None and torch.device(device).type != "cpu":
            raise InputError(f"{self.path.name}: an exported model runs on the CPU, not {device}")
        if dtype is not None and dtype != torch.float32:
            raise InputError(
                f"{self.path.name}: an exported model takes float32 images; "
                f"--dtype {str(dtype).removeprefix('torch.')} applies to PyTorch checkpoints"
            )
        return self

    def extra_repr(self) -> str:
        return (
            f"{self.path.name}: {self.model_name} on {self.runtime}, quantize={self.metadata.get('quantize')}"
        )


def load_exported(path: str | Path, *, runtime: str | None = None) -> ExportedModel:
    """Read an exported ``.onnx`` or ``.pt2`` file written by `tnt export` (module docstring).

    ``runtime``: for an ``.onnx`` file ``"onnxruntime"`` (None: the default) or ``"openvino"``; for a
    ``.pt2`` file None or ``"torch"`` (see :func:`resolve_runtime`).

    Raises:
        ConfigError: a ``runtime`` that does not run this kind of file.
        CheckpointError: a missing file, one that fails the ONNX checker or is no pt2 archive, an archive
            holding pickled payloads, a file without tntvision metadata, a file the runtime cannot load.
        DependencyError: onnx or the runtime's package missing for an ``.onnx`` file.
    """
    path = Path(path)
    chosen = resolve_runtime(path, runtime)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return load_onnx_file(path, runtime=chosen)
    if suffix == ".pt2":
        return load_pt2_file(path)
    raise CheckpointError(f"{path}: not an exported model (expected a file ending in .onnx or .pt2)")


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The tntvision metadata of an exported file, without building a runtime session."""
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        return _onnx_metadata(path, _read_onnx(path))
    check_pt2_archive(path)
    return _pt2_metadata(path)


# ------------------------------------------------------------------------------------------ onnx


def _read_onnx(path: Path) -> Any:
    """The ModelProto of ``path`` after ``onnx.checker`` (weights stay in the file: no external data)."""

    onnx = require("onnx", "reading an .onnx file")
    try:
        proto = onnx.load_model(path, load_external_data=False)
        onnx.checker.check_model(proto)
    except Exception as e:  # protobuf's DecodeError, onnx's ValidationError: a file that is not valid ONNX
        raise CheckpointError(read_failure(path, "a valid ONNX model", e)) from e
    return proto


def _onnx_metadata(path: Path, proto: Any) -> dict[str, Any]:

    props = {p.key: p.value for p in proto.metadata_props}
    if METADATA_KEY not in props:
        raise CheckpointError(
            f"{path}: an ONNX file without tntvision metadata (class names and preprocessing unknown); "
            "export it with `tnt export`"
        )
    return _parse_metadata(path, props[METADATA_KEY])


def _parse_metadata(path: Path, text: str) -> dict[str, Any]:
    try:
        metadata = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: unreadable tntvision metadata ({e})") from e
    if not isinstance(metadata, dict) or "meta" not in metadata:
        raise CheckpointError(f"{path}: unreadable tntvision metadata (no preprocessing)")
    return metadata


OnnxRunner = Callable[[np.ndarray], np.ndarray]
"""A compiled ONNX file: float32 images (B, C, H, W) -> float32 logits (B, classes), a fresh array."""


def _onnxruntime_runner(path: Path, threads: int) -> OnnxRunner:
    """``path`` in an onnxruntime CPU session with ``threads`` intra-op threads."""

    ort = require("onnxruntime", "running an .onnx file")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's own exception types (Fail, InvalidGraph, ...)
        raise CheckpointError(f"{path}: onnxruntime cannot load it ({_first_line(e)})") from e
    input_name = session.get_inputs()[0].name
    output_name = session.get_outputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        (logits,) = session.run([output_name], {input_name: x})
        return logits

    return run


def _openvino_runner(path: Path, threads: int, *, precision: str = "f32") -> OnnxRunner:
    """``path`` compiled by OpenVINO for its CPU plugin: one stream of ``threads`` threads (latency mode).

    ``precision`` is OpenVINO's ``INFERENCE_PRECISION_HINT`` for the float parts of the graph: ``"f32"``
    keeps an fp32 file fp32 (OpenVINO's own default is ``"bf16"`` on CPUs with bf16 units); int8 files
    keep their int8 GEMMs either way. The batch dimension stays dynamic.
    """
    ov = _require_openvino()
    config = {
        "INFERENCE_NUM_THREADS": threads,
        "NUM_STREAMS": 1,
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": precision,
    }
    try:
        compiled = ov.Core().compile_model(str(path), "CPU", config)
    except Exception as e:  # OpenVINO raises RuntimeError / GeneralFailure for what its frontend refuses
        raise CheckpointError(f"{path}: openvino cannot load it ({_openvino_message(e)})") from e
    output = compiled.output(0)

    def run(x: np.ndarray) -> np.ndarray:
        return compiled(x)[output]  # a copy (share_outputs=False): safe to keep across calls

    return run


def _require_openvino() -> Any:

    return require("openvino", "--runtime openvino", extra="openvino")


_ONNX_RUNNERS: dict[str, Callable[..., OnnxRunner]] = {
    "onnxruntime": _onnxruntime_runner,
    "openvino": _openvino_runner,
}


def _openvino_message(e: BaseException) -> str:
    """The reason in an OpenVINO exception, without its ``Exception from src/...cpp:N:`` trace lines."""
    skip = ("Exception from ", "Check '", "FrontEnd API failed")
    lines = [line.strip() for line in str(e).splitlines() if line.strip() and not line.startswith(skip)]
    return lines[-1] if lines else _first_line(e)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def load_onnx_file(path: Path, *, runtime: str = "onnxruntime", **options: Any) -> ExportedModel:
    """An ``.onnx`` file (any name) checked and compiled by ``runtime``; see :func:`load_exported`.

    The runtime's package is imported first (a missing one fails before the file is read), then the file
    passes ``onnx.checker`` and its metadata is read, the same for every runtime. ``options`` go to the
    runtime's runner (``precision=`` for OpenVINO); the thread count is torch's.
    """
    if runtime not in _ONNX_RUNNERS:
        raise ConfigError(f"{path.name}: an .onnx file runs in {' or '.join(ONNX_RUNTIMES)}, not {runtime!r}")
    if runtime == "openvino":
        _require_openvino()
    metadata = _onnx_metadata(path, _read_onnx(path))
    runner = _ONNX_RUNNERS[runtime](path, torch.get_num_threads(), **options)

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(runner(x.numpy()))  # (B, classes)

    model = ExportedModel(path=path, metadata=metadata, run=run, runtime=runtime)
    model.runner = runner
    return model


# ------------------------------------------------------------------------------------------ pt2


def _archive_entries(z: zipfile.ZipFile) -> dict[str, str]:
    """Names inside the archive's root folder -> full zip names."""
    names = z.namelist()
    if not names:
        return {}
    root = names[0].split("/")[0]
    return {n[len(root) + 1 :]: n for n in names if n.startswith(root + "/")}


def check_pt2_archive(path: str | Path) -> None:
    """Refuse a ``.pt2`` file that is no pt2 archive or that ``torch.export.load`` would unpickle.

    Pickled payloads are tensor subclasses and custom objects (``use_pickle`` in the weights / constants
    configs, ``custom_obj_*`` / ``opaque_obj_*`` constants), legacy ``.pt`` weight files and compiled
    (AOTInductor) code; example inputs must load with ``torch.load(weights_only=True)``, so torch's
    unrestricted fallback never runs.

    Raises:
        CheckpointError: with what was found.
    """
    from torch.export.pt2_archive import constants as C

    path = Path(path)
    try:
        with zipfile.ZipFile(path) as z:
            entries = _archive_entries(z)
            marker = entries.get(C.ARCHIVE_FORMAT_PATH)
            if marker is None or z.read(marker) != b"pt2":
                raise CheckpointError(f"{path}: not a torch.export archive")
            for name, full in entries.items():
                _check_pt2_entry(path, name, lambda full=full: z.read(full), C)
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(read_failure(path, "a torch.export archive", e)) from e


def _check_pt2_entry(path: Path, name: str, read: Callable[[], bytes], C: Any) -> None:
    def refuse(what: str) -> None:
        raise CheckpointError(
            f"{path}: refused, the archive holds {what} ({name}), which loading would unpickle"
        )

    base = name.rsplit("/", 1)[-1]
    if name.startswith(C.AOTINDUCTOR_DIR):
        refuse("compiled code")
    if name.startswith((C.WEIGHTS_DIR, C.CONSTANTS_DIR)):
        if name.endswith(".pt"):
            refuse("a pickled (legacy) weights file")
        if base.startswith((C.CUSTOM_OBJ_FILENAME_PREFIX, C.OPAQUE_OBJ_FILENAME_PREFIX)):
            refuse("a custom object")
        if name.endswith(".json"):
            try:
                config = json.loads(read()).get("config", {})
            except (ValueError, AttributeError):
                config = None
            if not isinstance(config, dict):
                refuse("an unreadable payload config")
            if any(isinstance(m, dict) and m.get("use_pickle") for m in config.values()):
                refuse("pickled tensors")
    if name.startswith(C.SAMPLE_INPUTS_DIR):
        try:
            torch.load(io.BytesIO(read()), weights_only=True)
        except Exception:  # anything the restricted unpickler refuses
            refuse("example inputs that are not plain tensors")


def _pt2_metadata(path: Path) -> dict[str, Any]:
    from torch.export.pt2_archive import constants as C

    with zipfile.ZipFile(path) as z:
        entries = _archive_entries(z)
        name = f"{C.EXTRA_DIR}{METADATA_KEY}.json"
        if name not in entries:
            raise CheckpointError(
                f"{path}: a pt2 archive without tntvision metadata (class names and preprocessing unknown); "
                "export it with `tnt export`"
            )
        return _parse_metadata(path, z.read(entries[name]).decode("utf-8"))


def load_pt2_file(path: Path) -> ExportedModel:
    """A ``.pt2`` archive (any name) checked for pickled payloads and loaded; see :func:`load_exported`."""
    check_pt2_archive(path)
    metadata = _pt2_metadata(path)
    try:
        with open(path, "rb") as f:  # a file object: torch.export.load wants a .pt2 name otherwise
            program = torch.export.load(f)
    except Exception as e:  # torch's deserialiser: a version mismatch, an op it does not know
        raise CheckpointError(f"{path}: torch.export.load failed ({str(e).strip().splitlines()[0]})") from e
    module = program.module()

    def run(x: torch.Tensor) -> torch.Tensor:
        return module(x)

    return ExportedModel(path=path, metadata=metadata, run=run, runtime="torch.export")


# ------------------------------------------------------------------------------------------ bench


def bench_exported(
    path: str | Path,
    *,
    batch_size: int = 16,
    rounds: int = 6,
    warmup: int = 2,
    threads: int | None = None,
    compare_pytorch: bool = True,
    runtime: str | None = None,
) -> dict[str, Any]:
    """`tnt bench --checkpoint FILE`: inference speed of an exported file, and of PyTorch on the same model.

    Throughput at ``batch_size`` and latency at batch 1 on random images. With ``compare_pytorch`` the
    file's architecture (from its metadata) also runs in eager PyTorch (fused kernels on, random weights:
    speed does not depend on their values), interleaved round by round with the file as
    :func:`tntvision.tools.bench.bench_model` does. ``threads`` sets torch's thread count, which the
    ONNX runtime follows. ``runtime`` runs an ``.onnx`` file in ``"onnxruntime"`` (default) or
    ``"openvino"`` (see :func:`resolve_runtime`); the file's row is labelled with it.

    Returns plain data: per workload, per implementation ``median_ms`` / ``min_ms`` / ``img_per_s``, and
    ``speedup`` = PyTorch's median time / the file's (> 1: the file is faster).
    """
    from ..models import create_model
    from .bench import _summarise, _threads, _time_interleaved

    if batch_size < 1 or rounds < 1 or warmup < 0:
        raise ConfigError("batch size and rounds must be positive, warmup not negative")
    resolve_runtime(path, runtime)
    with _threads(threads) as n_threads:
        file_model = load_exported(
            path, runtime=runtime
        )  # after the thread count is set: the runtime takes it
        label = f"{file_model.runtime}" + (f" {q}" if (q := file_model.metadata.get("quantize")) else "")
        models: dict[str, nn.Module] = {label: file_model}
        if compare_pytorch:
            name, config = file_model.metadata.get("model"), dict(file_model.metadata.get("config") or {})
            torch.manual_seed(0)
            try:
                merge = list(file_model.metadata.get("merge_tokens") or [])
                models["pytorch"] = create_model(
                    name, merge_tokens=merge if any(merge) else 0, **config
                ).eval()
            except (KeyError, TypeError, ValueError) as e:
                raise CheckpointError(f"{path}: cannot rebuild its PyTorch model ({e})") from e
        result: dict[str, Any] = {
            "checkpoint": str(path),
            "model": file_model.model_name,
            "runtime": file_model.runtime,
            "quantize": file_model.metadata.get("quantize"),
            "batch_size": batch_size,
            "threads": n_threads,
            "torch": torch.__version__,
            "implementations": list(models),
        }
        shape = tuple(file_model.meta.input_size)
        for workload, batch, n_rounds in (("inference", batch_size, rounds), ("latency", 1, 2 * rounds)):
            x = torch.randn(batch, *shape)

            def call(m: nn.Module, x: torch.Tensor = x) -> Callable[[], None]:
                def run() -> None:
                    with torch.inference_mode():
                        m(x)

                return run

            times = _time_interleaved({k: call(m) for k, m in models.items()}, warmup=warmup, rounds=n_rounds)
            summary = _summarise(times, batch)
            entry: dict[str, Any] = {"per_impl": summary}
            if compare_pytorch:
                entry["speedup"] = summary["pytorch"]["median_ms"] / summary[label]["median_ms"]
            result[workload] = entry
    return result


def format_bench(result: dict[str, Any]) -> str:
    """A human-readable table of :func:`bench_exported`'s result."""
    lines = [
        f"{result['checkpoint']} ({result['model']})  batch {result['batch_size']}  "
        f"{result['threads']} threads  torch {result['torch']}"
    ]
    for key, title in (("inference", "inference"), ("latency", "latency (batch 1)")):
        lines.append(f"{title}:")
        for name, s in result[key]["per_impl"].items():
            lines.append(f"  {name:<34}{s['median_ms']:10.1f} ms  {s['img_per_s']:8.2f} img/s")
        if "speedup" in result[key]:
            lines.append(f"  time pytorch / file{'':<15}{result[key]['speedup']:10.3f}x")
    return "\n".join(lines)
