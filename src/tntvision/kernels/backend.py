"""Which inner transformer runs: the C++ op, the Triton op or the reference path, from static facts only
(device, dtype, shapes, the switches of :mod:`~tntvision.kernels.settings`, whether the C++ op builds and
Triton runs); never from timings or tensor values.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from . import cpu, triton_op
from .op import compute_dtype
from .settings import fused_kernels_enabled, kernel_backend_setting

__all__ = ["fused_backend", "kernel_backend", "kernels_info"]


def kernel_backend(device: torch.device | str, dtype: torch.dtype = torch.float32) -> str:
    """Which inner transformer runs on ``device`` for words of ``dtype``: ``cpu`` (the C++ op), ``triton``
    (the Triton op) or ``reference`` (PyTorch modules), from static facts only: the device, the dtype, the
    setting (:func:`kernel_backend_setting`), whether the fused path is on, whether the C++ op builds and
    whether Triton imports (and, on CPU tensors, runs its interpreter). :class:`ConfigError` when the
    ``triton`` backend is asked for where it cannot run."""
    device = torch.device(device)
    if not fused_kernels_enabled():
        return "reference"
    setting = kernel_backend_setting()
    if setting == "triton" or (setting == "auto" and device.type == "cuda"):
        ok, why = _triton_runs(device.type)
        if not ok and setting == "triton":
            raise ConfigError(f"TNTVISION_KERNEL_BACKEND=triton: {why}")
        return "triton" if ok and dtype in triton_op.DTYPES else "reference"
    if device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and cpu.fused_available():
        return "cpu"
    return "reference"


def kernels_info() -> dict[str, object]:
    """What ``tnt kernels info`` reports: the C++ op's copy, bf16 mode and build folder
    (:func:`kernel_dispatch`), the backend setting, the backend each device's words get
    (:func:`kernel_backend`, fp32) and Triton's version and mode."""
    info: dict[str, object] = {**cpu.kernel_dispatch(), "build": str(cpu.build_directory())}
    info["backend_setting"] = kernel_backend_setting()
    backends = {}
    for device in ("cpu", "cuda"):
        try:
            backends[device] = kernel_backend(device)
        except ConfigError as e:
            backends[device] = f"unavailable ({e})"
    info["backends"] = backends
    info["cuda_available"] = torch.cuda.is_available()
    ok, why = triton_op.triton_status()
    version = triton_op.triton_version() if ok else None
    info["triton"] = {"version": version, "interpreted": ok and triton_op.interpreted(), "error": why or None}
    return info


def _triton_runs(device_type: str) -> tuple[bool, str]:
    """Whether the Triton op runs on tensors of this device type here (checked once per device type)."""
    if device_type not in _TRITON:
        _TRITON[device_type] = triton_op.runs_on(torch.device(device_type))
    return _TRITON[device_type]


_TRITON: dict[str, tuple[bool, str]] = {}


def fused_backend(x: torch.Tensor) -> str | None:
    """The fused op that may run on words ``x`` (S, m, c) now: ``cpu``, ``triton``, or None for the
    reference path (static facts only; builds the C++ op on first use)."""
    if torch.onnx.is_in_onnx_export():
        return None
    if torch.compiler.is_compiling():  # dynamo runs these once at trace time and keeps the answers
        backend = _backend_for_trace(x.device.type, x.dtype)
    else:
        backend = kernel_backend(x.device, x.dtype)
    if backend == "triton":
        capability = _capability(x.device.index) if x.device.type == "cuda" else None
        ok = triton_op.supports(x.shape[1], x.shape[2]) and triton_op.gpu_supports(
            capability, compute_dtype(x)
        )
        return "triton" if ok else None
    return None if backend == "reference" else backend


@torch.compiler.assume_constant_result
def _capability(index: int | None) -> tuple[int, int]:
    """The compute capability of CUDA device ``index`` (the current one for None)."""
    return torch.cuda.get_device_capability(index)


def _backend_for_trace(device_type: str, dtype: torch.dtype) -> str:
    """:func:`kernel_backend` inside a trace: a constant of the graph, so a model compiled or exported
    before any eager call still gets the fused op. torch 2.14's dynamo reads the on/off switch (a context
    variable) and guards on it; 2.13's cannot, so there it is read once per trace."""
    if _DYNAMO_TRACES_CONTEXTVARS and not fused_kernels_enabled():
        return "reference"
    return _constant_backend(device_type, dtype)


@torch.compiler.assume_constant_result
def _constant_backend(device_type: str, dtype: torch.dtype) -> str:
    return kernel_backend(torch.device(device_type), dtype)


# torch 2.14's dynamo traces ContextVar.get and guards on the value (switching the fused path recompiles);
# 2.13's cannot trace it, so there the switch is read once per trace, a constant of the compiled graph.
_DYNAMO_TRACES_CONTEXTVARS = torch.torch_version.TorchVersion(torch.__version__) >= (2, 14)
