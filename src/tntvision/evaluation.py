"""The evaluation loop that training's validation and `tnt eval` share: top-1 / top-5, loss, confusion.

It sits below both (train/ and tools/ import it; it imports neither), and works in a torchrun job as
on its own: each process evaluates its shard and the sums are combined.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .errors import DataError
from .utils.amp import autocast
from .utils.devices import non_blocking

__all__ = ["all_reduce_sum", "evaluate"]


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over all processes (in place and returned); unchanged in a world of one."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    confusion: bool = False,
) -> dict[str, Any]:
    """Top-1 / top-5 accuracy (percent) and mean cross-entropy of ``model`` over ``loader``.

    Under torchrun each process evaluates its shard and the sums are combined, so every rank returns the
    metrics of the whole set. With ``confusion=True`` the result has ``"confusion"``, a (K, K) int64
    tensor counting (true class, predicted class) pairs.

    Raises:
        DataError: the loader yields no samples at all.
    """
    was_training = model.training
    model.eval()
    param = next(model.parameters(), None)  # images follow the weights (bf16 weights: bf16 inference)
    dtype = param.dtype if param is not None and param.is_floating_point() else None
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1 hits, top-5 hits, samples
    matrix: torch.Tensor | None = None
    copy_async = non_blocking(device)
    for x, y in loader:
        x = x.to(device=device, dtype=dtype, non_blocking=copy_async)
        y = y.to(device, non_blocking=copy_async)
        with autocast(device, amp_dtype):
            logits = model(x)
        logits = logits.float()  # (B, K)
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices  # (B, k)
        hits = top == y[:, None]  # (B, k)
        sums += torch.stack(
            [
                F.cross_entropy(logits, y, reduction="sum").double(),
                hits[:, 0].sum().double(),
                hits.any(dim=1).sum().double(),
                torch.tensor(float(y.shape[0]), dtype=torch.float64, device=device),
            ]
        )
        if confusion:
            K = logits.shape[1]
            if matrix is None:
                matrix = torch.zeros(K, K, dtype=torch.int64, device=device)
            matrix += torch.bincount(y * K + top[:, 0], minlength=K * K).view(K, K)  # rows: true class
    all_reduce_sum(sums)
    n = int(sums[3].item())
    if n == 0:
        raise DataError("nothing to evaluate: the evaluation data is empty")
    out: dict[str, Any] = {
        "top1": 100.0 * sums[1].item() / n,
        "top5": 100.0 * sums[2].item() / n,
        "loss": sums[0].item() / n,
        "n": n,
    }
    if confusion:
        if matrix is None:  # this rank had no batch; its share is zero
            K = getattr(model, "num_classes", 0)
            matrix = torch.zeros(K, K, dtype=torch.int64, device=device)
        out["confusion"] = all_reduce_sum(matrix).cpu()
    model.train(was_training)
    return out
