"""benchmarks/gpu_check.py (issue 31): its dry run walks every section on the CPU and writes the JSON a
GPU run writes; its pure helpers (row arguments, ratios, test counts, the table) on made-up inputs."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gc():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _positive_times(per_impl: dict) -> None:
    for name, m in per_impl.items():
        assert 0 < m["min_ms"] <= m["median_ms"] <= m["max_ms"], name
        assert m["img_per_s"] > 0, name


def test_dry_run_walks_every_section(tmp_path):
    out = tmp_path / "gpu_check_dry.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), "--work", str(tmp_path / "work")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert "DRY RUN" in lines[0]  # the table, then the command that made it
    assert any(line.startswith("command: ") and "gpu_check.py --dry-run" in line for line in lines)
    report = json.loads(out.read_text())
    assert report["dry_run"] is True and "--dry-run" in report["command"]
    env_info = report["environment"]
    assert env_info["device"] == "cpu" and env_info["torch"]
    assert set(env_info["kernel_backend"]) == {"float32", "bfloat16"}
    sections = report["sections"]
    assert set(sections) == {"tests", "speed", "ddp", "train"}
    for name, section in sections.items():
        assert section["dry"] is True and section["status"] == "ok", (name, section)
        assert section["seconds"] > 0, name

    tests = sections["tests"]
    assert tests["counts"]["tests"] > 0 and tests["counts"]["failures"] == tests["counts"]["errors"] == 0
    assert all(run["status"] == "ok" and run["tail"] for run in tests["runs"])

    rows = sections["speed"]["rows"]
    assert len(rows) == 8  # every row of the GPU table is listed
    ran = [r for r in rows if r["status"] == "ok"]
    assert {(r["model"], r["workload"], r["mode"]) for r in ran} == {
        ("tnt_mini_patch4_28", "inference", "eager"),
        ("tnt_mini_patch4_28", "train", "eager"),
        ("tnt_mini_patch4_28", "inference", "compiled"),
    }
    for row in ran:
        assert set(row["per_impl"]) == {"ours", "tntvision:vit_mini_patch4_28"}
        _positive_times(row["per_impl"])
        assert row["ratios"]["tnt_mini_over_vit_mini"] > 0
        assert row["batch_size"] == 2 and row["rounds"] == 1 and row["timing"].startswith("time.perf_counter")
        assert set(row["kernel_backend"]) == {"float32", "bfloat16"}
    compiled = next(r for r in ran if r["mode"] == "compiled")
    assert all(v > 0 for v in compiled["compile_s"].values())
    assert all(r["reason"].startswith("dry run") for r in rows if r["status"] != "ok")
    assert set(sections["speed"]["ratios"]) == {f"{r['model']} {r['workload']} {r['mode']}" for r in ran}

    for name, backend in (("train", None), ("ddp", "gloo")):
        summary = sections[name]["summary"]
        assert summary["backend"] == backend and summary["processes"] == 1, name
        assert summary["device"] == "cpu" and summary["amp"] == "none"
        assert summary["epochs"] > 0 and summary["images_seen"] > 0 and summary["train_images_per_s"] > 0
        assert 0 <= summary["top1"] <= 100
    assert sections["ddp"]["backend_ok"] is True
    assert "torch.distributed.run --standalone --nproc_per_node=1" in sections["ddp"]["command"]


def test_the_gpu_rows_are_the_issue_s(gc):
    """What a real run asks bench_model for: bf16 autocast, batch 256 / 64 (mini's train 128), CUDA, five
    timed calls after two warm-ups, memory for eager rows, inductor for compiled ones."""
    rows = {(m, w, mode): gc.row_spec(m, w, mode, dry=False, rounds=5, warmup=2) for m, w, mode in gc.ROWS}
    assert len(rows) == 8
    for (_model, workload, mode), spec in rows.items():
        assert spec["device"] == "cuda" and spec["amp"] == "bfloat16" and spec["rounds"] >= 3
        assert spec["train"] == (workload == "train")
        assert spec["memory"] == (mode == "eager") and spec["compile"] == (mode == "compiled")
    tnt = rows[("tnt_s_patch16_224", "inference", "eager")]
    assert tnt["batch_size"] == 256 and tnt["compare"] == ["timm:deit_small_patch16_224", "timm"]
    assert rows[("tnt_s_patch16_224", "train", "eager")]["batch_size"] == 64
    assert rows[("tnt_mini_patch4_28", "train", "compiled")]["compare"] == ["tntvision:vit_mini_patch4_28"]


def _bench_result(workload: str, ms: dict[str, float], memory: dict[str, float] | None = None) -> dict:
    ours = ms["ours"]
    result = {
        workload: {
            "per_impl": {
                k: {"median_ms": v, "min_ms": v - 1, "max_ms": v + 1, "img_per_s": 64 / (v / 1e3)}
                for k, v in ms.items()
            },
            "time_ratio": {k: ours / v for k, v in ms.items() if k != "ours"},
            "speedup": {k: v / ours for k, v in ms.items() if k != "ours"},
        },
        "timing": "CUDA events",
        "device_name": "a GPU",
        "rounds": 5,
    }
    if memory:
        result["memory"] = {
            "measured_as": "CUDA max_memory_allocated",
            "per_impl": {k: {"peak_mb": v} for k, v in memory.items()},
        }
    return result


def test_row_ratios_are_tnt_over_deit_and_timm_over_ours(gc):
    ms = {"ours": 30.0, "timm:deit_small_patch16_224": 20.0, "timm": 45.0}
    mem = {"ours": 900.0, "timm:deit_small_patch16_224": 600.0, "timm": 1200.0}
    row = gc.summarise_row("tnt_s_patch16_224", "train", "eager", _bench_result("train", ms, mem))
    assert row["ratios"] == {"tnt_s_over_deit_s": 1.5, "timm_tnt_s_over_ours": 1.5}
    assert row["per_impl"]["timm"]["peak_mb"] == 1200.0 and row["per_impl"]["ours"]["max_ms"] == 31.0
    assert row["memory_measured_as"] == "CUDA max_memory_allocated"
    mini = gc.summarise_row(
        "tnt_mini_patch4_28",
        "inference",
        "compiled",
        _bench_result("inference", {"ours": 4.0, "tntvision:vit_mini_patch4_28": 2.0}),
    )
    assert mini["ratios"] == {"tnt_mini_over_vit_mini": 2.0}
    assert mini["per_impl"]["ours"]["peak_mb"] is None and mini["memory_measured_as"] is None


def test_junit_counts(gc, tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text(
        '<?xml version="1.0"?><testsuites><testsuite name="pytest" errors="1" failures="2" skipped="3" '
        'tests="10" time="1.0"></testsuite></testsuites>'
    )
    assert gc.junit_counts(xml) == {"tests": 10, "failures": 2, "errors": 1, "skipped": 3, "passed": 4}


def test_the_table_shows_rows_ratios_errors_and_the_command(gc):
    ms = {"ours": 30.0, "timm:deit_small_patch16_224": 20.0, "timm": 45.0}
    row = gc.summarise_row("tnt_s_patch16_224", "inference", "eager", _bench_result("inference", ms))
    report = {
        "command": "python benchmarks/gpu_check.py",
        "dry_run": False,
        "environment": {"device": "cuda", "gpu": "NVIDIA H100 80GB HBM3"},
        "sections": {
            "tests": {"status": "failed", "counts": {"passed": 5, "failures": 1, "errors": 0, "skipped": 2}},
            "speed": {
                "rows": [
                    gc._row_record("tnt_s_patch16_224 inference eager", "ok", kernel_backend="triton", **row),
                    gc._row_record("tnt_s_patch16_224 train compiled", "skipped", reason="time budget"),
                ]
            },
            "train": {"status": "timeout", "reason": "killed"},
        },
    }
    text = gc.format_table(report)
    assert text.splitlines()[0] == "gpu_check on NVIDIA H100 80GB HBM3"
    assert "passed 5  failed 1" in text and "skipped: time budget" in text
    assert "tnt_s_over_deit_s 1.500, timm_tnt_s_over_ours 1.500" in text and "(29.0-31.0)" in text
    assert "train: timeout killed" in text
    assert text.splitlines()[-1] == "command: python benchmarks/gpu_check.py"


def test_default_out_follows_OUT(gc, monkeypatch, tmp_path):
    monkeypatch.setenv("OUT", str(tmp_path))
    assert gc.default_out(False) == tmp_path / "gpu_check.json"
    assert gc.default_out(True) == tmp_path / "gpu_check_dry.json"
    monkeypatch.delenv("OUT")
    assert gc.default_out(False) == ROOT / "benchmarks" / "results" / "gpu_check.json"
