"""The switches that say which inner transformer may run: fused on or off, and which fused op.

``TNTVISION_FUSED=0`` (or :func:`set_fused_kernels`, or a :func:`fused_kernels` block) sends every model
down the reference path; ``TNTVISION_KERNEL_BACKEND`` (``auto``, ``cpu``, ``triton``) or
:func:`set_kernel_backend` picks the op: ``auto`` is the C++ op on CPU tensors and the Triton op on CUDA
tensors, ``triton`` the Triton op everywhere (on CPU tensors through Triton's interpreter).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator

from ..errors import ConfigError

__all__ = [
    "BACKENDS",
    "fused_kernels",
    "fused_kernels_enabled",
    "kernel_backend_set",
    "kernel_backend_setting",
    "set_fused_kernels",
    "set_kernel_backend",
]

BACKENDS = ("auto", "cpu", "triton")


def _fused_from_environment() -> tuple[bool | None, str]:
    """(on?, value) of ``TNTVISION_FUSED``, on when unset; None for a value that is neither
    1/true/yes/on nor 0/false/no/off."""
    flags = dict.fromkeys(("1", "true", "yes", "on"), True)
    flags |= dict.fromkeys(("0", "false", "no", "off"), False)
    value = os.environ.get("TNTVISION_FUSED", "1")
    return flags.get(value.strip().lower()), value


# On/off: a process default (TNTVISION_FUSED, set_fused_kernels) and, over it, what a `fused_kernels` block
# says in the current thread or asyncio task (a context variable: another thread keeps its own setting).
_FUSED_ENVIRONMENT = _fused_from_environment()  # read once, at import
_fused_default: bool | None = None  # set_fused_kernels's choice; None: the environment decides
_FUSED_OVERRIDE: contextvars.ContextVar[bool | None] = contextvars.ContextVar("tntvision_fused", default=None)
_backend_choice: str | None = None  # set_kernel_backend's choice; None: TNTVISION_KERNEL_BACKEND decides
_BACKEND_ENVIRONMENT = os.environ.get("TNTVISION_KERNEL_BACKEND", "auto")  # read once, at import


def fused_kernels_enabled() -> bool:
    """Whether the fused path is on here: the innermost `fused_kernels` block of this thread (or asyncio
    task), else the process default."""
    override = _FUSED_OVERRIDE.get()
    if override is not None:
        return override
    if _fused_default is not None:
        return _fused_default
    enabled, value = _FUSED_ENVIRONMENT
    if enabled is None:  # a bad TNTVISION_FUSED: every call that needs it fails the same way
        raise ConfigError(f"TNTVISION_FUSED={value!r}: use 1/true/yes/on or 0/false/no/off")
    return enabled


def set_fused_kernels(enabled: bool) -> None:
    """Turn the fused path on or off by default for this process (the reference path runs when off).

    A `fused_kernels` block, in any thread, takes precedence inside it."""
    global _fused_default
    _fused_default = bool(enabled)


@contextlib.contextmanager
def fused_kernels(enabled: bool) -> Iterator[None]:
    """Run the ``with`` block with the fused path on or off, restoring the previous setting after.

    The setting is the current thread's (a context variable): a thread that exports a model with the
    fused path off does not change the numbers another thread computes meanwhile."""
    token = _FUSED_OVERRIDE.set(bool(enabled))
    try:
        yield
    finally:
        _FUSED_OVERRIDE.reset(token)


def kernel_backend_setting() -> str:
    """The backend asked for: :func:`set_kernel_backend`'s, else ``TNTVISION_KERNEL_BACKEND`` (``auto``
    when unset). A bad value raises on every call that needs it."""
    name = _backend_choice if _backend_choice is not None else _BACKEND_ENVIRONMENT.strip().lower()
    if name not in BACKENDS:
        raise ConfigError(f"TNTVISION_KERNEL_BACKEND={name!r}: choose one of {', '.join(BACKENDS)}")
    return name


def set_kernel_backend(name: str) -> None:
    """Choose the fused op's backend for this process (one of :data:`BACKENDS`; ``None`` goes back to
    ``TNTVISION_KERNEL_BACKEND``)."""
    global _backend_choice
    if name is not None and name not in BACKENDS:
        raise ConfigError(f"unknown kernel backend {name!r}; choose one of {', '.join(BACKENDS)}")
    _backend_choice = name


@contextlib.contextmanager
def kernel_backend_set(name: str) -> Iterator[None]:
    """Run the ``with`` block with another backend (see :func:`set_kernel_backend`), then restore it."""
    before = _backend_choice
    set_kernel_backend(name)
    try:
        yield
    finally:
        set_kernel_backend(before)
