"""Where a training step of the demo model goes, operator by operator, next to its ViT twin's.

    .venv/bin/python benchmarks/mini_profile.py [--batch 128] [--amp none|bfloat16] [--top 25]

One AdamW training step (forward, cross-entropy, backward, update; :func:`tntvision.tools.bench._train_fn`,
what ``tnt bench --train`` and benchmarks/speed.py time) of ``tnt_mini_patch4_28`` and of
``vit_mini_patch4_28`` (the same model without inner transformers) under ``torch.profiler``, after three
warm-up steps: self CPU ms and calls of the ``--top`` operators of either model, the sum over every
operator, and the difference (what the TNT adds). Run it in two trees (``PYTHONPATH=<tree>/src``) for a
before / after table.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

from tntvision import create_model
from tntvision.tools.bench import _train_fn, profile_ops

MODELS = ("tnt_mini_patch4_28", "vit_mini_patch4_28")


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--amp", default="none", choices=["none", "bfloat16"])
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.batch, 1, 28, 28)
    ops, totals = {}, {}
    for name in MODELS:
        step = _train_fn(create_model(name), x, "cpu", args.amp)
        for _ in range(3):
            step()
        rows = profile_ops(step, top=10_000)
        ops[name] = {r["op"]: (r["self_ms"], r["calls"]) for r in rows}
        totals[name] = sum(r["self_ms"] for r in rows)
    tnt, vit = (ops[n] for n in MODELS)
    top = sorted(set(tnt) | set(vit), key=lambda k: -max(tnt.get(k, (0, 0))[0], vit.get(k, (0, 0))[0]))
    print(f"CPU: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"command: python benchmarks/mini_profile.py {' '.join(sys.argv[1:])}".rstrip())
    print()
    print("| op | TNT mini ms (calls) | ViT twin ms (calls) | TNT - ViT ms |")
    print("|---|---|---|---|")
    for op in top[: args.top]:
        a, b = tnt.get(op, (0.0, 0)), vit.get(op, (0.0, 0))
        print(f"| `{op[:60]}` | {a[0]:.1f} ({a[1]}) | {b[0]:.1f} ({b[1]}) | {a[0] - b[0]:+.1f} |")
    t, v = (totals[n] for n in MODELS)
    print(f"| total (every operator) | {t:.1f} | {v:.1f} | {t - v:+.1f} ({t / v:.2f}x) |")


if __name__ == "__main__":
    main()
