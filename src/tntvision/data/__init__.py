"""Data: images to tensors the way a model's metadata says, data sets and training transforms."""

from .transforms import eval_transform, open_image, to_model_mode

__all__ = ["eval_transform", "open_image", "to_model_mode"]
