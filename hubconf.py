"""torch.hub entry points: ``torch.hub.load(path_to_clone, "tnt_s_patch16_224", source="local")``.

One entry per registered model (``torch.hub.list(path, source="local")``), each
``NAME(pretrained=False, tag=None, **overrides)`` = :func:`tntvision.create_model` of ``NAME`` or
``NAME.TAG`` (``pretrained``: True for the tag's published weights, downloaded or cached, or a path to
weights in any supported layout; ``overrides``: ``num_classes``, ``img_size``, ``in_chans``, ...). The
package is imported from this clone's ``src/``. Everything else here starts with ``_``: torch.hub lists
every public callable of this module as an entry point.
"""

import sys as _sys
from pathlib import Path as _Path

dependencies = ["torch", "torchvision", "safetensors"]

_SRC = _Path(__file__).resolve().parent / "src"
if _SRC.is_dir() and str(_SRC) not in _sys.path:
    _sys.path.insert(0, str(_SRC))  # this clone's package, as torch.hub's "load from this folder" implies

import tntvision as _tntvision  # noqa: E402  (after the path above)


def _entry(name: str):
    def entry(pretrained: bool | str | None = False, tag: str | None = None, **overrides):
        return _tntvision.create_model(f"{name}.{tag}" if tag else name, pretrained=pretrained, **overrides)

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = (
        f"{name}: tntvision.create_model({name!r}, pretrained=False, **overrides). pretrained=True: the "
        "published weights of the default tag, or of `tag` (see tntvision.list_models(pretrained=True)); "
        "or a path to weights (ours, timm's, the authors' or mmpretrain's)."
    )
    return entry


for _name in _tntvision.list_models():
    globals()[_name] = _entry(_name)
