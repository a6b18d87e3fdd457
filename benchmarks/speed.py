"""Speed table of BENCHMARKS.md: our TNT-S against timm's TNT-S and timm's DeiT-S, one process, interleaved.

    .venv/bin/python benchmarks/speed.py [--quick] [--no-compile] [--out BENCHMARKS.md]

Every row is one :func:`tntvision.tools.bench.bench_model` call: the three models run round-robin in this
process (same allocator, same load), so the ratios are the numbers to read; absolute img/s on a shared
2-core machine move by 2x from minute to minute. Peak memory comes from one fresh child process per model.
The raw results go to benchmarks/results/speed.json; the `## Speed` section of BENCHMARKS.md is replaced
(other sections are kept).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

from tntvision.tools.bench import bench_model

ROOT = Path(__file__).resolve().parents[1]
MODEL = "tnt_s_patch16_224"
TIMM = "timm"
DEIT = "timm:deit_small_patch16_224"


def run(quick: bool, compile_rows: bool) -> list[dict]:
    rounds = 2 if quick else 6
    rows = []
    plan = [
        dict(batch_size=16, dtype="float32", memory=False),
        dict(batch_size=16, dtype="bfloat16", memory=False),
        dict(batch_size=16, dtype="float32", train=True, rounds=max(2, rounds - 2)),
    ]
    if quick:
        plan = [dict(batch_size=4, dtype="float32", train=True)]
    if compile_rows:
        plan += [dict(batch_size=16, dtype=dt, compile=True, memory=False) for dt in ("float32", "bfloat16")]
    for kw in plan:
        kw = {"rounds": rounds, **kw}
        t0 = time.time()
        print(f"bench {kw} ...", file=sys.stderr, flush=True)
        rows.append(bench_model(model_name=MODEL, compare=[TIMM, DEIT], **kw))
        print(f"  done in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    return rows


def _fmt(x: float, nd: int = 2) -> str:
    return f"{x:.{nd}f}"


def speed_section(rows: list[dict], command: str) -> str:
    """The markdown of the `## Speed` section."""
    first = rows[0]
    lines = [
        "## Speed",
        "",
        f"TNT-S (`{MODEL}`) against timm {first.get('timm_version', '')}'s TNT-S (same weights) and timm's "
        f"DeiT-S (`deit_small_patch16_224`), all in one process, interleaved round by round; torch "
        f"{first['torch']}, CPU, {first['threads']} threads, a 2-core machine that other jobs may share "
        "(absolute img/s move a lot between runs; read the ratios). Times are medians. `x timm` = timm "
        "TNT-S time / our time (> 1: we are faster). `/ DeiT-S` = that model's time / DeiT-S time (FLOP "
        "ratio TNT-S / DeiT-S = 1.23). bfloat16 = the same `torch.autocast` for every model. Peak memory: "
        "the RSS high-water mark (VmHWM) of a fresh process per model running the same training steps.",
        "",
        "| workload | batch | dtype | ours img/s | timm TNT-S img/s | DeiT-S img/s | x timm TNT-S "
        "| ours / DeiT-S | timm TNT-S / DeiT-S |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        for key, label in (("inference", "inference"), ("latency", "latency"), ("train", "train step")):
            if key not in r:
                continue
            per = r[key]["per_impl"]
            ours, tnt, deit = (per[k]["median_ms"] for k in ("ours", TIMM, DEIT))
            batch = 1 if key == "latency" else r["batch_size"]
            name = label + (" (compiled)" if r["compile"] else "")
            lines.append(
                f"| {name} | {batch} | {r['dtype']} | {_fmt(per['ours']['img_per_s'])} | "
                f"{_fmt(per[TIMM]['img_per_s'])} | {_fmt(per[DEIT]['img_per_s'])} | **{_fmt(tnt / ours)}** | "
                f"{_fmt(ours / deit)} | {_fmt(tnt / deit)} |"
            )
    mem_rows = [r for r in rows if "memory" in r]
    if mem_rows:
        lines += [
            "",
            "| peak memory | batch | dtype | ours MB | timm TNT-S MB | DeiT-S MB | ours / timm TNT-S |",
        ]
        lines.append("|---|---|---|---|---|---|---|")
        for r in mem_rows:
            m, ratio = r["memory"]["per_impl"], r["memory"]["ratio"][TIMM]
            lines.append(
                f"| {r['memory']['workload']} | {r['batch_size']} | {r['dtype']} | "
                f"{m['ours']['peak_mb']:.0f} | {m[TIMM]['peak_mb']:.0f} | {m[DEIT]['peak_mb']:.0f} | "
                f"**{ratio:.2f}** |"
            )
    comp = [r for r in rows if r.get("compile_s")]
    if comp:
        lines += [""]
        for r in comp:
            took = ", ".join(f"{k} {v:.0f} s" for k, v in r["compile_s"].items())
            lines.append(
                f"- torch.compile, {r['dtype']}, batch {r['batch_size']}: first call (compile) {took}."
            )
    lines += ["", f"Produced by `{command}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}).", ""]
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
    parser.add_argument("--quick", action="store_true", help="tiny batches and rounds (smoke test)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    args = parser.parse_args()
    import timm

    rows = run(args.quick, not args.no_compile)
    for r in rows:
        r["timm_version"] = timm.__version__
    results = ROOT / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "speed.json").write_text(json.dumps(rows, indent=2) + "\n")
    command = "python benchmarks/speed.py" + "".join(f" {a}" for a in sys.argv[1:])
    write_section(Path(args.out), speed_section(rows, command))
    print(speed_section(rows, command))


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
