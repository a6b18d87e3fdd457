"""Issue 14: does TNT beat a plain ViT at equal budget? `tnt_mini_patch4_28` against `vit_mini_patch4_28`.

    python benchmarks/tnt_vs_vit.py --phase tune|main|ablations|transfer|all [--seeds 0 1 2]
        [--epochs 2] [--minutes 2] [--procs 2] [--out runs/tnt_vs_vit] [--quick] [--dry-run]

The two models are the same outer network (d 128, depth 4, 4 px patches embedded from 2x2 words); the ViT
has no inner transformers (`inner_blocks=()`), so TNT has ~4% more MACs. Every run is `tnt train` in a
subprocess (torchrun with `--procs` one-thread processes, as `make demo`; one run at a time, never two at
once), on the real Fashion-MNIST with the small-image recipe (configs/fashion_mnist.yaml). Phases:

- ``tune``: a learning-rate grid (Muon + AdamW, the recipe's optimizer) per model, one seed, the same
  short time budget for every trial, ranked on validation accuracy (never on test). ``main``,
  ``ablations`` and ``transfer`` then use each model's best rate (the recipe's rate until ``tune`` ran).
- ``main``: both models (a) for the same number of epochs and (b) for the same wall-clock budget of
  training, ``--seeds`` seeds each. The table gives test top-1 (mean, standard deviation, range over
  seeds), validation top-1, parameters, MACs, training images/s and wall time, and the TNT - ViT
  difference paired by seed.
- ``ablations``: the paper's cheap ablations on TNT, equal epochs, fewer seeds: no word position
  encoding (`word_pos=False`), 1 and 4 inner heads (the mini has 2), inner transformers in half of the
  blocks (`inner_blocks=(0, 2)`), 4x4 instead of 2x2 words per patch (`word_stride=1`). The ViT (no
  inner transformer at all) and the TNT baseline are the ``main`` equal-epoch runs with the same seeds.
- ``transfer``: each model pre-trained on Fashion-MNIST (the ``main`` equal-epoch run of that seed) is
  fine-tuned with a fresh head on 10 and 50 labelled images per class of scikit-learn's digits (8x8,
  upsampled to 28x28), against the same model trained from scratch on the same images with the same
  recipe and the same number of steps. Digits' own held-out half measures (test); 20 images per class of
  the rest are the validation split; the labelled images are drawn (per seed) from what is left.

Same data, same order. Both models are trained on the same 54,000 images and validated on the same 6,000
(`val_split.json`: a function of `val_fraction` and `val_seed` alone). The order of the training images
is the run seed's: `ShardedSampler` draws each epoch's permutation from (seed, epoch) and the number of
images, nothing else, and the model's initial weights come from a generator seeded apart (`mix_seed(seed,
0xC0FFEE)`), so under one seed both models see the same batches in the same order; the recipe has no
augmentation and no drop path, so nothing else is drawn per model. The main table's TNT - ViT differences
are therefore paired: the same seed means the same data order.

Resumable: each finished run appends one line to ``OUT/runs.jsonl`` keyed by a hash of its full
specification (model, variant, seed, budget, `--set` overrides, data, processes); a rerun skips every key
already there, so an interrupted campaign continues with the run it stopped in (a half-done run is
started again). A run shared by two phases (the TNT baseline of the ablations, the pre-trained models of
the transfer) is the same key and runs once. Before starting, the script prints what it will run and an
estimate of the time (from the speeds of runs already recorded, else from assumed ones).

Writes: ``benchmarks/results/tnt_vs_vit.json`` (every run and every table), a section of BENCHMARKS.md
between ``<!-- tnt_vs_vit:begin -->`` and ``<!-- tnt_vs_vit:end -->`` (replaced on rerun) and
``docs/figures/tnt_vs_vit.png`` (validation accuracy against epochs and against minutes of training).
``--quick`` (tiny subsets, seconds per run) writes all of these into ``OUT`` instead (default
``runs/tnt_vs_vit_quick``), never into BENCHMARKS.md. docs/evidence.md explains the protocol.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TNT, VIT = "tnt_mini_patch4_28", "vit_mini_patch4_28"
MODELS = (TNT, VIT)
PHASES = ("tune", "main", "ablations", "transfer")
BEGIN, END = "<!-- tnt_vs_vit:begin -->", "<!-- tnt_vs_vit:end -->"
RECIPE_LR = 0.016  # configs/fashion_mnist.yaml: optim.lr at lr_base_batch 256 (8e-3 at batch 128)
LR_BASE_BATCH = 256

# The paper's ablations that are cheap at this scale: label -> TNTConfig overrides of the TNT mini.
ABLATIONS: dict[str, dict[str, Any]] = {
    "no word position encoding": {"word_pos": False},
    "1 inner head (mini: 2)": {"inner_num_heads": 1},
    "4 inner heads (mini: 2)": {"inner_num_heads": 4},
    "inner transformers in blocks 1, 3 of 4": {"inner_blocks": [0, 2]},
    "4x4 words per patch (mini: 2x2)": {"word_stride": 1},
}

# Assumed training speeds (images/s, two one-thread processes) for the time estimate, until runs of the
# same model and processes are recorded; one process is taken as 0.55x.
ASSUMED_SPEED = {TNT: 700.0, VIT: 1100.0}


@dataclass(frozen=True)
class Settings:
    """What a campaign is made of; ``--quick`` swaps in tiny values."""

    seeds: tuple[int, ...] = (0, 1, 2)
    ablation_seeds: tuple[int, ...] = (0, 1)
    transfer_seeds: tuple[int, ...] = (0, 1, 2)
    epochs: int = 2  # main (a), ablations, pre-training for the transfer
    minutes: float = 2.0  # main (b): training time per run
    tune_minutes: float = 1.5
    tune_lrs: tuple[float, ...] = (0.004, 0.008, 0.016, 0.032)  # optim.lr at batch 256
    labels_per_class: tuple[int, ...] = (10, 50)
    digits_val_per_class: int = 20
    finetune_steps: int = 300
    batch_size: int = 128
    procs: int = 2
    threads: int = 1
    fmnist_subset: tuple[int, int] | None = None  # (train, test) images: --quick only
    quick: bool = False


QUICK = dict(
    seeds=(0, 1),
    ablation_seeds=(0,),
    transfer_seeds=(0,),
    epochs=1,
    minutes=0.05,
    tune_minutes=0.03,
    tune_lrs=(0.008, 0.016),
    labels_per_class=(2, 5),
    digits_val_per_class=3,
    finetune_steps=4,
    batch_size=64,
    procs=1,
    fmnist_subset=(600, 200),
    quick=True,
)


@dataclass(frozen=True)
class RunSpec:
    """One `tnt train` run. ``key()`` hashes everything that makes it this run (labels excluded)."""

    model: str
    seed: int
    variant: tuple[tuple[str, Any], ...] = ()  # TNTConfig overrides (ablations)
    epochs: int | None = None
    minutes: float | None = None  # --time-budget
    sets: tuple[str, ...] = ()
    data: str = "fashion-mnist"  # or "digits-<k>pc" (an ImageFolder the script writes)
    batch_size: int | None = None
    pretrained: str | None = None  # key of the run whose model (head removed) this one starts from
    procs: int = 2
    fmnist: str = "full"  # which Fashion-MNIST: "full" or "subset-<train>-<test>" (--quick)
    label: str = field(default="", compare=False)

    def key(self) -> str:
        data = dataclasses.asdict(self)
        data.pop("label")
        blob = json.dumps(data, sort_keys=True, default=list)
        return hashlib.sha1(blob.encode()).hexdigest()[:12]

    @property
    def variant_dict(self) -> dict[str, Any]:
        return dict(self.variant)

    def folder_name(self) -> str:
        short = "tnt" if self.model == TNT else "vit" if self.model == VIT else self.model
        tag = "".join(f"_{k}{_tag(v)}" for k, v in self.variant)
        budget = f"e{self.epochs}" if self.minutes is None else f"m{self.minutes:g}"
        init = "_ft" if self.pretrained else ""
        return f"{short}{tag}_{self.data}{init}_s{self.seed}_{budget}_{self.key()[:8]}"


def _tag(v: Any) -> str:
    if isinstance(v, list | tuple):
        return "-".join(str(x) for x in v) or "none"
    return str(v).lower()


def variant_name(base: str, variant: dict[str, Any]) -> str:
    """The registry name a variant is trained under (registered in the subprocess, see ``_train``)."""
    return (
        base if not variant else base + "+" + ",".join(f"{k}={_tag(v)}" for k, v in sorted(variant.items()))
    )


def lr_set(lr: float) -> str:
    return f"optim.lr={lr:g}"


def lr_at_128(lr: float) -> float:
    """The peak rate the recipe's ``optim.lr`` (at batch 256) gives at batch 128."""
    return lr * 128 / LR_BASE_BATCH


# ------------------------------------------------------------------------------------ the plan


def tuned_lr(records: dict[str, dict], s: Settings) -> dict[str, tuple[float, str]]:
    """Per model: the learning rate to use and where it came from (best validation of the tune grid)."""
    out = {}
    for model in MODELS:
        done = [(records[k.key()]["val_top1"], lr) for lr, k in tune_specs(s, model) if k.key() in records]
        if len(done) == len(s.tune_lrs):
            best_val, best = max(done, key=lambda t: (t[0], -t[1]))
            edge = ", at the edge of the grid" if best in (min(s.tune_lrs), max(s.tune_lrs)) else ""
            out[model] = (best, f"tuned: best validation top-1 ({best_val:.2f}%) of {len(done)} rates{edge}")
        else:
            out[model] = (RECIPE_LR, "the recipe's rate (tune phase not complete)")
    return out


def tune_specs(s: Settings, model: str) -> list[tuple[float, RunSpec]]:
    return [
        (
            lr,
            RunSpec(
                model=model,
                seed=s.seeds[0],
                minutes=s.tune_minutes,
                sets=(lr_set(lr), "eval_every=1000"),
                batch_size=s.batch_size,
                procs=s.procs,
                fmnist=_fmnist(s),
                label=f"tune lr {lr_at_128(lr):.3g}",
            ),
        )
        for lr in s.tune_lrs
    ]


def _fmnist(s: Settings) -> str:
    return "full" if s.fmnist_subset is None else "subset-{}-{}".format(*s.fmnist_subset)


def epochs_spec(s: Settings, model: str, seed: int, lr: float, variant: dict | None = None) -> RunSpec:
    """Equal epochs: ``s.epochs`` epochs, validation after each (the curve against epochs)."""
    return RunSpec(
        model=model,
        seed=seed,
        variant=tuple(
            sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in (variant or {}).items())
        ),
        epochs=s.epochs,
        sets=(lr_set(lr),),
        batch_size=s.batch_size,
        procs=s.procs,
        fmnist=_fmnist(s),
        label="equal epochs",
    )


def time_spec(s: Settings, model: str, seed: int, lr: float) -> RunSpec:
    """Equal wall-clock: ``s.minutes`` of training (validated at the end only, so evaluation is not
    charged to the budget of the slower-evaluating model; the cosine follows the clock)."""
    return RunSpec(
        model=model,
        seed=seed,
        minutes=s.minutes,
        sets=(lr_set(lr), "eval_every=1000"),
        batch_size=s.batch_size,
        procs=s.procs,
        fmnist=_fmnist(s),
        label="equal time",
    )


def finetune_batch(n_train: int) -> int:
    """Batch of a digits run: 16 for 100 images, 32 for 500 (at least 8, at most 32, a multiple of 8)."""
    return max(8, min(32, (n_train // 6) // 8 * 8))


def transfer_specs(s: Settings, model: str, k: int, seed: int, lr: float) -> tuple[RunSpec, RunSpec, RunSpec]:
    """(pre-training, fine-tuning, from scratch) for ``k`` labelled digits per class."""
    pre = epochs_spec(s, model, seed, lr)
    n = 10 * k
    batch = finetune_batch(n)
    epochs = math.ceil(s.finetune_steps / (n // batch))
    common = dict(
        model=model,
        seed=seed,
        epochs=epochs,
        sets=(lr_set(RECIPE_LR), "workers=0"),
        data=f"digits-{k}pc",
        batch_size=batch,
        procs=s.procs,
        fmnist=_fmnist(s),
    )
    return (
        pre,
        RunSpec(**common, pretrained=pre.key(), label="pre-trained"),
        RunSpec(**common, label="from scratch"),
    )


def plan(phases: Sequence[str], s: Settings, records: dict[str, dict]) -> list[RunSpec]:
    """Every run of ``phases`` in the order they run, shared runs once (first use)."""
    lrs = {m: lr for m, (lr, _) in tuned_lr(records, s).items()}
    specs: list[RunSpec] = []
    if "tune" in phases:
        for model in MODELS:
            specs += [spec for _, spec in tune_specs(s, model)]
    if "main" in phases:
        for seed in s.seeds:  # both models of a seed back to back: the pairs finish together
            specs += [epochs_spec(s, m, seed, lrs[m]) for m in MODELS]
        for seed in s.seeds:
            specs += [time_spec(s, m, seed, lrs[m]) for m in MODELS]
    if "ablations" in phases:
        for seed in s.ablation_seeds:
            specs.append(epochs_spec(s, TNT, seed, lrs[TNT]))
            specs += [epochs_spec(s, TNT, seed, lrs[TNT], v) for v in ABLATIONS.values()]
    if "transfer" in phases:
        for seed in s.transfer_seeds:
            for model in MODELS:
                for k in s.labels_per_class:
                    specs += transfer_specs(s, model, k, seed, lrs[model])
    seen, out = set(), []
    for spec in specs:
        if spec.key() not in seen:
            seen.add(spec.key())
            out.append(spec)
    return out


def pending(specs: Iterable[RunSpec], records: dict[str, dict]) -> list[RunSpec]:
    """The runs not recorded yet (what a resumed campaign still has to do)."""
    return [spec for spec in specs if spec.key() not in records]


# ------------------------------------------------------------------------------------ time estimate


def expected_speed(spec: RunSpec, records: dict[str, dict]) -> float:
    """Training images/s of ``spec``: the mean of recorded runs of the same model, variant and processes."""
    seen = [
        r["train_images_per_s"]
        for r in records.values()
        if r["spec"]["model"] == spec.model
        and json.dumps(r["spec"]["variant"]) == json.dumps([list(kv) for kv in spec.variant])
        and r["spec"]["procs"] == spec.procs
        and r["spec"]["data"] == spec.data
    ]
    if seen:
        return statistics.fmean(seen)
    speed = ASSUMED_SPEED.get(spec.model, 700.0) * (1.0 if spec.procs >= 2 else 0.55)
    v = spec.variant_dict
    if v.get("word_stride") == 1:
        speed *= 0.45  # 16 words per patch instead of 4
    if "inner_blocks" in v:
        speed = speed / 2 + ASSUMED_SPEED[VIT] * (1.0 if spec.procs >= 2 else 0.55) / 2
    if spec.data.startswith("digits"):
        speed *= 0.5  # per-image DataLoader path
    return speed


def estimate_seconds(spec: RunSpec, records: dict[str, dict], s: Settings) -> float:
    """Seconds of one run: start-up, training, evaluations (assumed 3x the training speed)."""
    speed = expected_speed(spec, records)
    if spec.data.startswith("digits"):
        k = int(spec.data.split("-")[1].rstrip("pc"))
        n_train, n_eval = 10 * k, 10 * s.digits_val_per_class
        train = (spec.epochs or 1) * (n_train // (spec.batch_size or 32)) * (spec.batch_size or 32)
        evals = (spec.epochs or 1) * n_eval + 900
        return 8.0 + 0.25 * (spec.epochs or 1) + train / speed + evals / (3 * speed)
    n_train, n_test = s.fmnist_subset or (60000, 10000)
    n_val = round(0.1 * n_train)
    if spec.minutes is not None:
        train_s, n_evals = 60.0 * spec.minutes, 1
    else:
        train_s, n_evals = (spec.epochs or 1) * (n_train - n_val) / speed, spec.epochs or 1
    return 10.0 + train_s + (n_evals * n_val + n_test) / (3 * speed)


# ------------------------------------------------------------------------------------ results on disk


def read_records(path: Path) -> dict[str, dict]:
    """``runs.jsonl`` as {key: record}; a torn last line (a campaign killed mid-write) is ignored."""
    records: dict[str, dict] = {}
    if not path.is_file():
        return records
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        records[rec["key"]] = rec
    return records


def append_record(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


# ------------------------------------------------------------------------------------ data


def write_fmnist_subset(src: Path, dst: Path, n_train: int, n_test: int) -> Path:
    """The first ``n_train`` / ``n_test`` images of the Fashion-MNIST in ``src`` as IDX files in ``dst``."""
    import numpy as np

    from tntvision.data.datasets import _FASHION_FILES, _find_idx, read_idx

    if (dst / "done").is_file():
        return dst
    dst.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        for stem in _FASHION_FILES[split]:
            arr = read_idx(_find_idx(src, stem))[:n]
            header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(d.to_bytes(4, "big") for d in arr.shape)
            (dst / stem).write_bytes(header + np.ascontiguousarray(arr, dtype=np.uint8).tobytes())
    (dst / "done").write_text("")
    return dst


def digits_split(k: int, seed: int, *, val_per_class: int) -> dict[str, list[int]]:
    """Indices into scikit-learn's digits: ``test`` (a fixed stratified half), ``val`` (``val_per_class``
    per class of the rest, fixed) and ``train`` (``k`` per class of what is left, drawn with ``seed``)."""
    import numpy as np
    from sklearn.datasets import load_digits

    target = load_digits().target
    fixed = np.random.default_rng(14)
    drawn = np.random.default_rng(seed)
    out: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for c in range(10):
        idx = fixed.permutation(np.flatnonzero(target == c))
        half = len(idx) // 2
        rest = idx[half:]
        if val_per_class + k > len(rest):
            raise SystemExit(
                f"digits: class {c} has {len(rest)} images left for {val_per_class} val + {k} train"
            )
        out["test"] += idx[:half].tolist()
        out["val"] += rest[:val_per_class].tolist()
        out["train"] += drawn.choice(rest[val_per_class:], size=k, replace=False).tolist()
    return {name: sorted(v) for name, v in out.items()}


def write_digits_folder(root: Path, k: int, seed: int, *, val_per_class: int) -> Path:
    """An ImageFolder tree ``root/{train,val,test}/<digit>/<index>.png`` of 28x28 grey digits."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    if (root / "done").is_file():
        return root
    if root.exists():
        shutil.rmtree(root)
    digits = load_digits()
    for split, indices in digits_split(k, seed, val_per_class=val_per_class).items():
        for i in indices:
            label = int(digits.target[i])
            pixels = np.clip(digits.images[i] * (255.0 / 16.0), 0, 255).astype(np.uint8)  # 0..16 -> 0..255
            img = Image.fromarray(pixels, mode="L").resize((28, 28), Image.Resampling.BILINEAR)
            (root / split / str(label)).mkdir(parents=True, exist_ok=True)
            img.save(root / split / str(label) / f"{i}.png")
    (root / "done").write_text("")
    return root


def headless_copy(model_dir: Path, dst: Path) -> Path:
    """The weights of ``model_dir`` without the classifier head: `tnt train --pretrained` adds a fresh one."""
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True, exist_ok=True)
    sd = {k: v for k, v in load_file(model_dir / "model.safetensors").items() if not k.startswith("head.")}
    save_file(sd, dst / "model.safetensors")
    return dst


# ------------------------------------------------------------------------------------ running


class Campaign:
    """Runs specs one at a time into ``out`` and records each in ``out/runs.jsonl``."""

    def __init__(self, out: Path, s: Settings, *, fmnist_dir: Path) -> None:
        self.out, self.s, self.fmnist_dir = out, s, fmnist_dir
        self.jsonl = out / "runs.jsonl"
        self.records = read_records(self.jsonl)

    def data_env(self) -> dict[str, str]:
        env = dict(os.environ, OMP_NUM_THREADS=str(self.s.threads), OMP_WAIT_POLICY="PASSIVE")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
        if self.s.fmnist_subset is not None:
            sub = self.out / "data" / "fashion-mnist-{}-{}".format(*self.s.fmnist_subset)
            env["TNT_FASHION_MNIST_DIR"] = str(
                write_fmnist_subset(self.fmnist_dir, sub, *self.s.fmnist_subset)
            )
        else:
            env["TNT_FASHION_MNIST_DIR"] = str(self.fmnist_dir)
        return env

    def data_arg(self, spec: RunSpec) -> str:
        if spec.data == "fashion-mnist":
            return "fashion-mnist"
        k = int(spec.data.split("-")[1].rstrip("pc"))
        root = self.out / "data" / f"digits-{k}pc-s{spec.seed}-v{self.s.digits_val_per_class}"
        return str(write_digits_folder(root, k, spec.seed, val_per_class=self.s.digits_val_per_class))

    def command(self, spec: RunSpec, run_dir: Path) -> list[str]:
        launcher = (
            [
                str(Path(sys.executable).with_name("torchrun")),
                "--standalone",
                f"--nproc_per_node={spec.procs}",
            ]
            if spec.procs > 1
            else [sys.executable]
        )
        if spec.variant:  # registered under its own name in the subprocess: see _train
            entry = [str(Path(__file__).resolve()), "_train", json.dumps(spec.variant_dict), spec.model]
        else:
            entry = ["-m", "tntvision.cli"]
        model = variant_name(spec.model, spec.variant_dict)
        args = ["train", "--model", model, "--data", self.data_arg(spec), "--out", str(run_dir)]
        args += ["--seed", str(spec.seed), "--json"]
        if spec.epochs is not None:
            args += ["--epochs", str(spec.epochs)]
        if spec.minutes is not None:
            args += ["--time-budget", f"{spec.minutes:g}"]
        if spec.batch_size is not None:
            args += ["--batch-size", str(spec.batch_size)]
        if spec.pretrained is not None:
            pre = self.records[spec.pretrained]
            headless = headless_copy(Path(pre["out"]) / "model", self.out / "headless" / spec.pretrained)
            args += ["--pretrained", str(headless)]
        for item in spec.sets:
            args += ["--set", item]
        return launcher + entry + args

    def run(self, spec: RunSpec, *, index: int, total: int, eta: float) -> dict:
        run_dir = self.out / "runs" / spec.folder_name()
        summary_path = run_dir / "summary.json"
        if run_dir.exists() and not summary_path.is_file():
            shutil.rmtree(run_dir)  # a run interrupted half-way: start it again
        cmd = self.command(spec, run_dir)
        shown = shlex.join(["OMP_NUM_THREADS=" + str(self.s.threads), *cmd])
        print(
            f"[{index}/{total}] {spec.label}: {spec.model} {spec.variant_dict or ''} seed {spec.seed} "
            f"(~{eta / 60:.1f} min left)\n  {shown}",
            file=sys.stderr,
            flush=True,
        )
        t0 = time.time()
        if not summary_path.is_file():
            proc = subprocess.run(cmd, env=self.data_env(), capture_output=True, text=True)
            if proc.returncode != 0:
                tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
                raise SystemExit(f"run failed (exit {proc.returncode}): {shown}\n{tail}")
        record = make_record(spec, run_dir, command=shown, elapsed=time.time() - t0)
        append_record(self.jsonl, record)
        self.records[spec.key()] = record
        print(
            f"  test top-1 {record['top1']:.2f}%, val top-1 {record['val_top1']:.2f}%, "
            f"{record['epochs']:.2f} epochs, {record['train_images_per_s']:.0f} img/s, "
            f"{record['process_seconds']:.0f} s",
            file=sys.stderr,
            flush=True,
        )
        return record


@functools.cache
def _cost(model: str, variant_json: str) -> tuple[int, int]:
    from tntvision.models import create_model
    from tntvision.tools.info import count_macs, count_params

    net = create_model(model, **json.loads(variant_json))
    return count_params(net), count_macs(net)


def model_cost(model: str, variant: dict[str, Any]) -> dict[str, int]:
    """Trainable parameters and MACs per image (as the paper counts them) of a model or variant."""
    params, macs = _cost(model, json.dumps(variant, sort_keys=True))
    return {"params": params, "macs": macs}


def make_record(spec: RunSpec, run_dir: Path, *, command: str, elapsed: float) -> dict:
    """What runs.jsonl keeps of a run: its spec, summary numbers, validation curve and cost."""
    summary = json.loads((run_dir / "summary.json").read_text())
    curve, train_s, images = [], 0.0, 0
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        new = row["images_seen"] - images
        images = row["images_seen"]
        train_s += new / max(row["train_images_per_s"], 1e-9)
        if "val_top1" in row:
            curve.append(
                {"epoch": row["epoch"], "train_minutes": round(train_s / 60, 4), "val_top1": row["val_top1"]}
            )
    spec_data = dataclasses.asdict(spec)
    spec_data["variant"] = [list(kv) for kv in spec.variant]
    return {
        "key": spec.key(),
        "spec": spec_data,
        "command": command,
        "out": str(run_dir),
        "top1": summary["top1"],
        "val_top1": summary["val_top1"],
        "epochs": summary["epochs"],
        "train_images_per_s": summary["train_images_per_s"],
        "train_seconds": summary["train_seconds"],
        "wall_seconds": summary["wall_seconds"],
        "process_seconds": round(elapsed, 1),
        "stopped_by": summary["stopped_by"],
        "curve": curve,
        **model_cost(spec.model, spec.variant_dict),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }


# ------------------------------------------------------------------------------------ aggregation


def mean_sd(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for fewer than two values)."""
    if not values:
        raise ValueError("no values")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def fmt_spread(values: Sequence[float], unit: str = "%") -> str:
    """``91.20 ± 0.31% (90.9-91.5)``, or ``91.20% (1 seed)``; ``-`` for none."""
    if not values:
        return "-"
    m, sd = mean_sd(values)
    if sd is None:
        return f"{m:.2f}{unit} (1 seed)"
    return f"{m:.2f} ± {sd:.2f}{unit} ({min(values):.2f}-{max(values):.2f})"


def summarize(records: Sequence[dict]) -> dict[str, Any]:
    """Mean and spread of a group of runs (the seeds of one model and protocol)."""
    top1 = [r["top1"] for r in records]
    val = [r["val_top1"] for r in records]
    out: dict[str, Any] = {"seeds": [r["spec"]["seed"] for r in records], "n": len(records)}
    if not records:
        return out
    for name, vals in (("test_top1", top1), ("val_top1", val)):
        m, sd = mean_sd(vals)
        out[name] = {
            "mean": round(m, 3),
            "sd": None if sd is None else round(sd, 3),
            "min": min(vals),
            "max": max(vals),
            "values": vals,
        }
    out.update(
        params=records[0]["params"],
        macs=records[0]["macs"],
        epochs=round(statistics.fmean(r["epochs"] for r in records), 3),
        train_images_per_s=round(statistics.fmean(r["train_images_per_s"] for r in records), 1),
        wall_seconds=round(statistics.fmean(r["wall_seconds"] for r in records), 1),
        commands=[r["command"] for r in records],
    )
    return out


def paired_difference(a: Sequence[dict], b: Sequence[dict]) -> dict[str, Any] | None:
    """Test top-1 of ``a`` minus ``b``, paired by seed (same seed = same data order)."""
    by_seed = {r["spec"]["seed"]: r["top1"] for r in b}
    diffs = [r["top1"] - by_seed[r["spec"]["seed"]] for r in a if r["spec"]["seed"] in by_seed]
    if not diffs:
        return None
    m, sd = mean_sd(diffs)
    return {
        "mean": round(m, 3),
        "sd": None if sd is None else round(sd, 3),
        "values": diffs,
        "a_wins": sum(d > 0 for d in diffs),
        "n": len(diffs),
    }


def collect(phases: Sequence[str], s: Settings, records: dict[str, dict]) -> dict[str, Any]:
    """The tables' data for ``phases`` from the recorded runs (runs not done yet are left out)."""
    lrs = tuned_lr(records, s)
    got = lambda specs: [records[x.key()] for x in specs if x.key() in records]  # noqa: E731
    res: dict[str, Any] = {
        "lr": {
            m: {"optim.lr": lr, "lr_at_batch_128": lr_at_128(lr), "source": why}
            for m, (lr, why) in lrs.items()
        }
    }
    if "tune" in phases:
        rows = []
        for m in MODELS:
            for lr, spec in tune_specs(s, m):
                if spec.key() in records:
                    r = records[spec.key()]
                    rows.append(
                        {
                            "model": m,
                            "optim.lr": lr,
                            "lr_at_batch_128": lr_at_128(lr),
                            "val_top1": r["val_top1"],
                            "epochs": r["epochs"],
                            "chosen": lrs[m][0] == lr and lrs[m][1].startswith("tuned"),
                            "minutes": s.tune_minutes,
                            "command": r["command"],
                        }
                    )
        res["tune"] = rows
    if "main" in phases:
        main: dict[str, Any] = {}
        for proto, make in (("equal epochs", epochs_spec), ("equal time", time_spec)):
            groups = {m: got([make(s, m, seed, lrs[m][0]) for seed in s.seeds]) for m in MODELS}
            main[proto] = {m: summarize(g) for m, g in groups.items()}
            main[proto]["tnt_minus_vit"] = paired_difference(groups[TNT], groups[VIT])
        res["main"] = main
    if "ablations" in phases:
        rows = []
        base = got([epochs_spec(s, TNT, seed, lrs[TNT][0]) for seed in s.ablation_seeds])
        vit = got([epochs_spec(s, VIT, seed, lrs[VIT][0]) for seed in s.ablation_seeds])
        rows.append({"variant": "TNT mini (baseline)", "change": {}, **summarize(base)})
        for label, v in ABLATIONS.items():
            runs = got([epochs_spec(s, TNT, seed, lrs[TNT][0], v) for seed in s.ablation_seeds])
            rows.append(
                {
                    "variant": label,
                    "change": v,
                    **summarize(runs),
                    "minus_baseline": paired_difference(runs, base),
                }
            )
        rows.append(
            {
                "variant": "ViT mini (no inner transformer)",
                "change": {"inner_blocks": []},
                **summarize(vit),
                "minus_baseline": paired_difference(vit, base),
            }
        )
        res["ablations"] = rows
    if "transfer" in phases:
        rows = []
        for m in MODELS:
            for k in s.labels_per_class:
                trio = [transfer_specs(s, m, k, seed, lrs[m][0]) for seed in s.transfer_seeds]
                ft, sc = got([t[1] for t in trio]), got([t[2] for t in trio])
                for init, runs in (("pre-trained on Fashion-MNIST", ft), ("from scratch", sc)):
                    rows.append(
                        {
                            "model": m,
                            "labels_per_class": k,
                            "init": init,
                            **summarize(runs),
                            "steps": s.finetune_steps,
                        }
                    )
        res["transfer"] = rows
    return res


# ------------------------------------------------------------------------------------ rendering


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}%"


def _diff(d: dict | None) -> str:
    if not d:
        return "-"
    sd = "" if d["sd"] is None else f" ± {d['sd']:.2f}"
    return f"{d['mean']:+.2f}{sd} points (higher in {d['a_wins']}/{d['n']} seeds)"


def _n_epochs(n: int) -> str:
    return f"{n} epoch{'s' if n != 1 else ''}"


def _seeds(seeds: Sequence[int]) -> str:
    return ", ".join(map(str, seeds))


def _g(summary: dict, name: str) -> list[float]:
    return summary.get(name, {}).get("values", [])


def render_section(res: dict[str, Any], *, command: str, s: Settings, figure: str | None) -> str:
    """The markdown section (between the markers) for the results ``res`` of :func:`collect`."""
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [
        BEGIN,
        "## TNT against ViT at equal budget (issue 14)",
        "",
        f"Last written by `{command}` ({when}); the whole campaign: `{canonical_command(s)}`. "
        "`tnt_mini_patch4_28` against `vit_mini_patch4_28` (the same outer "
        "network without inner transformers) on the real Fashion-MNIST, small-image recipe, "
        f"batch {s.batch_size}, {s.procs} one-thread process(es), one run at a time; same validation split "
        "and same data order per seed for both models. Protocol: docs/evidence.md. Every run, with the "
        "command that reproduces it: `benchmarks/results/tnt_vs_vit.json`.",
        "",
        "Learning rate (Muon + AdamW, `optim.lr` at batch 256): "
        + "; ".join(f"`{m}` {v['optim.lr']:g} ({v['source']})" for m, v in res["lr"].items())
        + ".",
        "",
    ]
    if "tune" in res:
        lines += [
            f"### Tuning (validation only; {s.tune_minutes:g} min of training per trial, seed {s.seeds[0]}, "
            "the same grid for both models)",
            "",
            "| model | lr at batch 128 | val top-1 | epochs | chosen |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| `{r['model']}` | {r['lr_at_batch_128']:.3g} | {r['val_top1']:.2f}% | {r['epochs']:.2f} "
            f"| {'yes' if r['chosen'] else ''} |"
            for r in res["tune"]
        ] or ["| (not run yet) | | | | |"]
        lines.append("")
    if "main" in res:
        lines += [
            "### Main comparison",
            "",
            "| protocol | model | params | MACs | test top-1 (mean ± sd, range) | val top-1 | epochs "
            "| training images/s | wall time per run |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for proto, by_model in res["main"].items():
            budget = _n_epochs(s.epochs) if proto == "equal epochs" else f"{s.minutes:g} min of training"
            for m in MODELS:
                g = by_model[m]
                if not g.get("n"):
                    lines.append(f"| {proto} ({budget}) | `{m}` | | | (not run yet) | | | | |")
                    continue
                lines.append(
                    f"| {proto} ({budget}) | `{m}` | {g['params']:,} | {g['macs'] / 1e6:.1f} M "
                    f"| {fmt_spread(_g(g, 'test_top1'))} | {fmt_spread(_g(g, 'val_top1'))} "
                    f"| {g['epochs']:.2f} "
                    f"| {g['train_images_per_s']:.0f} | {g['wall_seconds'] / 60:.1f} min |"
                )
            lines.append(
                f"| {proto}: TNT - ViT, paired by seed | | | | {_diff(by_model['tnt_minus_vit'])} | | | | |"
            )
        lines.append("")
        if figure:
            lines += [f"![validation top-1 against epochs and minutes]({figure})", ""]
    if "ablations" in res:
        lines += [
            f"### Ablations of the TNT mini ({_n_epochs(s.epochs)}, seeds {_seeds(s.ablation_seeds)})",
            "",
            "| variant | params | MACs | test top-1 | val top-1 | minus baseline (test) | train images/s |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in res["ablations"]:
            if not r.get("n"):
                lines.append(f"| {r['variant']} | | | (not run yet) | | | |")
                continue
            lines.append(
                f"| {r['variant']} | {r['params']:,} | {r['macs'] / 1e6:.1f} M "
                f"| {fmt_spread(_g(r, 'test_top1'))} "
                f"| {fmt_spread(_g(r, 'val_top1'))} | {_diff(r.get('minus_baseline'))} "
                f"| {r['train_images_per_s']:.0f} |"
            )
        lines.append("")
    if "transfer" in res:
        lines += [
            f"### Transfer to scikit-learn's digits ({s.finetune_steps} steps, fresh head, the recipe's "
            f"rate; test: digits' held-out half; seeds {_seeds(s.transfer_seeds)})",
            "",
            "| model | labels per class | init | digits test top-1 | digits val top-1 |",
            "|---|---|---|---|---|",
        ]
        for r in res["transfer"]:
            lines.append(
                f"| `{r['model']}` | {r['labels_per_class']} | {r['init']} | "
                f"{fmt_spread(_g(r, 'test_top1')) if r.get('n') else '(not run yet)'} "
                f"| {fmt_spread(_g(r, 'val_top1')) if r.get('n') else ''} |"
            )
        lines.append("")
    lines.append(END)
    return "\n".join(lines) + "\n"


def replace_section(text: str, section: str) -> str:
    """``text`` with its marked section replaced by ``section`` (appended when it has none)."""
    start, end = text.find(BEGIN), text.find(END)
    if start != -1 and end != -1 and end > start:
        return text[:start] + section.rstrip("\n") + text[end + len(END) :]
    return text.rstrip("\n") + "\n\n" + section


def plot(records: dict[str, dict], s: Settings, path: Path) -> Path | None:
    """Validation top-1 against epochs and against minutes of training, both models (equal-epoch runs,
    one thin line per seed and their mean; the equal-time runs' final points on the minutes panel)."""
    from matplotlib.figure import Figure

    lrs = {m: lr for m, (lr, _) in tuned_lr(records, s).items()}
    colors = {TNT: "tab:blue", VIT: "tab:orange"}
    fig = Figure(figsize=(11, 4.2), layout="tight")
    ax_e, ax_t = fig.subplots(1, 2)
    drawn = False
    for m in MODELS:
        runs = [
            records[x.key()]
            for x in (epochs_spec(s, m, seed, lrs[m]) for seed in s.seeds)
            if x.key() in records
        ]
        for i, r in enumerate(runs):
            ep = [p["epoch"] for p in r["curve"]]
            val = [p["val_top1"] for p in r["curve"]]
            mins = [p["train_minutes"] for p in r["curve"]]
            label = f"{m} (equal epochs)" if i == 0 else None
            ax_e.plot(ep, val, marker="o", color=colors[m], alpha=0.8, lw=1, label=label)
            ax_t.plot(mins, val, marker="o", color=colors[m], alpha=0.8, lw=1, label=label)
            drawn = True
        timed = [
            records[x.key()]
            for x in (time_spec(s, m, seed, lrs[m]) for seed in s.seeds)
            if x.key() in records
        ]
        if timed:
            ax_t.scatter(
                [r["train_seconds"] / 60 for r in timed],
                [r["val_top1"] for r in timed],
                marker="*",
                s=90,
                color=colors[m],
                edgecolor="black",
                label=f"{m} ({s.minutes:g} min budget)",
                zorder=3,
            )
            drawn = True
    if not drawn:
        return None
    ax_e.set(xlabel="epoch", ylabel="validation top-1 (%)", title="against epochs")
    ax_t.set(
        xlabel="minutes of training (evaluation excluded)",
        ylabel="validation top-1 (%)",
        title="against training time",
    )
    for ax in (ax_e, ax_t):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Fashion-MNIST validation accuracy, one line per seed")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def canonical_command(s: Settings) -> str:
    """The command that runs (or completes) the whole campaign with these settings."""
    parts = ["python", "benchmarks/tnt_vs_vit.py", "--phase", "all"]
    if s.quick:
        parts.append("--quick")
    parts += ["--seeds", *map(str, s.seeds), "--ablation-seeds", *map(str, s.ablation_seeds)]
    parts += [
        "--epochs",
        str(s.epochs),
        "--minutes",
        f"{s.minutes:g}",
        "--tune-minutes",
        f"{s.tune_minutes:g}",
    ]
    parts += ["--procs", str(s.procs)]
    return shlex.join(parts)


def write_outputs(s: Settings, camp: Campaign, paths: dict[str, Path], command: str) -> dict:
    """The JSON, the markdown section and the figure from every recorded run of the campaign (all phases:
    a phase not run yet shows as such, so rerunning one phase never drops another's table)."""
    phases = PHASES
    res = collect(phases, s, camp.records)
    fig = plot(camp.records, s, paths["figure"])
    rel = None
    if fig is not None:
        try:
            rel = str(fig.resolve().relative_to(paths["markdown"].resolve().parent))
        except ValueError:
            rel = str(fig)
    keys = {spec.key() for spec in plan(phases, s, camp.records)}
    doc = {
        "issue": 14,
        "written": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "command": command,
        "reproduce": canonical_command(s),
        "settings": dataclasses.asdict(s),
        "phases": list(phases),
        "results": res,
        "runs": [r for k, r in camp.records.items() if k in keys],
    }
    paths["json"].parent.mkdir(parents=True, exist_ok=True)
    paths["json"].write_text(json.dumps(doc, indent=2) + "\n")
    md = paths["markdown"]
    old = md.read_text() if md.is_file() else "# Benchmarks\n"
    md.write_text(replace_section(old, render_section(res, command=command, s=s, figure=rel)))
    return doc


# ------------------------------------------------------------------------------------ command line


def _train(argv: list[str]) -> int:
    """``tnt_vs_vit.py _train VARIANT_JSON BASE_MODEL train ...``: `tnt train` of a registered variant."""
    from tntvision.cli import main
    from tntvision.models.registry import get_model_entry, register_model
    from tntvision.models.tnt import build_tnt

    variant, base = json.loads(argv[0]), argv[1]
    entry = get_model_entry(base)
    register_model(variant_name(base, variant), build_tnt, entry.config.replace(**variant), entry.meta)
    return main(argv[2:])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--phase", default="all", help="tune, main, ablations, transfer or all (comma-separated list ok)"
    )
    p.add_argument(
        "--seeds", type=int, nargs="+", help="seeds of main (default 0 1 2); transfer uses them too"
    )
    p.add_argument("--ablation-seeds", type=int, nargs="+", help="seeds of the ablations (default 0 1)")
    p.add_argument("--epochs", type=int, help="epochs of the equal-epoch runs (default 2)")
    p.add_argument("--minutes", type=float, help="training minutes of the equal-time runs (default 2)")
    p.add_argument("--tune-minutes", type=float, help="training minutes per tuning trial (default 1.5)")
    p.add_argument("--procs", type=int, help="torchrun processes per run, one thread each (default 2)")
    p.add_argument(
        "--out", type=Path, help="campaign folder (default runs/tnt_vs_vit, quick: runs/tnt_vs_vit_quick)"
    )
    p.add_argument(
        "--fmnist-dir",
        type=Path,
        help="Fashion-MNIST IDX folder (default: $TNT_FASHION_MNIST_DIR "
        "or /usr/share/datasets/fashion-mnist)",
    )
    p.add_argument(
        "--quick", action="store_true", help="tiny subsets and budgets, seconds per run (smoke check)"
    )
    p.add_argument("--dry-run", action="store_true", help="print the plan and the estimate, run nothing")
    p.add_argument("--results", type=Path, help="JSON to write (default benchmarks/results/tnt_vs_vit.json)")
    p.add_argument(
        "--markdown", type=Path, help="markdown file whose section is replaced (default BENCHMARKS.md)"
    )
    p.add_argument("--figure", type=Path, help="PNG (default docs/figures/tnt_vs_vit.png)")
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    s = Settings(**QUICK) if args.quick else Settings()
    changes: dict[str, Any] = {}
    if args.seeds:
        changes.update(seeds=tuple(args.seeds), transfer_seeds=tuple(args.seeds))
    for name in ("ablation_seeds",):
        if getattr(args, name):
            changes[name] = tuple(getattr(args, name))
    for name in ("epochs", "minutes", "tune_minutes", "procs"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    return dataclasses.replace(s, **changes)


def phases_from(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    if "all" in names:
        return list(PHASES)
    unknown = sorted(set(names) - set(PHASES))
    if unknown or not names:
        raise SystemExit(f"unknown phase(s) {unknown}; choose from {', '.join(PHASES)} or all")
    return [p for p in PHASES if p in names]  # tune first: the others use its rates


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    s = settings_from(args)
    phases = phases_from(args.phase)
    out = args.out or ROOT / "runs" / ("tnt_vs_vit_quick" if s.quick else "tnt_vs_vit")
    fmnist_dir = args.fmnist_dir or Path(
        os.environ.get("TNT_FASHION_MNIST_DIR") or "/usr/share/datasets/fashion-mnist"
    )
    if s.quick:  # quick numbers never go into the repository's BENCHMARKS.md, results or figures
        paths = {
            "json": out / "tnt_vs_vit.json",
            "markdown": out / "BENCHMARKS.md",
            "figure": out / "tnt_vs_vit.png",
        }
    else:
        paths = {
            "json": ROOT / "benchmarks" / "results" / "tnt_vs_vit.json",
            "markdown": ROOT / "BENCHMARKS.md",
            "figure": ROOT / "docs" / "figures" / "tnt_vs_vit.png",
        }
    paths.update(
        {k: v for k, v in (("json", args.results), ("markdown", args.markdown), ("figure", args.figure)) if v}
    )
    command = shlex.join(["python", "benchmarks/tnt_vs_vit.py", *(sys.argv[1:] if argv is None else argv)])
    camp = Campaign(out, s, fmnist_dir=fmnist_dir)

    # The rates of main/ablations/transfer come from tune: plan (and estimate) phase by phase, replanning
    # after tune so that what runs is what the tables will look up.
    todo = pending(plan(phases, s, camp.records), camp.records)
    est = [estimate_seconds(x, camp.records, s) for x in todo]
    total = sum(est)
    print(
        f"campaign {out}: phases {', '.join(phases)}; {len(todo)} runs to do "
        f"({len(plan(phases, s, camp.records)) - len(todo)} already recorded), "
        f"estimated {total / 60:.0f} min "
        f"({s.procs} process(es) per run, one run at a time)",
        file=sys.stderr,
        flush=True,
    )
    listed: set[str] = set()
    for phase in phases:  # a run shared with an earlier phase is counted there
        part = [x for x in pending(plan([phase], s, camp.records), camp.records) if x.key() not in listed]
        listed |= {x.key() for x in part}
        mins = sum(estimate_seconds(x, camp.records, s) for x in part) / 60
        alone = len(pending(plan([phase], s, camp.records), camp.records))
        print(f"  {phase}: {len(part)} runs, ~{mins:.0f} min ({alone} runs when run alone)", file=sys.stderr)
    if (
        "tune" in phases
        and any(p != "tune" for p in phases)
        and any(not x.label.startswith("tune") for x in todo)
    ):
        print("  (runs after tune use its rates: the list is final once tune is done)", file=sys.stderr)
    if args.dry_run:
        for x in todo:
            print(
                f"  {x.label}: {x.model} {x.variant_dict or ''} seed {x.seed} key {x.key()}", file=sys.stderr
            )
        return 0
    from tntvision.kernels import fused_available

    fused_available()  # build the fused CPU kernel now, not inside the first run's time budget
    done = 0
    for phase in phases:
        for spec in pending(plan([phase], s, camp.records), camp.records):
            left = pending(plan(phases, s, camp.records), camp.records)
            eta = sum(estimate_seconds(x, camp.records, s) for x in left)
            done += 1
            camp.run(spec, index=done, total=done + len(left) - 1, eta=eta)
            write_outputs(s, camp, paths, command)  # tables stay current if the campaign stops
    write_outputs(s, camp, paths, command)
    print(f"wrote {paths['json']}, {paths['markdown']} (section {BEGIN}), {paths['figure']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_train":
        raise SystemExit(_train(sys.argv[2:]))
    raise SystemExit(main())
