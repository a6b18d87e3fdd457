"""Data: images to tensors the way a model's metadata says, data sets and training transforms."""

from .datasets import FASHION_MNIST_CLASSES, FashionMNIST, ImageFolder, build_dataset, read_idx
from .sampler import SeededDataset, ShardedSampler
from .tensor_batches import EvalBatches, TrainBatches, has_image_tensor
from .transforms import batch_mixer, eval_transform, open_image, to_model_mode, train_transform

__all__ = [
    "FASHION_MNIST_CLASSES",
    "EvalBatches",
    "FashionMNIST",
    "ImageFolder",
    "SeededDataset",
    "ShardedSampler",
    "TrainBatches",
    "batch_mixer",
    "build_dataset",
    "eval_transform",
    "has_image_tensor",
    "open_image",
    "read_idx",
    "to_model_mode",
    "train_transform",
]
