"""Messages for the user: close-match suggestions and log lines on stderr (stdout is kept for results)."""

from __future__ import annotations

import difflib
import sys
from collections.abc import Iterable

__all__ = ["did_you_mean", "log_stderr"]


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """``"; did you mean a, b?"`` listing up to three close matches of ``name``, or ``""``."""
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.5)
    return f"; did you mean {', '.join(close)}?" if close else ""


def log_stderr(msg: str) -> None:
    """One line for the user on stderr, flushed at once (a log file shows it in order)."""
    print(msg, file=sys.stderr, flush=True)
