"""Where a batch-1 forward of TNT-S goes, operator by operator, next to DeiT-S's (timm).

    .venv/bin/python benchmarks/latency_profile.py [--batch 1] [--top 20]

One inference-mode forward of each after five warm-up calls, under ``torch.profiler``
(:func:`tntvision.tools.bench.profile_ops`): self CPU ms and calls of the ``--top`` operators of either
model and the sum over every operator.
"""

from __future__ import annotations

import argparse
import sys

import timm
import torch

from tntvision import create_model
from tntvision.tools.bench import profile_ops

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from mini_profile import cpu_name  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, 224, 224)
    models = {"TNT-S": create_model("tnt_s_patch16_224")}
    models["DeiT-S"] = timm.create_model("deit_small_patch16_224")
    ops, totals = {}, {}
    for name, model in models.items():
        model.eval()

        def forward(model=model) -> None:
            with torch.inference_mode():
                model(x)

        for _ in range(5):
            forward()
        rows = profile_ops(forward, top=10_000)
        ops[name] = {r["op"]: (r["self_ms"], r["calls"]) for r in rows}
        totals[name] = sum(r["self_ms"] for r in rows)
    ours, deit = ops["TNT-S"], ops["DeiT-S"]
    top = sorted(set(ours) | set(deit), key=lambda k: -max(ours.get(k, (0, 0))[0], deit.get(k, (0, 0))[0]))
    print(f"CPU: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"command: python benchmarks/latency_profile.py {' '.join(sys.argv[1:])}".rstrip())
    print()
    print("| op | TNT-S ms (calls) | DeiT-S ms (calls) |")
    print("|---|---|---|")
    for op in top[: args.top]:
        a, b = ours.get(op, (0.0, 0)), deit.get(op, (0.0, 0))
        print(f"| `{op[:60]}` | {a[0]:.1f} ({a[1]}) | {b[0]:.1f} ({b[1]}) |")
    print(f"| total (every operator) | {totals['TNT-S']:.1f} | {totals['DeiT-S']:.1f} |")


if __name__ == "__main__":
    main()
