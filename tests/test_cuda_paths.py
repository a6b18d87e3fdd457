"""The CUDA paths of the commands, on any machine.

Without a GPU (CI, a CUDA build of torch on a machine without a GPU, a CPU-only torch): every command
that takes ``--device cuda`` exits 2 with one line saying why CUDA is not there, before it reads a file or
writes a folder; the choices that follow from the device (pinned host memory, asynchronous copies, the
process group's backend, each process's GPU) are unit-tested through the small functions that make them.

With a GPU, the tests marked ``cuda`` run the commands there (``pytest -m cuda``;
``benchmarks/gpu_check.py`` runs them on a lent GPU).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import tntvision
from tntvision.cli import main
from tntvision.errors import ConfigError
from tntvision.tools.predict import prepare_model
from tntvision.train import distributed
from tntvision.utils import devices

from .data_helpers import make_fashion_mnist, make_image_folder

REPO = Path(__file__).resolve().parents[1]
MINI = "tnt_mini_patch4_28"
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def no_gpu(monkeypatch):
    """This process sees no GPU, whatever the machine has (a CUDA build, as torch 2.14.1+cu130 here)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")


@pytest.fixture
def two_gpus(monkeypatch):
    """This process sees two GPUs (nothing below touches one: devices are only named)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


# ------------------------------------------------------------------------ --device cuda without a GPU


def _argv(command: str, tmp_path: Path) -> list[str]:
    """``tnt COMMAND ... --device cuda`` with paths that do not exist: the device must be refused first."""
    missing = str(tmp_path / "missing_run")
    image = str(tmp_path / "missing.png")
    return {
        "predict": ["predict", "--checkpoint", missing, image],
        "eval": ["eval", "--checkpoint", missing, "--data", str(tmp_path / "no_data")],
        "serve": ["serve", "--checkpoint", missing, "--port", "0"],
        "train": ["train", "--model", MINI, "--data", "fashion-mnist", "--out", str(tmp_path / "run")],
        "bench": ["bench", "--model", MINI, "--no-memory"],
    }[command] + ["--device", "cuda"]


@pytest.mark.parametrize("command", ["predict", "eval", "serve", "train", "bench"])
def test_device_cuda_without_a_gpu_is_one_line_and_exit_2(command, tmp_path, capsys, no_gpu):
    if command == "serve":
        pytest.importorskip("fastapi")
    assert main(_argv(command, tmp_path)) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.strip().splitlines()
    assert line.startswith(f"tnt {command}: error: ") and "Traceback" not in captured.err
    assert "cuda: CUDA is not available" in line and "finds no usable GPU" in line
    assert "--device cpu" in line
    assert not (tmp_path / "run").exists()  # train: refused before the run folder is made


def test_device_cuda_on_a_cpu_only_torch_says_so(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    assert main(_argv("predict", tmp_path)) == 2
    assert "is a CPU-only build" in capsys.readouterr().err


def test_train_device_from_the_config_is_refused_the_same_way(tmp_path, capsys, no_gpu):
    argv = ["train", "--model", MINI, "--data", "fashion-mnist", "--out", str(tmp_path / "run")]
    assert main([*argv, "--set", "device=cuda:1"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("tnt train: error: device cuda:1: CUDA is not available")
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_device_cuda_in_a_real_process_has_no_traceback(tmp_path):
    """The same through a fresh interpreter, with torch's real answer (no GPU here)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", "tntvision.cli", *_argv("train", tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stdout == "" and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert "CUDA is not available" in line
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------- resolve_device


def test_resolve_device_names(no_gpu):
    assert devices.resolve_device("cpu") == torch.device("cpu")
    assert devices.resolve_device("auto") == torch.device("cpu")  # no GPU: the CPU
    for bad in ("gpu", "mps", "cuda:x", ""):
        with pytest.raises(ConfigError, match="must be cpu, cuda or cuda:N"):
            devices.resolve_device(bad)
    with pytest.raises(ConfigError, match="--device cuda: CUDA is not available"):
        devices.resolve_device("cuda")
    with pytest.raises(ConfigError, match="^device cuda:0: "):
        devices.resolve_device("cuda:0", what="device")


def test_resolve_device_with_gpus_checks_the_index(two_gpus):
    assert devices.resolve_device("auto") == torch.device("cuda")
    assert devices.resolve_device("cuda") == torch.device("cuda")
    assert devices.resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match=r"shows 2 GPU\(s\) \(cuda:0..cuda:1\)"):
        devices.resolve_device("cuda:2")
    assert devices.cuda_unavailable_reason() is None


# ------------------------------------------------------------------------ pinned memory, async copies


@pytest.mark.parametrize(("device", "want"), [("cpu", False), ("cuda", True), ("cuda:1", True)])
def test_pinned_memory_and_async_copies_only_for_a_gpu(device, want):
    assert devices.pin_memory(torch.device(device)) is want
    assert devices.non_blocking(torch.device(device)) is want


@pytest.mark.parametrize(("device", "pinned"), [("cpu", False), ("cuda", True)])
def test_training_dataloaders_pin_for_a_gpu(device, pinned, tmp_path):
    """The per-image DataLoaders of a run are built with pin_memory from the device (built, not run)."""
    from tntvision.data import ShardedSampler, run_splits
    from tntvision.train import resolve_train_config
    from tntvision.train.builder import _loaders

    data = make_image_folder(tmp_path / "d", per_class=2, size=28)
    cfg = resolve_train_config(
        overrides={"model": MINI, "data": str(data), "out": str(tmp_path / "r"), "batch_size": 2}
    )
    splits = run_splits(str(data), val_fraction=0.1, val_seed=0)
    sampler = ShardedSampler(len(splits.train), global_batch=2, seed=0)
    meta = tntvision.create_model(MINI).meta
    loaders = _loaders(
        cfg, splits, sampler, meta=meta, world=distributed.World(), device=torch.device(device)
    )
    assert [loader.pin_memory for loader in loaders] == [pinned] * 3


class _Recorded:
    """A batch tensor that records how it was moved (``x.to(device, non_blocking=...)``)."""

    def __init__(self, t: torch.Tensor, calls: list) -> None:
        self.t, self.calls = t, calls

    def to(self, *args, **kwargs) -> torch.Tensor:
        self.calls.append(kwargs.get("non_blocking"))
        return self.t.to(*args, **kwargs)


def test_training_and_evaluation_copy_batches_as_the_device_says(monkeypatch):
    """The loops ask :func:`non_blocking` about their device and pass its answer to every ``.to``."""
    from tntvision import evaluation
    from tntvision.train import engine

    asked: list[torch.device] = []

    def spy(device):
        asked.append(device)
        return devices.non_blocking(device)

    monkeypatch.setattr(engine, "non_blocking", spy)
    monkeypatch.setattr(evaluation, "non_blocking", spy)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    calls: list = []
    batches = [(_Recorded(torch.randn(2, 4), calls), _Recorded(torch.tensor([0, 2]), calls))]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cpu = torch.device("cpu")
    engine.train_one_epoch(model, batches, opt, device=cpu, epoch=0, steps_per_epoch=1)
    evaluation.evaluate(model, batches, device=cpu)
    assert asked == [cpu, cpu] and calls == [False] * 4


def test_prepare_model_copies_when_the_device_changes():
    """A model prepared for another device is a copy (``tnt serve`` keeps the CPU one for /explain);
    the meta device stands in for a GPU."""
    model = tntvision.create_model(MINI)
    same = prepare_model(model, device="cpu")
    assert same is model
    moved = prepare_model(model, device="meta")
    assert moved is not model and next(moved.parameters()).is_meta
    assert next(model.parameters()).device == torch.device("cpu")


@pytest.mark.parametrize(("tensor_cores", "want"), [(True, "bfloat16"), (False, "none")])
def test_amp_auto_on_a_gpu_is_bf16_only_with_bf16_units(tensor_cores, want, monkeypatch, two_gpus):
    """``amp: auto`` asks the GPU it runs on for bf16 without emulation: a pre-Ampere GPU, which torch
    says "supports" bf16 by emulating it, trains in fp32."""
    import contextlib

    from tntvision.utils import amp

    asked = []
    monkeypatch.setattr(torch.cuda, "device", lambda d: asked.append(d) or contextlib.nullcontext())
    monkeypatch.setattr(
        torch.cuda, "is_bf16_supported", lambda including_emulation=True: tensor_cores or including_emulation
    )
    assert amp.resolve_amp("auto", torch.device("cuda", 1)) == want
    assert asked == [torch.device("cuda", 1)]


def test_amp_auto_without_a_gpu_is_fp32(no_gpu):
    from tntvision.utils import amp

    assert amp.resolve_amp("auto", torch.device("cuda")) == "none"


def test_serve_refuses_an_exported_file_on_a_gpu():
    """An exported file (a model without parameters) runs on the CPU only: refused before warm-up."""
    from tntvision.serve.engine import Engine, EngineConfig

    with pytest.raises(ConfigError, match="runs on the CPU: leave --device out"):
        Engine(torch.nn.Module(), EngineConfig(device=torch.device("cuda")))


# ------------------------------------------------------------------------------- process groups


def test_backend_is_nccl_for_cuda_and_gloo_for_cpu():
    assert distributed.backend_for(torch.device("cuda")) == "nccl"
    assert distributed.backend_for(torch.device("cuda", 3)) == "nccl"
    assert distributed.backend_for(torch.device("cpu")) == "gloo"


def test_launched_by_torchrun_needs_its_whole_environment():
    env = {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    assert distributed.launched_by_torchrun(env)
    assert not distributed.launched_by_torchrun({k: v for k, v in env.items() if k != "MASTER_PORT"})
    assert not distributed.launched_by_torchrun({})


def test_each_process_takes_the_gpu_of_its_local_rank(two_gpus):
    assert distributed.local_device(torch.device("cuda"), 1) == torch.device("cuda", 1)
    assert distributed.local_device(torch.device("cuda", 0), 1) == torch.device("cuda", 0)  # named: kept
    assert distributed.local_device(torch.device("cpu"), 1) == torch.device("cpu")
    with pytest.raises(ConfigError, match="LOCAL_RANK 2 has no GPU"):
        distributed.local_device(torch.device("cuda"), 2)


def _torchrun_env(monkeypatch, *, rank: int = 0, size: int = 1, local_rank: int = 0, port: int = 0) -> None:
    for key, value in {
        "RANK": rank,
        "WORLD_SIZE": size,
        "LOCAL_RANK": local_rank,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": port,
    }.items():
        monkeypatch.setenv(key, str(value))


def test_init_distributed_joins_nccl_for_cuda_without_starting_it(monkeypatch, two_gpus):
    """Under torchrun a CUDA process takes its GPU, then joins an nccl group (both recorded, not run)."""
    _torchrun_env(monkeypatch, rank=3, size=4, local_rank=1)
    seen: dict[str, object] = {}
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: seen.setdefault("gpu", d))
    monkeypatch.setattr(dist, "init_process_group", lambda backend: seen.setdefault("backend", backend))
    monkeypatch.setattr(dist, "get_backend", lambda: seen["backend"])
    world = distributed.init_distributed(torch.device("cuda"))
    assert seen == {"gpu": torch.device("cuda", 1), "backend": "nccl"}
    assert world == distributed.World(rank=3, size=4, local_rank=1, backend="nccl")
    assert world.distributed and not world.is_main


def test_one_process_under_torchrun_is_a_gloo_group_on_cpu(monkeypatch):
    """torchrun with one process joins a real (gloo) group, so it runs the path N processes run."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _torchrun_env(monkeypatch, port=port)
    try:
        world = distributed.init_distributed(torch.device("cpu"))
        assert world == distributed.World(rank=0, size=1, local_rank=0, backend="gloo")
        assert world.distributed and dist.get_world_size() == 1
    finally:
        distributed.shutdown()
    assert not dist.is_initialized()


def test_without_torchrun_there_is_no_process_group(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    world = distributed.init_distributed(torch.device("cpu"))
    assert world == distributed.World() and not world.distributed and world.backend is None


# ------------------------------------------------------------------------------- on a real GPU


@pytest.fixture
def fmnist(tmp_path, monkeypatch):
    folder = make_fashion_mnist(tmp_path / "fm", n_train=96, n_test=32)
    monkeypatch.setenv("TNT_FASHION_MNIST_DIR", str(folder))
    return folder


@pytest.mark.cuda
@needs_gpu
def test_gpu_train_predict_eval_agree(fmnist, tmp_path, capsys):
    """A short run on the GPU (bf16 autocast where the GPU has it), then eval and predict on the GPU match
    the CPU's answers for the same weights."""
    out = tmp_path / "run"
    argv = ["train", "--model", MINI, "--data", "fashion-mnist", "--out", str(out), "--epochs", "1"]
    assert main([*argv, "--batch-size", "16", "--device", "cuda", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["device"] == "cuda:0" and summary["device_name"] == torch.cuda.get_device_name(0)
    assert summary["amp"] == ("bfloat16" if torch.cuda.is_bf16_supported() else "none")
    assert summary["backend"] is None and summary["train_images_per_s"] > 0
    results = {}
    for device in ("cpu", "cuda"):
        assert main(["eval", "--checkpoint", str(out), "--data", "fashion-mnist", "--device", device]) == 0
        capsys.readouterr()
        results[device] = json.loads((out / "eval_test.json").read_text())
    assert results["cuda"]["n"] == results["cpu"]["n"] == 32
    assert abs(results["cuda"]["loss"] - results["cpu"]["loss"]) < 1e-3
    images = make_image_folder(tmp_path / "imgs", per_class=1, size=28, splits=("x",))
    probs = {}
    for device in ("cpu", "cuda"):
        assert main(["predict", "--checkpoint", str(out), str(images), "--device", device, "--json"]) == 0
        probs[device] = [p["top"][0] for p in json.loads(capsys.readouterr().out)["predictions"]]
    for a, b in zip(probs["cpu"], probs["cuda"], strict=True):
        assert a["index"] == b["index"] and abs(a["prob"] - b["prob"]) < 1e-3


@pytest.mark.cuda
@needs_gpu
def test_gpu_bench_times_with_events_and_names_the_gpu():
    from tntvision.tools.bench import TIMING, bench_model

    result = bench_model(
        model_name=MINI, batch_size=8, rounds=3, warmup=1, latency_rounds=3, train=True, device="cuda"
    )
    assert result["device_name"] == torch.cuda.get_device_name() and result["timing"] == TIMING["cuda"]
    for key in ("inference", "latency", "train"):
        s = result[key]["per_impl"]["ours"]
        assert 0 < s["min_ms"] <= s["median_ms"] <= s["max_ms"]
    mem = result["memory"]
    assert mem["measured_as"] == "CUDA max_memory_allocated" and mem["per_impl"]["ours"]["peak_mb"] > 0


@pytest.mark.cuda
@needs_gpu
def test_gpu_serve_engine_matches_the_cpu():
    import asyncio

    from tntvision.serve.engine import Engine, EngineConfig

    model = tntvision.create_model(MINI).eval()
    x = torch.randn(3, *model.meta.input_size)
    with torch.no_grad():
        want = model(x)
    engine = Engine(model, EngineConfig(max_wait_ms=50, device=torch.device("cuda")))
    engine.start()
    try:
        assert engine.ready.wait(120), engine.failure

        async def ask():
            return await asyncio.gather(*(engine.infer(img) for img in x))

        got = torch.stack(asyncio.run(ask()))
    finally:
        engine.stop()
    assert got.device.type == "cpu" and next(model.parameters()).device.type == "cpu"  # /explain's copy
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


@pytest.mark.cuda
@needs_gpu
def test_gpu_torchrun_one_process_trains_over_nccl(fmnist, tmp_path):
    env = dict(os.environ, TNT_FASHION_MNIST_DIR=str(fmnist), OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    out = tmp_path / "ddp"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    args = ["train", "--model", MINI, "--data", "fashion-mnist", "--epochs", "1", "--batch-size", "16"]
    proc = subprocess.run(
        [*torchrun, "-m", "tntvision.cli", *args, "--device", "cuda", "--out", str(out), "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["backend"] == "nccl" and summary["processes"] == 1 and summary["device"] == "cuda:0"
