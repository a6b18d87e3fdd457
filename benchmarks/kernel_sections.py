"""Where the fused inner transformer spends its time, and its rate per core against DeiT-S's GEMMs.

    .venv/bin/python benchmarks/kernel_sections.py [--batch 16] [--calls 4] [--isa auto] [--bf16]

Builds a second copy of the kernel with ``-DTNT_PROFILE`` (its section timers; the installed build has
none) into a temporary folder, runs forward and backward of one TNT-S block on the words of ``--batch``
images (196 patches x 16 words x 24 features each) on one thread, and prints the milliseconds per section.
The forward sections up to the GELU are the average over the forward calls and the forward recomputed
inside backward (which stops before fc2); fc2 and its residual come from the forward calls alone.

Then the rates per core: the fused forward's GMAC/s (qkv, attention, proj, fc1, fc2: 7,680 MACs per word of
TNT-S) next to DeiT-S's four GEMMs at the same batch (``F.linear`` on 197 tokens per image, the GEMMs
DeiT-S runs between attention calls), in fp32 and, with ``--bf16``, with bf16 operands: the kernel under
``low_precision`` (what autocast gives it) against bf16 ``F.linear``. ``--isa`` picks the kernel copy
(``auto``, ``avx512``, ``avx2``, ``baseline``, ``avx2-w16``).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import tntvision
from tntvision.kernels import _SOURCE, _cflags, _import_cpp_extension

FORWARD = ["ln1", "qkv", "attention", "proj+residual+ln2", "fc1", "gelu", "fc2", "residual"]
BACKWARD = ["mlp", "ln2", "proj", "attention", "qkv", "ln1"]


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def timed(fn, calls: int) -> float:
    """Median seconds of one call over ``calls`` calls (after one warm-up)."""
    fn()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def deit_gemm_rate(batch: int, dtype: torch.dtype, calls: int) -> float:
    """GMAC/s of DeiT-S's four block GEMMs (qkv, proj, fc1, fc2) at ``batch`` images, one thread."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch * 197, 384, generator=g).to(dtype)
    h = torch.randn(batch * 197, 1536, generator=g).to(dtype)
    shapes = [(1152, 384, x), (384, 384, x), (1536, 384, x), (384, 1536, h)]
    ws = [
        (torch.randn(n, k, generator=g).to(dtype), torch.randn(n, generator=g).to(dtype), a)
        for n, k, a in shapes
    ]

    def run():
        for w, b, a in ws:
            F.linear(a, w, b)

    macs = sum(a.shape[0] * w.shape[0] * w.shape[1] for w, _, a in ws)
    return macs / timed(run, calls) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16, help="images whose words one call processes")
    parser.add_argument("--calls", type=int, default=4, help="timed calls of forward and of backward")
    parser.add_argument("--isa", default="auto", help="kernel copy: auto, avx512, avx2, baseline, avx2-w16")
    parser.add_argument("--bf16", action="store_true", help="also the low-precision (bf16 GEMM) rates")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="tnt_kernel_profile_") as build:
        # its own op namespace would clash with the installed one: this process never loads the other
        _import_cpp_extension().load(
            name="tntvision_kernels_profile",
            sources=[str(_SOURCE)],
            extra_cflags=[*_cflags(), "-DTNT_PROFILE"],
            extra_ldflags=["-fopenmp"],
            build_directory=build,
            is_python_module=False,
        )
        ops = torch.ops.tntvision
        ops.set_kernel_dispatch(args.isa, "auto")
        isa, bf16_mode, _ = ops.kernel_dispatch()
        block = tntvision.create_model("tnt_s_patch16_224").blocks[0]
        attn, mlp = block.attn_in, block.mlp_in
        params = (block.norm_in.weight, block.norm_in.bias, attn.qk.weight, None, attn.v.weight, None)
        params += (attn.proj.weight, attn.proj.bias, block.norm_mlp_in.weight, block.norm_mlp_in.bias)
        params += (mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias, None, None, 4, 1e-5)
        x = torch.randn(args.batch * 196, 16, 24)  # (sentences, words, dim)
        grad = torch.randn_like(x)
        with torch.no_grad():
            for _ in range(2):  # warm-up
                ops.inner_transformer(x, *params)
                ops.inner_transformer_backward(grad, x, *params)
            ops.kernel_profile()
            t0 = time.perf_counter()
            for _ in range(args.calls):
                ops.inner_transformer(x, *params)
            fwd = (time.perf_counter() - t0) / args.calls
            t0 = time.perf_counter()
            for _ in range(args.calls):
                ops.inner_transformer_backward(grad, x, *params)
            bwd = (time.perf_counter() - t0) / args.calls
            ms = (ops.kernel_profile() * 1e3 / args.calls).tolist()
            macs = x.shape[0] * 16 * 7680  # per word: 4c^2 + 2cH + 2mc with c 24, H 96, m 16
            rows = [("fp32", macs / fwd / 1e9, deit_gemm_rate(args.batch, torch.float32, args.calls))]
            bf16_ms = None
            if args.bf16:
                xb = x.to(torch.bfloat16)
                ops.inner_transformer(xb, *params, True)  # warm-up, then the sections of the bf16 forward
                ops.kernel_profile()
                t = timed(lambda: ops.inner_transformer(xb, *params, True), args.calls)
                bf16_ms = (ops.kernel_profile() * 1e3 / (args.calls + 1)).tolist()  # timed() warms up once
                rows.append(
                    (
                        f"bf16 ({bf16_mode})",
                        macs / t / 1e9,
                        deit_gemm_rate(args.batch, torch.bfloat16, args.calls),
                    )
                )
    print(
        f"CPU: {cpu_name()}; kernel copy {isa}; TNT-S block, batch {args.batch}, 1 thread, "
        f"{args.calls} calls each"
    )
    print(f"forward {1e3 * fwd:.1f} ms; backward (forward recompute included) {1e3 * bwd:.1f} ms")
    # sections 0-5 also run in backward's recompute (which stops before fc2): average over both
    fwd_ms = [v / 2 for v in ms[:6]] + ms[6:8]
    print("forward sections, ms: " + ", ".join(f"{n} {v:.2f}" for n, v in zip(FORWARD, fwd_ms, strict=True)))
    print(
        "backward sections, ms: " + ", ".join(f"{n} {v:.2f}" for n, v in zip(BACKWARD, ms[8:14], strict=True))
    )
    if bf16_ms is not None:
        print(
            f"bf16 forward sections ({bf16_mode}), ms: "
            + ", ".join(f"{n} {v:.2f}" for n, v in zip(FORWARD, bf16_ms[:8], strict=True))
        )
    print()
    print("| dtype | fused inner transformer GMAC/s (1 core) | DeiT-S block GEMMs GMAC/s (1 core) | ratio |")
    print("|---|---|---|---|")
    for label, ours, deit in rows:
        print(f"| {label} | {ours:.1f} | {deit:.1f} | {ours / deit:.2f} |")
    print(
        f"\nProduced by `python benchmarks/kernel_sections.py --batch {args.batch} --calls {args.calls} "
        f"--isa {args.isa}{' --bf16' if args.bf16 else ''}`"
    )


if __name__ == "__main__":
    main()
