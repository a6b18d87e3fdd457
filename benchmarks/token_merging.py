"""Issue 21: token merging (ToMe) on TNT, against DeiT-S merged by the same code, and accuracy against r.

    python benchmarks/token_merging.py speed [--sizes 224 384] [--rs 0 4 8 13 16] [--runs 3]
        [--batch 32] [--threads N] [--out benchmarks/results/token_merging_speed.json]
    python benchmarks/token_merging.py accuracy --run runs/demo [--run runs/tome56 ...]
        [--rs 0 1 2 3 4 6 8] [--runs 3] [--out benchmarks/results/token_merging_accuracy.json]
    python benchmarks/token_merging.py plot [--accuracy-json ...] [--figure docs/figures/token_merging.png]

``speed``: TNT-S (tntvision, ``set_token_merging(r)``) and DeiT-S (timm's ``deit_small_patch16_224`` at the
same input size, its blocks run by :class:`MergedViT` with tntvision's ``bipartite_soft_matching``,
``merge_weighted`` and ``proportional_attention``: the same matching, averaging and attention bias) for
every ``r``, fp32 inference. Throughput: a batch of ``--batch`` images; latency: one image. Both models are
timed in the same process, interleaved (``tntvision.tools.bench``'s round-robin), and the whole measurement
is repeated ``--runs`` times: the table gives the median over runs and the spread (min-max). r=0 is each
model's own forward (no merging code at all). MACs are what ``torch.utils.flop_counter`` counts for one
image (TNT: as ``tnt info`` counts them).

``accuracy``: for each trained run folder (``tnt train`` output on Fashion-MNIST), top-1 on the validation
split its training held out and on the test set for every ``r``, and the model's own images/s at batch 256
for every ``r`` (same process, ``--runs`` repeats). Any choice (which ``r`` to recommend) is made from the
validation column; the test column only measures.

``plot``: test accuracy against images/s for every run in the accuracy JSON, one line per model, each
point labelled with its ``r``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from tntvision import create_model
from tntvision.models.merging import (
    bipartite_soft_matching,
    merge_schedule,
    merge_weighted,
    proportional_attention,
)
from tntvision.tools.bench import _time_interleaved
from tntvision.tools.info import count_macs, forward_macs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # the scripts' shared helpers
from speed import cpu_name, has_amx  # noqa: E402

COMMAND = "python benchmarks/token_merging.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def cpu_model() -> str:
    """The CPU's model name and whether it has AMX (``benchmarks/speed.py``'s helpers)."""
    return cpu_name() + (" (AMX)" if has_amx() else " (no AMX)")


class MergedViT(nn.Module):
    """A timm ``VisionTransformer`` (DeiT) with ToMe, through tntvision's merging functions.

    Each block: proportional attention over the current tokens, then ``r`` tokens merged by bipartite
    matching on the keys (averaged over heads), then the MLP; the class token is never merged and pools
    the output as in DeiT. ``r == 0`` in every block runs the timm model's own forward.
    """

    def __init__(self, vit: nn.Module, r: int | Sequence[int]) -> None:
        super().__init__()
        self.vit = vit
        self.schedule = merge_schedule(r, len(vit.blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.vit
        if not any(self.schedule):
            return v(x)
        x = v.norm_pre(v.patch_drop(v._pos_embed(v.patch_embed(x))))  # (B, 1+N, C)
        size = x.new_ones(x.shape[0], x.shape[1], 1)  # (B, 1+N, 1)
        for blk, r in zip(v.blocks, self.schedule, strict=True):
            a = blk.attn
            h = blk.norm1(x)
            B, N, C = h.shape
            qkv = (
                a.qkv(h).reshape(B, N, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
            )  # (3, B, h, N, hd)
            q, k, val = qkv.unbind(0)
            q, k = a.q_norm(q), a.k_norm(k)
            y = proportional_attention(q, k, val, size).transpose(1, 2).reshape(B, N, C)  # (B, N, C)
            x = x + blk.ls1(a.proj(a.norm(y)))
            if r > 0 and N >= 3:
                merge = bipartite_soft_matching(k.mean(dim=1), r, protected=1)
                x, size = merge_weighted(merge, x, size)
            x = x + blk.ls2(blk.mlp(blk.norm2(x)))
        return v.forward_head(v.norm(x))


def _perturb(model: nn.Module, seed: int = 0) -> nn.Module:
    """Move weights off their init (zero biases, unit LayerNorms) so that tokens differ as trained ones do."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return model.eval()


def _inference(model: nn.Module, x: torch.Tensor):
    def run() -> None:
        with torch.inference_mode():
            model(x)

    return run


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def speed(args: argparse.Namespace) -> dict:
    import timm

    torch.set_num_threads(args.threads or torch.get_num_threads())
    rows = []
    for size in args.sizes:
        torch.manual_seed(0)
        tnt = _perturb(create_model("tnt_s_patch16_224", img_size=size))
        vit = _perturb(timm.create_model("deit_small_patch16_224", img_size=size))
        for r in args.rs:
            tnt.set_token_merging(r)
            deit = MergedViT(vit, r).eval()
            macs = {
                "TNT-S": count_macs(tnt, size),
                "DeiT-S": forward_macs(deit, torch.zeros(1, 3, size, size)),
            }
            models = {"TNT-S": tnt, "DeiT-S": deit}
            per_run: dict[str, dict[str, list[float]]] = {
                n: {"img_per_s": [], "latency_ms": []} for n in models
            }
            for _ in range(args.runs):
                xb = torch.randn(args.batch, 3, size, size)
                x1 = torch.randn(1, 3, size, size)
                tb = _time_interleaved(
                    {n: _inference(m, xb) for n, m in models.items()}, warmup=1, rounds=args.rounds
                )
                t1 = _time_interleaved(
                    {n: _inference(m, x1) for n, m in models.items()}, warmup=2, rounds=4 * args.rounds
                )
                for n in models:
                    per_run[n]["img_per_s"].append(args.batch / statistics.median(tb[n]))
                    per_run[n]["latency_ms"].append(1e3 * statistics.median(t1[n]))
            for n in models:
                rows.append(
                    {
                        "model": n,
                        "img_size": size,
                        "r": r,
                        "macs": macs[n],
                        "img_per_s": _spread(per_run[n]["img_per_s"]),
                        "latency_ms": _spread(per_run[n]["latency_ms"]),
                        "runs": per_run[n],
                    }
                )
                print(_speed_line(rows[-1], rows), flush=True)
    return {
        "command": COMMAND,
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "batch": args.batch,
        "rounds": args.rounds,
        "runs": args.runs,
        "rows": rows,
    }


def _base(row: dict, rows: list[dict]) -> dict:
    return next(
        x for x in rows if x["model"] == row["model"] and x["img_size"] == row["img_size"] and x["r"] == 0
    )


def _speed_line(row: dict, rows: list[dict]) -> str:
    b = _base(row, rows)
    ips, lat = row["img_per_s"], row["latency_ms"]
    return (
        f"| {row['model']} | {row['img_size']} | {row['r']} | {row['macs'] / 1e9:.2f} | "
        f"{row['macs'] / b['macs']:.2f}x | {ips['median']:.1f} ({ips['min']:.1f}-{ips['max']:.1f}) | "
        f"{ips['median'] / b['img_per_s']['median']:.2f}x | "
        f"{lat['median']:.1f} ({lat['min']:.1f}-{lat['max']:.1f}) | "
        f"{b['latency_ms']['median'] / lat['median']:.2f}x |"
    )


def speed_table(result: dict) -> str:
    head = (
        f"CPU: {result['cpu']}, {result['threads']} threads, torch {result['torch']}, fp32, batch "
        f"{result['batch']} for images/s, 1 image for latency; median of {result['runs']} runs (min-max); "
        f"`{result['command']}`\n\n"
        "| model | px | r | GMACs | MACs vs r=0 | images/s | vs r=0 | latency ms | vs r=0 |\n"
        "|---|---|---|---|---|---|---|---|---|"
    )
    rows = sorted(result["rows"], key=lambda x: (x["img_size"], x["model"] != "TNT-S", x["r"]))
    return "\n".join([head, *(_speed_line(x, result["rows"]) for x in rows)])


# ------------------------------------------------------------------------------------------ accuracy


def accuracy(args: argparse.Namespace) -> dict:
    from tntvision.tools.checkpoints import open_model
    from tntvision.tools.evaluate import evaluate_checkpoint

    torch.set_num_threads(args.threads or torch.get_num_threads())
    out = []
    for spec in args.run:
        run, _, rs_text = spec.partition("=")
        rs = [int(v) for v in rs_text.split(",")] if rs_text else args.rs
        model = open_model(run).eval()
        size = model.cfg.img_size
        entry = {"run": run, "model": model.model_name, "img_size": size, "rows": []}
        speeds: dict[int, list[float]] = {r: [] for r in rs}
        for _ in range(args.runs):
            x = torch.randn(256, model.cfg.in_chans, size, size)
            fns = {r: _inference(open_model(run, merge_tokens=r).eval(), x) for r in rs}
            times = _time_interleaved(fns, warmup=1, rounds=args.rounds)
            for r in rs:
                speeds[r].append(256 / statistics.median(times[r]))
        with tempfile.TemporaryDirectory() as tmp:
            for r in rs:
                res = {}
                for split in ("val", "test"):
                    e = evaluate_checkpoint(
                        run, "fashion-mnist", split=split, out=tmp, progress=False, merge_tokens=r
                    )
                    res[split] = e.top1
                n_patches = (size // model.cfg.patch_size) ** 2
                tokens = _tokens_left(1 + n_patches, merge_schedule(r, len(model.blocks)))
                row = {
                    "r": r,
                    "val_top1": res["val"],
                    "test_top1": res["test"],
                    "macs": count_macs(open_model(run, merge_tokens=r), size),
                    "tokens_after_each_block": tokens,
                    "img_per_s": _spread(speeds[r]),
                    "runs": speeds[r],
                }
                entry["rows"].append(row)
                print(_accuracy_line(row, entry["rows"][0]), flush=True)
        out.append(entry)
    return {
        "command": COMMAND,
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "runs": args.runs,
        "models": out,
    }


def _tokens_left(n: int, schedule: Sequence[int]) -> list[int]:
    left = []
    for r in schedule:
        n -= min(r, (n - 1) // 2) if n >= 3 else 0
        left.append(n)
    return left


def _accuracy_line(row: dict, base: dict) -> str:
    ips = row["img_per_s"]
    return (
        f"| {row['r']} | {'-'.join(map(str, row['tokens_after_each_block']))} | {row['macs'] / 1e6:.1f} | "
        f"{ips['median']:.0f} ({ips['min']:.0f}-{ips['max']:.0f}) | "
        f"{ips['median'] / base['img_per_s']['median']:.2f}x | "
        f"{row['val_top1']:.2f} ({row['val_top1'] - base['val_top1']:+.2f}) | "
        f"{row['test_top1']:.2f} ({row['test_top1'] - base['test_top1']:+.2f}) |"
    )


def accuracy_table(result: dict) -> str:
    parts = [
        f"CPU: {result['cpu']}, {result['threads']} threads, torch {result['torch']}, fp32, batch 256; "
        f"images/s: median of {result['runs']} runs (min-max); `{result['command']}`"
    ]
    for entry in result["models"]:
        parts.append(
            f"\n`{entry['model']}` at {entry['img_size']} px (`{entry['run']}`)\n\n"
            "| r | tokens after each block | MMACs | images/s | vs r=0 | val top-1 (vs r=0) "
            "| test top-1 (vs r=0) |\n"
            "|---|---|---|---|---|---|---|"
        )
        parts.extend(_accuracy_line(row, entry["rows"][0]) for row in entry["rows"])
        parts.append("\n" + first_speedup_note(entry, 1.3))
    return "\n".join(parts)


def first_speedup_note(entry: dict, target: float) -> str:
    """The smallest measured r whose images/s reach ``target`` x r=0, and what it costs in top-1."""
    base = entry["rows"][0]
    for row in entry["rows"]:
        gain = row["img_per_s"]["median"] / base["img_per_s"]["median"]
        if gain >= target:
            dv, dt = row["val_top1"] - base["val_top1"], row["test_top1"] - base["test_top1"]
            return (
                f"First r with >= {target}x images/s: r={row['r']} ({gain:.2f}x): validation {dv:+.2f}, "
                f"test {dt:+.2f} points."
            )
    return f"No measured r reaches {target}x images/s."


def plot(args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result = json.loads(Path(args.accuracy_json).read_text())
    fig, axes = plt.subplots(
        1, len(result["models"]), figsize=(5.5 * len(result["models"]), 4.2), squeeze=False
    )
    for ax, entry in zip(axes[0], result["models"], strict=True):
        xs = [row["img_per_s"]["median"] for row in entry["rows"]]
        lo = [row["img_per_s"]["median"] - row["img_per_s"]["min"] for row in entry["rows"]]
        hi = [row["img_per_s"]["max"] - row["img_per_s"]["median"] for row in entry["rows"]]
        for key, style, label in (("test_top1", "o-", "test"), ("val_top1", "s--", "validation")):
            ys = [row[key] for row in entry["rows"]]
            ax.errorbar(xs, ys, xerr=[lo, hi], fmt=style, capsize=3, label=label)
        for row, x in zip(entry["rows"], xs, strict=True):
            ax.annotate(
                f"r={row['r']}",
                (x, row["test_top1"]),
                textcoords="offset points",
                xytext=(4, -12),
                fontsize=8,
            )
        ax.set_title(f"{entry['model']} at {entry['img_size']} px, Fashion-MNIST")
        ax.set_xlabel("images/s (batch 256, median of runs; bars: min-max)")
        ax.set_ylabel("top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"Token merging: accuracy against speed ({result['cpu']})", fontsize=9)
    fig.tight_layout()
    Path(args.figure).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.figure, dpi=120)
    print(f"wrote {args.figure}")


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--sizes", type=int, nargs="+", default=[224, 384])
    s.add_argument("--rs", type=int, nargs="+", default=[0, 4, 8, 13, 16])
    s.add_argument("--batch", type=int, default=32)
    s.add_argument("--rounds", type=int, default=3)
    s.add_argument("--runs", type=int, default=3)
    s.add_argument("--threads", type=int, default=0)
    s.add_argument("--out", default=str(ROOT / "benchmarks/results/token_merging_speed.json"))
    a = sub.add_parser("accuracy")
    a.add_argument(
        "--run",
        action="append",
        required=True,
        help="a `tnt train` run folder, optionally =R1,R2,... (repeatable)",
    )
    a.add_argument("--rs", type=int, nargs="+", default=[0, 1, 2, 3, 4, 6, 8])
    a.add_argument("--rounds", type=int, default=5)
    a.add_argument("--runs", type=int, default=3)
    a.add_argument("--threads", type=int, default=0)
    a.add_argument("--out", default=str(ROOT / "benchmarks/results/token_merging_accuracy.json"))
    f = sub.add_parser("plot")
    f.add_argument("--accuracy-json", default=str(ROOT / "benchmarks/results/token_merging_accuracy.json"))
    f.add_argument("--figure", default=str(ROOT / "docs/figures/token_merging.png"))
    args = p.parse_args(argv)
    if args.cmd == "plot":
        plot(args)
        return
    result = speed(args) if args.cmd == "speed" else accuracy(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print()
    print(speed_table(result) if args.cmd == "speed" else accuracy_table(result))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
