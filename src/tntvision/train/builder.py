"""Everything a training run needs, built from its config and checked before the run folder is touched."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..data import (
    EvalBatches,
    RunSplits,
    SeededDataset,
    ShardedSampler,
    TrainBatches,
    batch_mixer,
    eval_transform,
    has_image_tensor,
    run_splits,
    train_transform,
)
from ..data.sampler import mix_seed
from ..errors import ConfigError
from ..models import create_model
from ..models.pretrained import tag_named_by
from ..models.registry import ModelMeta
from ..utils.amp import amp_dtype, resolve_amp
from ..utils.devices import pin_memory
from ..utils.devices import resolve_device as _resolve_device
from .config import TrainConfig
from .distributed import World
from .engine import StepOptions
from .optim import MuonAdamW, build_optimizer
from .schedule import schedule_for

__all__ = ["RunParts", "build_run", "resolve_device"]


@dataclass(kw_only=True)
class RunParts:
    """What a run is made of. ``model`` is the plain model (saved, evaluated); ``train_model`` is what the
    loop trains (``model`` wrapped in DDP under torchrun)."""

    cfg: TrainConfig
    device: torch.device
    world: World
    splits: RunSplits
    classes: list[str]
    model: nn.Module
    train_model: nn.Module
    optimizer: torch.optim.Optimizer | MuonAdamW
    ema: torch.optim.swa_utils.AveragedModel | None
    scaler: torch.amp.GradScaler | None
    sampler: ShardedSampler
    train_batches: Iterable
    val_batches: Iterable
    test_batches: Iterable
    steps_per_epoch: int
    step_options: StepOptions
    lr_at: Callable[[int, float], float]

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return self.step_options.amp_dtype


def resolve_device(name: str) -> torch.device:
    """The config's ``device``: ``auto`` -> CUDA if there is one, else the CPU; :class:`ConfigError` for
    CUDA without CUDA (:func:`tntvision.utils.devices.resolve_device`)."""
    return _resolve_device(name, what="device")


def check_tensorboard(cfg: TrainConfig) -> None:
    if not cfg.tensorboard:
        return
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        raise ConfigError(
            "tensorboard=true needs the tensorboard package (pip install tensorboard)"
        ) from None


def memory_loader_refusal(cfg: TrainConfig, train_ds: Dataset) -> str | None:
    """Why the in-memory batch path cannot serve this run (None: it can)."""
    a = cfg.aug
    if not has_image_tensor(train_ds):
        return f"{cfg.data} is not held in memory as an image tensor (only fashion-mnist is)"
    if a.crop != "pad" or a.randaugment_magnitude > 0 or a.random_erasing > 0:
        return "it augments only by padded crops and flips (aug.crop=pad, no RandAugment or erasing)"
    return None


def _steps_per_epoch(cfg: TrainConfig, world: World, n_train: int) -> int:
    if cfg.batch_size % (world.size * cfg.accum_steps):
        raise ConfigError(
            f"batch_size {cfg.batch_size} must be divisible by processes x accum_steps "
            f"({world.size} x {cfg.accum_steps})"
        )
    steps = n_train // cfg.batch_size
    if steps < 1:
        raise ConfigError(f"batch_size {cfg.batch_size} is larger than the training set ({n_train} images)")
    return steps


def _build_model(cfg: TrainConfig, num_classes: int, device: torch.device) -> nn.Module:
    overrides: dict[str, Any] = {"num_classes": num_classes, "drop_path_rate": cfg.drop_path}
    if cfg.img_size is not None:
        overrides["img_size"] = cfg.img_size
    torch.manual_seed(mix_seed(cfg.seed, 0xC0FFEE))  # same initial weights on every rank
    tag = tag_named_by(cfg.pretrained) if cfg.pretrained else None
    if tag is not None:  # published weights by name (NAME.TAG): every process fetches or reads the cache
        model = create_model(tag.name, pretrained=True, **overrides).to(device)
    else:
        model = create_model(cfg.model, pretrained=cfg.pretrained, **overrides).to(device)
    model.set_lean_backward(cfg.lean_backward)
    return model


def _set_transforms(splits: RunSplits, meta: ModelMeta, cfg: TrainConfig) -> None:
    a = cfg.aug
    splits.train.transform = train_transform(
        meta,
        crop=a.crop,
        scale=a.scale,
        padding=a.padding,
        hflip=a.hflip,
        randaugment_magnitude=a.randaugment_magnitude,
        randaugment_ops=a.randaugment_ops,
        random_erasing=a.random_erasing,
    )
    splits.val.transform = eval_transform(meta)
    splits.test.transform = eval_transform(meta)


def _loaders(
    cfg: TrainConfig, splits: RunSplits, sampler: ShardedSampler, *, meta: ModelMeta, world: World, device
) -> tuple[Iterable, Iterable, Iterable]:
    """Train, validation and test batches: in-memory tensor batches or DataLoaders (``cfg.data_loader``)."""
    per_rank = cfg.batch_size // world.size
    eval_batch = max(per_rank, 64)
    if cfg.data_loader != "workers" and memory_loader_refusal(cfg, splits.train) is None:
        train = TrainBatches(splits.train, sampler, meta=meta, padding=cfg.aug.padding, hflip=cfg.aug.hflip)
        return (train,) + tuple(
            EvalBatches(ds, meta=meta, batch_size=eval_batch, rank=world.rank, world=world.size)
            for ds in (splits.val, splits.test)
        )
    kw = dict(num_workers=cfg.workers, pin_memory=pin_memory(device), persistent_workers=cfg.workers > 0)
    train = DataLoader(SeededDataset(splits.train), batch_size=per_rank, sampler=sampler, **kw)
    return (train,) + tuple(
        DataLoader(ds, batch_size=eval_batch, sampler=range(world.rank, len(ds), world.size), **kw)
        for ds in (splits.val, splits.test)
    )


def _restore(model, optimizer, ema, scaler, state: dict[str, Any]) -> None:
    """Load a checkpoint's training state into the freshly built parts."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if ema is not None and state.get("ema") is not None:
        ema.load_state_dict(state["ema"])
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])


def build_run(
    cfg: TrainConfig,
    *,
    device: torch.device,
    world: World,
    state: dict[str, Any] | None = None,
    log: Callable[[str], None] = lambda _msg: None,
) -> RunParts:
    """Data, model, optimizer, EMA, loaders and schedule of a run; ``state`` (a checkpoint) is restored.

    Raises:
        UserError: bad data, model name, sizes or config; nothing has been written.
    """
    check_tensorboard(cfg)
    splits = run_splits(
        cfg.data, val_fraction=cfg.val_fraction, val_seed=cfg.val_seed, on_bad_image=cfg.on_bad_image
    )
    classes = [str(c) for c in splits.train.classes]
    if cfg.data_loader == "memory" and (why := memory_loader_refusal(cfg, splits.train)):
        raise ConfigError(f"data_loader=memory cannot be used: {why}")
    steps_per_epoch = _steps_per_epoch(cfg, world, len(splits.train))
    model = _build_model(cfg, len(classes), device)
    _set_transforms(splits, model.meta, cfg)
    for ds in (splits.train, splits.val, splits.test):
        if getattr(ds, "skipped", 0):
            log(f"{cfg.data} {ds.split}: skipped {ds.skipped} files Pillow cannot read")
    optimizer = build_optimizer(model, cfg.optim, lr=cfg.scaled_lr, device=device)
    ema = None
    if cfg.ema_decay > 0:
        ema = torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True
        )
    amp = resolve_amp(cfg.amp, device)
    if cfg.amp == "auto":
        why = (
            "native bf16"
            if amp == "bfloat16"
            else "no native bf16 (bf16 would be emulated, slower than fp32)"
        )
        log(f"amp: auto -> {amp} ({device.type} with {why})")
    scaler = torch.amp.GradScaler(device.type) if amp == "float16" else None
    if state is not None:
        _restore(model, optimizer, ema, scaler, state)
    elif cfg.pretrained:
        log(f"fine-tuning from {cfg.pretrained} ({len(classes)} classes, {model.meta.input_size[1]} px)")
    train_model: nn.Module = model
    if world.distributed:  # in a process group (torchrun), even of one process
        ids = [device.index] if device.type == "cuda" else None  # cuda:LOCAL_RANK (train.local_device)
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    sampler = ShardedSampler(
        len(splits.train), global_batch=cfg.batch_size, seed=cfg.seed, rank=world.rank, world=world.size
    )
    train_b, val_b, test_b = _loaders(cfg, splits, sampler, meta=model.meta, world=world, device=device)
    log(f"data: {'in-memory tensor batches' if isinstance(train_b, TrainBatches) else 'DataLoader'}")
    a = cfg.aug
    options = StepOptions(
        criterion=nn.CrossEntropyLoss(label_smoothing=a.label_smoothing),
        mixer=batch_mixer(
            num_classes=len(classes), mixup=a.mixup, cutmix=a.cutmix, switch_prob=a.switch_prob
        ),
        amp_dtype=amp_dtype(amp),
        scaler=scaler,
        accum_steps=cfg.accum_steps,
        grad_clip=cfg.optim.grad_clip,
        ema=ema,
        seed=cfg.seed,
        rank=world.rank,
    )
    return RunParts(
        cfg=cfg,
        device=device,
        world=world,
        splits=splits,
        classes=classes,
        model=model,
        train_model=train_model,
        optimizer=optimizer,
        ema=ema,
        scaler=scaler,
        sampler=sampler,
        train_batches=train_b,
        val_batches=val_b,
        test_batches=test_b,
        steps_per_epoch=steps_per_epoch,
        step_options=options,
        lr_at=schedule_for(cfg, steps_per_epoch),
    )
