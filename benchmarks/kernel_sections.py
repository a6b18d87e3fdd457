"""Where the fused inner transformer spends its time: section timers of one TNT-S block, one thread.

    .venv/bin/python benchmarks/kernel_sections.py [--batch 16] [--calls 4]

Builds a second copy of the kernel with ``-DTNT_PROFILE`` (its section timers; the installed build has
none) into a temporary folder, runs forward and backward of one TNT-S block on the words of ``--batch``
images (196 patches x 16 words x 24 features each) and prints the milliseconds per section. The forward
sections up to the GELU are the average over the forward calls and the forward recomputed inside backward
(which stops before fc2); fc2 and its residual come from the forward calls alone.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import tntvision
from tntvision.models.kernels import _SOURCE, _cflags, _import_cpp_extension

FORWARD = ["ln1", "qkv", "attention", "proj+residual+ln2", "fc1", "gelu", "fc2", "residual"]
BACKWARD = ["mlp", "ln2", "proj", "attention", "qkv", "ln1"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16, help="images whose words one call processes")
    parser.add_argument("--calls", type=int, default=4, help="timed calls of forward and of backward")
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
        block = tntvision.create_model("tnt_s_patch16_224").blocks[0]
        attn, mlp = block.attn_in, block.mlp_in
        params = (block.norm_in.weight, block.norm_in.bias, attn.qk.weight, None, attn.v.weight, None)
        params += (attn.proj.weight, attn.proj.bias, block.norm_mlp_in.weight, block.norm_mlp_in.bias)
        params += (mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias, None, None, 4, 1e-5)
        x = torch.randn(args.batch * 196, 16, 24)  # (sentences, words, dim)
        grad = torch.randn_like(x)
        ops = torch.ops.tntvision
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
    print(f"TNT-S block, batch {args.batch}, 1 thread, {args.calls} calls each (`{Path(__file__).name}`)")
    print(f"forward {1e3 * fwd:.1f} ms; backward (forward recompute included) {1e3 * bwd:.1f} ms")
    # sections 0-5 also run in backward's recompute (which stops before fc2): average over both
    fwd_ms = [v / 2 for v in ms[:6]] + ms[6:8]
    print("forward sections, ms: " + ", ".join(f"{n} {v:.2f}" for n, v in zip(FORWARD, fwd_ms, strict=True)))
    print(
        "backward sections, ms: " + ", ".join(f"{n} {v:.2f}" for n, v in zip(BACKWARD, ms[8:14], strict=True))
    )


if __name__ == "__main__":
    main()
