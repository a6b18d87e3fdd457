"""Compile the Triton kernels for GPUs without having one: registers, spills, shared memory, occupancy.

Triton lowers a kernel to PTX and ptxas assembles it for a given architecture on any machine (the
compiler and ptxas ship with the ``triton`` wheel); ``cuobjdump`` then reads the resource usage out of the
cubin. This compiles the forward and backward kernels for every inner shape of the registry, in fp32, bf16
and fp16, for an A100 (sm_80), an RTX 4090 (sm_89) and an H100 (sm_90), and prints registers per thread,
stack and local memory per thread (spills), shared memory and the warps per SM the registers allow. It
proves the compiled path lowers (which the interpreter cannot) and shows what occupancy the tile size
buys; it says nothing about time. Usage::

    TRITON_INTERPRET=0 python benchmarks/triton_compile.py [--json out.json] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# name: (words, dim, heads, hidden)
SHAPES = {
    "tnt_mini_patch4_28": (4, 8, 2, 32),
    "tnt_ti_patch16_224": (16, 12, 2, 48),
    "tnt_s_patch16_224": (16, 24, 4, 96),
    "tnt_b_patch16_224": (16, 40, 4, 160),
}
TARGETS = {"A100 (sm_80)": 80, "RTX 4090 (sm_89)": 89, "H100 (sm_90)": 90}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
REGISTERS_PER_SM = 65536
MAX_WARPS_PER_SM = {80: 64, 89: 48, 90: 64}
_POINTER = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}


def _signature(kernel, dtype: torch.dtype, constants: dict) -> dict[str, str]:
    """Argument types: words, weights and buffers in ``dtype`` (a cast model), the LayerNorm sums fp32."""
    sig = {}
    for name in kernel.arg_names:
        if name in constants:
            sig[name] = "constexpr"
        elif name in ("S", "M", "C", "H", "HD"):
            sig[name] = "i32"
        elif name in ("eps", "scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "*fp32" if name == "LNP" else _POINTER[dtype]
    return sig


def compile_kernel(
    words: int, dim: int, heads: int, hidden: int, dtype: torch.dtype, arch: int, *, backward: bool
):
    """The cubin's resource usage: {"registers", "spill", "shared", "warps_per_sm", "seconds"}."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from tntvision.kernels import triton_op

    kernels = triton_op._kernels()
    kernel = kernels.inner_backward_kernel if backward else kernels.inner_forward_kernel
    cfg = triton_op.tile_config(words, dim, dim // heads, dtype)
    constants = triton_op._constants(cfg, heads, None, None, None)
    if backward:
        constants |= dict.fromkeys(
            ("NEED_X", "NEED_LN1", "NEED_QKV", "NEED_PROJ", "NEED_LN2", "NEED_FC1"), True
        )
        constants["NEED_FC2"] = True
    sig = _signature(kernel, dtype, constants)
    constexprs = {(kernel.arg_names.index(k),): v for k, v in constants.items()}
    start = time.perf_counter()
    src = ASTSource(fn=kernel, signature=sig, constexprs=constexprs)
    warps = cfg.backward_warps if backward else cfg.forward_warps
    out = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
    seconds = time.perf_counter() - start
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(out.asm["cubin"])
        f.flush()
        tool = Path(triton.__path__[0]) / "backends" / "nvidia" / "bin" / "cuobjdump"
        usage = subprocess.run(
            [str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True
        ).stdout
    found = {k: int(v) for k, v in re.findall(r"(REG|STACK|LOCAL):(\d+)", usage)}
    regs = found["REG"]
    blocks = REGISTERS_PER_SM // (max(regs, 1) * 32 * warps)
    return {
        "registers": regs,
        "spill": found.get("STACK", 0) + found.get("LOCAL", 0),  # bytes per thread in local memory
        "shared": out.metadata.shared,  # bytes per program (Triton's dynamic shared memory)
        "warps": warps,
        "warps_per_sm": min(blocks * warps, MAX_WARPS_PER_SM[arch]),
        "seconds": round(seconds, 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="also write the table here")
    ap.add_argument("--quick", action="store_true", help="TNT-S in bf16 for the H100 only")
    ap.add_argument("--tile-values", type=int, help="try another tile size (default: triton_op.TILE_VALUES)")
    args = ap.parse_args(argv)
    from tntvision.kernels import triton_op

    triton_op.TILE_VALUES = args.tile_values or triton_op.TILE_VALUES
    print(f"tile: at most {triton_op.TILE_ROWS} rows, {triton_op.TILE_VALUES} values")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("0", ""):
        print("run with TRITON_INTERPRET=0: the interpreter does not compile", file=sys.stderr)
        return 2
    shapes = {"tnt_s_patch16_224": SHAPES["tnt_s_patch16_224"]} if args.quick else SHAPES
    targets = {"H100 (sm_90)": 90} if args.quick else TARGETS
    dtypes = {"bf16": torch.bfloat16} if args.quick else DTYPES
    print("$ TRITON_INTERPRET=0 python benchmarks/triton_compile.py " + " ".join(argv or sys.argv[1:]))
    head = f"{'model':<20}{'dtype':<6}{'GPU':<18}{'kernel':<9}{'rows':>5}{'warps':>6}{'regs':>5}"
    print(head + f"{'spill B':>8}{'smem B':>8}{'warps/SM':>9}")
    rows = []
    for name, shape in shapes.items():
        for dname, dtype in dtypes.items():
            for gpu, arch in targets.items():
                for backward in (False, True):
                    r = compile_kernel(*shape, dtype, arch, backward=backward)
                    kind = "backward" if backward else "forward"
                    cfg = triton_op.tile_config(shape[0], shape[1], shape[1] // shape[2], dtype)
                    rows.append(
                        {"model": name, "dtype": dname, "gpu": gpu, "kernel": kind, "rows": cfg.R, **r}
                    )
                    line = (
                        f"{name:<20}{dname:<6}{gpu:<18}{kind:<9}{cfg.R:>5}{r['warps']:>6}{r['registers']:>5}"
                    )
                    print(line + f"{r['spill']:>8}{r['shared']:>8}{r['warps_per_sm']:>9}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
