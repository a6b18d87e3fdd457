"""benchmarks/tnt_vs_vit.py (issue 14): its pure helpers, and its --quick mode end to end on tiny data."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from .data_helpers import make_fashion_mnist

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("tnt_vs_vit", ROOT / "benchmarks" / "tnt_vs_vit.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["tnt_vs_vit"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


tv = _load()


def _record(spec, *, top1: float, val: float = 50.0) -> dict:
    """A runs.jsonl record as Campaign.run writes it (numbers made up)."""
    return {
        "key": spec.key(),
        "spec": {
            "seed": spec.seed,
            "model": spec.model,
            "variant": [list(kv) for kv in spec.variant],
            "procs": spec.procs,
            "data": spec.data,
        },
        "command": f"tnt train --seed {spec.seed}",
        "out": "/nowhere",
        "top1": top1,
        "val_top1": val,
        "epochs": 2.0,
        "train_images_per_s": 500.0,
        "train_seconds": 100.0,
        "wall_seconds": 110.0,
        "process_seconds": 120.0,
        "stopped_by": "epochs",
        "curve": [
            {"epoch": 1.0, "train_minutes": 0.8, "val_top1": val - 2},
            {"epoch": 2.0, "train_minutes": 1.6, "val_top1": val},
        ],
        "params": 562_170,
        "macs": 30_445_600,
    }


# ------------------------------------------------------------------------------------ aggregation


def test_mean_sd_and_spread_text():
    assert tv.mean_sd([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert tv.mean_sd([5.0]) == (5.0, None)
    with pytest.raises(ValueError):
        tv.mean_sd([])
    assert tv.fmt_spread([90.0, 91.0, 92.0]) == "91.00 ± 1.00% (90.00-92.00)"
    assert tv.fmt_spread([90.5]) == "90.50% (1 seed)"
    assert tv.fmt_spread([]) == "-"


def test_summarize_and_paired_difference():
    s = tv.Settings()
    tnt = [
        _record(tv.epochs_spec(s, tv.TNT, seed, 0.016), top1=t)
        for seed, t in ((0, 90.0), (1, 91.0), (2, 89.0))
    ]
    vit = [_record(tv.epochs_spec(s, tv.VIT, seed, 0.016), top1=t) for seed, t in ((2, 90.0), (0, 89.5))]
    g = tv.summarize(tnt)
    assert g["n"] == 3 and g["seeds"] == [0, 1, 2]
    assert g["test_top1"]["mean"] == 90.0 and g["test_top1"]["sd"] == 1.0
    assert (g["test_top1"]["min"], g["test_top1"]["max"]) == (89.0, 91.0)
    assert g["params"] == 562_170 and g["wall_seconds"] == 110.0
    # paired by seed: seed 0 +0.5, seed 2 -1.0; seed 1 has no ViT run
    d = tv.paired_difference(tnt, vit)
    assert d["values"] == [0.5, -1.0] and d["n"] == 2 and d["a_wins"] == 1
    assert d["mean"] == -0.25
    assert tv.paired_difference(tnt, []) is None
    assert tv.summarize([]) == {"seeds": [], "n": 0}


def test_tuned_lr_uses_validation_and_falls_back_to_the_recipe():
    s = tv.Settings()
    records = {}
    vals = {0.004: 80.0, 0.008: 85.0, 0.016: 84.0, 0.032: 70.0}
    for lr, spec in tv.tune_specs(s, tv.TNT):
        records[spec.key()] = _record(spec, top1=99.0 - vals[lr], val=vals[lr])  # test is never looked at
    lrs = tv.tuned_lr(records, s)
    assert lrs[tv.TNT][0] == 0.008 and lrs[tv.TNT][1].startswith("tuned")
    assert lrs[tv.VIT] == (tv.RECIPE_LR, "the recipe's rate (tune phase not complete)")
    # the tuned rate flows into the plan of the later phases
    main_tnt = [x for x in tv.plan(["main"], s, records) if x.model == tv.TNT]
    assert main_tnt and all("optim.lr=0.008" in x.sets for x in main_tnt)


# ------------------------------------------------------------------------------------ plan and resume


def test_run_keys_shared_runs_and_labels():
    s = tv.Settings()
    a = tv.epochs_spec(s, tv.TNT, 0, 0.016)
    assert a.key() == tv.epochs_spec(s, tv.TNT, 0, 0.016).key()
    assert a.key() != tv.epochs_spec(s, tv.TNT, 1, 0.016).key()
    assert a.key() != tv.epochs_spec(s, tv.VIT, 0, 0.016).key()
    assert a.key() != tv.time_spec(s, tv.TNT, 0, 0.016).key()
    # labels do not make a run different; a variant's key does not depend on how its dict is ordered
    import dataclasses

    assert dataclasses.replace(a, label="other").key() == a.key()
    v1 = tv.epochs_spec(s, tv.TNT, 0, 0.016, {"word_stride": 1, "inner_num_heads": 1})
    v2 = tv.epochs_spec(s, tv.TNT, 0, 0.016, {"inner_num_heads": 1, "word_stride": 1})
    assert v1.key() == v2.key()
    # the ablations' baseline and the transfer's pre-training are main's equal-epoch runs: planned once
    everything = tv.plan(list(tv.PHASES), s, {})
    keys = [x.key() for x in everything]
    assert len(keys) == len(set(keys))
    assert len(everything) == len(tv.plan(["tune", "main"], s, {})) + 10 + 24
    pre, ft, scratch = tv.transfer_specs(s, tv.VIT, 10, 1, 0.016)
    assert pre.key() == tv.epochs_spec(s, tv.VIT, 1, 0.016).key() and ft.pretrained == pre.key()
    assert scratch.pretrained is None and ft.data == scratch.data == "digits-10pc"
    assert ft.key() != scratch.key()


def test_pending_skips_recorded_runs_and_reading_tolerates_a_torn_line(tmp_path):
    s = tv.Settings()
    specs = tv.plan(["main"], s, {})
    assert len(specs) == 12  # 2 models x 3 seeds x (equal epochs, equal time)
    path = tmp_path / "runs.jsonl"
    for spec in specs[:5]:
        tv.append_record(path, _record(spec, top1=90.0))
    with path.open("a") as f:
        f.write('{"key": "torn')  # a campaign killed while writing
    records = tv.read_records(path)
    assert len(records) == 5
    left = tv.pending(specs, records)
    assert [x.key() for x in left] == [x.key() for x in specs[5:]]
    assert tv.read_records(tmp_path / "missing.jsonl") == {}


def test_finetune_batch_and_time_estimate():
    assert [tv.finetune_batch(n) for n in (20, 50, 100, 500)] == [8, 8, 16, 32]
    s = tv.Settings()
    spec = tv.epochs_spec(s, tv.TNT, 0, 0.016)
    guess = tv.estimate_seconds(spec, {}, s)
    assert 60 < guess < 600
    # recorded speeds of the same model replace the assumed ones
    fast = _record(spec, top1=90.0)
    fast["train_images_per_s"] = 1e6
    assert tv.estimate_seconds(spec, {"x": fast}, s) < guess


def test_both_models_see_the_same_data_in_the_same_order(tmp_path, monkeypatch):
    """The premise of the paired comparison: under one seed the batches do not depend on the model."""
    import torch

    from tntvision.train import resolve_train_config
    from tntvision.train.builder import build_run
    from tntvision.train.distributed import World

    monkeypatch.setenv("TNT_FASHION_MNIST_DIR", str(make_fashion_mnist(tmp_path / "fm", n_train=200)))

    def first_batches(model: str, seed: int) -> list[torch.Tensor]:
        over = {"model": model, "data": "fashion-mnist", "out": str(tmp_path / model), "seed": seed}
        cfg = resolve_train_config(overrides={**over, "batch_size": 32})
        parts = build_run(cfg, device=torch.device("cpu"), world=World())
        out = []
        for epoch in (0, 1):
            parts.sampler.set_epoch(epoch)
            out += [torch.cat([x.flatten(), y.float()]) for x, y in parts.train_batches]
        return out

    tnt, vit = first_batches(tv.TNT, 3), first_batches(tv.VIT, 3)
    assert len(tnt) == len(vit) > 2 and all(torch.equal(a, b) for a, b in zip(tnt, vit, strict=True))
    assert not torch.equal(tnt[0], first_batches(tv.TNT, 4)[0])  # and the seed does change it


# ------------------------------------------------------------------------------------ markdown


def test_render_and_replace_section():
    s = tv.Settings()
    records = {}
    for seed in s.seeds:
        for m, t in ((tv.TNT, 90.0 + seed), (tv.VIT, 89.0 + seed)):
            spec = tv.epochs_spec(s, m, seed, tv.RECIPE_LR)
            records[spec.key()] = _record(spec, top1=t)
    res = tv.collect(tv.PHASES, s, records)
    text = tv.render_section(res, command="python benchmarks/tnt_vs_vit.py", s=s, figure="fig.png")
    assert text.startswith(tv.BEGIN) and text.rstrip().endswith(tv.END)
    assert (
        "| equal epochs (2 epochs) | `tnt_mini_patch4_28` | 562,170 | 30.4 M | 91.00 ± 1.00% (90.00-92.00)"
        in text
    )
    assert (
        "| equal epochs: TNT - ViT, paired by seed | | | | +1.00 ± 0.00 points (higher in 3/3 seeds)" in text
    )
    assert "| equal time (2 min of training) | `vit_mini_patch4_28` | | | (not run yet)" in text
    assert "| no word position encoding | | | (not run yet)" in text
    assert "![validation top-1 against epochs and minutes](fig.png)" in text
    doc = "# Benchmarks\n\nintro\n"
    once = tv.replace_section(doc, text)
    assert once.startswith(doc.rstrip("\n")) and once.count(tv.BEGIN) == 1
    other = text.replace("91.00", "95.00")
    twice = tv.replace_section(once + "\n## After\n", other)
    assert twice.count(tv.BEGIN) == 1 and "95.00" in twice and "91.00 ±" not in twice
    assert twice.endswith("\n## After\n") and "intro" in twice


# ------------------------------------------------------------------------------------ digits


def test_digits_split_is_disjoint_and_the_test_half_fixed():
    import sklearn  # noqa: F401  (the dev extra installs it: its absence fails, not skips)

    a = tv.digits_split(10, 0, val_per_class=20)
    b = tv.digits_split(10, 1, val_per_class=20)
    assert len(a["train"]) == 100 and len(a["val"]) == 200 and 890 <= len(a["test"]) <= 905
    for split in (a, b):
        assert not set(split["train"]) & set(split["val"]) and not set(split["train"]) & set(split["test"])
        assert not set(split["val"]) & set(split["test"])
    assert a["test"] == b["test"] and a["val"] == b["val"] and a["train"] != b["train"]
    assert set(tv.digits_split(50, 0, val_per_class=20)["train"]).isdisjoint(a["test"])


# ------------------------------------------------------------------------------------ end to end


def _digest(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest() if path.exists() else ""


@pytest.mark.slow
def test_quick_mode_end_to_end(tmp_path, monkeypatch):
    """--quick on a synthetic Fashion-MNIST: 9 `tnt train` runs of a few seconds (~60 s on 2 cores)."""
    import sklearn  # noqa: F401  (the dev extra installs it: its absence fails, not skips)

    fmnist = make_fashion_mnist(tmp_path / "fm", n_train=300, n_test=100)
    monkeypatch.setattr(tv, "ABLATIONS", {"no word position encoding": {"word_pos": False}})
    monkeypatch.setattr(tv, "QUICK", {**tv.QUICK, "labels_per_class": (2,)})
    repo_files = [ROOT / "BENCHMARKS.md", ROOT / "benchmarks" / "results" / "tnt_vs_vit.json"]
    before = [_digest(p) for p in repo_files]
    out = tmp_path / "campaign"
    argv = ["--quick", "--phase", "main,ablations,transfer", "--seeds", "0", "--minutes", "0.02"]
    argv += ["--out", str(out), "--fmnist-dir", str(fmnist)]
    assert tv.main(argv) == 0

    lines = (out / "runs.jsonl").read_text().splitlines()
    assert (
        len(lines) == 9
    )  # main 4, one ablation (baseline shared), transfer 2 models x (fine-tuned, scratch)
    doc = json.loads((out / "tnt_vs_vit.json").read_text())
    main = doc["results"]["main"]
    for proto in ("equal epochs", "equal time"):
        for m in (tv.TNT, tv.VIT):
            assert main[proto][m]["n"] == 1 and 0 <= main[proto][m]["test_top1"]["mean"] <= 100
        assert main[proto]["tnt_minus_vit"]["n"] == 1
    assert main["equal epochs"][tv.TNT]["params"] > main["equal epochs"][tv.VIT]["params"]
    assert main["equal epochs"][tv.TNT]["macs"] > main["equal epochs"][tv.VIT]["macs"]
    abl = {r["variant"]: r for r in doc["results"]["ablations"]}
    assert abl["no word position encoding"]["n"] == 1
    assert abl["no word position encoding"]["params"] == abl["TNT mini (baseline)"]["params"] - 8 * 2 * 2
    transfer = doc["results"]["transfer"]
    assert len(transfer) == 4 and all(r["n"] == 1 for r in transfer)
    assert doc["reproduce"].startswith("python benchmarks/tnt_vs_vit.py --phase all --quick")
    run = doc["runs"][0]
    assert run["command"].startswith("OMP_NUM_THREADS=1 ") and run["curve"] and run["train_images_per_s"] > 0

    md = (out / "BENCHMARKS.md").read_text()
    assert md.count(tv.BEGIN) == 1 and md.count(tv.END) == 1
    assert "| equal epochs (1 epoch) | `tnt_mini_patch4_28` | 562,170 |" in md
    assert "| equal time (0.02 min of training) | `vit_mini_patch4_28` | 541,114 |" in md
    assert "| no word position encoding | 562,138 |" in md
    assert "| `vit_mini_patch4_28` | 2 | pre-trained on Fashion-MNIST | " in md
    assert "(not run yet)" in md  # the tune phase was not run
    assert (out / "tnt_vs_vit.png").stat().st_size > 10_000
    # the fine-tuned model started from the pre-trained weights with a fresh head
    ft = next(json.loads(x) for x in lines if json.loads(x)["spec"]["pretrained"])
    assert "--pretrained" in ft["command"] and (out / "headless").is_dir()

    # resuming: everything is recorded, so nothing runs again
    monkeypatch.setattr(tv.subprocess, "run", lambda *a, **k: pytest.fail("a recorded run ran again"))
    assert tv.main(argv) == 0
    assert len((out / "runs.jsonl").read_text().splitlines()) == 9
    # quick numbers never reach the repository's files
    assert [_digest(p) for p in repo_files] == before
