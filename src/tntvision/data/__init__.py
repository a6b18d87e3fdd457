"""Data: images to tensors the way a model's metadata says, data sets and training transforms."""

from .datasets import FASHION_MNIST_CLASSES, FashionMNIST, ImageFolder, build_dataset, has_val_split, read_idx
from .sampler import SeededDataset, ShardedSampler
from .splits import RunSplits, hold_out, run_splits
from .tensor_batches import EvalBatches, TrainBatches, has_image_tensor
from .transforms import batch_mixer, eval_transform, open_image, to_model_mode, train_transform

__all__ = [
    "FASHION_MNIST_CLASSES",
    "EvalBatches",
    "FashionMNIST",
    "ImageFolder",
    "RunSplits",
    "SeededDataset",
    "ShardedSampler",
    "TrainBatches",
    "batch_mixer",
    "build_dataset",
    "eval_transform",
    "has_image_tensor",
    "has_val_split",
    "hold_out",
    "open_image",
    "read_idx",
    "run_splits",
    "to_model_mode",
    "train_transform",
]
