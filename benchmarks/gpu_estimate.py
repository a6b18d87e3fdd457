"""The arithmetic on paper: what TNT-S costs against DeiT-S on a GPU, reference path vs the fused kernel.

Counts, per image, the FLOPs and the bytes every operator moves (reads + writes of activations; weights are
negligible at batch 256) for DeiT-S, for TNT-S's outer part (DeiT-S's blocks plus the words-to-patch
projection) and for TNT-S's inner transformers, once as eager PyTorch runs them (one kernel per operator)
and once as the fused Triton kernel (one read and one write of each word). Each operator takes the longer
of its compute time and its memory time (a roofline per kernel); the model's time is their sum. Printed
for an H100 SXM and an RTX 4090, for inference and for a training step, with the TNT-S / DeiT-S ratio each
predicts. The assumptions are parameters, printed with the table:

- activations are counted at 2 bytes (bf16 AMP); the fused kernel's words at 4 (tntvision keeps the word
  stream in fp32 under autocast);
- large GEMMs reach ``--gemm-efficiency`` of the tensor-core peak; memory-bound kernels ``--bw-efficiency``
  of the memory bandwidth; the fused kernel's tensor-core work (padded to 16-wide products, small tiles)
  ``--fused-efficiency``;
- a training step is forward + backward with backward = 2x forward's FLOPs and bytes on the reference path;
  the fused backward recomputes the forward, runs the attention twice and writes the weight products'
  operands (15 values per word feature, then read once by cuBLAS).

It models bandwidth and FLOPs only: launch overheads, tail effects and poorly shaped small kernels are
left out, so it flatters the reference path (timm's measured TNT-S / DeiT-S on an RTX 4090 is 4.74x, see
docs/performance.md). Usage::

    python benchmarks/gpu_estimate.py [--json benchmarks/results/gpu_estimate.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

GPUS = {  # dense bf16 tensor-core peak with fp32 accumulation (FLOP/s), memory bandwidth (B/s)
    "H100 SXM": (989e12, 3.35e12),
    "RTX 4090": (165e12, 1.008e12),
}


@dataclass(frozen=True)
class Op:
    name: str
    flops: float  # per image
    bytes: float  # per image
    kind: str  # "gemm" (large GEMM), "small" (K <= 96 GEMM or elementwise: memory-bound), "fused"


def _pow2(n: int, least: int = 16) -> int:
    return max(least, 1 << max(0, n - 1).bit_length())


def outer_ops(*, tokens: int = 197, d: int = 384, depth: int = 12, b: int = 2) -> list[Op]:
    """A ViT-S/DeiT-S encoder block, ``depth`` times (SDPA as flash attention: q, k, v read once)."""
    per = [
        ("ln1", 0, 2 * d),
        ("qkv", 2 * d * 3 * d, d + 3 * d),
        ("sdpa", 4 * tokens * d, 3 * d + d),
        ("proj", 2 * d * d, 2 * d),
        ("residual1", 0, 3 * d),
        ("ln2", 0, 2 * d),
        ("fc1", 8 * d * d, d + 4 * d),
        ("gelu", 0, 8 * d),
        ("fc2", 8 * d * d, 4 * d + d),
        ("residual2", 0, 3 * d),
    ]
    return [
        Op(
            f"outer.{n}",
            f * tokens * depth,
            v * b * tokens * depth,
            "gemm" if f > 0 and n != "sdpa" else "small",
        )
        for n, f, v in per
    ]


def projection_ops(
    *, patches: int = 196, m: int = 16, c: int = 24, d: int = 384, depth: int = 12, b: int = 2
):
    """TNT's words-to-patch projection per block: LN(m*c), Linear(m*c -> d), LN(d), add into the patches."""
    mc = m * c
    per = [("ln_words", 0, 2 * mc), ("linear", 2 * mc * d, mc + d), ("ln_patch", 0, 2 * d), ("add", 0, 5 * d)]
    return [
        Op(f"proj.{n}", f * patches * depth, v * b * patches * depth, "gemm" if f else "small")
        for n, f, v in per
    ]


def inner_reference_ops(*, words: int = 3136, m: int = 16, c: int = 24, heads: int = 4, hidden: int = 96,
                        depth: int = 12, b: int = 2) -> list[Op]:  # fmt: skip
    """The inner transformer as eager PyTorch runs it: one kernel per operator, per word."""
    hm = heads * m  # one word's attention scores over its sentence, all heads
    per = [
        ("ln1", 0, 2 * c),
        ("qkv", 2 * c * 3 * c, c + 3 * c),
        ("split_heads", 0, 6 * c),
        ("scores", 2 * m * c, 2 * c + hm),
        ("softmax", 0, 2 * hm),
        ("attn_v", 2 * m * c, hm + c + c),
        ("merge_heads", 0, 2 * c),
        ("proj", 2 * c * c, 2 * c),
        ("residual1", 0, 3 * c),
        ("ln2", 0, 2 * c),
        ("fc1", 2 * c * hidden, c + hidden),
        ("gelu", 0, 2 * hidden),
        ("fc2", 2 * hidden * c, hidden + c),
        ("residual2", 0, 3 * c),
    ]
    return [Op(f"inner.{n}", f * words * depth, v * b * words * depth, "small") for n, f, v in per]


def inner_fused_ops(*, words: int = 3136, m: int = 16, c: int = 24, heads: int = 4, hidden: int = 96,
                    depth: int = 12, word_bytes: int = 4) -> list[Op]:  # fmt: skip
    """The fused kernel: each word read and written once; the products it executes, padded as the
    kernel pads them (features to CP, head dims to HDP, block-diagonal attention over R rows)."""
    cp, hdp = _pow2(c), _pow2(c // heads)
    rows = _pow2(max(1, 64 // m) * m)
    hidden_p = -(-hidden // 32) * 32
    flops = 2 * (3 * heads * cp * hdp + 2 * heads * rows * hdp + heads * hdp * cp + 2 * cp * hidden_p)
    return [Op("inner.fused", flops * words * depth, 2 * c * word_bytes * words * depth, "fused")]


def op_time(op: Op, gpu: tuple[float, float], eff: dict[str, float]) -> float:
    peak, bandwidth = gpu
    compute = op.flops / (peak * (eff["fused"] if op.kind == "fused" else eff["gemm"]))
    return max(compute, op.bytes / (bandwidth * eff["bw"]))


def training_ops(ops: list[Op], fused_backward: list[Op] | None = None) -> list[Op]:
    """Forward + backward: backward = 2x forward, except the fused kernel's own backward."""
    out = []
    for op in ops:
        out.append(op)
        if op.kind == "fused" and fused_backward is not None:
            out.extend(fused_backward)
        else:
            out.append(Op(op.name + ".backward", 2 * op.flops, 2 * op.bytes, op.kind))
    return out


def fused_backward_ops(*, words: int = 3136, c: int = 24, hidden: int = 96, depth: int = 12, b: int = 2,
                       word_bytes: int = 4, forward: Op) -> list[Op]:  # fmt: skip
    """The backward kernel (forward recomputed, attention twice: ~3x the forward's products; reads x and
    dy, writes dx and 15 values per word feature) and the four weight-gradient GEMMs (read those)."""
    operands = (c + 3 * c + c + c + c + hidden + hidden) * b  # xn1, dqkv, o, da, xn2, g, dh
    kernel = Op(
        "inner.fused_backward", 3 * forward.flops, (3 * c * word_bytes + operands) * words * depth, "fused"
    )
    gemm_flops = 2 * (3 * c * c + c * c + 2 * c * hidden) * words * depth
    gemms = Op("inner.weight_grads", gemm_flops, (operands + c * b) * words * depth, "small")
    return [kernel, gemms]


def estimate(eff: dict[str, float]) -> dict:
    deit = outer_ops()
    outer = outer_ops() + projection_ops()
    reference = outer + inner_reference_ops()
    fused_forward = inner_fused_ops()
    fused = outer + fused_forward
    backward = fused_backward_ops(forward=fused_forward[0])
    models = {
        "inference": {"DeiT-S": deit, "TNT-S reference": reference, "TNT-S fused": fused},
        "training": {
            "DeiT-S": training_ops(deit),
            "TNT-S reference": training_ops(reference),
            "TNT-S fused": training_ops(fused, backward),
        },
    }
    result = {"assumptions": eff, "per_image": {}, "predicted": {}}
    for name, ops in models["inference"].items():
        result["per_image"][name] = {
            "GFLOP": round(sum(o.flops for o in ops) / 1e9, 3),
            "MB moved": round(sum(o.bytes for o in ops) / 1e6, 1),
        }
    inner = {"reference": inner_reference_ops(depth=1), "fused": inner_fused_ops(depth=1)}
    result["inner_block_per_image"] = {
        k: {
            "MFLOP": round(sum(o.flops for o in v) / 1e6, 1),
            "MB moved": round(sum(o.bytes for o in v) / 1e6, 2),
        }
        for k, v in inner.items()
    }
    for gpu, spec in GPUS.items():
        for mode, by_model in models.items():
            times = {k: sum(op_time(o, spec, eff) for o in ops) for k, ops in by_model.items()}
            result["predicted"][f"{gpu} {mode}"] = {
                "us per image": {k: round(t * 1e6, 1) for k, t in times.items()},
                "TNT-S reference / DeiT-S": round(times["TNT-S reference"] / times["DeiT-S"], 2),
                "TNT-S fused / DeiT-S": round(times["TNT-S fused"] / times["DeiT-S"], 2),
            }
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gemm-efficiency", type=float, default=0.6)
    ap.add_argument("--bw-efficiency", type=float, default=0.8)
    ap.add_argument("--fused-efficiency", type=float, default=0.15)
    ap.add_argument("--json", help="also write the result here")
    args = ap.parse_args(argv)
    eff = {"gemm": args.gemm_efficiency, "bw": args.bw_efficiency, "fused": args.fused_efficiency}
    result = estimate(eff)
    print("$ python benchmarks/gpu_estimate.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    print(f"assumptions: {eff}")
    print(f"{'per image':<20}{'GFLOP':>8}{'MB moved':>10}")
    for k, v in result["per_image"].items():
        print(f"{k:<20}{v['GFLOP']:>8}{v['MB moved']:>10}")
    print(f"{'one inner block':<20}{'MFLOP':>8}{'MB moved':>10}")
    for k, v in result["inner_block_per_image"].items():
        print(f"{k:<20}{v['MFLOP']:>8}{v['MB moved']:>10}")
    print(f"{'predicted':<24}{'DeiT-S us':>10}{'ref us':>9}{'fused us':>9}{'ref/DeiT':>9}{'fused/DeiT':>11}")
    for k, v in result["predicted"].items():
        t = v["us per image"]
        print(
            f"{k:<24}{t['DeiT-S']:>10}{t['TNT-S reference']:>9}{t['TNT-S fused']:>9}"
            f"{v['TNT-S reference / DeiT-S']:>9}{v['TNT-S fused / DeiT-S']:>11}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
