"""Time one AdamW step on `tnt_mini_patch4_28`'s parameters: torch's for-loop, foreach and fused kernels.

    .venv/bin/python benchmarks/adamw_step.py [--model NAME] [--steps 200]

One thread, random gradients, median of five blocks of ``--steps`` steps. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import tntvision

KERNELS = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def step_ms(model_name: str, kernel: dict, steps: int) -> float:
    model = tntvision.create_model(model_name)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, **kernel)
    for _ in range(5):
        opt.step()
    blocks = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(steps):
            opt.step()
        blocks.append((time.perf_counter() - t0) / steps * 1e3)
    return statistics.median(blocks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tnt_mini_patch4_28")
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    times = {name: step_ms(args.model, kw, args.steps) for name, kw in KERNELS.items()}
    print(f"`{' '.join(['python', 'benchmarks/adamw_step.py', *sys.argv[1:]])}`, {args.model}, 1 thread\n")
    print("| AdamW kernel | ms per step |")
    print("|---|---|")
    for name, ms in times.items():
        print(f"| {name} | {ms:.2f} |")


if __name__ == "__main__":
    main()
