"""What a TNT block spends deciding between the fused op and the reference path, and TNT-S's batch-1
forward time, in the tree on PYTHONPATH (the code before issue 35 or after it: either API is found).

    PYTHONPATH=<tree>/src python benchmarks/decision_cost.py

Prints one line: the median and min over 5 x 2000 decisions for block 0 of TNT-S (196 sentences of 16
words), and the median and min of 30 batch-1 forwards under ``torch.inference_mode``.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

import tntvision


def main() -> None:
    model = tntvision.create_model("tnt_s_patch16_224").eval()
    block, words = model.blocks[0], torch.randn(196, 16, 24)
    try:
        from tntvision.kernels import inner_backend

        def decide():
            return inner_backend(block, words)
    except ImportError:  # before issue 35: the block decided itself

        def decide():
            return block.fused_inner_backend(words)

    decide()
    per_call = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(2000):
            decide()
        per_call.append((time.perf_counter() - t) / 2000 * 1e6)
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        for _ in range(5):
            model(x)
        forward = []
        for _ in range(30):
            t = time.perf_counter()
            model(x)
            forward.append((time.perf_counter() - t) * 1e3)
    print(
        f"{tntvision.__file__}: decision per block {statistics.median(per_call):.1f} us "
        f"(min {min(per_call):.1f}); TNT-S batch-1 forward {statistics.median(forward):.2f} ms "
        f"(min {min(forward):.2f})"
    )
    print(f"command: PYTHONPATH=... python {' '.join(sys.argv)}")


if __name__ == "__main__":
    main()
