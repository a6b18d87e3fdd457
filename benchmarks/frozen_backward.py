"""What a frozen backbone saves now that the fused op's backward computes only the gradients autograd needs.

A saliency map (or any input gradient through a frozen TNT: parameters without gradients, the image with
one) asks each inner transformer's backward for the words' gradient alone. Before issue 30 the op computed
every weight gradient anyway. Both are timed here in the same process, interleaved round by round: "all
gradients" runs the op with every gradient asked for (what it did before: ``output_mask`` forced to all
True), "only needed" as autograd asks. Two rows: the op's backward alone at the model's inner shapes, and
a whole forward + backward of the frozen model to the image.

    python benchmarks/frozen_backward.py                       # TNT-S, batch 16, 3 runs
    python benchmarks/frozen_backward.py --model tnt_mini_patch4_28 --batch 256

Prints a table (median seconds of each run, the spread over runs) and the command that made it.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

import tntvision
from tntvision import kernels
from tntvision.tools.bench import _time_interleaved

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the scripts' shared helpers
from speed import cpu_name, has_amx  # noqa: E402

ALL = [True] * 7


def op_backward(block: torch.nn.Module, words: torch.Tensor, mask: list[bool]) -> Callable[[], None]:
    """One call of the op's backward on ``block``'s weights with this ``output_mask``."""
    attn, mlp = block.attn_in, block.mlp_in
    weights = (block.norm_in.weight, block.norm_in.bias, attn.qk.weight, attn.qk.bias, attn.v.weight)
    weights += (attn.v.bias, attn.proj.weight, attn.proj.bias, block.norm_mlp_in.weight)
    weights += (block.norm_mlp_in.bias, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias)
    grad = torch.randn_like(words)

    def run() -> None:
        with torch.no_grad():
            torch.ops.tntvision.inner_transformer_backward(
                grad, words, *weights, None, None, attn.num_heads, block.norm_in.eps, False, mask
            )

    return run


def saliency_step(
    model: torch.nn.Module, images: torch.Tensor, *, every_gradient: bool
) -> Callable[[], None]:
    """Forward and backward of the frozen model to the images; ``every_gradient``: the op is asked for
    every gradient, as before issue 30."""

    def run() -> None:
        x = images.detach().requires_grad_(True)
        real = kernels.output_mask
        if every_gradient:
            kernels.output_mask = lambda needs: ALL
        try:
            model(x).logsumexp(-1).sum().backward()
        finally:
            kernels.output_mask = real

    return run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tnt_s_patch16_224")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved calls of each per run")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = tntvision.create_model(args.model).eval().requires_grad_(False)
    cfg = model.cfg
    images = torch.randn(args.batch, cfg.in_chans, cfg.img_size, cfg.img_size)
    block = next(b for b in model.blocks if b.has_inner)
    m, c = model.pixel_embed.num_words, cfg.inner_dim
    words = torch.randn(args.batch * model.grid_size[0] * model.grid_size[1], m, c)
    rows = {
        "op backward": {
            "all gradients": op_backward(block, words, ALL),
            "only needed": op_backward(block, words, [True] + [False] * 6),
        },
        "saliency step": {
            "all gradients": saliency_step(model, images, every_gradient=True),
            "only needed": saliency_step(model, images, every_gradient=False),
        },
    }
    amx = "AMX" if has_amx() else "no AMX"
    print(f"CPU: {cpu_name()} ({amx}), {args.threads} threads, torch {torch.__version__}")
    print(f"model {args.model}, batch {args.batch}, fused kernel {kernels.kernel_dispatch()['isa']}\n")
    print("| what | all gradients (s) | only needed (s) | saved | runs |")
    print("|---|---|---|---|---|")
    for name, fns in rows.items():
        medians: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(args.runs):
            times = _time_interleaved(fns, warmup=1, rounds=args.rounds)
            for k, t in times.items():
                medians[k].append(statistics.median(t))
        full, lean = statistics.median(medians["all gradients"]), statistics.median(medians["only needed"])
        savings = [1 - b / a for a, b in zip(medians["all gradients"], medians["only needed"], strict=True)]
        print(
            f"| {name} | {full:.4f} | {lean:.4f} | {1 - lean / full:.0%} "
            f"({min(savings):.0%} to {max(savings):.0%}) | {args.runs} x {args.rounds} |"
        )
    print("\ncommand: python benchmarks/frozen_backward.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]))


if __name__ == "__main__":
    main()
