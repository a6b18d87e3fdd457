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
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from ..data.sampler import mix_seed
from ..errors import UserError
from ..evaluation import all_reduce_sum, evaluate
from ..utils.amp import autocast
from ..utils.devices import non_blocking

__all__ = ["EpochControl", "NonFiniteLossError", "StepOptions", "evaluate", "train_one_epoch"]


class NonFiniteLossError(UserError):
    """The loss became NaN or infinite (learning rate too high, bad data, fp16 overflow)."""


@dataclass(kw_only=True)
class StepOptions:
    """How every optimizer step of a run is taken (fixed by the recipe for the whole run).

    Attributes:
        criterion: loss on (logits, targets); targets are class indices or, after ``mixer``, soft labels.
        mixer: MixUp/CutMix on (images, labels) -> (images, soft labels), or None.
        amp_dtype: autocast dtype (None: float32).
        scaler: gradient scaler for float16 autocast.
        accum_steps: micro-batches per step; their gradients add up (DDP syncs only on the last).
        grad_clip: max global gradient norm (0: off).
        ema: an averaged copy of the model, updated after every step.
        seed, rank: before a step's random work (MixUp/CutMix, drop path) torch's generator is seeded
            from (seed, epoch, step, rank), so a resumed run continues exactly as an uninterrupted one.
    """

    criterion: nn.Module = field(default_factory=nn.CrossEntropyLoss)
    mixer: Callable | None = None
    amp_dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None
    accum_steps: int = 1
    grad_clip: float = 0.0
    ema: torch.optim.swa_utils.AveragedModel | None = None
    seed: int = 0
    rank: int = 0


@dataclass(kw_only=True)
class EpochControl:
    """The learning rate of each step and when to stop early (the run's clock, budget and signals).

    Attributes:
        lr_at: learning rate for (global step ``epoch * steps_per_epoch + step``, elapsed seconds), set
            before every step (None: leave the optimizer's).
        clock: seconds of the run so far; averaged over ranks after every step so that all ranks see the
            same time (it drives ``lr_at`` and ``time_limit``). ``elapsed`` is its value at the start.
        time_limit: stop after the step during which ``clock`` passes this many seconds (0: no limit).
        should_stop: polled after every step on every rank; if any rank says stop, all stop together.
    """

    lr_at: Callable[[int, float], float] | None = None
    clock: Callable[[], float] | None = None
    elapsed: float = 0.0
    time_limit: float = 0.0
    should_stop: Callable[[], bool] | None = None


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device,
    epoch: int,
    steps_per_epoch: int,
    start_step: int = 0,
    options: StepOptions | None = None,
    control: EpochControl | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Train over ``loader`` (one epoch, or its rest from ``start_step``), one optimizer step per batch.

    Each batch is this process's share of one global batch. ``epoch`` and ``start_step`` count from 0.

    Returns:
        ``loss`` (mean over the steps run, all ranks), ``steps``, ``images`` (all ranks), ``next_step``
        (where to resume), ``stopped`` (True if ``should_stop`` or ``time_limit`` ended the epoch early),
        ``seconds`` (of this call), ``elapsed`` (the synchronised clock after the last step).

    Raises:
        NonFiniteLossError: the loss of a step was not finite; the optimizer step is not taken, so the
            weights are those of the last good step.
    """
    opts, control = options or StepOptions(), control or EpochControl()
    model.train()
    total, steps, images, stopped = 0.0, 0, 0, False
    step, elapsed = start_step, control.elapsed
    bar = _progress_bar(epoch, steps_per_epoch, start_step, enabled=progress)
    copy_async = non_blocking(device)  # GPU: the copy from (pinned) host memory overlaps the host's work
    t0 = time.perf_counter()
    try:
        for x, y in loader:
            x, y = x.to(device, non_blocking=copy_async), y.to(device, non_blocking=copy_async)
            torch.manual_seed(mix_seed(opts.seed, epoch, step, opts.rank, 2))  # mixing, drop path
            if opts.mixer is not None:
                x, y = opts.mixer(x, y)  # y: (B, K) soft labels
            lr = _set_lr(optimizer, control.lr_at, epoch * steps_per_epoch + step, elapsed)
            step_loss = _forward_backward(model, x, y, opts, device)
            mean_loss, stop_votes, world, elapsed = _sync_step(step_loss, control)
            if not math.isfinite(mean_loss):
                optimizer.zero_grad(set_to_none=True)
                raise NonFiniteLossError(
                    f"loss is {mean_loss} in epoch {epoch + 1} at step {step + 1}; training stopped, the "
                    "last checkpoint is kept (lower optim.lr, set optim.grad_clip, or use amp=bfloat16 "
                    "instead of float16)"
                )
            _optimizer_step(model, optimizer, opts)
            total, steps, images, step = total + mean_loss, steps + 1, images + x.shape[0] * world, step + 1
            _show(bar, mean_loss, lr, images / max(time.perf_counter() - t0, 1e-9))
            if stop_votes > 0 or (control.time_limit > 0 and elapsed >= control.time_limit):
                stopped = True
                break
    finally:
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


def _progress_bar(epoch: int, steps_per_epoch: int, start_step: int, *, enabled: bool) -> tqdm:
    return tqdm(
        total=steps_per_epoch,
        initial=start_step,
        desc=f"epoch {epoch + 1}",
        leave=False,
        disable=not enabled,
        mininterval=0.1 if sys.stderr.isatty() else 30.0,  # a log file gets a line every 30 s, not every step
    )


def _show(bar: tqdm, loss: float, lr: float | None, images_per_s: float) -> None:
    bar.update(1)
    postfix = {"loss": f"{loss:.4f}", "img/s": f"{images_per_s:.0f}"}
    if lr is not None:
        postfix["lr"] = f"{lr:.2e}"
    bar.set_postfix(postfix, refresh=False)


def _set_lr(
    optimizer: torch.optim.Optimizer, lr_at: Callable[[int, float], float] | None, step: int, elapsed: float
) -> float | None:
    """Set every group's learning rate to ``lr_at(step, elapsed)``; returns it (None without a schedule)."""
    if lr_at is None:
        return None
    lr = lr_at(step, elapsed)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def _forward_backward(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, opts: StepOptions, device: torch.device
) -> torch.Tensor:
    """Gradients of the batch's mean loss, over ``accum_steps`` micro-batches; returns that loss (0-dim)."""
    step_loss = torch.zeros((), device=device)
    chunks = list(zip(x.chunk(opts.accum_steps), y.chunk(opts.accum_steps), strict=True))
    for i, (xc, yc) in enumerate(chunks):
        last = i == len(chunks) - 1
        no_sync = model.no_sync() if (hasattr(model, "no_sync") and not last) else contextlib.nullcontext()
        with no_sync:
            with autocast(device, opts.amp_dtype):
                loss = opts.criterion(model(xc), yc) * (xc.shape[0] / x.shape[0])  # mean over the batch
            (opts.scaler.scale(loss) if opts.scaler is not None else loss).backward()
        step_loss += loss.detach().float()
    return step_loss


def _sync_step(step_loss: torch.Tensor, control: EpochControl) -> tuple[float, float, int, float]:
    """One all-reduce for the loss, the stop votes and the clock of every rank.

    Returns (mean loss over ranks, number of ranks voting to stop, number of ranks, mean clock).
    """
    stop_vote = float(control.should_stop()) if control.should_stop is not None else 0.0
    now = control.clock() if control.clock is not None else 0.0
    extra = step_loss.new_tensor([stop_vote, 1.0, now], dtype=torch.float64)
    packed = all_reduce_sum(torch.cat([step_loss.double().reshape(1), extra]))  # (4,)
    world = int(packed[2].item())
    return packed[0].item() / world, packed[1].item(), world, packed[3].item() / world


def _optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, opts: StepOptions) -> None:
    """Unscale, clip, step, clear the gradients and update the EMA."""
    if opts.scaler is not None:
        opts.scaler.unscale_(optimizer)
    if opts.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), opts.grad_clip)
    if opts.scaler is not None:
        opts.scaler.step(optimizer)
        opts.scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if opts.ema is not None:
        opts.ema.update_parameters(getattr(model, "module", model))
