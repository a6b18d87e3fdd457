"""The projected words joining the patch tokens, forward + backward: the earlier form against TNTBlock's.

    .venv/bin/python benchmarks/patch_join.py [--calls 40]

``cat([patches[:, :1], patches[:, 1:] + add])`` (before issue 34) against ``patches + cat([zeros, add])``
(what ``TNTBlock.forward`` does now), at the mini's shapes (batch 128) and TNT-S's (batch 16), the two
alternating call by call; median ms of ``--calls`` calls each.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from mini_profile import cpu_name  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=40)
    args = parser.parse_args()
    print(f"CPU: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"command: python benchmarks/patch_join.py {' '.join(sys.argv[1:])}".rstrip())
    print()
    print("| tokens (B, 1+N, d) | slice + add + cat ms | add of [zeros, add] ms | ratio |")
    print("|---|---|---|---|")
    for B, N, d in ((128, 49, 128), (16, 196, 384)):
        p = torch.randn(B, N + 1, d, requires_grad=True)
        a = torch.randn(B, N, d, requires_grad=True)
        g = torch.randn(B, N + 1, d)
        forms = {
            "old": lambda p=p, a=a, g=g: torch.cat([p[:, :1], p[:, 1:] + a], dim=1).backward(g),
            "new": lambda p=p, a=a, g=g: (
                p + torch.cat([a.new_zeros(a.shape[0], 1, a.shape[2]), a], 1)
            ).backward(g),
        }
        times = {k: [] for k in forms}
        for r in range(args.calls):
            for k in forms if r % 2 else reversed(list(forms)):
                t0 = time.perf_counter()
                forms[k]()
                times[k].append((time.perf_counter() - t0) * 1e3)
        old, new = (statistics.median(times[k]) for k in forms)
        print(f"| ({B}, {N + 1}, {d}) | {old:.2f} | {new:.2f} | **{new / old:.2f}** |")


if __name__ == "__main__":
    main()
