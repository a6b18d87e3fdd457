"""The fused op's two tile layouts against each other: one block's inner transformer, rows vs lanes.

    .venv/bin/python benchmarks/kernel_layouts.py [--rounds 12] [--isa avx512,avx2] [--json PATH]

For each model and batch (the mini at 128, TNT-Ti and TNT-S at 16, TNT-S at 1), each kernel copy this CPU
runs and each direction (forward alone under ``no_grad``; forward + backward), block 0's inner transformer
runs on the words of a random batch, the two layouts (``kernel_options(layout=...)``) alternating call by
call in one process, ``--rounds`` rounds of 3 calls each. Printed: the median ms per call of each layout
and their ratio (lanes / rows: below 1, the lane layout is faster), and the layout ``auto`` takes there.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from tntvision import create_model, kernels
from tntvision.kernels.inner import run_inner

CASES = [("tnt_mini_patch4_28", 128), ("tnt_ti_patch16_224", 16), ("tnt_s_patch16_224", 16),
         ("tnt_s_patch16_224", 1)]  # fmt: skip


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def block_words(name: str, batch: int) -> tuple[torch.nn.Module, torch.Tensor]:
    """Block 0 of ``name`` (training mode, weights as initialised) and the words of a random batch."""
    torch.manual_seed(0)
    model = create_model(name).train()
    x = torch.randn(batch, *model.pretrained_cfg["input_size"])
    with torch.no_grad():
        words, _ = model._embed(x)
    return model.blocks[0], words.detach().requires_grad_(True)


def time_layouts(block: torch.nn.Module, words: torch.Tensor, isa: str, backward: bool, rounds: int) -> dict:
    def call() -> None:
        if backward:
            y = run_inner(block, words)
            y.backward(torch.ones_like(y))
        else:
            with torch.no_grad():
                run_inner(block, words)

    times: dict[str, list[float]] = {"rows": [], "lanes": []}
    for r in range(rounds):
        for layout in ("rows", "lanes") if r % 2 else ("lanes", "rows"):
            with kernels.kernel_options(isa=isa, layout=layout):
                call()  # warm
                t0 = time.perf_counter()
                for _ in range(3):
                    call()
                times[layout].append((time.perf_counter() - t0) / 3 * 1e3)
    with kernels.kernel_options(isa=isa):
        auto = kernels.kernel_layout(words.shape[1], words.shape[2])
    rows, lanes = (statistics.median(times[k]) for k in ("rows", "lanes"))
    return {"rows_ms": rows, "lanes_ms": lanes, "ratio": lanes / rows, "auto": auto}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--isa", default="", help="comma-separated copies (default: those this CPU runs)")
    parser.add_argument("--json", default="", help="also write the rows here")
    args = parser.parse_args()
    if not kernels.fused_available():
        sys.exit("the fused kernel is not built here")
    isas = [i for i in args.isa.split(",") if i] or kernels.kernel_dispatch()["cpu_isas"]
    isas = [i for i in isas if i != "baseline"] or isas
    print(f"CPU: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"command: python benchmarks/kernel_layouts.py {' '.join(sys.argv[1:])}".rstrip())
    print()
    print("| model | batch | words | copy | pass | rows ms | lanes ms | lanes / rows | auto |")
    print("|---|---|---|---|---|---|---|---|---|")
    out = []
    for name, batch in CASES:
        block, words = block_words(name, batch)
        for isa in isas:
            for backward in (False, True):
                r = time_layouts(block, words, isa, backward, args.rounds)
                row = {"model": name, "batch": batch, "words": list(words.shape), "isa": isa,
                       "pass": "fwd+bwd" if backward else "fwd", **r}  # fmt: skip
                out.append(row)
                cells = [name, batch, tuple(words.shape), isa, row["pass"], f"{r['rows_ms']:.2f}",
                         f"{r['lanes_ms']:.2f}", f"**{r['ratio']:.2f}**", r["auto"]]  # fmt: skip
                print("| " + " | ".join(map(str, cells)) + " |", flush=True)
    if args.json:
        meta = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__}
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": out}, indent=1))


if __name__ == "__main__":
    main()
