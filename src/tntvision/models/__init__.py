"""TNT model family: the models, their registry, and checkpoint handling."""

from ..errors import UnknownModelError
from . import pyramid_tnt, tnt  # noqa: F401  (register the variants)
from .factory import create_model
from .registry import ModelMeta, list_models
from .saving import load_model, save_model
from .tnt import TNT, TNTConfig, record_attention
from .weights import CheckpointError, LoadReport, load_pretrained

__all__ = [
    "TNT",
    "CheckpointError",
    "LoadReport",
    "ModelMeta",
    "TNTConfig",
    "UnknownModelError",
    "create_model",
    "list_models",
    "load_model",
    "load_pretrained",
    "record_attention",
    "save_model",
]
