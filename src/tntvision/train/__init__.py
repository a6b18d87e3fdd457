"""Training: the run loop, one-epoch engine, checkpoints, distributed helpers and the typed config."""

from .builder import RunParts, build_run
from .checkpoint import load_training_state, save_training_state
from .config import (
    SMALL_IMAGE_RECIPE,
    TrainConfig,
    from_dict,
    load_yaml,
    parse_set,
    resolve_train_config,
    to_dict,
)
from .engine import EpochControl, NonFiniteLossError, StepOptions, evaluate, train_one_epoch
from .optim import build_optimizer
from .run import train
from .schedule import lr_schedule

__all__ = [
    "SMALL_IMAGE_RECIPE",
    "EpochControl",
    "NonFiniteLossError",
    "RunParts",
    "StepOptions",
    "TrainConfig",
    "build_optimizer",
    "build_run",
    "evaluate",
    "from_dict",
    "load_training_state",
    "load_yaml",
    "lr_schedule",
    "parse_set",
    "resolve_train_config",
    "save_training_state",
    "to_dict",
    "train",
    "train_one_epoch",
]
