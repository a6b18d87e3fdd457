"""Exceptions for mistakes of the user (bad names, arguments, files, inputs).

The CLI turns every :class:`UserError` into a one-line message and exit code 2; anything else is a bug
(exit 1, with a traceback). Each class also derives from the builtin a Python caller would expect.
"""

from __future__ import annotations

import re

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DependencyError",
    "ImageTooLargeError",
    "InputError",
    "UnknownModelError",
    "UserError",
    "read_failure",
]


class UserError(Exception):
    """Base class: the user can fix this by changing what they asked for."""


class ConfigError(UserError, ValueError, TypeError):
    """A config value or an override that is out of range or unknown."""


class InputError(UserError, ValueError):
    """A tensor or image that does not fit the model (shape, channels, size)."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


class DataError(UserError, ValueError):
    """A data set that is missing, empty or inconsistent."""


class ImageTooLargeError(DataError):
    """An image that declares more pixels than a limit allows (a decompression bomb, say)."""


class DependencyError(UserError, ImportError):
    """An optional package a command needs is not installed (the message says which extra to install)."""


class UnknownModelError(UserError, KeyError, ValueError):
    """A model name that is not registered (the message suggests close matches)."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it plain
        return str(self.args[0]) if self.args else ""


def read_failure(path: object, what: str, e: BaseException) -> str:
    """Why reading ``path`` as ``what`` (e.g. "a weights file") failed, in words the user can act on:
    missing, permission denied, unsafe (pickled objects that weights-only loading refuses) or damaged.

    The caller raises its :class:`UserError` ``from e``, so the original exception stays the cause.
    """
    text = str(e)
    detail = text.strip().splitlines()[0][:200] if text.strip() else type(e).__name__
    if isinstance(e, PermissionError):
        return f"{path}: permission denied (cannot read {what})"
    if isinstance(e, FileNotFoundError):
        return f"{path}: no such file (expected {what})"
    if isinstance(e, IsADirectoryError):
        return f"{path}: a folder, not {what}"
    if isinstance(e, OSError):
        return f"{path}: cannot read {what} ({e.strerror or detail})"
    if "Unsupported global" in text or "can still be loaded" in text:  # torch's weights-only unpickler
        return f"{path}: refused as unsafe: it holds pickled objects beyond tensors and plain data"
    if "Weights only load failed" in text:
        found = re.search(r"WeightsUnpickler error:\s*(.+)", text)
        why = found.group(1).strip() if found else "weights-only unpickling failed"
        return f"{path}: damaged, or not {what} that loads without running pickled code ({why})"
    return f"{path}: damaged or not {what} ({type(e).__name__}: {detail})"
