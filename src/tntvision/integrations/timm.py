"""Every tntvision model in timm's registry: ``timm.create_model("tntvision_tnt_s_patch16_224")``.

After :func:`register`, timm's own tools (``train.py``, ``validate.py``, ``benchmark.py``) and any code that
builds models by timm name run our models, fused kernel included, unchanged. timm is imported when
:func:`register` is called, never by tntvision on its own.

The entry points take timm's arguments and map them onto :func:`tntvision.create_model`:
``num_classes``, ``in_chans``, ``img_size``, ``drop_rate``, ``drop_path_rate`` and the other config fields;
``features_only`` with ``out_indices``, ``feature_cls`` and ``output_fmt`` (also inside ``feature_cfg``);
``pretrained=True`` with ``pretrained_cfg_overlay=dict(file=PATH)`` loads weights from PATH in any layout
:func:`tntvision.load_pretrained` reads (there are no weights to download). timm's ``checkpoint_path``
works as with any timm model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from ..errors import ConfigError, DependencyError
from ..models.contract import TimmContract
from ..models.factory import create_model
from ..models.registry import get_model_entry, list_models

__all__ = ["PREFIX", "register"]

PREFIX = "tntvision_"

# What timm's registry reads from the module of an entry point: name -> the model's pretrained_cfg. Filled
# by register(); timm's test and script helpers (get_pretrained_cfg_value) look input sizes up here.
default_cfgs: dict[str, dict[str, Any]] = {}


def _pretrained_file(pretrained: bool, overlay: dict[str, Any] | None) -> str | None:
    if not pretrained:
        return None
    file = (overlay or {}).get("file")
    if not file:
        raise ConfigError(
            "tntvision has no weights to download: pass pretrained_cfg_overlay=dict(file=PATH) "
            "or checkpoint_path=PATH to timm.create_model"
        )
    return str(file)


def _entrypoint(name: str, timm_name: str) -> Callable[..., nn.Module]:
    def build(
        pretrained: bool = False,
        pretrained_cfg: Any = None,
        pretrained_cfg_overlay: dict[str, Any] | None = None,
        cache_dir: Any = None,
        feature_cfg: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> nn.Module:
        # pretrained_cfg and cache_dir are about downloading timm's weights: nothing to do here
        kwargs = {**(feature_cfg or {}), **kwargs}
        return create_model(name, _pretrained_file(pretrained, pretrained_cfg_overlay), **kwargs)

    build.__name__ = build.__qualname__ = timm_name
    build.__module__ = __name__
    build.__doc__ = f"tntvision's ``{name}`` (see ``tntvision.create_model``)."
    return build


def _pretrained_cfg(name: str) -> dict[str, Any]:
    """The pretrained_cfg a model ``name`` gets, without building it when its class can say."""
    entry = get_model_entry(name)
    factory = entry.factory
    if isinstance(factory, type) and issubclass(factory, TimmContract):
        return factory.pretrained_cfg_of(entry.config, entry.meta, architecture=name)
    return create_model(name).pretrained_cfg  # a factory function registered by other code


def register(*, prefix: str = PREFIX) -> list[str]:
    """Register every tntvision model in timm's registry as ``prefix + name``; returns the timm names.

    Calling it again registers nothing new. Raises :class:`DependencyError` when timm is not installed.
    """
    try:
        from timm.models import is_model, model_entrypoint
        from timm.models import register_model as timm_register_model
    except ImportError as e:
        raise DependencyError(f"tntvision.integrations.timm needs timm (pip install timm): {e}") from None
    names = []
    for name in list_models():
        timm_name = prefix + name
        names.append(timm_name)
        if is_model(timm_name) and model_entrypoint(timm_name).__module__ == __name__:
            continue  # registered by an earlier call
        default_cfgs[timm_name] = _pretrained_cfg(name)
        timm_register_model(_entrypoint(name, timm_name))
    return names
