"""Mixed precision by name: the config's ``amp`` strings and the autocast context they select."""

from __future__ import annotations

import contextlib

import torch

from ..errors import InputError

__all__ = ["AMP_DTYPES", "WEIGHT_DTYPES", "amp_dtype", "autocast", "weight_dtype"]

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
