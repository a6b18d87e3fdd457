"""One training epoch and one evaluation pass, as small functions returning metric dicts (as DeiT has).

Both work in a world of one or under torchrun: losses and counts are summed over processes, so every
rank returns the same numbers.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..data.sampler import mix_seed
from ..errors import DataError, UserError
from .distributed import all_reduce_sum

__all__ = ["NonFiniteLossError", "evaluate", "train_one_epoch"]


class NonFiniteLossError(UserError):
    """The loss became NaN or infinite (learning rate too high, bad data, fp16 overflow)."""


def _autocast(device: torch.device, amp_dtype: torch.dtype | None):
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device,
    epoch: int,
    steps_per_epoch: int,
    start_step: int = 0,
    lr_at: Callable[[int, float], float] | None = None,
    clock: Callable[[], float] | None = None,
    elapsed: float = 0.0,
    time_limit: float = 0.0,
    criterion: nn.Module | None = None,
    mixer: Callable | None = None,
    amp_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    accum_steps: int = 1,
    grad_clip: float = 0.0,
    ema: torch.optim.swa_utils.AveragedModel | None = None,
    seed: int = 0,
    rank: int = 0,
    should_stop: Callable[[], bool] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Train over ``loader`` (one epoch, or its rest from ``start_step``), one optimizer step per batch.

    Each batch is this process's share of one global batch; it is split into ``accum_steps``
    micro-batches whose gradients add up (DDP syncs only on the last). Before the step's random work
    (MixUp/CutMix, drop path) torch's generator is seeded from (seed, epoch, step, rank), which makes a
    resumed run continue exactly as an uninterrupted one.

    Args:
        lr_at: learning rate for (global step ``epoch * steps_per_epoch + step``, elapsed seconds), set
            before every step.
        clock: seconds of the run so far; averaged over ranks after every step so that all ranks see the
            same time (it drives ``lr_at`` and ``time_limit``). ``elapsed`` is its value at the start.
        time_limit: stop after the step during which ``clock`` passes this many seconds (0: no limit).
        criterion: loss on (logits, targets); targets are class indices or, after ``mixer``, soft labels.
        should_stop: polled after every step on every rank; if any rank says stop, all stop together.
        progress: show a tqdm bar (loss, lr, images/s) on stderr.

    Returns:
        ``loss`` (mean over the steps run, all ranks), ``steps``, ``images`` (all ranks), ``next_step``
        (where to resume), ``stopped`` (True if ``should_stop`` or ``time_limit`` ended the epoch early),
        ``seconds`` (of this call), ``elapsed`` (the synchronised clock after the last step).

    Raises:
        NonFiniteLossError: the loss of a step was not finite; the optimizer step is not taken, so the
            weights are those of the last good step.
    """
    criterion = criterion or nn.CrossEntropyLoss()
    model.train()
    total, steps, images, stopped = 0.0, 0, 0, False
    step = start_step
    bar = tqdm(
        total=steps_per_epoch,
        initial=start_step,
        desc=f"epoch {epoch}",
        leave=False,
        disable=not progress,
        mininterval=0.1 if sys.stderr.isatty() else 30.0,  # a log file gets a line every 30 s, not every step
    )
    t0 = time.perf_counter()
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        torch.manual_seed(mix_seed(seed, epoch, step, rank, 2))  # mixing and drop path of this step
        if mixer is not None:
            x, y = mixer(x, y)  # y: (B, K) soft labels
        lr = None
        if lr_at is not None:
            lr = lr_at(epoch * steps_per_epoch + step, elapsed)
            for group in optimizer.param_groups:
                group["lr"] = lr
        step_loss = torch.zeros((), device=device)
        chunks = list(zip(x.chunk(accum_steps), y.chunk(accum_steps), strict=True))
        for i, (xc, yc) in enumerate(chunks):
            sync = i == len(chunks) - 1
            no_sync = (
                model.no_sync() if (hasattr(model, "no_sync") and not sync) else contextlib.nullcontext()
            )
            with no_sync:
                with _autocast(device, amp_dtype):
                    loss = criterion(model(xc), yc) * (xc.shape[0] / x.shape[0])  # mean over the batch
                (scaler.scale(loss) if scaler is not None else loss).backward()
            step_loss += loss.detach().float()
        # one all-reduce carries the loss and the stop votes of every rank
        stop_vote = float(should_stop()) if should_stop is not None else 0.0
        now = clock() if clock is not None else 0.0
        packed = all_reduce_sum(
            torch.stack(
                [step_loss.double(), *step_loss.new_tensor([stop_vote, 1.0, now], dtype=torch.float64)]
            )
        )
        world = int(packed[2].item())
        mean_loss = packed[0].item() / world
        elapsed = packed[3].item() / world
        if not math.isfinite(mean_loss):
            optimizer.zero_grad(set_to_none=True)
            bar.close()
            raise NonFiniteLossError(
                f"loss is {mean_loss} at epoch {epoch} step {step}; training stopped, the last checkpoint "
                "is kept (lower optim.lr, set optim.grad_clip, or use amp=bfloat16 instead of float16)"
            )
        if scaler is not None:
            scaler.unscale_(optimizer)
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update_parameters(getattr(model, "module", model))
        total += mean_loss
        steps += 1
        images += x.shape[0] * world
        step += 1
        seconds = time.perf_counter() - t0
        bar.update(1)
        postfix = {"loss": f"{mean_loss:.4f}", "img/s": f"{images / max(seconds, 1e-9):.0f}"}
        if lr is not None:
            postfix["lr"] = f"{lr:.2e}"
        bar.set_postfix(postfix, refresh=False)
        if packed[1].item() > 0 or (time_limit > 0 and elapsed >= time_limit):
            stopped = True
            break
    bar.close()
    return {
        "loss": total / max(steps, 1),
        "steps": steps,
        "images": images,
        "next_step": step,
        "stopped": stopped,
        "seconds": time.perf_counter() - t0,
        "elapsed": elapsed,
    }


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
    dtype = next(model.parameters()).dtype  # images follow the weights (bf16 weights: bf16 inference)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1 hits, top-5 hits, samples
    matrix: torch.Tensor | None = None
    for x, y in loader:
        x, y = x.to(device, dtype, non_blocking=True), y.to(device, non_blocking=True)
        with _autocast(device, amp_dtype):
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
