"""Mixed precision by name: the config's ``amp`` strings and the autocast context they select."""

from __future__ import annotations

import contextlib
import platform
from functools import cache
from pathlib import Path

import torch

from ..errors import InputError

__all__ = [
    "AMP_DTYPES",
    "WEIGHT_DTYPES",
    "amp_dtype",
    "autocast",
    "native_bf16",
    "resolve_amp",
    "weight_dtype",
]

# "none" runs in float32; the others autocast to that dtype.
AMP_DTYPES: dict[str, torch.dtype | None] = {
    "none": None,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


# The dtypes weights (and inputs) may be held in for inference: bfloat16 skips autocast's per-call casts.
WEIGHT_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def weight_dtype(name: str) -> torch.dtype:
    """The torch dtype of a ``--dtype`` name; :class:`InputError` for an unknown one."""
    try:
        return WEIGHT_DTYPES[name]
    except KeyError:
        raise InputError(f"dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {name!r}") from None


def amp_dtype(name: str) -> torch.dtype | None:
    """The autocast dtype of an ``amp`` name; :class:`InputError` for an unknown one."""
    try:
        return AMP_DTYPES[name]
    except KeyError:
        raise InputError(f"amp must be one of {', '.join(AMP_DTYPES)}, got {name!r}") from None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``dtype`` on ``device``'s type, or nothing when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@cache
def _cpuinfo_field(*keys: str) -> str:
    """The first /proc/cpuinfo line's value whose key is one of ``keys``; empty where there is none."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    for line in text.splitlines():
        if line.split(":", 1)[0].strip() in keys:
            return line.split(":", 1)[1].strip()
    return ""


def _cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (x86 ``flags``, Arm ``Features``); empty elsewhere."""
    return frozenset(_cpuinfo_field("flags", "Features").split())


def _cpu_vendor() -> str:
    """x86 ``vendor_id`` (``GenuineIntel``, ``AuthenticAMD``); empty elsewhere."""
    return _cpuinfo_field("vendor_id")


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matrix products on ``device`` are faster than fp32 ones, from static facts of the
    hardware: CUDA GPUs with bf16 units (compute capability 8.0 and later; older ones only emulate bf16);
    x86 CPUs with AMX (``amx_bf16``); AMD CPUs with ``avx512_bf16`` (Zen 4 and later, measured 1.46x
    faster in bf16); Arm CPUs with the ``bf16`` extension.

    Not: x86 CPUs without bf16 instructions (an AVX2-only EPYC), where oneDNN emulates bf16 and a bf16 GEMM
    is several times slower than fp32, and Intel CPUs with ``avx512_bf16`` but no AMX (Cooper Lake, or a
    Sapphire/Emerald Rapids VM that hides AMX): there oneDNN's ``avx512_core_bf16``
    matmul ran at 66.5 GMAC/s against MKL's 122.6 in fp32 (2 threads, ``benchmarks/gemm_dtypes.py``), and
    bf16 autocast training was 1.25x slower than fp32 (docs/performance.md)."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False
        with torch.cuda.device(device):  # that GPU (a bare "cuda": the current one)
            # bf16 tensor cores (Ampere and later); older GPUs only emulate bf16, slower than fp32
            return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type != "cpu":
        return False
    flags = _cpu_flags()
    if platform.machine().lower() in ("aarch64", "arm64"):
        return "bf16" in flags
    if "amx_bf16" in flags:
        return True
    return "avx512_bf16" in flags and _cpu_vendor() == "AuthenticAMD"


def resolve_amp(name: str, device: torch.device) -> str:
    """The autocast a config's ``amp`` means on ``device``: ``"auto"`` is ``"bfloat16"`` where the device
    has native bf16 (:func:`native_bf16`) and ``"none"`` (float32) elsewhere; other names are kept."""
    if name == "auto":
        return "bfloat16" if native_bf16(device) else "none"
    amp_dtype(name)  # InputError for an unknown name
    return name
