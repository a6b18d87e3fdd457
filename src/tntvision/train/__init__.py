"""Training: the run loop, one-epoch engine, checkpoints, distributed helpers and the typed config."""

from .checkpoint import load_checkpoint, save_checkpoint
from .config import SMALL_IMAGE_RECIPE, TrainConfig, from_dict, load_yaml, parse_set, to_dict
from .engine import NonFiniteLossError, evaluate, train_one_epoch
from .optim import build_optimizer
from .run import resolve_config, train

__all__ = [
    "SMALL_IMAGE_RECIPE",
    "NonFiniteLossError",
    "TrainConfig",
    "build_optimizer",
    "evaluate",
    "from_dict",
    "load_checkpoint",
    "load_yaml",
    "parse_set",
    "resolve_config",
    "save_checkpoint",
    "to_dict",
    "train",
    "train_one_epoch",
]
