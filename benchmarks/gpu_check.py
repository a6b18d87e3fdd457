"""One prepared run for a lent GPU (issue 31): the CUDA tests, the speed table, a short training run and a
one-process nccl run, in under 8 minutes, into one JSON file.

    .venv/bin/python benchmarks/gpu_check.py [--out FILE] [--budget-s 450] [--train-minutes 1.5]
    .venv/bin/python benchmarks/gpu_check.py --dry-run --out /tmp/gpu_check_dry.json   # CPU, < 1 min

Sections, in this order (each guarded: a failure is recorded in the JSON and the next one runs; each is
given what is left of the global budget minus what the later ones need, and is skipped, saying so, when
too little is left):

- ``speed``, eager rows: TNT-S (ours) against timm's DeiT-S and timm's TNT-S (our weights), and the mini
  against its ViT twin: inference at batch 256 and a training step (forward, backward, AdamW) at batch
  64 (the mini's at 128, the demo's batch), all under bf16 autocast. Every row is one
  :func:`tntvision.tools.bench.bench_model` call in a process of its own (a kernel that corrupts the
  CUDA context, or a compile that does not finish, costs that row only): the models interleaved, CUDA
  events around every call after the warm-up, the median of the timed calls and their min-max, peak
  memory (``torch.cuda.max_memory_allocated``) of each model in a fresh process, and which inner
  transformer ran (``kernels.kernel_backend``). Meanwhile the fused CPU kernel builds (~1 minute; the
  tests need it on their CPU side) unless it is in its cache already.
- ``tests``: ``pytest -m cuda`` over tests/, and tests/test_triton_op.py if it exists (its tests not
  marked ``cuda``: the marked ones ran in the first call): counts and the tail of the output.
- ``ddp``: ``torchrun --standalone --nproc_per_node=1 -m tntvision.cli train ...``: a process group of
  one over nccl (DDP, all-reduces), a short run.
- ``train``: ``tnt train`` of the mini on the real Fashion-MNIST on the GPU for ``--train-minutes``
  (less if the budget is short); the run folder's ``summary.json`` (test top-1, images/s, ...).
- ``speed``, compiled rows (torch.compile, inductor): the same rows, as far as the budget goes.

The JSON (``--out``; default ``$OUT/gpu_check.json`` when ``$OUT`` is set, else
benchmarks/results/gpu_check.json) is rewritten after every section, so a killed run keeps what it did.
It ends with a table on stdout and the command that made it.

``--dry-run`` walks every section on the CPU (``CUDA_VISIBLE_DEVICES`` emptied for every child, one
thread each) with tiny sizes, the sections side by side (with no GPU to share they are independent): the
CUDA tests (skipped there), the mini rows at batch 2 with one timed call (the compiled one with
torch.compile's ``eager`` backend: traced, no code generated), a few seconds of training on a tiny
synthetic Fashion-MNIST, torchrun over gloo. The TNT-S rows need ~20 s each on 2 cores and are listed as
not run. Every section says ``"dry": true``; the default file is then gpu_check_dry.json.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.metadata
import json
import os
import platform
import re
import shlex
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).resolve()
FMNIST_DIR = "/usr/share/datasets/fashion-mnist"

TNT_S, MINI = "tnt_s_patch16_224", "tnt_mini_patch4_28"
DEIT, TIMM_TNT, VIT_MINI = "timm:deit_small_patch16_224", "timm", "tntvision:vit_mini_patch4_28"
COMPARE = {TNT_S: [DEIT, TIMM_TNT], MINI: [VIT_MINI]}
BATCH = {(TNT_S, "inference"): 256, (TNT_S, "train"): 64, (MINI, "inference"): 256, (MINI, "train"): 128}
# (model, workload, mode): eager rows first (with memory), compiled rows last, as far as the budget goes
ROWS = [
    (TNT_S, "inference", "eager"),
    (TNT_S, "train", "eager"),
    (MINI, "inference", "eager"),
    (MINI, "train", "eager"),
    (MINI, "inference", "compiled"),
    (MINI, "train", "compiled"),
    (TNT_S, "inference", "compiled"),
    (TNT_S, "train", "compiled"),
]
DRY_ROWS = {(MINI, "inference", "eager"), (MINI, "train", "eager"), (MINI, "inference", "compiled")}
EAGER_ROW_CAP_S = 150.0  # an eager row (3 models, memory probes included) takes well under a minute
SECTIONS = ("speed", "tests", "ddp", "train")  # run order; the compiled speed rows come last of all


# ------------------------------------------------------------------------------------------ plumbing


class Budget:
    """Seconds left of the whole run; each section asks for what it needs and gets at most what is left."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


def run_child(cmd: list[str], *, timeout: float, env: dict[str, str], cwd: Path = ROOT) -> dict[str, Any]:
    """Run ``cmd`` in a session of its own, its output in files (a process left behind cannot block the
    reading). On timeout: SIGTERM to its group (torchrun then stops its workers, which run in sessions of
    their own), SIGKILL to the group 10 s later. Returns ``returncode`` (None: stopped for time),
    ``stdout``, ``stderr``, ``seconds``."""
    t0 = time.monotonic()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err, start_new_session=True)
        try:
            code: int | None = proc.wait(timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired:
            _stop_group(proc)
            code = None
        out.seek(0)
        err.seek(0)
        return {
            "returncode": code,
            "stdout": out.read(),
            "stderr": err.read(),
            "seconds": round(time.monotonic() - t0, 2),
        }


def _stop_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def child_env(dry: bool, **extra: str) -> dict[str, str]:
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    if dry:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the dry run stays on the CPU, on any machine
        env["OMP_NUM_THREADS"] = "1"  # two spinning OpenMP threads crawl on a busy 2-core machine
    return env


def guarded(name: str, fn: Callable[[], dict[str, Any]], *, dry: bool) -> dict[str, Any]:
    """``fn()``'s section record, or the error it raised (the run goes on)."""
    t0 = time.monotonic()
    try:
        record = fn()
    except Exception as e:
        record = {"status": "error", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    record.setdefault("seconds", round(time.monotonic() - t0, 2))
    return {"section": name, "dry": dry, **record}


def write_json(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    tmp.replace(path)


def default_out(dry: bool) -> Path:
    name = "gpu_check_dry.json" if dry else "gpu_check.json"
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]) / name
    return ROOT / "benchmarks" / "results" / name


# ------------------------------------------------------------------------------------------ environment


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def kernel_backends(device: str) -> dict[str, str]:
    """Which inner transformer the models run on ``device`` (``kernels.kernel_backend``), for float32 and
    bfloat16 words."""
    import torch

    from tntvision import kernels

    out = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        try:
            out[name] = kernels.kernel_backend(torch.device(device), dtype)
        except Exception as e:
            out[name] = f"error: {type(e).__name__}: {e}"
    return out


def environment(device: str) -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "timm": _version("timm"),
        "triton": _version("triton"),
        "cpu_count": os.cpu_count(),
        "device": device,
        "cuda_available": torch.cuda.is_available(),
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(
            gpu=torch.cuda.get_device_name(0),
            gpu_count=torch.cuda.device_count(),
            gpu_memory_gb=round(props.total_memory / 2**30, 1),
            compute_capability=f"{props.major}.{props.minor}",
            bf16=torch.cuda.is_bf16_supported(),
        )
    git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False)
    env["commit"] = git.stdout.strip() or None
    try:
        env["kernel_backend"] = kernel_backends(device)
    except Exception as e:
        env["kernel_backend"] = f"error: {type(e).__name__}: {e}"
    return env


# ------------------------------------------------------------------------------------------ tests


def junit_counts(path: Path) -> dict[str, int]:
    """Test counts of a pytest ``--junitxml`` file."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


def tests_section(args: argparse.Namespace, budget: Budget, reserve: float) -> dict[str, Any]:
    """The CUDA tests (pytest in a child process per selection), each given what is left but ``reserve``."""
    selections = [["-m", "cuda", "tests/test_cuda_paths.py" if args.dry_run else "tests"]]
    triton = ROOT / "tests" / "test_triton_op.py"
    if triton.exists() and not args.dry_run:
        selections.append(["-m", "not cuda", str(triton.relative_to(ROOT))])
    runs = []
    for i, selection in enumerate(selections):
        timeout = min(args.tests_cap_s, budget.left() - reserve)
        if timeout < 20:
            runs.append({"selection": selection, "status": "skipped", "reason": "time budget"})
            continue
        junit = args.work / f"pytest_{i}.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *selection]
        res = run_child([*cmd, f"--junitxml={junit}"], timeout=timeout, env=child_env(args.dry_run))
        run: dict[str, Any] = {
            "selection": selection,
            "command": shlex.join(cmd),
            "returncode": res["returncode"],
            "seconds": res["seconds"],
            "tail": tail(res["stdout"] + res["stderr"]),
        }
        if res["returncode"] is None:
            run["status"] = "timeout"
        elif res["returncode"] in (0, 5):  # 5: nothing selected (no test of the selection here)
            run["status"] = "ok"
        else:
            run["status"] = "failed"
        if junit.exists():
            run["counts"] = junit_counts(junit)
        runs.append(run)
    totals = {
        k: sum(r.get("counts", {}).get(k, 0) for r in runs)
        for k in ("tests", "passed", "failures", "errors", "skipped")
    }
    statuses = {r["status"] for r in runs}
    status = "ok" if statuses == {"ok"} else ("failed" if statuses & {"failed", "timeout"} else "partial")
    return {"status": status, "runs": runs, "counts": totals}


# ------------------------------------------------------------------------------------------ speed


def row_spec(model: str, workload: str, mode: str, *, dry: bool, rounds: int, warmup: int) -> dict[str, Any]:
    """The :func:`bench_model` arguments of one row of the table."""
    spec: dict[str, Any] = {
        "model_name": model,
        "compare": COMPARE[model],
        "batch_size": 2 if dry else BATCH[(model, workload)],
        "amp": "none" if dry else "bfloat16",
        "train": workload == "train",
        "workloads": ("inference",) if workload == "inference" else (),
        "rounds": 1 if dry else rounds,
        "warmup": 0 if dry else warmup,
        "memory": mode == "eager" and not dry,
        "compile": ("eager" if dry else True) if mode == "compiled" else False,
        "device": "cpu" if dry else "cuda",
    }
    return spec


def summarise_row(model: str, workload: str, mode: str, result: dict[str, Any]) -> dict[str, Any]:
    """One row of the table from a :func:`bench_model` result: per implementation median / min / max ms,
    img/s and peak MB, and the ratios the issue asks for (time over time: < 1 is faster)."""
    per = result[workload]["per_impl"]
    memory = result.get("memory", {}).get("per_impl", {})
    impls = {
        name: {
            "median_ms": s["median_ms"],
            "min_ms": s["min_ms"],
            "max_ms": s["max_ms"],
            "img_per_s": s["img_per_s"],
            "peak_mb": memory[name]["peak_mb"] if name in memory else None,
        }
        for name, s in per.items()
    }
    time_ratio, speedup = result[workload]["time_ratio"], result[workload]["speedup"]
    if model == TNT_S:
        ratios = {"tnt_s_over_deit_s": time_ratio[DEIT], "timm_tnt_s_over_ours": speedup[TIMM_TNT]}
    else:
        ratios = {"tnt_mini_over_vit_mini": time_ratio[VIT_MINI]}
    return {
        "per_impl": impls,
        "ratios": ratios,
        "compile_s": result.get("compile_s"),
        "memory_measured_as": result.get("memory", {}).get("measured_as"),
        "timing": result["timing"],
        "device_name": result["device_name"],
        "rounds": result["rounds"],
    }


def bench_rows(specs: list[dict[str, Any]]) -> None:
    """Child mode (``--rows-json``): run each spec, print one JSON line per row as soon as it is done."""
    import torch

    from tntvision.tools.bench import bench_model

    for spec in specs:
        t0 = time.monotonic()
        try:
            torch.manual_seed(0)
            kwargs = {k: v for k, v in spec.items() if k != "key"}
            line = {"key": spec["key"], "result": bench_model(**kwargs)}
            line["kernel_backend"] = kernel_backends(spec["device"])
        except Exception as e:
            line = {
                "key": spec["key"],
                "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc(),
            }
        line["seconds"] = round(time.monotonic() - t0, 2)
        print(json.dumps(line, default=str), flush=True)
        if spec["device"] == "cuda":
            torch.cuda.empty_cache()


def speed_section(args: argparse.Namespace, budget: Budget, reserve: float, *, modes: set[str]) -> list:
    """The rows of these modes (eager, compiled): a child process per row (all rows in one child in a dry
    run), each given what is left of the budget but ``reserve``."""
    rows = [r for r in ROWS if r[2] in modes]
    records, pending = [], []
    for model, workload, mode in rows:
        key = f"{model} {workload} {mode}"
        if args.dry_run and (model, workload, mode) not in DRY_ROWS:
            records.append(
                _row_record(key, "not run", reason="dry run: TNT-S rows take ~20 s each on 2 cores")
            )
            continue
        spec = row_spec(model, workload, mode, dry=args.dry_run, rounds=args.rounds, warmup=args.warmup)
        pending.append({**spec, "key": key})
    groups = [pending] if args.dry_run else [[s] for s in pending]
    for group in groups:
        if not group:
            continue
        timeout = budget.left() - reserve
        if group[0]["compile"] is False and not args.dry_run:
            timeout = min(timeout, EAGER_ROW_CAP_S)  # an eager row that takes longer is stuck
        if timeout < (20 if args.dry_run else 45):
            records += [_row_record(s["key"], "skipped", reason="time budget") for s in group]
            continue
        cmd = [sys.executable, str(SCRIPT), "--rows-json", json.dumps(group)]
        res = run_child(cmd, timeout=timeout, env=child_env(args.dry_run))
        done = {}
        for line in res["stdout"].splitlines():
            if line.startswith("{"):
                item = json.loads(line)
                done[item["key"]] = item
        for spec in group:
            item = done.get(spec["key"])
            if item is None:
                why = "timeout" if res["returncode"] is None else f"child exited {res['returncode']}"
                records.append(_row_record(spec["key"], "error", reason=why, log=tail(res["stderr"])))
            elif "error" in item:
                records.append(_row_record(spec["key"], "error", reason=item["error"], log=item["traceback"]))
            else:
                model, workload, mode = spec["key"].split()
                row = summarise_row(model, workload, mode, item["result"])
                records.append(
                    _row_record(
                        spec["key"],
                        "ok",
                        seconds=item["seconds"],
                        batch_size=spec["batch_size"],
                        amp=spec["amp"],
                        kernel_backend=item["kernel_backend"],
                        **row,
                        bench=item["result"],
                    )
                )
    return records


def _row_record(key: str, status: str, **fields: Any) -> dict[str, Any]:
    model, workload, mode = key.split()
    return {"model": model, "workload": workload, "mode": mode, "status": status, **fields}


# ------------------------------------------------------------------------------------------ training


def write_idx(path: Path, array) -> None:
    """``array`` (uint8) as a gzipped IDX file, the format of Fashion-MNIST's files."""
    import numpy as np

    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()))


def synthetic_fashion_mnist(folder: Path, n_train: int = 160, n_test: int = 40) -> Path:
    """A tiny Fashion-MNIST-format folder for the dry run: noise with a bar whose row gives the class."""
    import numpy as np

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.permutation(np.arange(n) % 10).astype(np.uint8)
        images = rng.integers(0, 60, size=(n, 28, 28), dtype=np.uint8)
        for i, label in enumerate(labels):
            images[i, 2 + 2 * int(label) : 5 + 2 * int(label)] = 230
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", labels)
    return folder


SUMMARY_KEYS = (
    "top1",
    "top5",
    "val_top1",
    "epochs",
    "images_seen",
    "train_images_per_s",
    "wall_seconds",
    "train_seconds",
    "stopped_by",
    "processes",
    "backend",
    "device",
    "device_name",
    "amp",
)


def train_run(args: argparse.Namespace, budget: Budget, *, ddp: bool, minutes: float, reserve: float):
    """``tnt train`` (or a one-process torchrun of it) of the mini on Fashion-MNIST; its summary."""
    fm = args.work / ("fm_ddp" if ddp else "fm_train")  # a folder each: a dry run runs both at once
    data_dir = synthetic_fashion_mnist(fm) if args.dry_run else Path(args.fmnist)
    out = args.work / ("ddp_run" if ddp else "train_run")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    cmd = (launcher if ddp else [sys.executable]) + ["-m", "tntvision.cli", "train", "--model", MINI]
    cmd += ["--data", "fashion-mnist", "--out", str(out), "--device", "cpu" if args.dry_run else "cuda"]
    if args.dry_run:
        cmd += ["--epochs", "1", "--batch-size", "16", "--set", "amp=none"]
    else:
        cmd += ["--epochs", "1" if ddp else "30", "--time-budget", f"{minutes:g}"]
    cmd += ["--json"]
    timeout = min(minutes * 60 + (60 if args.dry_run else 90), budget.left() - reserve)
    if timeout < (15 if args.dry_run else 45):
        return {"status": "skipped", "reason": "time budget", "command": shlex.join(cmd)}
    env = child_env(args.dry_run, TNT_FASHION_MNIST_DIR=str(data_dir))
    res = run_child(cmd, timeout=timeout, env=env)
    record: dict[str, Any] = {
        "command": shlex.join(cmd),
        "data": "synthetic Fashion-MNIST (160 train / 40 test)" if args.dry_run else str(data_dir),
        "returncode": res["returncode"],
        "seconds": res["seconds"],
        "run_folder": str(out),
    }
    summary_file = out / "summary.json"
    if res["returncode"] == 0 and summary_file.exists():
        summary = json.loads(summary_file.read_text())
        record.update(status="ok", summary={k: summary.get(k) for k in SUMMARY_KEYS})
        if ddp:
            want = "gloo" if args.dry_run else "nccl"
            record["backend_ok"] = summary.get("backend") == want
            if not record["backend_ok"]:
                record["status"] = "failed"
    else:
        record.update(status="timeout" if res["returncode"] is None else "failed")
        errors = [line for line in res["stderr"].splitlines() if re.search(r"\berror: |Error: ", line)]
        record["reason"] = errors[0] if errors else f"exit code {res['returncode']}"
        record["tail"] = tail(res["stderr"], 25)
    return record


def dry_run_or_built(args: argparse.Namespace) -> bool:
    """Whether the fused CPU kernel needs no build here: a dry run (the machine that runs it has it, or
    builds it in the tests), or a kernel already in its cache folder."""
    if args.dry_run:
        return True
    from tntvision import kernels

    return any(kernels.build_directory().glob("*.so"))


# ------------------------------------------------------------------------------------------ report


def format_table(report: dict[str, Any]) -> str:
    """The table printed at the end: test counts, every speed row, the two training runs."""
    s = report["sections"]
    lines = [
        f"gpu_check on {report['environment'].get('gpu', report['environment']['device'])}"
        + ("  (DRY RUN: CPU, tiny sizes; no GPU figures)" if report["dry_run"] else "")
    ]
    if "tests" in s:
        c = s["tests"].get("counts", {})
        lines.append(
            f"tests: {s['tests']['status']}  passed {c.get('passed', 0)}  failed {c.get('failures', 0)}  "
            f"errors {c.get('errors', 0)}  skipped {c.get('skipped', 0)}"
        )
    if "speed" in s:
        lines.append(
            f"{'model':<20}{'workload':<11}{'mode':<10}{'impl':<30}{'median ms':>11} {'(min-max)':>17}"
            f"{'img/s':>10}{'peak MB':>9}"
        )
        for row in s["speed"].get("rows", []):
            head = f"{row['model']:<20}{row['workload']:<11}{row['mode']:<10}"
            if row["status"] != "ok":
                lines.append(f"{head}{row['status']}: {row.get('reason', '')}"[:160])
                continue
            for name, m in row["per_impl"].items():
                spread = f"({m['min_ms']:.1f}-{m['max_ms']:.1f})"
                peak = "-" if m["peak_mb"] is None else f"{m['peak_mb']:.0f}"
                lines.append(
                    f"{head}{name:<30}{m['median_ms']:11.1f} {spread:>17}{m['img_per_s']:10.0f}{peak:>9}"
                )
                head = " " * 41
            ratios = ", ".join(f"{k} {v:.3f}" for k, v in row["ratios"].items())
            lines.append(f"{' ' * 41}ratios (time / time): {ratios}; backend {row['kernel_backend']}")
    for name in ("train", "ddp"):
        if name not in s:
            continue
        sec = s[name]
        if sec.get("status") == "ok":
            m = sec["summary"]
            lines.append(
                f"{name}: test top-1 {m['top1']:.2f}%  {m['train_images_per_s']:.0f} img/s  "
                f"{m['epochs']} epochs  {m['device']} amp {m['amp']}  backend {m['backend']}"
            )
        else:
            lines.append(f"{name}: {sec.get('status')} {sec.get('reason', sec.get('error', ''))}"[:200])
    lines.append(f"command: {report['command']}")
    return "\n".join(lines)


def ratios_by_row(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Every measured row's ratios, keyed ``"MODEL WORKLOAD MODE"`` (the headline numbers)."""
    return {f"{r['model']} {r['workload']} {r['mode']}": r["ratios"] for r in rows if r["status"] == "ok"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="the JSON file (default: see above)")
    parser.add_argument("--dry-run", action="store_true", help="every section on the CPU, tiny sizes")
    parser.add_argument("--budget-s", type=float, default=450.0, help="whole-run budget (default 450 s)")
    parser.add_argument("--train-minutes", type=float, default=1.5, help="tnt train's --time-budget")
    parser.add_argument("--ddp-minutes", type=float, default=0.25, help="the torchrun run's --time-budget")
    parser.add_argument("--tests-cap-s", type=float, default=150.0, help="at most this for each pytest")
    parser.add_argument("--rounds", type=int, default=5, help="timed calls per model and row (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls first (default 2)")
    parser.add_argument("--fmnist", default=os.environ.get("TNT_FASHION_MNIST_DIR", FMNIST_DIR))
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)} (default all)"
    )
    parser.add_argument("--modes", default="eager,compiled", help="speed rows: eager,compiled (default both)")
    parser.add_argument(
        "--work",
        type=Path,
        default=None,
        help="folder for run folders and pytest reports (default: a temp one)",
    )
    parser.add_argument("--rows-json", default=None, help=argparse.SUPPRESS)  # child mode: bench rows
    args = parser.parse_args(argv)
    if args.rows_json is not None:
        bench_rows(json.loads(args.rows_json))
        return 0
    if args.dry_run:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch is imported: this process stays on the CPU
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    args.modes = {m.strip() for m in args.modes.split(",") if m.strip()}
    if not args.modes <= {"eager", "compiled"}:
        parser.error(f"--modes takes eager and/or compiled, got {sorted(args.modes)}")
    args.work = args.work or Path(tempfile.mkdtemp(prefix="gpu_check_"))
    args.work.mkdir(parents=True, exist_ok=True)
    budget = Budget(args.budget_s)
    out = args.out or default_out(args.dry_run)
    command = shlex.join([Path(sys.executable).name, *sys.argv]) if argv is None else shlex.join(argv)
    import torch

    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    report: dict[str, Any] = {
        "command": command,
        "dry_run": args.dry_run,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "budget_s": args.budget_s,
        "environment": environment(device),
        "sections": {},
    }
    if device != "cuda" and not args.dry_run:
        report["note"] = "no CUDA GPU here: the sections run and record their errors; use --dry-run on CPUs"
    write_json(out, report)
    t0 = time.monotonic()
    builder = None
    if not dry_run_or_built(args):  # the CPU kernel (the tests' CPU side needs it) builds while the GPU works
        builder = subprocess.Popen(
            [sys.executable, "-m", "tntvision.cli", "kernels", "build"],
            cwd=ROOT,
            env=child_env(False),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
    # what later sections need, held back from earlier ones (seconds)
    dry = args.dry_run
    train_need = 0.0 if "train" not in sections else (30 if dry else args.train_minutes * 60 + 40)
    ddp_need = 0.0 if "ddp" not in sections else (20 if dry else args.ddp_minutes * 60 + 35)
    tests_need = 0.0 if "tests" not in sections else (15 if dry else 100)
    first_modes = args.modes if dry else args.modes & {"eager"}  # a GPU run compiles at the end

    def train_minutes() -> float:  # whatever is left, up to --train-minutes (start and final eval ~40 s)
        return args.train_minutes if dry else min(args.train_minutes, max(0.0, (budget.left() - 40) / 60))

    plan: list[tuple[str, Callable[[], dict[str, Any]]]] = []
    if "speed" in sections:  # eager rows: GPU work, while the CPU kernel builds
        reserve = tests_need + train_need + ddp_need
        plan.append(
            (
                "speed",
                lambda: {"status": "ok", "rows": speed_section(args, budget, reserve, modes=first_modes)},
            )
        )
    if "tests" in sections:
        plan.append(("tests", lambda: tests_section(args, budget, train_need + ddp_need)))
    if "ddp" in sections:
        plan.append(
            ("ddp", lambda: train_run(args, budget, ddp=True, minutes=args.ddp_minutes, reserve=train_need))
        )
    if "train" in sections:
        plan.append(
            ("train", lambda: train_run(args, budget, ddp=False, minutes=train_minutes(), reserve=0.0))
        )
    s = report["sections"]
    if dry:  # independent on a CPU (no GPU to share): side by side, so the dry run takes half the time
        with ThreadPoolExecutor(max_workers=max(len(plan), 1)) as pool:
            futures = [(name, pool.submit(guarded, name, fn, dry=True)) for name, fn in plan]
            for name, future in futures:
                s[name] = future.result()
        write_json(out, report)
    for name, fn in plan if not dry else []:
        s[name] = guarded(name, fn, dry=False)
        write_json(out, report)
    compiled_left = not dry and "compiled" in args.modes
    if "speed" in sections and compiled_left and s["speed"].get("status") == "ok":
        t_compiled = time.monotonic()
        try:
            s["speed"]["rows"] += speed_section(args, budget, 5.0, modes={"compiled"})
        except Exception as e:
            s["speed"]["compiled_error"] = f"{type(e).__name__}: {e}"
        s["speed"]["seconds"] = round(s["speed"]["seconds"] + time.monotonic() - t_compiled, 2)
    if "speed" in sections and s["speed"].get("status") == "ok":
        rows = s["speed"]["rows"]
        statuses = {r["status"] for r in rows}
        if "error" in statuses:
            s["speed"]["status"] = "partial" if "ok" in statuses else "failed"
        s["speed"]["ratios"] = ratios_by_row(rows)
    if builder is not None:
        try:
            _, err = builder.communicate(timeout=max(budget.left(), 1.0))
            report["environment"]["cpu_kernel_build"] = {
                "returncode": builder.returncode,
                "tail": tail(err, 5),
            }
        except subprocess.TimeoutExpired:
            _stop_group(builder)
            report["environment"]["cpu_kernel_build"] = {"returncode": None, "tail": "stopped: time budget"}
    report["wall_s"] = round(time.monotonic() - t0, 1)
    write_json(out, report)
    print(format_table(report))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
