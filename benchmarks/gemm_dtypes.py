"""One DeiT-S-sized GEMM (3152x384 @ 384x1152, a batch of 16 images' qkv) in fp32 and in bf16, timed in one
process, interleaved: whether this CPU's bf16 matrix products are faster than its fp32 ones (what
`amp: auto` decides from static CPU facts; this prints the measurement behind the rule).

    .venv/bin/python benchmarks/gemm_dtypes.py [--repeat 3] [--calls 10]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tntvision.utils.amp import _cpuinfo_field, native_bf16


def rate(x: torch.Tensor, w: torch.Tensor, calls: int) -> float:
    for _ in range(3):
        torch.nn.functional.linear(x, w)
    t0 = time.perf_counter()
    for _ in range(calls):
        torch.nn.functional.linear(x, w)
    return x.shape[0] * x.shape[1] * w.shape[0] * calls / (time.perf_counter() - t0) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--calls", type=int, default=10)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    a, w = torch.randn(3152, 384, generator=g), torch.randn(1152, 384, generator=g)
    runs = {torch.float32: [], torch.bfloat16: []}
    for _ in range(args.repeat):
        for dt in runs:
            runs[dt].append(rate(a.to(dt), w.to(dt), args.calls))
    cpu = f"{_cpuinfo_field('model name')} ({_cpuinfo_field('vendor_id')})"
    print(f"CPU: {cpu}, {torch.get_num_threads()} threads, torch {torch.__version__};", end=" ")
    print(f"amp auto picks bf16: {native_bf16(torch.device('cpu'))}\n")
    print("| dtype | GMAC/s, median (min-max) |\n|---|---|")
    for dt, r in runs.items():
        print(f"| {str(dt).split('.')[-1]} | {statistics.median(r):.1f} ({min(r):.1f}-{max(r):.1f}) |")
    print(f"\nProduced by `python benchmarks/gemm_dtypes.py --repeat {args.repeat} --calls {args.calls}`")


if __name__ == "__main__":
    main()
