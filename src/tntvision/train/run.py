"""The training run: config -> parts (:mod:`.builder`) -> epochs -> a run folder (:mod:`.run_folder`).

Validation (the data's ``val/``, or images held out of the training set) is what each epoch reports; the
test split is evaluated once, at the end, for the summary. See docs/training.md for the recipes, the
reproducibility guarantees (resuming, several processes) and the run folder.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ConfigError, UserError
from ..utils.devices import device_name
from ..utils.messages import log_stderr
from .builder import RunParts, build_run, resolve_device
from .checkpoint import load_training_state
from .config import TrainConfig, to_dict
from .distributed import World, init_distributed, local_device, shutdown
from .engine import EpochControl, evaluate, train_one_epoch
from .run_folder import RunFolder
from .signals import StopFlag, catch_signals

__all__ = ["Progress", "reproducibility_notes", "train"]


@dataclass
class Progress:
    """Where a run is: the next ``epoch`` and ``step`` in it (0-based), counters, and one row per epoch."""

    epoch: int = 0
    step: int = 0
    images_seen: int = 0
    wall_seconds: float = 0.0
    train_seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_checkpoint(cls, state: dict[str, Any]) -> Progress:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in state["progress"].items() if k in known})

    def counters(self) -> dict[str, Any]:
        """The counters without the history (what an interrupted run reports)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "history"}


class _Clock:
    """Seconds of the run so far, over all its resumptions."""

    def __init__(self, before: float) -> None:
        self.before, self.t0 = before, time.perf_counter()

    def __call__(self) -> float:
        return self.before + time.perf_counter() - self.t0


def train(
    cfg: TrainConfig, *, resume: bool = False, log: Callable[[str], None] = log_stderr
) -> dict[str, Any]:
    """Train (or fine-tune, or resume) as ``cfg`` says; returns the summary (also in ``summary.json``).

    Everything that can be wrong with the input (data, model name, sizes) is checked before the run
    folder is touched. Under torchrun, rank 0 writes the folder and logs; all ranks return the summary.
    A run stopped by SIGINT/SIGTERM saves a checkpoint and returns ``{"interrupted": signal name, ...}``.

    Raises:
        NonFiniteLossError: the loss diverged; the last checkpoint (end of the previous epoch) is kept.
        UserError: bad data, config or checkpoint.
    """
    device = resolve_device(cfg.device)
    world = init_distributed(device)
    try:
        device = local_device(device, world.local_rank)  # cuda -> cuda:LOCAL_RANK, as the group set it
        return _train(cfg, resume=resume, device=device, world=world, log=log if world.is_main else None)
    finally:
        shutdown()


def _train(
    cfg: TrainConfig, *, resume: bool, device: torch.device, world: World, log: Callable[[str], None] | None
) -> dict[str, Any]:
    log = log or (lambda _msg: None)
    folder = RunFolder(cfg.out, writes=world.is_main)
    if not resume:
        folder.check_creatable()
    state = load_training_state(folder.checkpoint) if resume else None
    parts = build_run(cfg, device=device, world=world, state=state, log=log)
    if state is not None:
        progress = Progress.from_checkpoint(state)
        log(f"resuming {cfg.out} in {_position(progress.epoch, progress.step, parts)}")
    else:
        progress = Progress()
        folder.start(cfg, parts.splits.record)
    log(_describe(parts))
    for note in reproducibility_notes(cfg, processes=world.size, resumed=state is not None):
        log(f"note: {note}")
    clock, stopped_by = _Clock(progress.wall_seconds), "epochs"
    elapsed, flag = clock(), StopFlag()
    if cfg.tensorboard:
        folder.open_tensorboard()
    try:
        with catch_signals(flag):
            while progress.epoch < cfg.epochs:
                stats = _run_epoch(parts, progress, clock=clock, elapsed=elapsed, flag=flag)
                elapsed = stats["elapsed"]
                time_up = cfg.time_budget > 0 and elapsed >= cfg.time_budget * 60.0
                if stats["stopped"] and not time_up:  # a signal on some rank: every rank stops here
                    folder.save_state(**_state(parts, progress, clock))
                    return _interrupted(flag, progress, cfg, log)
                row = _epoch_row(
                    parts, progress, stats, clock, evaluate_now=time_up or _eval_due(cfg, progress)
                )
                progress.history.append(row)
                folder.save_state(**_state(parts, progress, clock))
                folder.write_epoch(progress.history, parts.model, parts.classes)
                log(_epoch_line(row, stats, parts))
                if time_up:
                    stopped_by = "time_budget"
                    log(f"time budget of {cfg.time_budget:g} min reached")
                    break
    finally:
        folder.close()
    summary = _summary(parts, progress, clock, stopped_by)
    folder.write_summary(summary)
    return summary


def reproducibility_notes(cfg: TrainConfig, *, processes: int, resumed: bool) -> list[str]:
    """Where this run leaves the two guarantees of docs/training.md (empty: it keeps both).

    A resumed run ends with the weights of an uninterrupted one, bit for bit, unless the schedule follows
    the clock (``sched.by_time`` with a time budget). N processes follow the trajectory of one process
    (up to float summation order) unless drop path or MixUp/CutMix is on: those draw per rank.
    """
    notes = []
    if resumed and cfg.sched.by_time and cfg.time_budget > 0:
        notes.append(
            "sched.by_time follows the clock: this resumed run will not end with the weights of an "
            "uninterrupted one bit for bit"
        )
    if processes > 1 and (cfg.drop_path > 0 or cfg.aug.mixup > 0 or cfg.aug.cutmix > 0):
        notes.append(
            f"drop path and MixUp/CutMix draw per rank: {processes} processes do not follow the trajectory "
            "of one process (the run is still seeded and resumable)"
        )
    return notes


def _run_epoch(
    parts: RunParts, progress: Progress, *, clock, elapsed: float, flag: StopFlag
) -> dict[str, Any]:
    """One epoch (or its rest) from ``progress``; advances ``progress`` past the steps taken."""
    cfg, epoch, start = parts.cfg, progress.epoch, progress.step
    parts.sampler.set_epoch(epoch, start)
    control = EpochControl(
        lr_at=parts.lr_at, clock=clock, elapsed=elapsed, time_limit=cfg.time_budget * 60.0, should_stop=flag
    )
    try:
        stats = train_one_epoch(
            parts.train_model,
            parts.train_batches,
            parts.optimizer,
            device=parts.device,
            epoch=epoch,
            steps_per_epoch=parts.steps_per_epoch,
            start_step=start,
            options=parts.step_options,
            control=control,
            progress=parts.world.is_main,
        )
    except UserError as e:  # NonFiniteLossError included: the last checkpoint is kept
        raise _one_line(e) from None
    progress.images_seen += stats["images"]
    progress.train_seconds += stats["seconds"]
    if stats["next_step"] >= parts.steps_per_epoch:
        progress.epoch, progress.step = epoch + 1, 0
    else:
        progress.step = stats["next_step"]
    return stats


def _eval_due(cfg: TrainConfig, progress: Progress) -> bool:
    """At the end of the run, and after every ``eval_every``-th whole epoch."""
    return progress.epoch >= cfg.epochs or (progress.step == 0 and progress.epoch % cfg.eval_every == 0)


def _evaluate(parts: RunParts, batches) -> dict[str, Any]:
    """Metrics of the model (and ``ema_*`` of its EMA) on ``batches``."""
    try:
        metrics = evaluate(parts.model, batches, device=parts.device, amp_dtype=parts.amp_dtype)
        if parts.ema is not None:
            ema = evaluate(parts.ema.module, batches, device=parts.device, amp_dtype=parts.amp_dtype)
            metrics.update(ema_top1=ema["top1"], ema_top5=ema["top5"])
    except UserError as e:
        raise _one_line(e) from None
    return metrics


def _epoch_row(
    parts: RunParts, progress: Progress, stats: dict[str, Any], clock, *, evaluate_now: bool
) -> dict[str, Any]:
    """The line of ``metrics.jsonl`` for the epoch just run; ``val_*`` keys when it was evaluated."""
    row: dict[str, Any] = {
        "epoch": round(progress.epoch + progress.step / parts.steps_per_epoch, 4),  # epochs done
        "train_loss": stats["loss"],
        "lr": parts.optimizer.param_groups[0]["lr"],
        "images_seen": progress.images_seen,
        "wall_seconds": round(clock(), 2),
        "train_images_per_s": round(stats["images"] / max(stats["seconds"], 1e-9), 1),
    }
    if evaluate_now:
        m = _evaluate(parts, parts.val_batches)
        row.update(val_top1=m["top1"], val_top5=m["top5"], val_loss=m["loss"], val_n=m["n"])
        if "ema_top1" in m:
            row.update(ema_val_top1=m["ema_top1"], ema_val_top5=m["ema_top5"])
    return row


def _position(epoch: int, step: int, parts: RunParts) -> str:
    """``epoch 3/30, step 12/469`` as a person counts (from 1)."""
    return f"epoch {epoch + 1}/{parts.cfg.epochs}, step {step + 1}/{parts.steps_per_epoch}"


def _epoch_line(row: dict[str, Any], stats: dict[str, Any], parts: RunParts) -> str:
    """The log line of an epoch: ``epoch 3/30: ...``, or ``epoch 3/30 (stopped at step 40/469): ...``."""
    cfg, steps = parts.cfg, parts.steps_per_epoch
    done = stats["next_step"] >= steps
    number = int(row["epoch"]) if done else int(row["epoch"]) + 1
    where = "" if done else f" (stopped after step {stats['next_step']}/{steps})"
    text = f"epoch {number}/{cfg.epochs}{where}: train loss {row['train_loss']:.4f}"
    if "val_top1" in row:
        text += f", val top-1 {row['val_top1']:.2f}% top-5 {row['val_top5']:.2f}% loss {row['val_loss']:.4f}"
    if "ema_val_top1" in row:
        text += f", EMA val top-1 {row['ema_val_top1']:.2f}%"
    return text + f", {row['train_images_per_s']:.0f} img/s, {row['wall_seconds']:.0f} s"


def _describe(parts: RunParts) -> str:
    cfg, s = parts.cfg, parts.splits
    return (
        f"training {cfg.model} on {cfg.data}: {len(s.train)} train / {len(s.val)} val "
        f"({s.record['val_source']}) / {len(s.test)} test images, {len(parts.classes)} classes, "
        f"batch {cfg.batch_size} x {parts.steps_per_epoch} steps/epoch, {parts.world.size} process(es)"
        + (f" ({parts.world.backend})" if parts.world.backend else "")
        + f" on {_device_text(parts.device)}, "
        f"lr {cfg.scaled_lr:.2e}, run folder {cfg.out}"
    )


def _device_text(device: torch.device) -> str:
    """``cpu``, or ``cuda:0 (NVIDIA H100 80GB HBM3)``."""
    return f"{device} ({device_name(device)})" if device.type == "cuda" else str(device)


def _state(parts: RunParts, progress: Progress, clock) -> dict[str, Any]:
    """What ``checkpoints/last.pt`` holds (plain data and tensors)."""
    return {
        "model": parts.model,
        "optimizer": parts.optimizer,
        "ema": parts.ema,
        "scaler": parts.scaler,
        "progress": {**dataclasses.asdict(progress), "wall_seconds": clock()},
        "config": to_dict(parts.cfg),
    }


def _interrupted(flag: StopFlag, progress: Progress, cfg: TrainConfig, log) -> dict[str, Any]:
    name = flag.signal or "signal on another rank"
    log(
        f"{name}: stopped in epoch {progress.epoch + 1}/{cfg.epochs} after step {progress.step}; "
        f"checkpoint saved, continue with: tnt train --out {cfg.out} --resume"
    )
    return {"interrupted": name, "out": str(cfg.out), **progress.counters()}


def _summary(parts: RunParts, progress: Progress, clock, stopped_by: str) -> dict[str, Any]:
    """The final numbers: the test split (``top1``, ``top5``, ``loss``, ``n``), the last validation."""
    cfg, out = parts.cfg, parts.cfg.out
    last_val = next((h for h in reversed(progress.history) if "val_top1" in h), None)
    if last_val is None:
        raise ConfigError(f"{out}: the run has no evaluation to summarise")
    test = _evaluate(parts, parts.test_batches)
    summary: dict[str, Any] = {
        "model": cfg.model,
        "data": cfg.data,
        "top1": test["top1"],
        "top5": test["top5"],
        "loss": test["loss"],
        "n": test["n"],
        "split": parts.splits.record["test_source"],
        "val_top1": last_val["val_top1"],
        "val_top5": last_val["val_top5"],
        "val_loss": last_val["val_loss"],
        "val_n": last_val["val_n"],
        "epochs": progress.history[-1]["epoch"],
        "images_seen": progress.images_seen,
        "wall_seconds": round(clock(), 2),
        "train_seconds": round(progress.train_seconds, 2),
        "train_images_per_s": round(progress.images_seen / max(progress.train_seconds, 1e-9), 1),
        "stopped_by": stopped_by,
        "processes": parts.world.size,
        "backend": parts.world.backend,
        "device": str(parts.device),
        "device_name": device_name(parts.device),
        "amp": "none" if parts.amp_dtype is None else str(parts.amp_dtype).removeprefix("torch."),
        "out": str(out),
        "model_dir": f"{out}/model",
        "curves": f"{out}/curves.png",
    }
    if "ema_top1" in test:
        summary.update(ema_top1=test["ema_top1"], ema_top5=test["ema_top5"])
    return summary


def _one_line(e: UserError) -> UserError:
    """A user error raised in a DataLoader worker arrives with the worker's traceback; keep the message."""
    text = str(e)
    if "Traceback" not in text:
        return e
    last = text.strip().splitlines()[-1]
    return type(e)(last.split(": ", 1)[1] if ": " in last else last)
