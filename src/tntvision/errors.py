"""Exceptions for mistakes of the user (bad names, arguments, files, inputs).

The CLI turns every :class:`UserError` into a one-line message and exit code 2; anything else is a bug
(exit 1, with a traceback). Each class also derives from the builtin a Python caller would expect.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DependencyError",
    "ImageTooLargeError",
    "InputError",
    "UnknownModelError",
    "UserError",
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
