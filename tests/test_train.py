"""`tnt train` and the training library: learning, run folder, resume, DDP, fine-tuning, bad input.

Everything runs on tiny data the tests make (28 px IDX files, 32 px ImageFolder trees) and tiny models.
"""

from __future__ import annotations

import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch.utils.data import DataLoader, TensorDataset

import tntvision
from tntvision.cli import main
from tntvision.train import (
    SMALL_IMAGE_RECIPE,
    NonFiniteLossError,
    TrainConfig,
    evaluate,
    from_dict,
    load_yaml,
    lr_schedule,
    parse_set,
    resolve_train_config,
    to_dict,
    train,
    train_one_epoch,
)
from tntvision.train.config import ConfigError, OptimConfig
from tntvision.train.engine import StepOptions
from tntvision.train.optim import MuonAdamW, build_optimizer, param_groups
from tntvision.train.run_folder import RunFolder

from .data_helpers import make_fashion_mnist, make_image_folder

REPO = Path(__file__).resolve().parents[1]
FAST = ["--set", "workers=0", "--set", "amp=none"]


@pytest.fixture
def fmnist(tmp_path, monkeypatch):
    folder = make_fashion_mnist(tmp_path / "fm", n_train=96, n_test=32)
    monkeypatch.setenv("TNT_FASHION_MNIST_DIR", str(folder))
    return folder


def _cfg(out: Path, **changes) -> TrainConfig:
    data = {"model": "tnt_mini_patch4_28", "data": "fashion-mnist", "out": str(out), "epochs": 2}
    data.update(batch_size=16, workers=0, amp="none", **changes)
    return resolve_train_config(overrides=data)


def _env(fm_dir: Path) -> dict[str, str]:
    env = dict(os.environ, TNT_FASHION_MNIST_DIR=str(fm_dir), OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model" / "model.safetensors")


# ---------------------------------------------------------------------------------------------- config


def test_config_yaml_and_overrides():
    cfg = from_dict(parse_set(["optim.lr=1e-3", "aug.scale=[0.5, 1]", "epochs=3", "pretrained=null"]))
    assert cfg.optim.lr == 1e-3 and cfg.aug.scale == (0.5, 1.0) and cfg.epochs == 3
    assert TrainConfig().optim.lr == 5e-4  # defaults untouched
    assert from_dict(to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match="did you mean epochs"):
        from_dict({"epoch": 3})
    with pytest.raises(ConfigError, match="expected an integer"):
        from_dict({"batch_size": "many"})
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_set(["lr"])
    base = dict(model="tnt_mini_patch4_28", data="x", out="y")
    for bad in ({"epochs": 0}, {"optim": {"lr": -1.0}}, {"aug": {"hflip": 2.0}}, {"amp": "fp8"}):
        with pytest.raises(ConfigError):
            from_dict({**base, **bad}).validate()


def test_recipes_in_configs_folder():
    """configs/fashion_mnist.yaml spells out the small-image recipe; the ImageNet file is the default."""
    fm = from_dict(load_yaml(REPO / "configs" / "fashion_mnist.yaml"))
    auto = resolve_train_config(
        overrides={"model": "tnt_mini_patch4_28", "data": "fashion-mnist", "out": "/nonexistent"}
    )
    assert to_dict(fm) == {**to_dict(auto), "out": ""}
    assert to_dict(from_dict(SMALL_IMAGE_RECIPE, base=fm)) == to_dict(fm)
    imagenet = from_dict(load_yaml(REPO / "configs" / "imagenet_tnt_s.yaml"))
    default = TrainConfig(model="tnt_s_patch16_224", data=imagenet.data, out=imagenet.out)
    assert to_dict(imagenet) == to_dict(default)
    assert imagenet.scaled_lr == pytest.approx(1e-3 * imagenet.batch_size / 1024)  # the paper: 1e-3 at 1024


def test_param_groups_skip_decay_on_norms_biases_tokens_tables():
    model = tntvision.create_model("tnt_mini_patch4_28")
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert {"cls_token", "patch_pos", "pixel_pos", "norm.weight", "head.bias"} <= skipped
    assert all(names[id(p)].endswith("weight") for p in decay["params"])
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0


def test_muon_takes_the_weight_matrices_adamw_the_rest():
    model = tntvision.create_model("tnt_mini_patch4_28")
    opt = build_optimizer(model, OptimConfig(name="muon"), lr=2e-3, device=torch.device("cpu"))
    assert isinstance(opt, MuonAdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = [names[id(p)] for g in opt.muon.param_groups for p in g["params"]]
    adamw = [names[id(p)] for g in opt.adamw.param_groups for p in g["params"]]
    assert sorted(muon + adamw) == sorted(names.values())  # every parameter, once
    shapes = dict(model.named_parameters())
    assert muon and all(shapes[n].ndim == 2 and not n.startswith("head.") for n in muon)
    assert {"blocks.0.attn_in.qk.weight", "blocks.3.mlp.fc2.weight", "proj.weight"} <= set(muon)
    assert {"head.weight", "pixel_embed.proj.weight", "cls_token", "norm.bias"} <= set(adamw)
    for group in opt.param_groups:  # what the schedule does each step
        group["lr"] = 5e-4
    assert {g["lr"] for g in opt.adamw.param_groups + opt.muon.param_groups} == {5e-4}


def test_muon_adamw_state_dict_round_trip_continues_exactly():
    def grads(model, seed):
        gen = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen)

    cfg, cpu = OptimConfig(name="muon"), torch.device("cpu")
    a = tntvision.create_model("tnt_mini_patch4_28")
    opt_a = build_optimizer(a, cfg, lr=1e-3, device=cpu)
    grads(a, 0)
    opt_a.step()
    b = tntvision.create_model("tnt_mini_patch4_28")
    b.load_state_dict(a.state_dict())
    opt_b = build_optimizer(b, cfg, lr=1e-3, device=cpu)
    saved = io.BytesIO()  # through bytes, as a checkpoint does: loading shares tensors otherwise
    torch.save(opt_a.state_dict(), saved)
    saved.seek(0)
    opt_b.load_state_dict(torch.load(saved, weights_only=True))
    for model, opt in ((a, opt_a), (b, opt_b)):
        for group in opt.param_groups:  # the schedule's change must reach the loaded inner optimizers
            group["lr"] = 5e-4
        grads(model, 1)
        opt.step()
    assert {g["lr"] for g in opt_b.adamw.param_groups + opt_b.muon.param_groups} == {5e-4}
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), name


# ---------------------------------------------------------------------------------------------- engine


def test_lr_schedule_warmup_cosine_by_steps_and_by_time():
    kw = dict(peak=1e-3, total_steps=100, warmup_steps=10, warmup_lr=1e-6, min_lr=1e-5)
    lr_at = lr_schedule(**kw)
    assert lr_at(0, 0.0) == 1e-6 and lr_at(5, 0.0) == pytest.approx((1e-6 + 1e-3) / 2)
    assert lr_at(10, 0.0) == pytest.approx(1e-3) and lr_at(100, 0.0) == pytest.approx(1e-5)
    assert lr_at(55, 0.0) == pytest.approx(1e-5 + (1e-3 - 1e-5) / 2)  # half-way down the cosine
    # with a time budget the larger progress wins, and the rate stays continuous at the end of warm-up
    by_time = lr_schedule(**kw, time_budget_s=60.0)
    assert by_time(50, 60.0) == pytest.approx(1e-5) and by_time(50, 0.0) == lr_at(50, 0.0)
    before, after = by_time(9, 30.0), by_time(10, 30.0)
    assert after == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * (0.5 - 0.1) / 0.9)))
    assert abs(after - before) < 0.15 * after


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_few_steps_reduce_the_loss(optimizer):
    torch.manual_seed(0)
    x = 0.1 * torch.randn(32, 1, 28, 28)
    y = torch.arange(32) % 4
    x[torch.arange(32), 0, y * 6, :] += 3.0  # a bright row per class
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    model = tntvision.create_model("tnt_mini_patch4_28", num_classes=4, depth=2)
    dev = torch.device("cpu")
    opt = build_optimizer(model, OptimConfig(name=optimizer, weight_decay=0.0), lr=1e-3, device=dev)
    before = evaluate(model, loader, device=dev)["loss"]
    for epoch in range(4):
        res = train_one_epoch(model, loader, opt, device=dev, epoch=epoch, steps_per_epoch=4)
        assert res["steps"] == 4 and res["images"] == 32
    after = evaluate(model, loader, device=dev)["loss"]
    assert after < 0.7 * before, (before, after)


def test_accumulated_micro_batches_give_the_whole_batch_step():
    """accum_steps splits each batch; the summed gradients are the whole batch's: same weights."""
    x, y = torch.randn(16, 1, 28, 28), torch.arange(16) % 10
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    weights = []
    for accum in (1, 4):
        torch.manual_seed(0)
        model = tntvision.create_model("tnt_mini_patch4_28", depth=1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        res = train_one_epoch(
            model, loader, opt, device=torch.device("cpu"), epoch=0, steps_per_epoch=2,
            options=StepOptions(accum_steps=accum),
        )  # fmt: skip
        assert res["steps"] == 2 and res["next_step"] == 2 and not res["stopped"]
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(weights[0], weights[1], rtol=1e-4, atol=1e-6)


def test_run_folder_writes_only_on_rank_0(tmp_path):
    quiet = RunFolder(tmp_path / "other_rank", writes=False)
    quiet.start(TrainConfig(model="m", data="d", out=str(quiet.path)), {"val_source": "x"})
    quiet.write_summary({"top1": 1.0})
    assert not quiet.path.exists()
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="is not a folder"):
        RunFolder(blocker / "run").check_creatable()
    RunFolder(tmp_path / "a" / "b").check_creatable()  # creatable: nothing made yet
    assert not (tmp_path / "a").exists()


def test_evaluate_metrics_and_confusion():
    logits = torch.tensor(
        [[5.0, 1, 0, 0, 0, 0], [0, 5.0, 4, 0, 0, 0], [-1, 0, 1, 2, 3, 4], [1, 0, 0, 0, 0, 0]]
    )
    labels = torch.tensor([0, 2, 0, 0])

    class Fixed(torch.nn.Module):
        num_classes = 6

        def forward(self, i):
            return logits[i]

    loader = DataLoader(TensorDataset(torch.arange(4), labels), batch_size=3)
    out = evaluate(Fixed(), loader, device=torch.device("cpu"), confusion=True)
    assert out["n"] == 4
    assert out["top1"] == pytest.approx(50.0)  # samples 0 and 3
    assert out["top5"] == pytest.approx(75.0)  # sample 2's class 0 is its 6th
    assert out["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-6)
    expected = torch.zeros(6, 6, dtype=torch.int64)
    expected[0, 0], expected[2, 1], expected[0, 5] = 2, 1, 1
    assert torch.equal(out["confusion"], expected)


# ---------------------------------------------------------------------------------------------- runs


def test_run_folder_contents(fmnist, tmp_path):
    out = tmp_path / "run"
    summary = train(_cfg(out), log=lambda _m: None)
    names = {p.name for p in out.iterdir()}
    assert {"config.yaml", "metrics.jsonl", "summary.json", "curves.png", "checkpoints", "model"} <= names
    assert (out / "checkpoints" / "last.pt").is_file()
    assert yaml.safe_load((out / "config.yaml").read_text())["model"] == "tnt_mini_patch4_28"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and all("val_top1" in r and "train_loss" in r for r in rows)
    saved = json.loads((out / "summary.json").read_text())
    assert saved == summary
    for key in ("top1", "top5", "loss", "epochs", "images_seen", "wall_seconds"):
        assert key in saved
    # 96 training images: 10 held out for validation, 86 -> 5 steps of 16; the summary is the test set's
    assert saved["images_seen"] == 2 * 80 and saved["epochs"] == 2 and saved["n"] == 32
    assert rows[-1]["val_n"] == 10 and saved["val_n"] == 10 and saved["val_top1"] == rows[-1]["val_top1"]
    split = json.loads((out / "val_split.json").read_text())
    assert split["val_seed"] == 0 and len(split["val_indices"]) == 10
    # tnt eval finds the held-out images through val_split.json, and the test set as the summary has it
    from tntvision.tools.evaluate import evaluate_checkpoint

    val = evaluate_checkpoint(out, "fashion-mnist", split="val", progress=False)
    assert (
        val.n == 10
        and val.top1 == pytest.approx(saved["val_top1"])
        and val.loss == pytest.approx(saved["val_loss"], rel=1e-5)
    )
    test = evaluate_checkpoint(out, "fashion-mnist", split="test", progress=False)
    assert test.n == 32 and test.top1 == pytest.approx(saved["top1"])
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    model = tntvision.load_model(out)
    assert model.class_names[:2] == ["T-shirt/top", "Trouser"]
    with pytest.raises(ConfigError, match="already holds a training run"):
        _cfg(out)


def test_fused_adamw_follows_the_for_loop_adamw(fmnist, tmp_path):
    """optim.fused (the default) only changes how AdamW runs: same weights as torch's for-loop AdamW."""
    runs = {}
    for fused in (True, False):
        out = tmp_path / f"fused_{fused}"
        summary = train(_cfg(out, epochs=1, optim={"name": "adamw", "fused": fused}), log=lambda _m: None)
        assert summary["images_seen"] == 80  # 86 training images (10 held out): 5 steps of 16
        state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
        assert all(g["fused"] is fused for g in state["optimizer"]["param_groups"])
        runs[fused] = _weights(out)
    for k, w in runs[True].items():
        torch.testing.assert_close(w, runs[False][k], rtol=1e-4, atol=1e-5)


def test_time_budget_stops_cleanly(fmnist, tmp_path):
    out = tmp_path / "run"
    lines: list[str] = []
    summary = train(_cfg(out, epochs=50, time_budget=1e-6), log=lines.append)
    assert summary["stopped_by"] == "time_budget" and summary["epochs"] < 1
    assert any(line.startswith("epoch 1/50 (stopped after step 1/5): train loss") for line in lines), lines
    assert summary["images_seen"] == 16  # one step, then evaluate and save
    assert (out / "model" / "model.safetensors").is_file() and (out / "summary.json").is_file()


def test_non_finite_loss_keeps_last_good_checkpoint(fmnist, tmp_path, monkeypatch):
    out = tmp_path / "run"
    calls = {"n": 0}
    real = torch.nn.CrossEntropyLoss

    class Diverging(real):
        def forward(self, logits, target):
            calls["n"] += 1
            loss = super().forward(logits, target)
            return loss * float("nan") if calls["n"] > 7 else loss  # epoch 1 (5 steps) is fine

    monkeypatch.setattr("tntvision.train.builder.nn.CrossEntropyLoss", Diverging)
    good = {}

    def snapshot(msg):
        if msg.startswith("epoch 1/"):
            good["ckpt"] = (out / "checkpoints" / "last.pt").read_bytes()

    with pytest.raises(NonFiniteLossError, match="last checkpoint is kept"):
        train(_cfg(out), log=snapshot)
    assert (out / "checkpoints" / "last.pt").read_bytes() == good["ckpt"]
    assert not (out / "summary.json").exists()


@pytest.mark.slow
def test_resume_after_sigkill_and_sigterm_is_bit_exact(fmnist, tmp_path):
    """An uninterrupted run == one killed (SIGKILL) after epoch 1 and resumed == one stopped by SIGTERM
    in the middle of an epoch and resumed: the same weights, bit for bit (same seed, 1 thread, CPU, no time
    budget: with one and sched.by_time the schedule follows the clock, see docs/training.md)."""
    fm = make_fashion_mnist(tmp_path / "fm_big", n_train=320, n_test=32)
    env = _env(fm)

    def cmd(out: Path, *extra: str) -> list[str]:
        base = [sys.executable, "-m", "tntvision.cli", "train", "--out", str(out)]
        if "--resume" in extra:
            return base + list(extra)
        common = ["--model", "tnt_mini_patch4_28", "--data", "fashion-mnist", "--epochs", "3"]
        return base + common + ["--batch-size", "16", "--seed", "7", "--set", "drop_path=0.1", *FAST, *extra]

    ref = tmp_path / "ref"
    subprocess.run(cmd(ref), env=env, check=True, capture_output=True, timeout=600)

    for sig, run in ((signal.SIGKILL, tmp_path / "killed"), (signal.SIGTERM, tmp_path / "termed")):
        proc = subprocess.Popen(
            cmd(run, "--json"), env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        metrics = run / "metrics.jsonl"
        deadline = time.time() + 300
        while not (metrics.exists() and metrics.read_text().strip()) and proc.poll() is None:
            assert time.time() < deadline
            time.sleep(0.02)
        if sig == signal.SIGTERM:
            time.sleep(0.3)  # into epoch 2
        proc.send_signal(sig)
        stdout, _ = proc.communicate(timeout=120)
        assert not (run / "summary.json").exists(), "the run ended before it was interrupted"
        if sig == signal.SIGTERM:
            assert proc.returncode == 130
            assert json.loads(stdout)["interrupted"] == "SIGTERM"  # --json: one object, also now
            state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
            assert state["progress"]["step"] > 0, "SIGTERM should stop mid-epoch"
        subprocess.run(cmd(run, "--resume"), env=env, check=True, capture_output=True, timeout=600)
        a, b = _weights(ref), _weights(run)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{sig.name}: {k} differs"
        ref_rows = (ref / "metrics.jsonl").read_text().splitlines()
        run_rows = (run / "metrics.jsonl").read_text().splitlines()
        losses = [[json.loads(r)["train_loss"] for r in rows] for rows in (ref_rows, run_rows)]
        if sig == signal.SIGKILL:
            assert losses[0] == losses[1]


@pytest.mark.slow
@pytest.mark.parametrize(("optimizer", "weight_tol"), [("adamw", 1e-4), ("muon", 2e-3)])
def test_ddp_two_processes_match_one(fmnist, tmp_path, optimizer, weight_tol):
    """torchrun with 2 CPU processes (gloo) and the same global batch follows the 1-process run.

    This holds for the small-image recipe (no drop path, no MixUp/CutMix): those draw their random numbers
    per rank, so with them on N processes follow another (equally valid) trajectory; docs/training.md.
    Augmentation and data order depend on (seed, epoch, sample) only, so both see the same batches; the
    remaining difference is float summation order (gradient all-reduce), hence a tolerance of 1e-4 on
    losses and AdamW's weights. Muon orthogonalises in bf16, where a last-bit gradient difference can
    flip a rounding (2**-8 relative) of an update of size ~lr: its weights get 2e-3.
    """
    env = _env(fmnist)
    args = ["train", "--model", "tnt_mini_patch4_28", "--data", "fashion-mnist", "--epochs", "2"]
    args += ["--batch-size", "16", "--seed", "1", "--set", f"optim.name={optimizer}", *FAST, "--json"]
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(
        [sys.executable, "-m", "tntvision.cli", *args, "--out", str(one)],
        env=env,
        check=True,
        timeout=600,
        capture_output=True,
    )
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    res = subprocess.run(
        [*torchrun, "-m", "tntvision.cli", *args, "--out", str(two)],
        env=env,
        timeout=600,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    assert s2["processes"] == 2 and s1["images_seen"] == s2["images_seen"]
    rows = [[json.loads(r) for r in (d / "metrics.jsonl").read_text().splitlines()] for d in (one, two)]
    for r1, r2 in zip(*rows, strict=True):
        assert r1["train_loss"] == pytest.approx(r2["train_loss"], rel=1e-4, abs=1e-5)
        assert r1["val_loss"] == pytest.approx(r2["val_loss"], rel=1e-4, abs=1e-5)
    assert json.loads(res.stdout) == s2  # exactly one JSON object on stdout: rank 0's summary
    w1, w2 = _weights(one), _weights(two)
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < weight_tol


def test_finetune_other_classes_and_image_size(fmnist, tmp_path):
    src = tmp_path / "pre"
    train(_cfg(src, epochs=1), log=lambda _m: None)
    pre = tntvision.load_model(src)
    with torch.no_grad():  # a mark no fresh init has (init: std 0.02 around 0), to trace the weights by
        pre.blocks[0].attn_in.qk.weight.add_(0.5)
    tntvision.save_model(pre, src / "model", class_names=pre.class_names)
    folder = make_image_folder(tmp_path / "imgs", classes=("a", "b", "c"), per_class=6, size=32)
    out = tmp_path / "ft"
    code = main(
        [
            "train",
            "--model",
            "tnt_mini_patch4_28",
            "--data",
            str(folder),
            "--out",
            str(out),
            "--pretrained",
            str(src / "model"),
            "--img-size",
            "32",
            "--epochs",
            "1",
            "--batch-size",
            "6",
            *FAST,
            "--json",
        ]
    )
    assert code == 0
    model = tntvision.load_model(out)
    assert model.class_names == ["a", "b", "c"] and model.cfg.img_size == 32
    assert model.patch_pos.shape == (1, 1 + 8 * 8, model.embed_dim)  # 7x7 grid resampled to 8x8
    # the inner transformer came from the pretrained weights: one epoch at a small lr barely moves it,
    # and the mark is still there
    w0, w1 = pre.blocks[0].attn_in.qk.weight, model.blocks[0].attn_in.qk.weight
    assert (w1 - w0).abs().max() < 0.05
    assert w1.mean() > 0.4


# ------------------------------------------------------------------------------------------- bad input


def test_reproducibility_notes_say_when_the_guarantees_do_not_hold():
    from tntvision.train.run import reproducibility_notes

    small = from_dict({**SMALL_IMAGE_RECIPE, "time_budget": 5.0})  # by_time, no drop path, no mixing
    assert reproducibility_notes(small, processes=2, resumed=False) == []
    assert "bit for bit" in reproducibility_notes(small, processes=1, resumed=True)[0]
    assert "per rank" in reproducibility_notes(TrainConfig(), processes=2, resumed=False)[0]
    assert reproducibility_notes(TrainConfig(), processes=1, resumed=True) == []


def test_epochs_counted_as_a_person_does():
    from tntvision.cli import _epochs_text

    assert _epochs_text(3.0) == "3 epochs" and _epochs_text(1.0) == "1 epoch"
    assert (
        _epochs_text(6.34) == "6 epochs and 34% of the 7th"
        and _epochs_text(0.5) == "0 epochs and 50% of the 1st"
    )
    assert _epochs_text(10.2) == "10 epochs and 20% of the 11th" and _epochs_text(21.5).endswith(
        "of the 22nd"
    )


def _cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(["train", *argv])
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "no such data folder"),
        ("empty", "data folder is empty"),
        ("no_classes", "no class folders"),
        ("mismatch", "different classes"),
        ("bad_image", "broken.png: not an image"),
        ("epochs", "epochs must be >= 1"),
        ("lr", "optim.lr"),
        ("model", "unknown model"),
        ("batch", "larger than the training set"),
        ("memory", "data_loader=memory cannot be used"),
    ],
)
def test_bad_input_exits_2_with_one_line(capsys, tmp_path, case, message):
    data = tmp_path / "d"
    extra: list[str] = []
    if case == "empty":
        data.mkdir()
    elif case == "no_classes":
        make_image_folder(data, splits=("val",))
        (data / "train").mkdir()
    elif case == "mismatch":
        make_image_folder(data, classes=("a", "b"), per_class=1)
        make_image_folder(data, classes=("a", "c"), per_class=1, splits=("val",))
    elif case in ("bad_image", "epochs", "lr", "model", "batch", "memory"):
        make_image_folder(data, per_class=2)
        (data / "train" / "dog" / "broken.png").write_bytes(b"\x00garbage")
        extra = {
            "bad_image": [],
            "epochs": ["--epochs", "0"],
            "lr": ["--set", "optim.lr=-1"],
            "model": ["--model", "tnt_nope"],
            "batch": ["--batch-size", "64", "--set", "on_bad_image=skip"],
            "memory": ["--set", "on_bad_image=skip", "--set", "data_loader=memory"],
        }[case]
    out = tmp_path / "run"
    argv = ["--model", "tnt_mini_patch4_28", "--data", str(data), "--out", str(out), *FAST, *extra]
    if case == "model":
        argv = argv[2:]
    code, err = _cli(capsys, *argv)
    assert code == 2
    assert len(err.splitlines()) == 1 and message in err, err
    assert not out.exists()  # nothing was written


def test_undecodable_images_skipped_when_asked(capsys, tmp_path):
    data = make_image_folder(tmp_path / "d", per_class=2)
    (data / "train" / "dog" / "broken.png").write_bytes(b"\x00garbage")
    out = tmp_path / "run"
    argv = ["--model", "tnt_mini_patch4_28", "--data", str(data), "--out", str(out), "--batch-size", "3"]
    code, err = _cli(capsys, *argv, "--epochs", "1", "--set", "on_bad_image=skip", *FAST)
    assert code == 0 and "skipped 1 files" in err


def test_existing_run_and_resume_rules(capsys, fmnist, tmp_path):
    out = tmp_path / "run"
    argv = ["--model", "tnt_mini_patch4_28", "--data", "fashion-mnist", "--out", str(out), "--epochs", "1"]
    assert _cli(capsys, *argv, "--batch-size", "32", *FAST)[0] == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    code, err = _cli(capsys, *argv, *FAST)
    assert code == 2 and "already holds a training run" in err and len(err.splitlines()) == 1
    code, err = _cli(capsys, "--out", str(out), "--resume", "--set", "optim.lr=1")
    assert code == 2 and "cannot change optim.lr" in err
    code, err = _cli(capsys, "--out", str(tmp_path / "other"), "--resume")
    assert code == 2 and "no checkpoint to resume from" in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing lost
    # a finished run resumed with more time does nothing new but report
    code, err = _cli(capsys, "--out", str(out), "--resume", "--time-budget", "5")
    assert code == 0
