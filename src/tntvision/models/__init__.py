"""TNT model family: the models, their registry, and checkpoint handling."""

from ..errors import UnknownModelError
from . import pyramid_tnt, tnt  # noqa: F401  (register the variants)
from .factory import create_model
from .pretrained import PretrainedTag, get_pretrained_tag, list_pretrained
from .registry import ModelMeta, list_models
from .saving import load_model, save_model
from .tnt import TNT, TNTConfig, record_attention
from .weights import CheckpointError, LoadReport, load_pretrained

__all__ = [
    "TNT",
    "CheckpointError",
    "LoadReport",
    "ModelMeta",
    "PretrainedTag",
    "TNTConfig",
    "UnknownModelError",
    "create_model",
    "get_pretrained_tag",
    "list_models",
    "list_pretrained",
    "load_model",
    "load_pretrained",
    "record_attention",
    "save_model",
]
