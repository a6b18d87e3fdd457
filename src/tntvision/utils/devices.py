"""Which device a command runs on, and how batches get there.

Every ``--device`` (``tnt train``, ``eval``, ``predict``, ``serve``, ``bench``) goes through
:func:`resolve_device`, so asking for CUDA where there is none is one :class:`~tntvision.errors.ConfigError`
saying why (a CPU-only torch, or a CUDA build that sees no GPU), raised before anything is loaded or
written. :func:`pin_memory` and :func:`non_blocking` are the two transfer choices that follow from the
device: page-locked host batches and asynchronous copies only pay off when the batch crosses to a GPU.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError

__all__ = ["cuda_unavailable_reason", "device_name", "non_blocking", "pin_memory", "resolve_device"]


def cuda_unavailable_reason() -> str | None:
    """Why CUDA cannot be used in this process, in words; None when it can."""
    if torch.cuda.is_available():
        return None
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is a CPU-only build"
    return (
        f"torch {torch.__version__} is built with CUDA {torch.version.cuda} but finds no usable GPU "
        "(no device, no driver, or CUDA_VISIBLE_DEVICES hides them)"
    )


def resolve_device(name: str | torch.device, *, what: str = "--device") -> torch.device:
    """``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (``"auto"``: CUDA when there is a GPU, else the CPU) as a
    :class:`torch.device`.

    Raises:
        ConfigError: CUDA asked for where it is not available, a GPU index beyond those visible, or a
            device of another kind; ``what`` names the option in the message.
    """
    text = str(name)
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ConfigError(f"{what} must be cpu, cuda or cuda:N, got {text!r}") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ConfigError(f"{what} must be cpu, cuda or cuda:N, got {text!r}")
    why = cuda_unavailable_reason()
    if why is not None:
        raise ConfigError(f"{what} {text}: CUDA is not available: {why}; use --device cpu")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ConfigError(f"{what} {text}: this machine shows {count} GPU(s) (cuda:0..cuda:{count - 1})")
    return device


def device_name(device: torch.device) -> str:
    """The GPU's name (``torch.cuda.get_device_name``) for a CUDA device, else the device type."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def pin_memory(device: torch.device) -> bool:
    """Whether a DataLoader feeding ``device`` should pin its batches (page-locked host memory): only for
    a GPU, where it makes the host-to-device copy faster and lets it run asynchronously."""
    return device.type == "cuda"


def non_blocking(device: torch.device) -> bool:
    """Whether ``tensor.to(device)`` may return before the copy is done: for a GPU (the copy is ordered on
    its stream, and from pinned memory it overlaps the host's work); a copy to the CPU must be finished
    before the CPU reads the tensor, so there it stays blocking."""
    return device.type == "cuda"
