"""Export speed and fidelity: a model exported every way `tnt export` can, run in every runtime tntvision
supports, against PyTorch eager fp32 and bf16, all in one process, interleaved.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/export_speed.py [TARGET ...] [--threads N] [--repeat 3]
        [--rounds 6] [--batch-size N] [--calibrate DATA] [--data DATA] [--json OUT] [--quick]

A TARGET is a checkpoint (run folder, ``model/`` folder, weights file) or a registered model name (built
with random weights, seed 0; ``--img-size`` or, with ``--quick``, 32 px). Default: ``runs/demo_s4`` (the
``make demo`` model) and ``tnt_s_patch16_224``. For each target the script

1. exports it with :func:`tntvision.tools.export.export_model` into a temporary folder: ONNX fp32, ONNX
   int8 dynamic, ONNX int8 static (QDQ, calibrated on ``--calibration-images`` train images of
   ``--calibrate``) and ``.pt2``;
2. times, interleaved round by round (order reversed every other round, as ``tnt bench`` does), images/s
   at ``--batch-size`` of: PyTorch fp32 eager (fused kernels on, as users run it), PyTorch bf16 autocast
   (``tnt bench --amp bfloat16``), PyTorch bf16 weights (``--dtype bfloat16``), each ONNX file under
   onnxruntime and under OpenVINO (``--runtime openvino``: fp32 inference precision), the ``.pt2`` file,
   and, on CPUs where OpenVINO's default inference precision is bf16, the fp32 ONNX file under that
   default too (what OpenVINO does when not told otherwise). All threads counts are ``--threads``;
3. repeats step 2 ``--repeat`` times (>= 3 for the record): the table gives the median of the runs and
   their min-max, and the ratio to PyTorch fp32 as the median of the per-run ratios (the number to read
   on a shared machine: both sides of a ratio saw the same load);
4. measures quality: output fidelity for every target (largest |logit - PyTorch fp32's|, that relative
   to the spread of PyTorch's logits, top-1 agreement with PyTorch fp32, on ``--fidelity-images`` test
   images of ``--data`` preprocessed for the model, or Gaussian noise when ``--data`` is unavailable), and
   top-1 accuracy on ``--data``'s test split for a checkpoint whose class names are the data's (the demo
   model on Fashion-MNIST). A model with random weights (TNT-S offline) has no accuracy to report: its
   rows show fidelity only.

It prints one markdown table per target, naming the CPU (``model name`` of /proc/cpuinfo, whether
``amx_tile`` and ``avx512_bf16`` are present), the versions and the command that made it; ``--json OUT``
also writes the raw numbers. Nothing in the repository is written. ``--quick`` (tiny sizes: batch 8,
registered models at 32 px with 2 blocks, 1 round, 16 calibration, 8 fidelity and 256 accuracy images)
checks that the script works in a minute or two; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import tntvision
from tntvision.errors import DataError
from tntvision.models.registry import get_model_entry
from tntvision.tools.bench import _time_interleaved
from tntvision.tools.export import export_model
from tntvision.tools.exported import load_exported, load_onnx_file

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TARGETS = ("runs/demo_s4", "tnt_s_patch16_224")
REFERENCE = "PyTorch fp32 eager"
# (label, file kind) of the exported files; the kind is the key of the temporary file
FILES = (
    ("ONNX fp32", "fp32.onnx"),
    ("ONNX int8 dynamic", "int8_dynamic.onnx"),
    ("ONNX int8 static (QDQ)", "int8_static.onnx"),
    ("pt2 (torch.export)", "model.pt2"),
)


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ the machine


def cpu_info() -> dict[str, Any]:
    """CPU name and the flags that decide which int8 / bf16 kernels run."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name in ("", platform.machine(), platform.processor()):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {
        "name": name,
        "amx_tile": "amx_tile" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "avx512_vnni": "avx512_vnni" in flags,
    }


def versions() -> dict[str, str]:
    out = {"torch": torch.__version__, "tntvision": tntvision.__version__}
    for package in ("onnxruntime", "openvino", "onnx"):
        try:
            module = __import__(package)
            out[package] = str(getattr(module, "__version__", "?")).split("-")[0]
        except ImportError:
            out[package] = "missing"
    return out


def openvino_default_precision() -> str | None:
    """OpenVINO's default INFERENCE_PRECISION_HINT on this CPU ('bf16' where it has bf16 units)."""
    try:
        import openvino as ov
    except ImportError:
        return None
    return ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT").to_string()  # "bf16", "f32", ...


# ------------------------------------------------------------------------------------------ the target


def resolve_target(target: str, work: Path, *, quick: bool, img_size: int | None) -> tuple[Path, bool]:
    """(a checkpoint folder to export, whether it has trained weights) for a path or a registered name.

    A name is built with random weights (seed 0) at ``img_size`` (None: its own); ``quick`` keeps two of
    its blocks (exporting takes seconds per block, and the numbers of --quick mean nothing anyway).
    """
    for cand in (Path(target), ROOT / target):
        if cand.exists():
            return cand, True
    entry = get_model_entry(target)  # an unknown name fails here, with suggestions
    torch.manual_seed(0)
    kw: dict[str, Any] = {} if img_size is None else {"img_size": img_size}
    if quick:
        kw["depth"] = min(entry.config.depth, 2)
    model = tntvision.create_model(target, **kw)
    folder = work / "model"
    tntvision.save_model(model, folder)
    return folder, False


def export_all(ckpt: Path, work: Path, args: argparse.Namespace, img_size: int | None) -> dict[str, dict]:
    """Every exported file of ``ckpt`` (file label -> path, size, export seconds, check difference)."""
    out: dict[str, dict] = {}
    for label, kind in FILES:
        fmt = "pt2" if kind.endswith(".pt2") else "onnx"
        kw: dict[str, Any] = {"img_size": img_size}
        if "int8" in kind:
            kw["quantize"] = "int8"
        if "static" in kind:
            kw.update(calibrate=args.calibrate, calibration_images=args.calibration_images)
        say(f"  export {label} ...")
        t0 = time.perf_counter()
        result = export_model(ckpt, format=fmt, out=work / kind, warn=say, **kw)
        out[label] = {
            "path": work / kind,
            "size_mb": result.size_bytes / 1e6,
            "export_s": time.perf_counter() - t0,
            "check_max_abs_diff": result.max_abs_diff,
            "quantize": result.quantize,
        }
    return out


class _Bf16Weights(nn.Module):
    """A bf16 copy of the model taking float32 images and returning float32 logits (``--dtype bfloat16``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = copy.deepcopy(model).to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(torch.bfloat16)).float()


class _Autocast(nn.Module):
    """The model under ``torch.autocast("cpu", bfloat16)`` (``--amp bfloat16``), float32 logits out."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.model(x).float()


def implementations(
    model: nn.Module, files: dict[str, dict], *, ov_default: str | None
) -> dict[str, tuple[nn.Module, dict[str, Any]]]:
    """label -> (float32 images -> float32 logits, row info), PyTorch fp32 first (the reference)."""
    impls: dict[str, tuple[nn.Module, dict[str, Any]]] = {
        REFERENCE: (model, {"runtime": "torch", "file": None}),
        "PyTorch bf16 autocast": (_Autocast(model), {"runtime": "torch", "file": None}),
        "PyTorch bf16 weights": (_Bf16Weights(model), {"runtime": "torch", "file": None}),
    }
    for label, info in files.items():
        path = info["path"]
        if path.suffix == ".pt2":
            impls[label] = (load_exported(path), {"runtime": "torch.export", "file": label})
            continue
        for runtime in ("onnxruntime", "openvino"):
            impls[f"{label} / {runtime}"] = (
                load_exported(path, runtime=runtime),
                {"runtime": runtime, "file": label},
            )
    if ov_default not in (None, "f32"):
        path = files["ONNX fp32"]["path"]
        impls[f"ONNX fp32 / openvino, its default {ov_default} precision"] = (
            load_onnx_file(path, runtime="openvino", precision=ov_default),
            {"runtime": "openvino", "file": "ONNX fp32", "precision": ov_default},
        )
    return impls


# ------------------------------------------------------------------------------------------ measuring


def time_runs(
    impls: dict[str, tuple[nn.Module, dict]], x: torch.Tensor, *, repeat: int, rounds: int, warmup: int
) -> list[dict[str, float]]:
    """Per run, per implementation: the median seconds of one call on ``x`` (interleaved)."""

    def call(m: nn.Module) -> Callable[[], None]:
        def run() -> None:
            with torch.inference_mode():
                m(x)

        return run

    runs = []
    for r in range(repeat):
        t0 = time.perf_counter()
        times = _time_interleaved({k: call(m) for k, (m, _) in impls.items()}, warmup=warmup, rounds=rounds)
        runs.append({k: statistics.median(v) for k, v in times.items()})
        say(f"  timing run {r + 1}/{repeat}: {time.perf_counter() - t0:.0f} s")
    return runs


def _test_set(data: str, meta: Any, *, limit: int | None):
    """(dataset, loader maker) of ``data``'s test split preprocessed for ``meta``; None if unavailable."""
    from torch.utils.data import DataLoader

    from tntvision.data import EvalBatches, build_dataset, eval_transform, has_image_tensor

    try:
        dataset = build_dataset(data, "test", transform=eval_transform(meta))
    except DataError as e:
        say(f"  note: {e}")
        return None
    if limit is not None and limit < len(dataset):
        index = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:limit].sort().values
        dataset = dataset.subset(index, split="test")
    if has_image_tensor(dataset):
        return dataset, lambda bs: EvalBatches(dataset, meta=meta, batch_size=bs)
    return dataset, lambda bs: DataLoader(dataset, batch_size=bs, shuffle=False)


def _first_images(loader, n: int) -> torch.Tensor:
    """The first ``n`` images of ``loader``'s batches (the rest is never preprocessed)."""
    parts, have = [], 0
    for x, _ in loader:
        parts.append(x[: n - have])
        have += len(parts[-1])
        if have >= n:
            break
    return torch.cat(parts)


@torch.inference_mode()
def fidelity(impls: dict[str, tuple[nn.Module, dict]], x: torch.Tensor, batch: int) -> dict[str, dict]:
    """Per implementation: largest |logit - PyTorch fp32's|, that over the std of PyTorch's logits, top-1
    agreement with PyTorch fp32, on the images ``x``."""
    logits = {k: torch.cat([m(part) for part in x.split(batch)]).float() for k, (m, _) in impls.items()}
    ref = logits[REFERENCE]
    scale = float(ref.std())
    out = {}
    for k, got in logits.items():
        diff = float((got - ref).abs().max())
        out[k] = {
            "max_abs_diff": diff,
            "max_abs_diff_over_std": diff / scale if scale > 0 else float("nan"),
            "top1_agreement": float((got.argmax(1) == ref.argmax(1)).float().mean()),
        }
    return out


@torch.inference_mode()
def accuracy(impls: dict[str, tuple[nn.Module, dict]], loader) -> dict[str, float]:
    """Per implementation: top-1 (percent) over ``loader`` (the same batches for every implementation)."""
    correct = dict.fromkeys(impls, 0)
    n = 0
    for x, y in loader:
        n += len(y)
        for k, (m, _) in impls.items():
            correct[k] += int((m(x).argmax(1) == y).sum())
    return {k: 100.0 * c / n for k, c in correct.items()}


def measure_target(target: str, args: argparse.Namespace, ov_default: str | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="tnt_export_speed_") as tmp:
        work = Path(tmp)
        # a registered name is built at its size (--quick: 32 px), a checkpoint exported at --img-size
        size = args.img_size or (32 if args.quick else None)
        ckpt, trained = resolve_target(target, work, quick=args.quick, img_size=size)
        export_size = args.img_size if trained else None
        if export_size is None:
            model = tntvision.load_model(ckpt).eval()
        else:  # as tnt export rebuilds it: position tables resampled, preprocessing at the new size
            model = tntvision.load_model(ckpt, img_size=export_size).eval()
            model.meta = model.meta.resolved(img_size=export_size)
        name = model.model_name
        size = model.meta.input_size[-1]
        batch = args.batch_size or (8 if args.quick else (128 if size <= 64 else 16))
        say(f"{target}: {name} at {size} px, batch {batch}")
        files = export_all(ckpt, work, args, export_size)
        impls = implementations(model, files, ov_default=ov_default)
        x = torch.randn(batch, *model.meta.input_size, generator=torch.Generator().manual_seed(0))
        runs = time_runs(impls, x, repeat=args.repeat, rounds=args.rounds, warmup=args.warmup)
        # quality
        test = None if args.data == "none" else _test_set(args.data, model.meta, limit=args.accuracy_images)
        if test is not None:
            dataset, loader = test
            images = _first_images(loader(batch), args.fidelity_images)
            inputs = f"{len(images)} {args.data} test images"
        else:
            images = torch.randn(args.fidelity_images, *model.meta.input_size)
            inputs = f"{args.fidelity_images} Gaussian-noise images"
        say(f"  fidelity on {inputs} ...")
        fid = fidelity(impls, images, batch)
        acc, acc_note = None, None
        names = getattr(model, "class_names", None)
        if not trained:
            acc_note = f"{name} has random weights (no trained weights offline): fidelity only, no accuracy"
        elif test is None:
            acc_note = f"{args.data} is unavailable: fidelity on noise only, no accuracy"
        elif names is None or [str(c) for c in dataset.classes] != list(names):
            acc_note = f"the checkpoint's classes are not {args.data}'s: fidelity only, no accuracy"
        else:
            say(f"  top-1 on {len(dataset)} {args.data} test images ...")
            acc = accuracy(impls, loader(batch))
        return {
            "target": target,
            "model": name,
            "trained": trained,
            "input_size": list(model.meta.input_size),
            "depth": model.cfg.depth,
            "batch_size": batch,
            "files": {k: {kk: vv for kk, vv in v.items() if kk != "path"} for k, v in files.items()},
            "impls": {k: info for k, (_, info) in impls.items()},
            "runs_s": runs,
            "fidelity": fid,
            "fidelity_inputs": inputs,
            "accuracy": acc,
            "accuracy_images": None if acc is None else len(dataset),
            "accuracy_note": acc_note,
        }


# ------------------------------------------------------------------------------------------ the table


def _spread(values: list[float], fmt: str) -> str:
    med = format(statistics.median(values), fmt)
    return med if len(values) == 1 else f"{med} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def table(res: dict[str, Any]) -> str:
    batch, runs = res["batch_size"], res["runs_s"]
    size = "x".join(str(s) for s in res["input_size"][1:])
    kind = "trained checkpoint" if res["trained"] else "random weights"
    lines = [
        f"### {res['model']} ({res['target']}, {kind}, {size} px, {res['depth']} blocks), batch {batch}",
        "",
        f"images/s: median of {len(runs)} runs (min-max); x PyTorch fp32: median of the per-run ratios of "
        "images/s (min-max). Fidelity against PyTorch fp32 eager on "
        f"{res['fidelity_inputs']}: largest |logit difference| (and over the std of PyTorch's logits), "
        "top-1 agreement." + (f" {res['accuracy_note']}." if res["accuracy_note"] else ""),
        "",
        "| implementation | runtime | file MB | images/s | x PyTorch fp32 | max abs logit diff | "
        "top-1 agreement |" + (f" test top-1 ({res['accuracy_images']} images) |" if res["accuracy"] else ""),
        "|---|---|---|---|---|---|---|" + ("---|" if res["accuracy"] else ""),
    ]
    for label, info in res["impls"].items():
        ips = [batch / run[label] for run in runs]
        ratio = [run[REFERENCE] / run[label] for run in runs]
        f = res["fidelity"][label]
        file_mb = f"{res['files'][info['file']]['size_mb']:.1f}" if info["file"] else ""
        runtime = info["runtime"] + (f" ({info['precision']})" if "precision" in info else "")
        row = (
            f"| {label} | {runtime} | {file_mb} | {_spread(ips, '.1f')} | {_spread(ratio, '.2f')} | "
            f"{f['max_abs_diff']:.2e} ({f['max_abs_diff_over_std']:.1%}) | {f['top1_agreement']:.1%} |"
        )
        if res["accuracy"]:
            row += f" {res['accuracy'][label]:.2f}% |"
        lines.append(row)
    exports = ", ".join(
        f"{k} {v['export_s']:.0f} s (check {v['check_max_abs_diff']:.1e})" for k, v in res["files"].items()
    )
    lines += ["", f"Export times (and the export's own max |logit difference| check): {exports}.", ""]
    return "\n".join(lines)


def header(
    cpu: dict[str, Any], vers: dict[str, str], args: argparse.Namespace, ov_default: str | None
) -> str:
    flags = ", ".join(f"{k}: {'yes' if cpu[k] else 'no'}" for k in ("amx_tile", "avx512_bf16", "avx512_vnni"))
    ver = ", ".join(f"{k} {v}" for k, v in vers.items())
    return "\n".join(
        [
            "## Export speed",
            "",
            f"CPU: {cpu['name']} ({flags}); {torch.get_num_threads()} thread(s) for every runtime; {ver}; "
            f"OpenVINO's default CPU inference precision here: {ov_default}. "
            f"{args.repeat} runs x {args.rounds} timed rounds (+{args.warmup} warm-up) per implementation, "
            "interleaved round by round in one process (order reversed every other round). PyTorch runs "
            "with the fused kernels on; OpenVINO rows run fp32 unless marked.",
            "",
            "",
        ]
    )


def command_line() -> str:
    env = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    return env + "python " + " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).as_posix(), *sys.argv[1:]])


# ------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "targets", nargs="*", default=list(DEFAULT_TARGETS), help="checkpoints or model names"
    )
    parser.add_argument("--threads", type=int, default=None, help="threads (default: torch's / OMP's)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of the whole timing (default: 3)")
    parser.add_argument("--rounds", type=int, default=6, help="timed calls per implementation and run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per implementation and run")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 128 up to 64 px, else 16")
    parser.add_argument("--img-size", type=int, default=None, help="export at this size (default: model's)")
    parser.add_argument("--calibrate", default="fashion-mnist", help="static int8 calibration data")
    parser.add_argument("--calibration-images", type=int, default=256)
    parser.add_argument("--data", default="fashion-mnist", help="test data for accuracy / fidelity, or none")
    parser.add_argument("--fidelity-images", type=int, default=64)
    parser.add_argument("--accuracy-images", type=int, default=None, help="default: the whole test split")
    parser.add_argument("--json", default=None, metavar="OUT", help="also write the raw numbers here")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the script, not the speed")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.warmup = min(args.rounds, 1), min(args.warmup, 1)
        args.calibration_images = min(args.calibration_images, 16)
        args.fidelity_images = min(args.fidelity_images, 8)
        args.accuracy_images = min(args.accuracy_images or 256, 256)
    if args.repeat < 1 or args.rounds < 1 or args.warmup < 0:
        parser.error("--repeat and --rounds must be >= 1, --warmup >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)  # before any runtime is built: they take torch's count
    cpu, vers, ov_default = cpu_info(), versions(), openvino_default_precision()
    t0 = time.time()
    results = [measure_target(t, args, ov_default) for t in args.targets]
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    text = header(cpu, vers, args, ov_default) + "\n".join(table(r) for r in results)
    text += f"\nProduced by `{command_line()}` ({stamp}, {time.time() - t0:.0f} s).\n"
    sys.stdout.write(text)
    if args.json:
        record = {"cpu": cpu, "versions": vers, "threads": torch.get_num_threads(), "args": vars(args)}
        record.update(openvino_default_precision=ov_default, command=command_line(), results=results)
        Path(args.json).write_text(json.dumps(record, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
