"""Plumbing shared by the library's modules: atomic file writes, autocast, user-facing messages."""

from .amp import AMP_DTYPES, amp_dtype, autocast
from .files import atomic_write, save_figure, write_json, write_text
from .messages import did_you_mean, log_stderr

__all__ = [
    "AMP_DTYPES",
    "amp_dtype",
    "atomic_write",
    "autocast",
    "did_you_mean",
    "log_stderr",
    "save_figure",
    "write_json",
    "write_text",
]
