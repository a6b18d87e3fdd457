"""Short side-by-side `tnt train` runs on the real Fashion-MNIST: how recipe choices compare in minutes.

    .venv/bin/python benchmarks/fmnist_trials.py [--minutes 4] [--procs 2] [--only NAME ...]

Each trial is `make demo`'s training command (torchrun, one thread per process, the small-image recipe)
with a shorter time budget, evaluation only at the end and the trial's `--set` overrides. Trials run one
after another (never two at once: they would share the two cores). Prints a markdown table and writes
benchmarks/results/fmnist_trials.json. A few minutes of training rank choices, they do not predict the
14-minute result: read them against each other (run-to-run spread ~0.5 point).

Trials are ranked on validation accuracy (6,000 images held out of the training set, the same for every
trial: `val_split.json` in each run folder); the test accuracy is printed beside it, not chosen on.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = "tnt_mini_patch4_28"

# name (optimizer-lr at batch 128) -> `--set` overrides on top of the small-image recipe
# (configs/fashion_mnist.yaml)
TRIALS: dict[str, list[str]] = {
    "adamw-4e-3": ["optim.name=adamw", "optim.lr=0.008"],
    "muon-4e-3": ["optim.name=muon", "optim.lr=0.008"],
    "muon-8e-3": [],  # the recipe as it is
    "muon-1.6e-2": ["optim.name=muon", "optim.lr=0.032"],
}


def run_trial(name: str, overrides: list[str], *, minutes: float, procs: int, work: Path) -> dict:
    out = work / name
    cmd = [
        str(Path(sys.executable).with_name("torchrun")),
        "--standalone",
        f"--nproc_per_node={procs}",
        "-m",
        "tntvision.cli",
        "train",
        "--model",
        MODEL,
        "--data",
        "fashion-mnist",
        "--out",
        str(out),
        "--time-budget",
        str(minutes),
        "--set",
        "eval_every=1000",
    ]
    for o in overrides:
        cmd += ["--set", o]
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    t0 = time.time()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    summary = json.loads((out / "summary.json").read_text())
    return {
        "trial": name,
        "set": overrides,
        "val_top1": summary["val_top1"],
        "test_top1": summary["top1"],
        "epochs": summary["epochs"],
        "images_per_s": summary["train_images_per_s"],
        "wall_s": round(time.time() - t0, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=4.0, help="training budget per trial")
    parser.add_argument("--procs", type=int, default=2, help="torchrun processes (one thread each)")
    parser.add_argument("--only", nargs="*", help="trial names to run (default: all)")
    args = parser.parse_args()
    names = args.only or list(TRIALS)
    unknown = sorted(set(names) - set(TRIALS))
    if unknown:
        parser.error(f"unknown trials {unknown}; known: {list(TRIALS)}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="fmnist_trials_") as tmp:
        for name in names:
            print(f"trial {name!r} ({args.minutes:g} min) ...", file=sys.stderr, flush=True)
            rows.append(run_trial(name, TRIALS[name], minutes=args.minutes, procs=args.procs, work=Path(tmp)))
            print(f"  {rows[-1]}", file=sys.stderr, flush=True)
        shutil.rmtree(tmp, ignore_errors=True)
    results = ROOT / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "fmnist_trials.json").write_text(json.dumps(rows, indent=2) + "\n")
    command = shlex.join(["python", "benchmarks/fmnist_trials.py", *sys.argv[1:]])
    print(f"`{MODEL}`, {args.minutes:g}-minute budget, {args.procs} processes; `{command}`")
    print(f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})\n")
    print("| trial | overrides | val top-1 | test top-1 | epochs | images/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        sets = " ".join(f"`{s}`" for s in r["set"]) or "(the recipe)"
        print(
            f"| {r['trial']} | {sets} | {r['val_top1']:.2f}% | {r['test_top1']:.2f}% | {r['epochs']:.2f} "
            f"| {r['images_per_s']:.0f} |"
        )


if __name__ == "__main__":
    main()
