"""torch.hub entry points: ``torch.hub.load(path_to_clone, "tnt_s_patch16_224", source="local")``.

One entry per registered model (``torch.hub.list(path, source="local")``), each
``NAME(pretrained=None, **overrides)`` = :func:`tntvision.create_model` (``pretrained``: a path to weights
in any supported layout; ``overrides``: ``num_classes``, ``img_size``, ``in_chans``, ...). The package is
imported from this clone's ``src/`` when it is not installed.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

dependencies = ["torch", "torchvision", "safetensors"]

_SRC = Path(__file__).resolve().parent / "src"
if _SRC.is_dir() and str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))  # this clone's package, as torch.hub's "load from this folder" implies

import tntvision  # noqa: E402  (after the path above)


def _entry(name: str) -> Callable:
    def entry(pretrained: str | None = None, **overrides):
        return tntvision.create_model(name, pretrained=pretrained, **overrides)

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = (
        f"{name}: tntvision.create_model({name!r}, pretrained=None, **overrides); pretrained is a path to "
        "weights (ours, timm's or the authors')."
    )
    return entry


for _name in tntvision.list_models():
    globals()[_name] = _entry(_name)
