"""Speed table of BENCHMARKS.md: our TNT-S against timm's DeiT-S (the headline), timm's TNT-S and our own
reference path, all in one process, interleaved.

    .venv/bin/python benchmarks/speed.py [--repeat 3] [--quick] [--compile] [--out BENCHMARKS.md]

Every row is one :func:`tntvision.tools.bench.bench_model` call: the models run round-robin in this process
(same allocator, same load), so the ratios are the numbers to read; absolute img/s on a shared 2-core
machine move a lot from minute to minute. The whole plan runs ``--repeat`` times; the table gives the
median of the per-run ratios and their min-max spread. Peak memory comes from one fresh child process per
model. The raw results go to benchmarks/results/speed.json; the `## Speed` section of BENCHMARKS.md is
replaced (other sections are kept).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

from tntvision.kernels import kernel_dispatch
from tntvision.tools.bench import bench_model

ROOT = Path(__file__).resolve().parents[1]
MODEL = "tnt_s_patch16_224"
DEIT = "timm:deit_small_patch16_224"
TIMM = "timm"
REF = "ours:reference"
MINI, MINI_VIT = "tnt_mini_patch4_28", "tntvision:vit_mini_patch4_28"

# (label, bench_model arguments, the workload to read, the goal for ours / baseline time)
PLAN = [
    ("inference fp32", dict(batch_size=16), "inference", 1.25),
    ("inference bf16 autocast", dict(batch_size=16, amp="bfloat16"), "inference", 1.25),
    ("inference bf16 weights", dict(batch_size=16, dtype="bfloat16"), "inference", 1.25),
    ("latency fp32", dict(batch_size=1, workloads=("latency",)), "latency", 1.25),
    ("train step fp32", dict(batch_size=16, train=True, workloads=()), "train", 1.30),
    (
        "train step bf16 autocast",
        dict(batch_size=16, amp="bfloat16", train=True, workloads=()),
        "train",
        1.30,
    ),
    (
        "mini train step bf16 autocast",
        dict(batch_size=128, amp="bfloat16", train=True, workloads=()),
        "train",
        1.15,
    ),
    ("mini train step fp32", dict(batch_size=128, train=True, workloads=()), "train", 1.15),
]
MEMORY_GOAL = 0.70  # training peak memory / timm TNT-S's


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def has_amx() -> bool:
    try:
        return "amx_tile" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def run_plan(quick: bool, compile_rows: bool, rows: str = "", rounds: int = 0) -> list[dict]:
    rounds = rounds or (2 if quick else 6)
    out = []
    for label, kw, workload, goal in PLAN:
        if rows and not any(r.strip() and r.strip() in label for r in rows.split(",")):
            continue
        mini = label.startswith("mini")
        kw = {"rounds": rounds if "train" not in kw else max(2, rounds - 2), "memory": False, **kw}
        if quick:
            kw["batch_size"] = min(kw["batch_size"], 4 if mini else 2)
        if label == "train step fp32":
            kw["memory"] = not quick
        compare = [MINI_VIT, REF] if mini else [DEIT, TIMM, REF]
        t0 = time.time()
        print(f"bench {label} ...", file=sys.stderr, flush=True)
        r = bench_model(model_name=MINI if mini else MODEL, compare=compare, **kw)
        print(f"  done in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
        out.append({"label": label, "workload": workload, "goal": goal, "baseline": compare[0], "result": r})
    if compile_rows:
        for amp in ("none", "bfloat16"):
            label = "inference compiled" + (" bf16 autocast" if amp != "none" else " fp32")
            r = bench_model(
                model_name=MODEL,
                compare=[DEIT, TIMM],
                batch_size=16,
                amp=amp,
                compile=True,
                memory=False,
                rounds=rounds,
                workloads=("inference",),
            )
            out.append({"label": label, "workload": "inference", "goal": None, "baseline": DEIT, "result": r})
    return out


def _spread(values: list[float]) -> str:
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:.2f}"
    return f"{med:.2f} ({min(values):.2f}-{max(values):.2f})"


def speed_section(runs: list[list[dict]], command: str) -> str:
    """The markdown of the `## Speed` section from ``runs`` (one list of rows per repeat)."""
    first = runs[0][0]["result"]
    kd = kernel_dispatch()
    lines = [
        "## Speed",
        "",
        f"CPU: {cpu_name()} ({'with' if has_amx() else 'without'} AMX), {first['threads']} threads, torch "
        f"{first['torch']}; fused kernel copy `{kd['isa']}`, low-precision GEMMs `{kd['bf16']}`. "
        f"TNT-S (`{MODEL}`) against timm's DeiT-S (`deit_small_patch16_224`), timm's "
        f"TNT-S (same weights) and our own pure-PyTorch reference path (`ours:reference`, fused kernels "
        "off), all in one process, interleaved round by round; the mini row is `tnt_mini_patch4_28` "
        "against its ViT twin `vit_mini_patch4_28`. Each cell: the median over "
        f"{len(runs)} runs of the script of that run's ratio of median times (time / baseline time: "
        "lower is faster), with the min-max over runs in brackets. `goal` is issue 18's. bf16 autocast = "
        "the same `torch.autocast` for every model; bf16 weights = weights and inputs held in bfloat16 "
        "(`tnt bench --dtype bfloat16`). MAC ratios come from `torch.utils.flop_counter` (one image).",
        "",
        "| row | batch | ours ms | ours / baseline | reference / baseline | timm TNT-S / baseline "
        "| MAC ratio | goal | met |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for i, row in enumerate(runs[0]):
        per_run = [run[i] for run in runs]
        res = [r["result"] for r in per_run]
        wl, base = row["workload"], row["baseline"]

        def ratios(impl: str, res=res, wl=wl, base=base) -> list[float]:
            return [
                r[wl]["per_impl"][impl]["median_ms"] / r[wl]["per_impl"][base]["median_ms"]
                for r in res
                if impl in r[wl]["per_impl"]
            ]

        ours = ratios("ours")
        med = statistics.median(ours)
        goal = row["goal"]
        met = "" if goal is None else ("yes" if med <= goal else "no")
        ours_ms = statistics.median(r[wl]["per_impl"]["ours"]["median_ms"] for r in res)
        cells = [_spread(ratios(k)) if ratios(k) else "" for k in (REF, TIMM)]
        lines.append(
            f"| {row['label']} | {res[0]['batch_size']} | {ours_ms:.1f} | **{_spread(ours)}** | {cells[0]} | "
            f"{cells[1]} | {res[0]['flop_ratio'][base]:.3f} | {'' if goal is None else goal} | {met} |"
        )
    mem = [row["result"]["memory"] for run in runs for row in run if "memory" in row["result"]]
    if mem:
        ratios = [m["ratio"][TIMM] for m in mem]
        per = mem[0]["per_impl"]
        lines += [
            "",
            f"Training peak memory (RSS high-water mark of a fresh process, TNT-S batch 16 fp32): ours "
            f"{per['ours']['peak_mb']:.0f} MB, timm TNT-S {per[TIMM]['peak_mb']:.0f} MB, DeiT-S "
            f"{per[DEIT]['peak_mb']:.0f} MB, our reference path {per[REF]['peak_mb']:.0f} MB (first run); "
            f"ours / timm TNT-S **{_spread(ratios)}**, goal <= {MEMORY_GOAL}: "
            f"{'met' if statistics.median(ratios) <= MEMORY_GOAL else 'not met'}.",
        ]
    comp = [row for row in runs[0] if row["result"].get("compile_s")]
    for row in comp:
        took = ", ".join(f"{k} {v:.0f} s" for k, v in row["result"]["compile_s"].items())
        lines.append(f"- {row['label']}: first call (compile) {took}.")
    lines += ["", f"Produced by `{command}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}).", ""]
    return "\n".join(lines)


def profile_section(batch: int = 16, top: int = 12) -> str:
    """Top operators (self CPU time, one call, ``torch.profiler``) of TNT-S on the reference path (before),
    on the fused path (after) and of DeiT-S, per workload: where the milliseconds over DeiT-S go."""
    import timm

    from tntvision import create_model
    from tntvision.tools.bench import _inference_fn, _on_path, _train_fn, profile_ops

    torch.manual_seed(0)
    models = {"ours": create_model(MODEL), "deit": timm.create_model("deit_small_patch16_224")}
    x = torch.randn(batch, 3, 224, 224)
    lines = [
        "### Profile: TNT-S before (reference path) and after (fused), and DeiT-S",
        "",
        f"Self CPU time of one call at batch {batch} (`torch.profiler`, {torch.get_num_threads()} threads), "
        f"top {top} operators of the fused run plus any other that costs DeiT-S or the reference path more "
        "than 5% of its total; `total` is the sum over all operators.",
    ]
    for label, make, amp in (
        ("inference fp32", _inference_fn, "none"),
        ("inference bf16 autocast", _inference_fn, "bfloat16"),
        ("train step fp32", _train_fn, "none"),
    ):
        prof = {
            "reference": profile_ops(_on_path(make(models["ours"], x, "cpu", amp), False), top=200),
            "fused": profile_ops(_on_path(make(models["ours"], x, "cpu", amp), True), top=200),
            "DeiT-S": profile_ops(make(models["deit"], x, "cpu", amp), top=200),
        }
        ms = {k: {r["op"]: (r["self_ms"], r["calls"]) for r in rows} for k, rows in prof.items()}
        totals = {k: sum(v for v, _ in d.values()) for k, d in ms.items()}
        ops = [r["op"] for r in prof["fused"][:top]]
        for k in ("reference", "DeiT-S"):
            ops += [r["op"] for r in prof[k] if r["share"] > 0.05 and r["op"] not in ops]
        lines += ["", f"{label}:", "", "| op | reference ms (calls) | fused ms (calls) | DeiT-S ms (calls) |"]
        lines.append("|---|---|---|---|")
        for op in ops:
            cells = [f"{ms[k][op][0]:.1f} ({ms[k][op][1]})" if op in ms[k] else "-" for k in prof]
            lines.append(f"| `{op}` | " + " | ".join(cells) + " |")
        lines.append("| total | " + " | ".join(f"{totals[k]:.1f}" for k in prof) + " |")
    return "\n".join(lines)


def write_section(path: Path, section: str) -> None:
    """Replace the `## Speed` section of ``path`` (up to the next `## ` heading), or append it."""
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    pattern = re.compile(r"^## Speed\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text.rstrip("\n") + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs of the whole plan (default: 3)")
    parser.add_argument("--quick", action="store_true", help="tiny batches and rounds (smoke test)")
    parser.add_argument("--compile", action="store_true", help="add torch.compile inference rows")
    parser.add_argument("--profile", action="store_true", help="add the per-operator profile tables")
    parser.add_argument(
        "--rows", default="", help="only the rows whose label contains one of these (comma list)"
    )
    parser.add_argument(
        "--rounds", type=int, default=0, help="timed rounds per row (default 6, 2 with --quick)"
    )
    parser.add_argument(
        "--json-out", default="", help="raw results file (default benchmarks/results/speed.json)"
    )
    parser.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    args = parser.parse_args()
    runs = []
    for i in range(args.repeat):
        print(f"run {i + 1}/{args.repeat}", file=sys.stderr, flush=True)
        runs.append(run_plan(args.quick, args.compile, args.rows, args.rounds))
    if not args.quick:  # a smoke run must not overwrite the recorded results
        results = ROOT / "benchmarks" / "results"
        results.mkdir(parents=True, exist_ok=True)
        (Path(args.json_out) if args.json_out else results / "speed.json").write_text(
            json.dumps({"cpu": cpu_name(), "runs": runs}, indent=2) + "\n"
        )
    command = "python benchmarks/speed.py" + "".join(f" {a}" for a in sys.argv[1:])
    section = speed_section(runs, command)
    if args.profile:
        section = section.rstrip("\n") + "\n\n" + profile_section() + "\n"
    write_section(Path(args.out), section)
    print(section)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
