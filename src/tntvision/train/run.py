"""The training run: config -> data, model, optimizer -> epochs -> a run folder a user can read.

Run folder (DESIGN.md): ``config.yaml`` (resolved config), ``metrics.jsonl`` (one line per epoch),
``summary.json`` (final metrics), ``curves.png`` (loss and accuracy per epoch), ``checkpoints/last.pt``
(resumable state) and ``model/`` (``model.safetensors`` + ``config.json`` with the class names).
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader

from ..data import (
    EvalBatches,
    SeededDataset,
    ShardedSampler,
    TrainBatches,
    batch_mixer,
    build_dataset,
    eval_transform,
    has_image_tensor,
    train_transform,
)
from ..data.sampler import mix_seed
from ..errors import ConfigError, UserError
from ..models import create_model, save_model
from ..models.io import atomic_write
from ..models.registry import get_model_entry
from .checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from .config import SMALL_IMAGE_RECIPE, TrainConfig, apply_overrides, from_dict, load_yaml, to_dict
from .distributed import World, init_distributed, shutdown
from .engine import NonFiniteLossError, evaluate, train_one_epoch
from .optim import build_optimizer

__all__ = ["RESUMABLE_KEYS", "lr_schedule", "resolve_config", "train"]

# Keys a resumed run may change; anything else would make it a different run.
RESUMABLE_KEYS = {"out", "time_budget", "workers", "tensorboard", "on_bad_image"}
_AMP = {"none": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def resolve_config(
    *, overrides: dict[str, Any], config_file: str | Path | None = None, resume: bool = False
) -> TrainConfig:
    """The run's config: defaults or a recipe, then ``config_file``, then ``overrides`` (plain data).

    A new run without ``config_file`` takes the paper's recipe (the dataclass defaults), or
    :data:`SMALL_IMAGE_RECIPE` for a model whose input is 64 px or less. With ``resume`` the base is the
    config saved in the run's checkpoint and only :data:`RESUMABLE_KEYS` may differ. A new run refuses a
    folder that already holds one, so nothing written before is overwritten.
    """
    out = overrides.get("out")
    if not out:
        raise ConfigError("no run folder given (--out DIR)")
    ckpt = Path(out) / "checkpoints" / CHECKPOINT_NAME
    if resume:
        if config_file is not None:
            raise ConfigError(
                "--config cannot be combined with --resume: the run's config is in its checkpoint"
            )
        saved = load_checkpoint(ckpt)["config"]
        merged = apply_overrides(saved, overrides)
        changed = sorted(k for k, v in _flatten(merged).items() if _flatten(saved).get(k) != v)
        refused = [k for k in changed if k not in RESUMABLE_KEYS]
        if refused:
            raise ConfigError(
                f"cannot change {', '.join(refused)} when resuming (only {', '.join(sorted(RESUMABLE_KEYS))})"
            )
        cfg = from_dict(merged)
    else:
        if ckpt.exists() or (Path(out) / "summary.json").exists():
            raise ConfigError(f"{out} already holds a training run; add --resume or choose another --out")
        if config_file is not None:
            base = load_yaml(config_file)
        else:
            model = overrides.get("model")
            img = overrides.get("img_size") or (get_model_entry(model).config.img_size if model else 224)
            base = SMALL_IMAGE_RECIPE if img <= 64 else {}
        cfg = from_dict(apply_overrides(base, overrides))
    cfg.validate()
    return cfg


def lr_schedule(
    *,
    peak: float,
    total_steps: int,
    warmup_steps: int,
    warmup_lr: float,
    min_lr: float,
    time_budget_s: float = 0.0,
) -> Callable[[int, float], float]:
    """``lr_at(step, elapsed_seconds)``: linear warm-up to ``peak``, then cosine decay to ``min_lr``.

    torch's schedulers count steps only; this one may also follow a time budget (``time_budget_s`` > 0):
    progress is then the larger of the step fraction and the fraction of the budget used. Warm-up ramps
    towards the cosine's value at the current progress (``peak`` when counting steps), so the rate stays
    continuous when a short budget has moved the cosine on during warm-up.
    """
    warm_frac = warmup_steps / max(total_steps, 1)

    def lr_at(step: int, elapsed: float) -> float:
        p = step / max(total_steps, 1)
        if time_budget_s > 0:
            p = max(p, elapsed / time_budget_s)
        q = min(max((p - warm_frac) / max(1.0 - warm_frac, 1e-12), 0.0), 1.0)
        lr = min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * q))
        if step < warmup_steps:
            return warmup_lr + (lr - warmup_lr) * step / warmup_steps
        return lr

    return lr_at


class _StopFlag:
    """Set by SIGINT / SIGTERM during training: the loop finishes its step, saves and exits."""

    def __init__(self) -> None:
        self.signal: str | None = None

    def __call__(self) -> bool:
        return self.signal is not None


@contextmanager
def _catch_signals(flag: _StopFlag):
    def handler(signum, _frame):
        if flag.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop at once
        flag.signal = signal.Signals(signum).name

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _one_line(e: UserError) -> UserError:
    """A user error raised in a DataLoader worker arrives with the worker's traceback; keep the message."""
    text = str(e)
    if "Traceback" not in text:
        return e
    last = text.strip().splitlines()[-1]
    return type(e)(last.split(": ", 1)[1] if ": " in last else last)


def _plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    """Loss (train, val) and top-1 (val, EMA) per epoch -> a PNG, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train")
    ax_loss.plot(epochs, [h.get("val_loss") for h in history], marker="o", label="val")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_acc.plot(epochs, [h.get("top1") for h in history], marker="o", label="val top-1")
    if any("ema_top1" in h for h in history):
        ax_acc.plot(epochs, [h.get("ema_top1") for h in history], marker="o", label="EMA top-1")
    ax_acc.set(xlabel="epoch", ylabel="%", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def _write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"))


def _write_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(json.dumps(h) + "\n" for h in history)))


def _memory_loader_refusal(cfg: TrainConfig, train_ds) -> str | None:
    """Why the in-memory batch path cannot serve this run (None: it can)."""
    a = cfg.aug
    if not has_image_tensor(train_ds):
        return f"{cfg.data} is not held in memory as an image tensor (only fashion-mnist is)"
    if a.crop != "pad" or a.randaugment_magnitude > 0 or a.random_erasing > 0:
        return "it augments only by padded crops and flips (aug.crop=pad, no RandAugment or erasing)"
    return None


def _loaders(cfg: TrainConfig, train_ds, val_ds, sampler: ShardedSampler, *, meta, world: World, device):
    """Training and evaluation batches: in-memory tensor batches or DataLoaders, as cfg.data_loader says."""
    per_rank = cfg.batch_size // world.size
    eval_batch = max(per_rank, 64)
    if cfg.data_loader != "workers" and _memory_loader_refusal(cfg, train_ds) is None:
        train = TrainBatches(train_ds, sampler, meta=meta, padding=cfg.aug.padding, hflip=cfg.aug.hflip)
        val = EvalBatches(val_ds, meta=meta, batch_size=eval_batch, rank=world.rank, world=world.size)
        return train, val
    loader_kw = dict(
        num_workers=cfg.workers, pin_memory=device.type == "cuda", persistent_workers=cfg.workers > 0
    )
    train = DataLoader(SeededDataset(train_ds), batch_size=per_rank, sampler=sampler, **loader_kw)
    val = DataLoader(
        val_ds, batch_size=eval_batch, sampler=range(world.rank, len(val_ds), world.size), **loader_kw
    )
    return train, val


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name} asked for, but CUDA is not available")
    return torch.device(name)


def train(cfg: TrainConfig, *, resume: bool = False, log: Callable[[str], None] = _log) -> dict[str, Any]:
    """Train (or fine-tune, or resume) as ``cfg`` says; returns the summary (also in ``summary.json``).

    Everything that can be wrong with the input (data, model name, sizes) is checked before the run
    folder is touched. Under torchrun, rank 0 writes the folder and logs; all ranks return the summary.
    A run stopped by SIGINT/SIGTERM saves a checkpoint and returns ``{"interrupted": signal name, ...}``.

    Raises:
        NonFiniteLossError: the loss diverged; the last checkpoint (end of the previous epoch) is kept.
        UserError: bad data, config or checkpoint.
    """
    device = _device(cfg.device)
    world = init_distributed(device)
    try:
        return _train(cfg, resume=resume, device=device, world=world, log=log if world.is_main else None)
    finally:
        shutdown()


def _train(
    cfg: TrainConfig, *, resume: bool, device: torch.device, world: World, log: Callable[[str], None] | None
) -> dict[str, Any]:
    say = log or (lambda _msg: None)
    out = Path(cfg.out)
    amp_dtype = _AMP[cfg.amp]
    if cfg.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(
                "tensorboard=true needs the tensorboard package (pip install tensorboard)"
            ) from None

    # ---- data and model, all checked before anything is written
    train_ds = build_dataset(cfg.data, "train", on_bad_image=cfg.on_bad_image)
    val_ds = build_dataset(cfg.data, "val", on_bad_image=cfg.on_bad_image)
    if list(val_ds.classes) != list(train_ds.classes):
        raise ConfigError(f"{cfg.data}: train and val have different classes")
    classes = list(train_ds.classes)
    if cfg.data_loader == "memory" and (why := _memory_loader_refusal(cfg, train_ds)):
        raise ConfigError(f"data_loader=memory cannot be used: {why}")
    if cfg.batch_size % (world.size * cfg.accum_steps):
        raise ConfigError(
            f"batch_size {cfg.batch_size} must be divisible by processes x accum_steps "
            f"({world.size} x {cfg.accum_steps})"
        )
    steps_per_epoch = len(train_ds) // cfg.batch_size
    if steps_per_epoch < 1:
        raise ConfigError(
            f"batch_size {cfg.batch_size} is larger than the training set ({len(train_ds)} images)"
        )
    overrides: dict[str, Any] = {"num_classes": len(classes), "drop_path_rate": cfg.drop_path}
    if cfg.img_size is not None:
        overrides["img_size"] = cfg.img_size
    torch.manual_seed(mix_seed(cfg.seed, 0xC0FFEE))  # same initial weights on every rank
    model = create_model(cfg.model, pretrained=cfg.pretrained, **overrides).to(device)
    model.set_lean_backward(cfg.lean_backward)
    meta = model.meta
    a = cfg.aug
    train_ds.transform = train_transform(
        meta,
        crop=a.crop,
        scale=a.scale,
        padding=a.padding,
        hflip=a.hflip,
        randaugment_magnitude=a.randaugment_magnitude,
        randaugment_ops=a.randaugment_ops,
        random_erasing=a.random_erasing,
    )
    val_ds.transform = eval_transform(meta)
    for ds in (train_ds, val_ds):
        if getattr(ds, "skipped", 0):
            say(f"{cfg.data} {ds.split}: skipped {ds.skipped} files Pillow cannot read")

    optimizer = build_optimizer(model, cfg.optim, lr=cfg.scaled_lr, device=device)
    ema = None
    if cfg.ema_decay > 0:
        ema = torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True
        )
    scaler = torch.amp.GradScaler(device.type) if cfg.amp == "float16" else None

    progress: dict[str, Any] = {
        "epoch": 0,
        "step": 0,
        "images_seen": 0,
        "wall_seconds": 0.0,
        "train_seconds": 0.0,
    }
    history: list[dict[str, Any]] = []
    if resume:
        state = load_checkpoint(out / "checkpoints" / CHECKPOINT_NAME)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        if scaler is not None and state.get("scaler") is not None:
            scaler.load_state_dict(state["scaler"])
        progress.update(state["progress"])
        history = list(progress.pop("history", []))
        say(f"resuming {out} at epoch {progress['epoch']} step {progress['step']}")
    elif world.is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(
            out / "config.yaml",
            lambda tmp: Path(tmp).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False)),
        )
    if cfg.pretrained and not resume:
        say(f"fine-tuning from {cfg.pretrained} ({len(classes)} classes, {meta.input_size[1]} px)")

    train_model: nn.Module = model
    if world.distributed:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    sampler = ShardedSampler(
        len(train_ds), global_batch=cfg.batch_size, seed=cfg.seed, rank=world.rank, world=world.size
    )
    train_loader, val_loader = _loaders(cfg, train_ds, val_ds, sampler, meta=meta, world=world, device=device)
    say(f"data: {'in-memory tensor batches' if isinstance(train_loader, TrainBatches) else 'DataLoader'}")
    mixer = batch_mixer(num_classes=len(classes), mixup=a.mixup, cutmix=a.cutmix, switch_prob=a.switch_prob)
    criterion = nn.CrossEntropyLoss(label_smoothing=a.label_smoothing)
    budget_s = cfg.time_budget * 60.0
    lr_at = lr_schedule(
        peak=cfg.scaled_lr,
        total_steps=cfg.epochs * steps_per_epoch,
        warmup_steps=round(cfg.sched.warmup_epochs * steps_per_epoch),
        warmup_lr=cfg.sched.warmup_lr,
        min_lr=cfg.sched.min_lr,
        time_budget_s=budget_s if cfg.sched.by_time else 0.0,
    )
    writer = SummaryWriter(str(out / "tensorboard")) if cfg.tensorboard and world.is_main else None

    wall_before = float(progress["wall_seconds"])
    t_start = time.perf_counter()

    def clock() -> float:  # seconds of this run so far, over all its resumptions
        return wall_before + time.perf_counter() - t_start

    def checkpoint() -> None:
        if world.is_main:
            save_checkpoint(
                out / "checkpoints" / CHECKPOINT_NAME,
                model=model,
                optimizer=optimizer,
                ema=ema,
                scaler=scaler,
                progress={**progress, "wall_seconds": clock(), "history": history},
                config=to_dict(cfg),
            )

    say(
        f"training {cfg.model} on {cfg.data}: {len(train_ds)} train / {len(val_ds)} val images, "
        f"{len(classes)} classes, batch {cfg.batch_size} x {steps_per_epoch} steps/epoch, "
        f"{world.size} process(es), lr {cfg.scaled_lr:.2e}, run folder {out}"
    )
    flag = _StopFlag()
    stopped_by = "epochs"
    elapsed = clock()
    last_eval: dict[str, Any] | None = next((h for h in reversed(history) if "top1" in h), None)
    with _catch_signals(flag):
        while progress["epoch"] < cfg.epochs:
            epoch, start_step = int(progress["epoch"]), int(progress["step"])
            sampler.set_epoch(epoch, start_step)
            try:
                res = train_one_epoch(
                    train_model,
                    train_loader,
                    optimizer,
                    device=device,
                    epoch=epoch,
                    steps_per_epoch=steps_per_epoch,
                    start_step=start_step,
                    lr_at=lr_at,
                    clock=clock,
                    elapsed=elapsed,
                    time_limit=budget_s,
                    criterion=criterion,
                    mixer=mixer,
                    amp_dtype=amp_dtype,
                    scaler=scaler,
                    accum_steps=cfg.accum_steps,
                    grad_clip=cfg.optim.grad_clip,
                    ema=ema,
                    seed=cfg.seed,
                    rank=world.rank,
                    should_stop=flag,
                    progress=world.is_main,
                )
            except NonFiniteLossError as e:
                say(f"stopped: {e}")
                raise
            except UserError as e:
                raise _one_line(e) from None
            elapsed = res["elapsed"]
            progress["images_seen"] += res["images"]
            progress["train_seconds"] += res["seconds"]
            epoch_done = res["next_step"] >= steps_per_epoch
            if epoch_done:
                progress.update(epoch=epoch + 1, step=0)
            else:
                progress.update(step=res["next_step"])
            time_up = budget_s > 0 and elapsed >= budget_s
            if res["stopped"] and not time_up:  # a signal on some rank: every rank stops here
                checkpoint()
                name = flag.signal or "signal on another rank"
                say(
                    f"{name}: stopped at epoch {epoch} step {res['next_step']}; "
                    f"checkpoint saved, continue with: tnt train --out {out} --resume"
                )
                return {"interrupted": name, "out": str(out), **progress}
            finished = progress["epoch"] >= cfg.epochs
            row: dict[str, Any] = {
                "epoch": round(epoch + res["next_step"] / steps_per_epoch, 4),
                "train_loss": res["loss"],
                "lr": optimizer.param_groups[0]["lr"],
                "images_seen": progress["images_seen"],
                "wall_seconds": round(clock(), 2),
                "train_images_per_s": round(res["images"] / max(res["seconds"], 1e-9), 1),
            }
            if time_up or finished or (epoch_done and (epoch + 1) % cfg.eval_every == 0):
                try:
                    metrics = evaluate(model, val_loader, device=device, amp_dtype=amp_dtype)
                    if ema is not None:
                        ema_metrics = evaluate(ema.module, val_loader, device=device, amp_dtype=amp_dtype)
                        row.update(ema_top1=ema_metrics["top1"], ema_top5=ema_metrics["top5"])
                except UserError as e:
                    raise _one_line(e) from None
                row.update(
                    top1=metrics["top1"], top5=metrics["top5"], val_loss=metrics["loss"], n=metrics["n"]
                )
                last_eval = row
            history.append(row)
            checkpoint()
            if world.is_main:
                _write_metrics(out / "metrics.jsonl", history)
                save_model(model, out / "model", class_names=classes)
                _plot_curves(history, out / "curves.png")
                if writer is not None:
                    for key, value in row.items():
                        writer.add_scalar(key, value, global_step=progress["images_seen"])
                    writer.flush()
                say(
                    f"epoch {row['epoch']:g}/{cfg.epochs}: train loss {row['train_loss']:.4f}"
                    + (
                        f", val top-1 {row['top1']:.2f}% top-5 {row['top5']:.2f}% loss {row['val_loss']:.4f}"
                        if "top1" in row
                        else ""
                    )
                    + (f", EMA top-1 {row['ema_top1']:.2f}%" if "ema_top1" in row else "")
                    + f", {row['train_images_per_s']:.0f} img/s, {row['wall_seconds']:.0f} s"
                )
            if time_up:
                stopped_by = "time_budget"
                say(f"time budget of {cfg.time_budget:g} min reached")
                break
    if writer is not None:
        writer.close()
    if last_eval is None:
        raise ConfigError(f"{out}: the run has no evaluation to summarise")
    summary: dict[str, Any] = {
        "model": cfg.model,
        "data": cfg.data,
        "top1": last_eval["top1"],
        "top5": last_eval["top5"],
        "loss": last_eval["val_loss"],
        "n": last_eval["n"],
        "epochs": history[-1]["epoch"],
        "images_seen": progress["images_seen"],
        "wall_seconds": round(clock(), 2),
        "train_seconds": round(progress["train_seconds"], 2),
        "train_images_per_s": round(progress["images_seen"] / max(progress["train_seconds"], 1e-9), 1),
        "stopped_by": stopped_by,
        "processes": world.size,
        "out": str(out),
        "model_dir": str(out / "model"),
        "curves": str(out / "curves.png"),
    }
    if "ema_top1" in last_eval:
        summary.update(ema_top1=last_eval["ema_top1"], ema_top5=last_eval["ema_top5"])
    if world.is_main:
        _write_json(out / "summary.json", summary)
    return summary
