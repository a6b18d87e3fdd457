"""Mutation check: does the test suite fail when the code is wrong?

Each mutant is one deliberate bug, a small textual change to one source file: in the fused op's arguments
on their way in from the model, the checks that choose the fused or the reference path (slots, hooks), the
gradients the backward computes, the kernel itself, drop-path scales, position-table resampling, the
words-to-patch projection, checkpoint key mapping, export metadata, the bf16 casts, the validation split.
The script applies one mutant at a time, runs the tests that guard that code, and restores the file,
whatever happens. A mutant is *killed* when those tests fail, *survives* when they pass. Before any
mutant, the same tests run on the unchanged tree and must pass (else the check says so and stops).

    python benchmarks/mutants.py                 # every mutant; a table, then the command
    python benchmarks/mutants.py --only drop     # the mutants whose name contains "drop"
    python benchmarks/mutants.py --list          # names and where they apply, nothing run

Exit status 0 when every mutant is killed, 1 when one survives, 2 for a mutant that no longer applies (its
text is not in the file: the code moved, update the list). The kernel mutants rebuild the C++ extension
(~30 s each, cached by source hash). Run alone: it edits files of this checkout while it runs.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "tntvision"


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to src/tntvision
    old: str
    new: str
    tests: tuple[str, ...]  # pytest arguments (node ids, -k filters)


FUSED_FP32 = ("tests/test_fused.py", "-k", "fp32 and (tnt_s_patch16_224 or tnt_mini)")
KERNEL = ("tests/test_kernel_op.py", "-k", "formula and not bf16")
BOUNDARY = ("tests/test_fused.py", "-k", "every_option")
SLOT_TESTS = ("tests/test_fused.py", "-k", "bypasses or computes_what")
HOOK_TESTS = ("tests/test_fused.py", "-k", "backward_hooks or plain_module")
MASK_TESTS = ("tests/test_kernel_op.py", "-k", "asked or frozen_backbone")
TRITON = ("tests/test_triton_op.py", "-k", "float64_formula")  # under Triton's interpreter (see conftest.py)
TRITON_LOW = ("tests/test_triton_op.py", "-k", "low_precision")
TRITON_DISPATCH = ("tests/test_triton_op.py", "-k", "static_facts or compute_dtype")

MUTANTS = [
    Mutant(
        "fused op: LN2's weights passed as LN1's",
        "kernels/op.py",
        "return cls(ln1.weight, ln1.bias,",
        "return cls(ln2.weight, ln2.bias,",
        FUSED_FP32,
    ),
    Mutant(
        "fused op: LayerNorm eps 100x",
        "kernels/inner.py",
        "eps=block.norm_in.eps, backend=backend)",
        "eps=block.norm_in.eps * 100, backend=backend)",
        FUSED_FP32,
    ),
    Mutant(
        "fused op: half the heads",
        "kernels/inner.py",
        "num_heads=block.attn_in.num_heads,",
        "num_heads=max(1, block.attn_in.num_heads // 2),",
        FUSED_FP32,
    ),
    Mutant(
        "fused op: keep scales of the two branches swapped",
        "kernels/inner.py",
        "InnerWeights.of(block), attn_scale, mlp_scale,",
        "InnerWeights.of(block), mlp_scale, attn_scale,",
        ("tests/test_fused.py", "-k", "drop_path and fp32"),
    ),
    Mutant(
        "kernel: softmax scale 1/hd instead of 1/sqrt(hd)",
        "csrc/inner_transformer.cpp",
        "  d.scale = 1.0f / std::sqrt(static_cast<float>(d.hd));",
        "  d.scale = 1.0f / static_cast<float>(d.hd);",
        KERNEL,
    ),
    Mutant(
        "kernel: LayerNorm eps ignored",
        "csrc/inner_transformer.cpp",
        "  d.eps = static_cast<float>(eps);",
        "  d.eps = 0.0f;",
        KERNEL,
    ),
    Mutant(
        "drop path: scales not divided by the keep probability",
        "models/layers.py",
        "    return torch.empty(n, dtype=dtype, device=device).bernoulli_(keep).div_(keep)",
        "    return torch.empty(n, dtype=dtype, device=device).bernoulli_(keep)",
        ("tests/test_fused.py", "tests/test_timm_parity.py", "-k", "drop_path"),
    ),
    Mutant(
        "position table: resampled with align_corners=True",
        "models/layers.py",
        'mode="bicubic", antialias=True, align_corners=False)',
        'mode="bicubic", antialias=True, align_corners=True)',
        ("tests/test_timm_parity.py", "tests/test_models.py", "-k", "resampling or other_input_sizes"),
    ),
    Mutant(
        "position table: grid rows and columns swapped",
        "models/layers.py",
        "    grid = grid.reshape(1, old_grid[0], old_grid[1], D).permute(0, 3, 1, 2)  # (1, D, gh, gw)",
        "    grid = grid.reshape(1, old_grid[1], old_grid[0], D).permute(0, 3, 1, 2)  # (1, D, gh, gw)",
        ("tests/test_timm_parity.py", "tests/test_models.py", "-k", "resampling or other_input_sizes"),
    ),
    Mutant(
        "PyramidTNT relative table: bilinear over the query grid",
        "models/pyramid_tnt.py",
        '        t = F.interpolate(t, size=tuple(grid), mode="bicubic", align_corners=False)',
        '        t = F.interpolate(t, size=tuple(grid), mode="bilinear", align_corners=False)',
        ("tests/test_pyramid_tnt.py", "-k", "resampl"),
    ),
    Mutant(
        "words to patch: feature-major flattening",
        "models/tnt.py",
        "        flat = words.reshape(batch, -1, self.proj.in_features)  # (B, N, m*c), word-major",
        "        flat = words.transpose(1, 2).reshape(batch, -1, self.proj.in_features)",
        ("tests/test_checkpoints.py", "-k", "logits_match_timm"),
    ),
    Mutant(
        "authors' keys: the two inner LayerNorms swapped",
        "models/weights.py",
        '    "inner_norm1": "norm_in",\n    "inner_attn": "attn_in",\n    "inner_norm2": "norm_mlp_in",',
        '    "inner_norm1": "norm_mlp_in",\n    "inner_attn": "attn_in",\n    "inner_norm2": "norm_in",',
        ("tests/test_checkpoints.py", "-k", "authors_layout"),
    ),
    Mutant(
        "mmpretrain keys: fc1 and fc2 of the inner MLP swapped",
        "models/weights.py",
        '"ffn.layers.0.0": "mlp_in.fc1", "ffn.layers.1": "mlp_in.fc2"},',
        '"ffn.layers.0.0": "mlp_in.fc2", "ffn.layers.1": "mlp_in.fc1"},',
        ("tests/test_checkpoints.py", "-k", "mmpretrain_layout"),
    ),
    Mutant(
        "grey input from RGB weights: mean instead of sum",
        "models/weights.py",
        "        return weight.sum(dim=1, keepdim=True)",
        "        return weight.mean(dim=1, keepdim=True)",
        ("tests/test_checkpoints.py", "-k", "adapt"),
    ),
    Mutant(
        "export metadata: class names dropped",
        "tools/export.py",
        '        "class_names": None if class_names is None else [str(c) for c in class_names],',
        '        "class_names": None,',
        ("tests/test_export.py", "-k", "metadata_round_trip or eval_and_predict"),
    ),
    Mutant(
        "export metadata: another mean",
        "tools/export.py",
        '        "meta": dataclasses.asdict(meta),',
        '        "meta": dataclasses.asdict(dataclasses.replace(meta, mean=tuple(0.5 for _ in meta.mean))),',
        ("tests/test_export.py", "-k", "metadata_round_trip or eval_and_predict"),
    ),
    Mutant(
        "evaluation: images not cast to the weights' dtype (bf16)",
        "evaluation.py",
        "        x = x.to(device=device, dtype=dtype, non_blocking=copy_async)",
        "        x = x.to(device=device, non_blocking=copy_async)",
        ("tests/test_eval.py", "-k", "bf16_weights"),
    ),
    Mutant(
        "fused op: never told to compute in low precision",
        "kernels/inner.py",
        "low_precision=dtype == torch.bfloat16)",
        "low_precision=False)",
        ("tests/test_fused.py", "tests/test_kernel_op.py", "-k", "bf16 or low_precision"),
    ),
    Mutant(
        "amp auto: bf16 from avx512_bf16 on any vendor",
        "utils/amp.py",
        '    return "avx512_bf16" in flags and _cpu_vendor() == "AuthenticAMD"',
        '    return "avx512_bf16" in flags',
        ("tests/test_amp.py",),
    ),
    # --- the boundary between the model and the op, and the checks that choose a path (issue 30)
    Mutant(
        "op boundary: inner qkv biases dropped on the way in",
        "kernels/op.py",
        "attn.qk.weight, attn.qk.bias, attn.v.weight, attn.v.bias,",
        "attn.qk.weight, None, attn.v.weight, None,",
        BOUNDARY,
    ),
    Mutant(
        "op boundary: LN1's bias passed as LN2's",
        "kernels/op.py",
        "ln2.weight, ln2.bias,",
        "ln2.weight, ln1.bias,",
        BOUNDARY,
    ),
    Mutant(
        "op boundary: the attention projection's bias zeroed",
        "kernels/op.py",
        "attn.proj.weight, attn.proj.bias,",
        "attn.proj.weight, torch.zeros_like(attn.proj.bias),",
        BOUNDARY,
    ),
    Mutant(
        "op boundary: fc2's bias zeroed",
        "kernels/op.py",
        "mlp.fc2.weight, mlp.fc2.bias)",
        "mlp.fc2.weight, torch.zeros_like(mlp.fc2.bias))",
        BOUNDARY,
    ),
    Mutant(
        "op boundary: the MLP branch's drop-path scale dropped",
        "kernels/inner.py",
        "InnerWeights.of(block), attn_scale, mlp_scale,",
        "InnerWeights.of(block), attn_scale, None,",
        BOUNDARY,
    ),
    Mutant(
        "op boundary: different LayerNorm eps not sent to the reference path",
        "kernels/inner.py",
        "        and block.norm_in.eps == block.norm_mlp_in.eps\n",
        "",
        SLOT_TESTS,
    ),
    Mutant(
        "slots: an Identity accepted where the GELU belongs",
        "models/layers.py",
        'SLOTS = {"fc1": nn.Linear, "act": nn.GELU,',
        'SLOTS = {"fc1": nn.Linear, "act": (nn.GELU, nn.Identity),',
        SLOT_TESTS,
    ),
    Mutant(
        "slots: the reference MLP takes its shortcut whatever its slots hold",
        "models/layers.py",
        "        if self.is_plain():",
        "        if True:",
        SLOT_TESTS,
    ),
    Mutant(
        "slots: the block's DropPath slot not checked",
        "kernels/inner.py",
        "        and exactly(block.drop_path, DropPath)\n",
        "",
        SLOT_TESTS,
    ),
    Mutant(
        "hooks: a module's backward hooks ignored",
        "kernels/rules.py",
        "    return bool(forward or mod._backward_hooks or mod._backward_pre_hooks)",
        "    return bool(forward)",
        HOOK_TESTS,
    ),
    Mutant(
        "hooks: global backward hooks ignored",
        "kernels/rules.py",
        "        or nn_module._global_backward_hooks\n",
        "",
        HOOK_TESTS,
    ),
    Mutant(
        "hooks: the word-embedding GEMM taken whatever the conv holds",
        "models/tnt.py",
        'if self.fused and exactly(self.proj, nn.Conv2d) and self.proj.padding_mode == "zeros":',
        "if self.fused:",
        ("tests/test_fused.py", "-k", "word_embedding"),
    ),
    Mutant(
        "backward: every gradient computed whatever autograd needs",
        "kernels/op.py",
        "*ctx.options, output_mask(ctx.needs_input_grad))",
        "*ctx.options, [True] * len(GROUPS))",
        MASK_TESTS,
    ),
    Mutant(
        "backward: the qkv gradients gated by the projection's flag",
        "csrc/inner_transformer_tile.h",
        "  if (need.qkv) {",
        "  if (need.proj) {",
        MASK_TESTS,
    ),
    Mutant(
        "backward: recomputes the forward in fp32 for a low-precision call",
        "csrc/inner_transformer.cpp",
        "fc1_b, fc2_w, fc2_b, attn_scale, mlp_scale, num_heads, eps, low_precision, true);",
        "fc1_b, fc2_w, fc2_b, attn_scale, mlp_scale, num_heads, eps, false, true);",
        ("tests/test_kernel_op.py", "-k", "bf16_backward"),
    ),
    Mutant(
        "triton kernel: softmax scale dropped",
        "kernels/triton_kernels.py",
        "_mm(q, tl.trans(k), DOT) * scale",
        "_mm(q, tl.trans(k), DOT)",
        TRITON,
    ),
    Mutant(
        "triton kernel: GELU derivative without the density term",
        "kernels/triton_kernels.py",
        "tl.erf(h * 0.7071067811865476)) + h * tl.exp(-0.5 * h * h) * 0.3989422804014327",
        "tl.erf(h * 0.7071067811865476))",
        TRITON,
    ),
    Mutant(
        "triton kernel: mlp_scale not applied to the MLP branch's gradient",
        "kernels/triton_kernels.py",
        "    dm = dy * mlp_scale[:, None]\n",
        "    dm = dy\n",
        TRITON,
    ),
    Mutant(
        "triton kernel: LN1 weight gradient from the LN output, not xhat",
        "kernels/triton_kernels.py",
        "tl.sum(dxn1 * xhat1, axis=0)",
        "tl.sum(dxn1 * xn1, axis=0)",
        TRITON,
    ),
    Mutant(
        "triton op: qkv weight gradient against LN2's output",
        "kernels/triton_op.py",
        "w = dqkv.t() @ xn1",
        "w = dqkv.t() @ xn2",
        TRITON,
    ),
    Mutant(
        "triton kernel: interpreter's bf16 rounding truncates",
        "kernels/triton_kernels.py",
        "bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000",
        "bits = bits & 0xFFFF0000",
        TRITON_LOW,
    ),
    Mutant(
        "triton dispatch: the fused switch ignored on CUDA",
        "kernels/backend.py",
        '        return "reference"\n    setting = kernel_backend_setting()',
        "        pass\n    setting = kernel_backend_setting()",
        TRITON_DISPATCH,
    ),
    Mutant(
        "triton dispatch: autocast's dtype ignored",
        "kernels/op.py",
        "    return autocast if autocast in (torch.bfloat16, torch.float16) else torch.float32",
        "    return torch.float32",
        TRITON_DISPATCH,
    ),
    Mutant(
        "validation split: held-out images stay in training",
        "data/splits.py",
        "    return order[n_val:].sort().values, order[:n_val].sort().values",
        "    return order.sort().values, order[:n_val].sort().values",
        ("tests/test_data.py", "-k", "held_out"),
    ),
    Mutant(
        "validation split: not seeded by val_seed",
        "data/splits.py",
        "manual_seed(mix_seed(seed, 0x5E1))",
        "manual_seed(mix_seed(0, 0x5E1))",
        ("tests/test_data.py", "-k", "held_out"),
    ),
    # --- the rules' verdict, kept on the block until something it reads changes (issue 35)
    Mutant(
        "rules cache: hooks added after a forward not noticed",
        "kernels/rules.py",
        "sum(_hooks(m) for m in modules if m is not None)",
        "0",
        SLOT_TESTS,
    ),
    Mutant(
        "rules cache: a parameter replaced or removed not noticed",
        "kernels/rules.py",
        'key += tuple((type(m), *map(type, m.__dict__["_parameters"].values())) for m',
        "key += tuple((type(m),) for m",
        SLOT_TESTS,
    ),
    Mutant(
        "rules cache: plain values (eps, the GELU's approximation) not in the key",
        "kernels/rules.py",
        "key = (global_hooks(), extra,",
        "key = (global_hooks(), (),",
        SLOT_TESTS,
    ),
]


def run_tests(args: tuple[str, ...], timeout: float) -> tuple[int, float, str]:
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:randomly", "-p", "no:cacheprovider", *args]
    t0 = time.perf_counter()
    try:
        res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, time.perf_counter() - t0, "timeout"
    tail = (res.stdout.strip().splitlines() or [""])[-1]
    return res.returncode, time.perf_counter() - t0, tail


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=None, help="mutants whose name contains this (case-insensitive)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per test run (default: 600)")
    args = parser.parse_args(argv)
    mutants = [m for m in MUTANTS if args.only is None or args.only.lower() in m.name.lower()]
    if args.list:
        for m in mutants:
            print(f"{m.name:<60} {m.path:<28} {' '.join(m.tests)}")
        return 0
    for m in mutants:  # every mutant must still apply: one whose text moved would be a silent survivor
        text = (SRC / m.path).read_text()
        if text.count(m.old) != 1:
            print(f"mutant {m.name!r}: its text occurs {text.count(m.old)} times in {m.path}; update it")
            return 2
    baseline = sorted({m.tests for m in mutants})
    for tests in baseline:
        code, secs, tail = run_tests(tests, args.timeout)
        if code != 0:
            print(f"the unchanged tree fails {' '.join(tests)} ({tail}): fix that first")
            return 2
    rows, killed = [], 0
    for m in mutants:
        path = SRC / m.path
        original = path.read_text()
        try:
            path.write_text(original.replace(m.old, m.new, 1))
            code, secs, tail = run_tests(m.tests, args.timeout)
        finally:
            path.write_text(original)
        dead = code not in (0, 5)  # 5: no test collected, which proves nothing
        killed += dead
        verdict = "killed" if dead else ("no tests ran" if code == 5 else "SURVIVED")
        rows.append((m.name, m.path, verdict, secs, tail))
        print(f"{verdict:<9} {secs:6.1f} s  {m.name}", flush=True)
    print()
    print("| mutant | file | verdict | seconds | tests said |")
    print("|---|---|---|---|---|")
    for name, path, verdict, secs, tail in rows:
        print(f"| {name} | {path} | {verdict} | {secs:.0f} | {tail} |")
    print(f"\n{killed} of {len(rows)} mutants killed.")
    print(f"command: python benchmarks/mutants.py{' --only ' + repr(args.only) if args.only else ''}")
    return 0 if killed == len(rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
