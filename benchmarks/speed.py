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
FLOP_RATIO = 1.23  # TNT-S / DeiT-S multiply-accumulates (spec section 1; `tnt info` gives ours)
# Issue 3's targets, as speed-ups over timm's TNT-S, per (workload, dtype); compiled rows have none.
TARGETS = {
    ("inference", "float32"): 1.4,
    ("inference", "bfloat16"): 2.0,
    ("latency", "float32"): 1.3,
    ("latency", "bfloat16"): 1.3,
    ("train", "float32"): 1.35,
}
MEMORY_TARGET = 0.7  # training peak memory, as a fraction of timm TNT-S's


def run(quick: bool, compile_rows: bool) -> list[dict]:
    rounds = 2 if quick else 6
    rows = []
    plan = [
        dict(batch_size=16, dtype="float32", memory=False),
        dict(batch_size=16, dtype="bfloat16", memory=False),
        dict(batch_size=16, dtype="float32", train=True, rounds=max(2, rounds - 2)),
        dict(batch_size=32, dtype="float32", train=True, rounds=max(2, rounds - 3)),
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


def _time_rows(rows: list[dict]) -> list[dict]:
    """One entry per timed workload of every bench result: its ratios, FLOP-parity ceiling and target."""
    out = []
    for r in rows:
        for key, label in (("inference", "inference"), ("latency", "latency"), ("train", "train step")):
            if key not in r:
                continue
            per = r[key]["per_impl"]
            ours, tnt, deit = (per[k]["median_ms"] for k in ("ours", TIMM, DEIT))
            out.append(
                {
                    "key": key,
                    "name": label + (" (compiled)" if r["compile"] else ""),
                    "batch": 1 if key == "latency" else r["batch_size"],
                    "dtype": r["dtype"],
                    "img_per_s": [per[k]["img_per_s"] for k in ("ours", TIMM, DEIT)],
                    "x_timm": tnt / ours,
                    "ours_deit": ours / deit,
                    "timm_deit": tnt / deit,
                    "ceiling": tnt / deit / FLOP_RATIO,
                    "target": None if r["compile"] else TARGETS.get((key, r["dtype"])),
                }
            )
    return out


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
        f"ratio TNT-S / DeiT-S = {FLOP_RATIO}). `ceiling` = (timm TNT-S / DeiT-S) / {FLOP_RATIO}: the "
        "`x timm` a TNT-S would reach if it cost exactly its FLOPs, i.e. ran at DeiT-S's speed per FLOP; "
        "`target` = issue 3's goal for that row. A target above the ceiling needs a TNT-S faster per FLOP "
        "than timm's own DeiT-S. bfloat16 = the same `torch.autocast` for every model. Peak memory: the RSS "
        "high-water mark (VmHWM) of a fresh process per model running the same training steps.",
        "",
        "| workload | batch | dtype | ours img/s | timm TNT-S img/s | DeiT-S img/s | x timm TNT-S "
        "| ours / DeiT-S | timm TNT-S / DeiT-S | ceiling | target |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for t in _time_rows(rows):
        target = t["target"]
        lines.append(
            f"| {t['name']} | {t['batch']} | {t['dtype']} | "
            + " | ".join(_fmt(v) for v in t["img_per_s"])
            + f" | **{_fmt(t['x_timm'])}** | {_fmt(t['ours_deit'])} | {_fmt(t['timm_deit'])} | "
            f"{_fmt(t['ceiling'])} | {'' if target is None else _fmt(target)} |"
        )
        if target is not None:
            verdict = "met" if t["x_timm"] >= target else "not met"
            reach = "within" if target <= t["ceiling"] else "above"
            verdicts.append(
                f"- {t['key']} {t['dtype']} batch {t['batch']}: {t['x_timm']:.2f}x timm, target {target}x "
                f"{verdict}; the target is {reach} the FLOP-parity ceiling {t['ceiling']:.2f}x."
            )
    lines += ["", *verdicts]
    mem_rows = [r for r in rows if "memory" in r]
    if mem_rows:
        lines += [
            "",
            "| peak memory | batch | dtype | ours MB | timm TNT-S MB | DeiT-S MB | ours / timm TNT-S |",
        ]
        lines.append("|---|---|---|---|---|---|---|")
        verdicts = []
        for r in mem_rows:
            m, ratio = r["memory"]["per_impl"], r["memory"]["ratio"][TIMM]
            lines.append(
                f"| {r['memory']['workload']} | {r['batch_size']} | {r['dtype']} | "
                f"{m['ours']['peak_mb']:.0f} | {m[TIMM]['peak_mb']:.0f} | {m[DEIT]['peak_mb']:.0f} | "
                f"**{ratio:.2f}** |"
            )
            verdicts.append(
                f"- {r['memory']['workload']} peak memory, batch {r['batch_size']}: {ratio:.2f}x timm's, "
                f"target <= {MEMORY_TARGET}x {'met' if ratio <= MEMORY_TARGET else 'not met'}."
            )
        lines += ["", *verdicts]
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
