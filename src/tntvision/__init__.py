"""tntvision: Transformer-iN-Transformer vision models for PyTorch."""

from .models import (
    TNT,
    CheckpointError,
    ModelMeta,
    TNTConfig,
    UnknownModelError,
    create_model,
    list_models,
    list_pretrained,
    load_model,
    load_pretrained,
    record_attention,
    save_model,
)

__version__ = "0.1.0"

__all__ = [
    "TNT",
    "CheckpointError",
    "ModelMeta",
    "TNTConfig",
    "UnknownModelError",
    "__version__",
    "create_model",
    "list_models",
    "list_pretrained",
    "load_model",
    "load_pretrained",
    "record_attention",
    "save_model",
]
