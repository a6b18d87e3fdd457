"""Typed training config: dataclass defaults (the paper's recipe), YAML files, ``key=value`` overrides.

The resolved config is the single source of truth: it is written to the run folder as ``config.yaml`` and
stored in checkpoints as plain data (``to_dict``), never as an argparse Namespace.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError
from ..utils.messages import did_you_mean

__all__ = [
    "RESUMABLE_KEYS",
    "AugConfig",
    "OptimConfig",
    "ScheduleConfig",
    "TrainConfig",
    "SMALL_IMAGE_RECIPE",
    "apply_overrides",
    "from_dict",
    "load_yaml",
    "parse_set",
    "resolve_train_config",
    "to_dict",
]


@dataclass
class OptimConfig:
    """AdamW, or Muon + AdamW (see :mod:`tntvision.train.optim`).

    The learning rate used is ``lr * batch_size / lr_base_batch`` (linear scaling rule).
    """

    name: str = "adamw"  # adamw | muon (Muon on the weight matrices, AdamW on the rest)
    lr: float = 5e-4
    lr_base_batch: int = 512
    weight_decay: float = 0.05  # not applied to norms, biases, class token and position tables
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 0.0  # max global gradient norm; 0 = off
    fused: bool = True  # torch's fused AdamW kernel on CPU and CUDA (~4x faster than its for-loop on CPU)
    muon_momentum: float = 0.95  # name: muon


@dataclass
class ScheduleConfig:
    """Linear warm-up from ``warmup_lr``, then cosine decay to ``min_lr``, updated every step.

    ``by_time``: with a time budget, progress along the schedule is the larger of the step fraction and the
    fraction of the budget used, so a run stopped by the budget ends with the learning rate decayed.
    Such a run is not bit-for-bit reproducible (its schedule depends on the machine's speed).
    """

    warmup_epochs: float = 5.0
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    by_time: bool = False


@dataclass
class AugConfig:
    """Training augmentation and label handling (see :func:`tntvision.data.train_transform`)."""

    crop: str = "random_resized"  # or "pad": resize + random crop of the padded image (small images)
    scale: tuple[float, float] = (0.08, 1.0)
    padding: int = 4
    hflip: float = 0.5
    randaugment_ops: int = 2
    randaugment_magnitude: int = 9  # 0 = off
    random_erasing: float = 0.25
    mixup: float = 0.8  # Beta alpha; 0 = off
    cutmix: float = 1.0  # Beta alpha; 0 = off
    switch_prob: float = 0.5
    label_smoothing: float = 0.1


@dataclass
class TrainConfig:
    """Everything a run needs. Defaults are the paper's DeiT-style ImageNet recipe (docs/training.md).

    ``batch_size`` is the global batch of one optimizer step: split over processes and then over
    ``accum_steps`` micro-batches. ``time_budget`` is in minutes of training (0: none). When the data has
    no validation split of its own (Fashion-MNIST, an ImageFolder tree without ``val/``), a seeded
    ``val_fraction`` of the training images is held out for validation (``val_seed`` fixes which, the
    same for every run seed, so trials compare on the same images).
    """

    model: str = ""
    data: str = ""
    out: str = ""
    pretrained: str | None = None
    img_size: int | None = None
    epochs: int = 300
    time_budget: float = 0.0
    batch_size: int = 1024
    accum_steps: int = 1
    seed: int = 0
    workers: int = 4
    # auto: batches cut from an in-memory image tensor (Fashion-MNIST) when the augmentation allows it
    # (crop "pad", no RandAugment or erasing); memory: insist on that; workers: the per-image DataLoader
    data_loader: str = "auto"
    device: str = "auto"  # auto: cuda if available, else cpu
    amp: str = (
        "auto"  # auto (bfloat16 where the hardware has native bf16, else none) | none | bfloat16 | float16
    )
    drop_path: float = 0.1
    lean_backward: bool = True  # recompute attention/MLP activations in backward (not the fused op's own)
    ema_decay: float = 0.99996  # 0 = no EMA of the weights
    eval_every: int = 1
    val_fraction: float = 0.1
    val_seed: int = 0
    on_bad_image: str = "error"  # error | skip
    tensorboard: bool = False
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: ScheduleConfig = field(default_factory=ScheduleConfig)
    aug: AugConfig = field(default_factory=AugConfig)

    def validate(self) -> None:
        """Raise :class:`ConfigError` for a missing or out-of-range value (:class:`CheckpointError` for an
        exported ``.onnx`` / ``.pt2`` file as ``pretrained``)."""

        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        need(bool(self.model), "no model given (--model NAME, see `tnt models`)")
        need(bool(self.data), "no data given (--data fashion-mnist or an ImageFolder folder)")
        need(bool(self.out), "no run folder given (--out DIR)")
        if self.pretrained:
            from ..models.weights import refuse_exported  # local: the models load torch

            refuse_exported(self.pretrained, why="it holds no trainable weights", option="--pretrained")
            tag = _pretrained_tag(self.pretrained)
            need(
                tag is None or self.model.partition(".")[0] == tag.architecture,
                f"--pretrained {self.pretrained} holds weights of {tag and tag.architecture}, not of "
                f"--model {self.model}",
            )
        need(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        need(self.time_budget >= 0, f"time_budget must be >= 0 minutes, got {self.time_budget}")
        need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        need(self.accum_steps >= 1, f"accum_steps must be >= 1, got {self.accum_steps}")
        need(
            self.batch_size % self.accum_steps == 0,
            f"batch_size {self.batch_size} is not divisible by accum_steps {self.accum_steps}",
        )
        need(self.img_size is None or self.img_size > 0, f"img_size must be positive, got {self.img_size}")
        need(self.workers >= 0, f"workers must be >= 0, got {self.workers}")
        need(
            self.data_loader in ("auto", "memory", "workers"),
            f"data_loader must be auto, memory or workers, not {self.data_loader!r}",
        )
        need(
            self.device in ("auto", "cpu") or self.device.startswith("cuda"),
            f"unknown device {self.device!r}",
        )
        need(
            self.amp in ("auto", "none", "bfloat16", "float16"),
            f"amp must be auto, none, bfloat16 or float16, not {self.amp!r}",
        )
        need(0.0 <= self.drop_path < 1.0, f"drop_path must be in [0, 1), got {self.drop_path}")
        need(0.0 <= self.ema_decay < 1.0, f"ema_decay must be in [0, 1), got {self.ema_decay}")
        need(self.eval_every >= 1, f"eval_every must be >= 1, got {self.eval_every}")
        need(0.0 < self.val_fraction < 1.0, f"val_fraction must be in (0, 1), got {self.val_fraction}")
        need(
            self.on_bad_image in ("error", "skip"),
            f"on_bad_image must be error or skip, not {self.on_bad_image!r}",
        )
        o, s, a = self.optim, self.sched, self.aug
        need(o.lr > 0 and o.lr_base_batch > 0, "optim.lr and optim.lr_base_batch must be positive")
        need(o.weight_decay >= 0 and o.grad_clip >= 0, "optim.weight_decay and optim.grad_clip must be >= 0")
        need(all(0.0 <= b < 1.0 for b in o.betas), f"optim.betas must be in [0, 1), got {o.betas}")
        need(o.name in ("adamw", "muon"), f"optim.name must be adamw or muon, not {o.name!r}")
        need(0.0 <= o.muon_momentum < 1.0, f"optim.muon_momentum must be in [0, 1), got {o.muon_momentum}")
        need(s.warmup_epochs >= 0 and s.warmup_lr >= 0 and s.min_lr >= 0, "sched values must be >= 0")
        need(a.crop in ("random_resized", "pad"), f"aug.crop must be random_resized or pad, not {a.crop!r}")
        need(
            0.0 < a.scale[0] <= a.scale[1] <= 1.0, f"aug.scale must satisfy 0 < lo <= hi <= 1, got {a.scale}"
        )
        for name in ("hflip", "random_erasing", "switch_prob"):
            need(0.0 <= getattr(a, name) <= 1.0, f"aug.{name} must be in [0, 1], got {getattr(a, name)}")
        need(
            0.0 <= a.label_smoothing < 1.0, f"aug.label_smoothing must be in [0, 1), got {a.label_smoothing}"
        )
        need(a.mixup >= 0 and a.cutmix >= 0, "aug.mixup and aug.cutmix must be >= 0")
        need(a.padding >= 0 and a.randaugment_ops >= 0, "aug.padding and aug.randaugment_ops must be >= 0")
        need(
            0 <= a.randaugment_magnitude <= 30,
            f"aug.randaugment_magnitude must be in [0, 30], got {a.randaugment_magnitude}",
        )

    @property
    def scaled_lr(self) -> float:
        """The peak learning rate for this batch size (linear scaling)."""
        return self.optim.lr * self.batch_size / self.optim.lr_base_batch


# The small-image recipe (28 px data such as Fashion-MNIST): a few epochs on a CPU, so no augmentation at
# all (flips, crops, RandAugment, MixUp/CutMix, erasing slow convergence in a few epochs: without flips a
# 5-minute trial gained 2 points; turn them on for long runs); bf16 autocast where the hardware has native
# bf16 (`amp: auto`; elsewhere bf16 is emulated and ~10x slower than fp32); Muon at a high learning rate;
# the schedule follows the time budget when one is given.
# configs/fashion_mnist.yaml spells it out; `tnt train` picks it for models whose input is <= 64 px.
SMALL_IMAGE_RECIPE: dict[str, Any] = {
    "epochs": 30,
    "batch_size": 128,
    "workers": 1,
    "amp": "auto",
    "drop_path": 0.0,
    "lean_backward": False,  # small activations: keeping them is ~20% faster
    "ema_decay": 0.0,
    # Muon (weight matrices) + AdamW (the rest) at 8e-3 for batch 128. 4-minute trials, two processes
    # (`python benchmarks/fmnist_trials.py`, BENCHMARKS.md): 87.8%, against 84.4% for AdamW alone at its
    # best rate (4e-3; 8e-3 diverged in earlier trials); Muon at 4e-3 87.1%, at 1.6e-2 86.4%. AdamW's
    # beta2 0.99.
    "optim": {
        "name": "muon",
        "lr": 1.6e-2,
        "lr_base_batch": 256,
        "betas": (0.9, 0.99),
        "weight_decay": 0.05,
        "grad_clip": 0.0,
    },
    "sched": {"warmup_epochs": 0.3, "warmup_lr": 1e-5, "min_lr": 1e-5, "by_time": True},
    "aug": {
        "crop": "pad",
        "padding": 0,
        "hflip": 0.0,
        "randaugment_magnitude": 0,
        "random_erasing": 0.0,
        "mixup": 0.0,
        "cutmix": 0.0,
        "label_smoothing": 0.1,
    },
}


# ------------------------------------------------------------------------------- plain data <-> config


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain YAML/JSON data (tuples become lists)."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against a field's type hint, converting where it is lossless (int -> float ...)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: {value!r} is not a valid {hint}")
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {hint}")


def _unknown(key: str, known: list[str]) -> ConfigError:
    return ConfigError(f"unknown config key {key!r}{did_you_mean(key.rsplit('.', 1)[-1], known)}")


def _update(obj: Any, data: dict[str, Any], prefix: str = "") -> None:
    """Set fields of the dataclass ``obj`` from ``data`` (nested dicts for nested configs), checked."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in data.items():
        full = prefix + str(key)
        if key not in names:
            raise _unknown(full, names)
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _update(current, value, full + ".")
        else:
            setattr(obj, key, _coerce(value, hints[key], full))


def from_dict(data: dict[str, Any], *, base: TrainConfig | None = None) -> TrainConfig:
    """A :class:`TrainConfig` from plain data laid over ``base`` (default: the dataclass defaults)."""
    cfg = dataclasses.replace(base) if base is not None else TrainConfig()
    # replace() is shallow: copy the nested configs so the base is not changed
    cfg.optim, cfg.sched, cfg.aug = (dataclasses.replace(x) for x in (cfg.optim, cfg.sched, cfg.aug))
    _update(cfg, data)
    return cfg


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into plain data; :class:`ConfigError` if it is missing or malformed."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys")
    return data


def parse_set(items: list[str]) -> dict[str, Any]:
    """``["optim.lr=1e-3", "aug.scale=[0.5, 1]"]`` -> nested plain data; values are parsed as YAML."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            raise ConfigError(f"--set {item}: value is not valid YAML") from None
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item}: {part} is set both as a value and a section")
        node[parts[-1]] = value
    return out


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``overrides`` into ``data`` (new dict; nested mappings merge, other values replace)."""
    out = dict(data)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = apply_overrides(out[key], value)
        else:
            out[key] = value
    return out


# ---------------------------------------------------------------------------------- resolving a run's config

# Keys a resumed run may change; anything else would make it a different run.
RESUMABLE_KEYS = frozenset({"out", "time_budget", "workers", "tensorboard", "on_bad_image"})


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 1}}`` -> ``{"optim.lr": 1}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _pretrained_tag(value: str | None):
    """The published weights ``pretrained`` names (``NAME.TAG``), or None for a path or no value."""
    if not value:
        return None
    from ..models.pretrained import tag_named_by  # local: the model registry is not needed to parse

    return tag_named_by(value)


def _recipe_for(overrides: dict[str, Any]) -> dict[str, Any]:
    """The base recipe of a new run: :data:`SMALL_IMAGE_RECIPE` for inputs of 64 px or less, else none."""
    from ..models.registry import get_model_entry  # local: the model registry is not needed to parse

    model = overrides.get("model")
    img = overrides.get("img_size") or (get_model_entry(model).config.img_size if model else 224)
    return SMALL_IMAGE_RECIPE if img <= 64 else {}


def resolve_train_config(
    *, overrides: dict[str, Any], config_file: str | Path | None = None, resume: bool = False
) -> TrainConfig:
    """The run's config: defaults or a recipe, then ``config_file``, then ``overrides`` (plain data).

    A new run without ``config_file`` takes the paper's recipe (the dataclass defaults), or
    :data:`SMALL_IMAGE_RECIPE` for a model whose input is 64 px or less. With ``resume`` the base is the
    config saved in the run's checkpoint and only :data:`RESUMABLE_KEYS` may differ. A new run refuses a
    folder that already holds one, so nothing written before is overwritten.

    Raises:
        ConfigError: no ``out``, a bad value, a key a resumed run may not change, a folder already used.
        CheckpointError: ``resume`` without a readable checkpoint in ``out``.
    """
    from .checkpoint import checkpoint_path, load_training_state  # local: checkpoint imports the models

    out = overrides.get("out")
    if not out:
        raise ConfigError("no run folder given (--out DIR)")
    ckpt = checkpoint_path(out)
    if resume:
        if config_file is not None:
            raise ConfigError(
                "--config cannot be combined with --resume: the run's config is in its checkpoint"
            )
        saved = load_training_state(ckpt)["config"]
        merged = apply_overrides(saved, overrides)
        before = _flatten(saved)
        changed = sorted(k for k, v in _flatten(merged).items() if before.get(k) != v)
        refused = [k for k in changed if k not in RESUMABLE_KEYS]
        if refused:
            raise ConfigError(
                f"cannot change {', '.join(refused)} when resuming (only {', '.join(sorted(RESUMABLE_KEYS))})"
            )
        cfg = from_dict(merged)
    else:
        if ckpt.exists() or (Path(out) / "summary.json").exists():
            raise ConfigError(f"{out} already holds a training run; add --resume or choose another --out")
        tag = _pretrained_tag(overrides.get("pretrained"))
        if tag is not None and not overrides.get("model"):  # --pretrained NAME.TAG: its architecture
            overrides = {**overrides, "model": tag.architecture}
        base = load_yaml(config_file) if config_file is not None else _recipe_for(overrides)
        cfg = from_dict(apply_overrides(base, overrides))
    cfg.validate()
    return cfg
