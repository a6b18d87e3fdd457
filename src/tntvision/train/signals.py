"""SIGINT / SIGTERM during training: the loop finishes its step, saves a checkpoint and returns."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["StopFlag", "catch_signals"]


class StopFlag:
    """Set by SIGINT / SIGTERM (its name in ``.signal``); calling it says whether to stop."""

    def __init__(self) -> None:
        self.signal: str | None = None

    def __call__(self) -> bool:
        return self.signal is not None


@contextmanager
def catch_signals(flag: StopFlag) -> Iterator[StopFlag]:
    """Within the block SIGINT and SIGTERM set ``flag``; a second Ctrl-C raises KeyboardInterrupt at once."""

    def handler(signum, _frame):
        if flag.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag.signal = signal.Signals(signum).name

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
