"""Optional packages: import one, or say which pyproject extra installs it."""

from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import DependencyError

__all__ = ["require"]


def require(module: str, purpose: str, *, extra: str = "export") -> ModuleType:
    """Import ``module`` or raise :class:`DependencyError` naming the pyproject ``extra`` that installs it
    (the ImportError stays its cause)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        package = module.split(".")[0]
        raise DependencyError(
            f"{purpose} needs the {package} package: pip install 'tntvision[{extra}]'"
        ) from e
