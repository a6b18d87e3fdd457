"""Files written so that a reader (or a crash) never sees half of one: a temp file, then a rename."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["atomic_write", "save_figure", "write_json", "write_text"]


def atomic_write(path: str | Path, write: Callable[[str], object]) -> Path:
    """Write ``path`` via ``write(tmp_path)`` and a rename, so readers never see half a file.

    The temp file sits beside ``path`` (same file system, so the rename is atomic) and gets the
    permissions a plain ``open()`` would give it. Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the permissions open() would
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_text(path: str | Path, text: str) -> Path:
    """``path`` holds ``text`` (atomically)."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_json(path: str | Path, obj: Any) -> Path:
    """``path`` holds ``obj`` as indented JSON and a final newline (atomically)."""
    return write_text(path, json.dumps(obj, indent=2) + "\n")


def save_figure(fig: Any, path: str | Path, *, dpi: int = 100) -> Path:
    """A matplotlib figure -> PNG at ``path`` (atomically)."""
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
