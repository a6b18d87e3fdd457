"""`tnt export`: ONNX and pt2 files compute PyTorch's logits at any batch size, in onnxruntime and in
OpenVINO (``--runtime openvino``), carry the model's name, class names and preprocessing, and work as
``--checkpoint`` for eval, predict and bench; int8 stays within its tolerance; bad input (a ``--runtime``
that cannot run the file, a missing runtime package, an exported file where PyTorch weights are needed)
exits 2 with one line and leaves no file behind; torch.hub loads the models."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import tntvision
from tntvision.cli import main
from tntvision.errors import CheckpointError, ConfigError, DependencyError, InputError
from tntvision.kernels import fused_kernels
from tntvision.tools.export import export_model
from tntvision.tools.exported import (
    RUNTIMES,
    ExportedModel,
    check_pt2_archive,
    load_exported,
    read_metadata,
    resolve_runtime,
)

from .data_helpers import make_fashion_mnist, make_image_folder

REPO = Path(__file__).resolve().parents[1]
CLASSES = [f"class_{i}" for i in range(10)]
# the registered models small enough for CI, and the input size each is saved at (TNT-S: a 2x2 grid)
MODELS = {
    "tnt_mini_patch4_28": 28,
    "vit_mini_patch4_28": 28,
    "tnt_s_patch16_224": 32,
    "tnt_s_legacy_patch16_224": 32,  # the other structure (whole-image word conv)
    "tnt_s_se_patch16_224": 32,  # the SE gate
    "ptnt_ti_patch16_192": 64,  # PyramidTNT: conv stem, spatial reduction, relative tables, merges
}
# Fewer blocks for the full-size models: an exporter traces every block, and their blocks are all alike
# (what a file holds is the same ops per block; the export time was ~15-25 s a model with all of them).
# PyramidTNT keeps every stage, and a block without an inner transformer in its first (depth 2: the
# inner one is block 0). TNT-Ti and TNT-B share TNT-S's structure (exported by hand at 32 px: logits
# within 1e-6 of PyTorch's).
OVERRIDES = {
    "tnt_s_patch16_224": dict(depth=2),
    "tnt_s_legacy_patch16_224": dict(depth=2),
    "tnt_s_se_patch16_224": dict(depth=2),
    "ptnt_ti_patch16_192": dict(depths=(2, 1, 1, 1)),
}
SLOW = {"tnt_s_patch16_224", "tnt_s_legacy_patch16_224", "tnt_s_se_patch16_224", "ptnt_ti_patch16_192"}
FORMATS = ("onnx", "pt2")
# (format, --runtime): every way an exported file runs; None is the format's default runtime
FILE_RUNTIMES = [("onnx", None), ("onnx", "openvino"), ("pt2", None)]
ATOL = 1e-4  # float32 exports: the same ops in another runtime (measured: ~1e-6)


def _model_params():
    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in MODELS]


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Norm weights and biases moved off their init (1 / 0): a dropped bias or norm would then show."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
        model.head.weight.mul_(20)  # logits of a few units, so that tolerances mean something
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (model folder, the PyTorch model loaded from it); built on first use."""
    cache: dict[str, tuple[Path, torch.nn.Module]] = {}

    def get(name: str) -> tuple[Path, torch.nn.Module]:
        if name not in cache:
            torch.manual_seed(0)
            model = tntvision.create_model(
                name, img_size=MODELS[name], num_classes=10, **OVERRIDES.get(name, {})
            )
            model = _perturbed(model)
            folder = tmp_path_factory.mktemp(name) / "model"
            tntvision.save_model(model, folder, class_names=CLASSES)
            cache[name] = folder, tntvision.load_model(folder).eval()
        return cache[name]

    return get


@pytest.fixture(scope="module")
def exported(saved, tmp_path_factory):
    """(name, format) -> the exported file; built on first use."""
    cache: dict[tuple[str, str], Path] = {}

    def get(name: str, fmt: str) -> Path:
        if (name, fmt) not in cache:
            folder, _ = saved(name)
            out = tmp_path_factory.mktemp("exported") / f"{name}.{fmt}"
            export_model(folder, format=fmt, out=out)
            cache[name, fmt] = out
        return cache[name, fmt]

    return get


def _images(model: torch.nn.Module, batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, *model.meta.input_size, generator=torch.Generator().manual_seed(seed))


@torch.inference_mode()
def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)


# ------------------------------------------------------------------------------------------ numbers


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", _model_params())
def test_exported_logits_equal_pytorchs_at_two_batch_sizes(saved, exported, name, fmt):
    _, model = saved(name)
    file_model = load_exported(exported(name, fmt))
    assert isinstance(file_model, ExportedModel)
    for batch in (1, 5):  # the example input had 2: the batch dimension is dynamic
        x = _images(model, batch, seed=batch)
        got, want = _logits(file_model, x), _logits(model, x)  # PyTorch as users run it (fused kernels on)
        assert got.shape == (batch, 10)
        torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
        assert want.std() > 0.5  # the comparison is not between near-zero numbers


@pytest.mark.parametrize("name", _model_params())
def test_openvino_runs_the_onnx_file_with_pytorchs_logits_at_two_batch_sizes(saved, exported, name):
    _, model = saved(name)
    path = exported(name, "onnx")
    file_model = load_exported(path, runtime="openvino")
    assert file_model.runtime == "openvino"
    assert file_model.metadata == load_exported(path).metadata  # the same metadata, read the same way
    for batch in (1, 5):  # the example input had 2: the batch dimension stays dynamic in OpenVINO too
        x = _images(model, batch, seed=batch)
        got, want = _logits(file_model, x), _logits(model, x)
        assert got.shape == (batch, 10) and got.dtype == torch.float32
        # fp32 inference: OpenVINO's bf16 default (CPUs with bf16 units) would miss this by ~1e-2
        torch.testing.assert_close(got, want, rtol=0, atol=ATOL)


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_at_another_input_size_resamples_like_pytorch(saved, tmp_path, fmt):
    folder, _ = saved("tnt_mini_patch4_28")
    out = tmp_path / f"m32.{fmt}"
    result = export_model(folder, format=fmt, out=out, img_size=32)
    assert result.input_size == (1, 32, 32)
    model = tntvision.load_model(folder, img_size=32).eval()  # position tables resampled on load
    file_model = load_exported(out)
    assert file_model.meta.input_size == (1, 32, 32)
    for batch in (1, 3):
        x = _images(file_model, batch)
        torch.testing.assert_close(_logits(file_model, x), _logits(model, x), rtol=0, atol=ATOL)
    with pytest.raises(InputError, match="takes images"):
        file_model(torch.zeros(1, 1, 28, 28))  # the file is fixed to its size


@pytest.mark.parametrize("fmt", FORMATS)
def test_metadata_round_trip(saved, exported, fmt):
    _, model = saved("tnt_mini_patch4_28")
    path = exported("tnt_mini_patch4_28", fmt)
    meta = read_metadata(path)
    assert meta["model"] == "tnt_mini_patch4_28"
    assert meta["class_names"] == CLASSES and meta["num_classes"] == 10
    assert meta["meta"] == json.loads(json.dumps(dataclasses.asdict(model.meta)))
    assert meta["config"] == json.loads(json.dumps(dataclasses.asdict(model.cfg)))
    assert meta["quantize"] is None
    file_model = load_exported(path)
    assert file_model.meta == model.meta  # tuples again, equal to the PyTorch model's
    assert file_model.class_names == CLASSES and file_model.num_classes == 10
    assert file_model.model_name == "tnt_mini_patch4_28"


def test_onnx_opset_is_the_one_asked_for(saved, tmp_path):
    import onnx

    folder, model = saved("tnt_mini_patch4_28")
    out = tmp_path / "m17.onnx"
    export_model(folder, format="onnx", out=out, opset=17)
    assert {o.domain: o.version for o in onnx.load(out).opset_import}[""] == 17
    x = _images(model, 2)
    torch.testing.assert_close(_logits(load_exported(out), x), _logits(model, x), rtol=0, atol=ATOL)
    with pytest.raises(ConfigError, match="--opset"):
        export_model(folder, format="onnx", out=tmp_path / "m9.onnx", opset=9)


def test_pt2_holds_no_tntvision_op_and_loads_without_the_extension(exported):
    """Exported with the fused kernels off: plain aten ops, so torch alone runs the archive."""
    program = torch.export.load(exported("tnt_mini_patch4_28", "pt2"))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert targets and not any("tntvision" in t for t in targets)


# ------------------------------------------------------------------------------------------ as checkpoints


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    return make_image_folder(
        tmp_path_factory.mktemp("data"), classes=tuple(CLASSES), per_class=2, size=28, splits=("val",)
    )


def _run_json(capsys, argv: list[str]) -> dict:
    capsys.readouterr()
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _runtime_args(runtime: str | None) -> list[str]:
    return [] if runtime is None else ["--runtime", runtime]


@pytest.mark.parametrize(("fmt", "runtime"), FILE_RUNTIMES)
def test_eval_and_predict_on_an_exported_file_give_the_checkpoints_numbers(
    saved, exported, image_folder, tmp_path, capsys, fmt, runtime
):
    folder, _ = saved("tnt_mini_patch4_28")
    path = exported("tnt_mini_patch4_28", fmt)
    results = {}
    for label, ckpt, extra in (("pytorch", folder, []), ("exported", path, _runtime_args(runtime))):
        argv = ["eval", "--checkpoint", str(ckpt), "--data", str(image_folder), "--split", "val", *extra]
        results[label] = _run_json(capsys, [*argv, "--out", str(tmp_path / label)])
    ours, theirs = results["exported"], results["pytorch"]
    assert (ours["top1"], ours["top5"], ours["n"], ours["confusion"]) == (
        theirs["top1"],
        theirs["top5"],
        theirs["n"],
        theirs["confusion"],
    )
    assert ours["loss"] == pytest.approx(theirs["loss"], abs=1e-5)
    assert ours["classes"] == CLASSES
    images = str(image_folder / "val")
    preds = {
        label: _run_json(capsys, ["predict", "--checkpoint", str(ckpt), images, "--topk", "3", *extra])[
            "predictions"
        ]
        for label, ckpt, extra in (("pytorch", folder, []), ("exported", path, _runtime_args(runtime)))
    }
    assert len(preds["exported"]) == len(preds["pytorch"]) == 20
    for a, b in zip(preds["exported"], preds["pytorch"], strict=True):
        assert a["path"] == b["path"]
        assert [t["label"] for t in a["top"]] == [t["label"] for t in b["top"]]
        np.testing.assert_allclose([t["prob"] for t in a["top"]], [t["prob"] for t in b["top"]], atol=1e-5)


def test_exported_file_refuses_bf16_and_autocast(exported, image_folder, capsys):
    path = str(exported("tnt_mini_patch4_28", "onnx"))
    for extra in (["--dtype", "bfloat16"], ["--amp", "bfloat16"]):
        argv = ["eval", "--checkpoint", path, "--data", str(image_folder), "--split", "val", *extra]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "PyTorch checkpoints" in err, err


# ------------------------------------------------------------------------------------------ int8


def _agreement_and_error(file_model, model, x) -> tuple[float, float]:
    got, want = _logits(file_model, x), _logits(model, x)
    agree = float((got.argmax(1) == want.argmax(1)).float().mean())
    return agree, float((got - want).abs().max() / want.std())


@pytest.mark.parametrize("calibrated", [False, True], ids=["dynamic", "static"])
def test_int8_quantizes_only_the_linear_layers_and_stays_close(
    saved, tmp_path, monkeypatch, capsys, calibrated
):
    import onnx

    folder, model = saved("tnt_mini_patch4_28")
    out = tmp_path / "int8.onnx"
    argv = [
        "export",
        "--checkpoint",
        str(folder),
        "--format",
        "onnx",
        "--out",
        str(out),
        "--quantize",
        "int8",
    ]
    if calibrated:
        monkeypatch.setenv("TNT_FASHION_MNIST_DIR", str(make_fashion_mnist(tmp_path / "fm", n_train=64)))
        argv += ["--calibrate", "fashion-mnist", "--calibration-images", "48"]
    result = _run_json(capsys, argv)
    assert result["quantize"] == ("int8-static-qdq" if calibrated else "int8-dynamic")
    ops = [n.op_type for n in onnx.load(out).graph.node]
    assert "LayerNormalization" in ops and "Softmax" in ops  # left in float
    if calibrated:
        # QDQ pairs sit in front of the Linear layers only: LayerNorm and softmax read float tensors
        proto = onnx.load(out)
        producers = {o: n.op_type for n in proto.graph.node for o in n.output}
        for node in proto.graph.node:
            if node.op_type in ("LayerNormalization", "Softmax"):
                assert producers.get(node.input[0]) != "DequantizeLinear", node.name
        assert ops.count("QuantizeLinear") > 0
    else:
        assert "DynamicQuantizeLinear" in ops or "DynamicQuantizeMatMul" in ops
    x = _images(model, 64)
    for runtime in ("onnxruntime", "openvino"):  # OpenVINO reads the int8 ops (QDQ, MatMulInteger) too
        agree, err = _agreement_and_error(load_exported(out, runtime=runtime), model, x)
        # Measured on this model (256 images): the largest logit error is 1.4% (dynamic) / 4.8% (static)
        # of the logits' standard deviation, and every top-1 class survives, in both runtimes. 15% leaves
        # room for other CPUs' int8 kernels (with or without VNNI) and still catches a broken
        # quantization (errors of order 100%).
        assert agree >= 0.95 and err < 0.15, (runtime, agree, err)


# ------------------------------------------------------------------------------------------ bad input


def _one_line_exit_2(capsys, argv: list[str], match: str) -> None:
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors exit from parse_args
        code = e.code
    assert code == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and match in err, err
    assert captured.out == ""


def test_bad_export_arguments_exit_2_and_leave_no_file(saved, tmp_path, capsys, monkeypatch):
    folder, _ = saved("tnt_mini_patch4_28")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    base = ["export", "--checkpoint", str(folder)]
    onnx_out = str(out_dir / "m.onnx")
    _one_line_exit_2(capsys, [*base, "--format", "tflite", "--out", onnx_out], "invalid choice")
    _one_line_exit_2(capsys, [*base, "--format", "pt2", "--out", onnx_out], "must end in .pt2")
    _one_line_exit_2(
        capsys,
        [*base, "--format", "pt2", "--out", str(out_dir / "m.pt2"), "--quantize", "int8"],
        "--quantize",
    )
    _one_line_exit_2(
        capsys, [*base, "--format", "onnx", "--out", onnx_out, "--calibrate", "x"], "--calibrate"
    )
    blocker = tmp_path / "a_file"
    blocker.write_text("in the way")
    _one_line_exit_2(capsys, [*base, "--format", "onnx", "--out", str(blocker / "m.onnx")], "a_file")
    assert blocker.read_text() == "in the way"
    monkeypatch.setitem(sys.modules, "onnxruntime.quantization", None)  # as if it were not installed
    _one_line_exit_2(
        capsys, [*base, "--format", "onnx", "--out", onnx_out, "--quantize", "int8"], "tntvision[export]"
    )
    with pytest.raises(DependencyError):
        export_model(folder, format="onnx", out=onnx_out, quantize="int8")
    with pytest.raises(ConfigError, match="unknown format"):
        export_model(folder, format="tflite", out=out_dir / "m.tflite")
    assert list(out_dir.iterdir()) == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_failing_export_leaves_no_partial_file(saved, tmp_path, monkeypatch, fmt):
    """The file is complete on disk when the check fails: it must still vanish, temp file included."""
    import tntvision.tools.export as export

    def broken_check(*args, **kwargs):
        raise RuntimeError("checked and found wrong")

    monkeypatch.setattr(export, "_check_against", broken_check)
    folder, _ = saved("tnt_mini_patch4_28")
    with pytest.raises(RuntimeError, match="found wrong"):
        export_model(folder, format=fmt, out=tmp_path / f"m.{fmt}")
    assert list(tmp_path.iterdir()) == []


def test_files_that_are_not_valid_exports_are_refused(exported, image_folder, tmp_path, capsys):
    import onnx

    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07not a protobuf at all" * 10)
    broken = tmp_path / "broken.onnx"  # parses, fails the checker: a node reads a value nobody makes
    proto = onnx.load(exported("tnt_mini_patch4_28", "onnx"))
    proto.graph.node[len(proto.graph.node) // 2].input[0] = "nowhere"
    onnx.save(proto, broken)
    foreign = tmp_path / "foreign.onnx"  # valid ONNX without our metadata
    proto = onnx.load(exported("tnt_mini_patch4_28", "onnx"))
    del proto.metadata_props[:]
    onnx.save(proto, foreign)
    not_zip = tmp_path / "not_zip.pt2"
    not_zip.write_bytes(b"PK but not really")
    for path, match in (
        (garbage, "not a valid ONNX model"),
        (broken, "not a valid ONNX model"),
        (foreign, "without tntvision metadata"),
        (not_zip, "not a torch.export archive"),
    ):
        with pytest.raises(CheckpointError, match=match):
            load_exported(path)
        argv = ["eval", "--checkpoint", str(path), "--data", str(image_folder), "--split", "val"]
        _one_line_exit_2(capsys, argv, path.name)


class _Payload:
    """Unpickling this runs code that writes ``marker`` (what an attacker's file would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('the payload ran')",))


def _with_pickled_weight(src: Path, dst: Path, marker: Path) -> None:
    """A copy of the archive ``src`` whose first weight is a pickled payload (``use_pickle``)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        config_name = next(n for n in zin.namelist() if n.endswith("weights_config.json"))
        config = json.loads(zin.read(config_name))
        first = next(iter(config["config"].values()))
        first["use_pickle"] = True
        buffer = io.BytesIO()
        torch.save(_Payload(marker), buffer)
        weight_name = next(n for n in zin.namelist() if n.endswith("/" + first["path_name"]))
        for item in zin.infolist():
            data = zin.read(item)
            if item.filename == config_name:
                data = json.dumps(config).encode()
            elif item.filename == weight_name:
                data = buffer.getvalue()
            zout.writestr(item, data)


def test_pt2_with_a_pickled_payload_is_refused_before_loading(exported, image_folder, tmp_path, capsys):
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pt2"
    _with_pickled_weight(exported("tnt_mini_patch4_28", "pt2"), evil, marker)
    with pytest.raises(CheckpointError, match="pickled tensors"):
        check_pt2_archive(evil)
    argv = ["eval", "--checkpoint", str(evil), "--data", str(image_folder), "--split", "val"]
    _one_line_exit_2(capsys, argv, "refused")
    _one_line_exit_2(capsys, ["predict", "--checkpoint", str(evil), str(image_folder / "val")], "refused")
    assert not marker.exists()
    with contextlib.suppress(Exception):  # whether loading then fails or not, the payload has run
        torch.export.load(evil)
    assert marker.read_text() == "the payload ran"  # so the refusal above is what kept it from running


# ------------------------------------------------------------------------------------------ torch.hub


def test_torch_hub_loads_every_registered_model_from_a_clone():
    spec = importlib.util.spec_from_file_location("tnt_hubconf", REPO / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    # what torch.hub.list would show (it has no source="local"): public callables of the module
    entries = sorted(n for n in dir(hubconf) if callable(getattr(hubconf, n)) and not n.startswith("_"))
    assert entries == tntvision.list_models()
    model = torch.hub.load(str(REPO), "tnt_mini_patch4_28", source="local", num_classes=3)
    assert model.num_classes == 3 and model.model_name == "tnt_mini_patch4_28"
    with torch.no_grad(), fused_kernels(False):
        assert model.eval()(torch.zeros(2, 1, 28, 28)).shape == (2, 3)


@pytest.mark.parametrize("runtime", [None, "onnxruntime", "openvino"])
def test_bench_times_an_exported_file_against_pytorch(exported, capsys, runtime, monkeypatch):
    from tntvision.tools import exported as exported_module

    batches: list[int] = []  # the batch of every call the exported file ran
    real_load = exported_module.load_exported

    def load(*args, **kwargs):
        module = real_load(*args, **kwargs)
        module.register_forward_pre_hook(lambda _m, inputs: batches.append(inputs[0].shape[0]))
        return module

    monkeypatch.setattr(exported_module, "load_exported", load)
    path = str(exported("tnt_mini_patch4_28", "onnx"))
    argv = [
        "bench",
        "--checkpoint",
        path,
        "--batch-size",
        "2",
        "--rounds",
        "1",
        "--warmup",
        "0",
        "--threads",
        "1",
        *_runtime_args(runtime),
    ]
    result = _run_json(capsys, argv)
    label = runtime or "onnxruntime"
    assert result["implementations"] == [label, "pytorch"] and result["threads"] == 1
    assert result["runtime"] == label
    # warmup 0, one round of batch 2, then two of batch 1: what was timed is the file's runs
    assert batches == [2, 1, 1]
    for workload, batch in (("inference", 2), ("latency", 1)):
        per = result[workload]["per_impl"]
        assert set(per) == {label, "pytorch"}
        assert result[workload]["speedup"] == pytest.approx(
            per["pytorch"]["median_ms"] / per[label]["median_ms"]
        )
        assert per[label]["img_per_s"] == pytest.approx(batch / (per[label]["median_ms"] / 1e3))
    _one_line_exit_2(capsys, [*argv, "--train"], "float32 inference only")


@pytest.mark.parametrize("fmt", FORMATS)
def test_commands_that_need_pytorch_weights_refuse_an_exported_file(
    exported, image_folder, tmp_path, capsys, fmt
):
    path = str(exported("tnt_mini_patch4_28", fmt))
    name = Path(path).name
    img = str(next((image_folder / "val").rglob("*.png")))
    instead = "pass --checkpoint the run folder, model/ folder or weights file it was exported from"
    _one_line_exit_2(
        capsys,
        ["visualize", "--checkpoint", path, img, "--out", str(tmp_path / "v")],
        f"tnt visualize: error: {name} is an exported graph: it has no attention maps",
    )
    _one_line_exit_2(capsys, ["visualize", "--checkpoint", path, img, "--out", str(tmp_path / "v")], instead)
    argv = ["train", "--model", "tnt_mini_patch4_28", "--data", str(image_folder), "--epochs", "1"]
    _one_line_exit_2(
        capsys,
        [*argv, "--out", str(tmp_path / "run"), "--pretrained", path],
        f"{name} is an exported graph: it holds no trainable weights; pass --pretrained the run folder",
    )
    _one_line_exit_2(
        capsys, [*argv, "--out", str(tmp_path / "run"), "--set", f"pretrained={path}"], "no trainable weights"
    )
    _one_line_exit_2(
        capsys,
        ["export", "--checkpoint", path, "--format", "pt2", "--out", str(tmp_path / "m.pt2")],
        "already exported",
    )
    with pytest.raises(CheckpointError, match="an exported model"):
        tntvision.load_model(path)
    with pytest.raises(CheckpointError, match="no trainable weights"):
        tntvision.create_model("tnt_mini_patch4_28", num_classes=10, pretrained=path)
    assert list(tmp_path.iterdir()) == []  # no figure folder, no run folder, no file


def test_refusals_through_real_processes(exported, image_folder, tmp_path):
    """The same refusals from `python -m tntvision.cli` (and a missing openvino, hidden in the child)."""
    onnx_file, pt2_file = (str(exported("tnt_mini_patch4_28", f)) for f in FORMATS)
    img = str(next((image_folder / "val").rglob("*.png")))
    hide_openvino = "import sys; sys.modules['openvino'] = None; from tntvision.cli import main; "
    cases = {
        "visualize": (
            ["-m", "tntvision.cli", "visualize", "--checkpoint", pt2_file, img, "--out", str(tmp_path / "v")],
            "no attention maps",
        ),
        "train": (
            ["-m", "tntvision.cli", "train", "--model", "tnt_mini_patch4_28", "--data", str(image_folder)]
            + ["--out", str(tmp_path / "run"), "--pretrained", onnx_file],
            "no trainable weights",
        ),
        "openvino missing": (
            ["-c", hide_openvino + "raise SystemExit(main(sys.argv[1:]))"]
            + ["predict", "--checkpoint", onnx_file, img, "--runtime", "openvino"],
            "pip install 'tntvision[openvino]'",
        ),
    }
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    procs = {  # all at once: most of each is importing torch
        name: subprocess.Popen(
            [sys.executable, *argv], env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for name, (argv, _) in cases.items()
    }
    for name, proc in procs.items():
        out, err = (b.decode() for b in proc.communicate(timeout=300))
        lines = err.strip().splitlines()
        assert proc.returncode == 2 and out == "", (name, proc.returncode, out, err)
        assert len(lines) == 1 and cases[name][1] in lines[0] and "Traceback" not in err, (name, err)
    assert list(tmp_path.iterdir()) == []  # no figure folder, no run folder


# ------------------------------------------------------------------------------------------ --runtime


def test_runtime_that_cannot_run_the_checkpoint_exits_2_with_one_line(
    saved, exported, image_folder, tmp_path, capsys
):
    folder, _ = saved("tnt_mini_patch4_28")
    onnx_file, pt2_file = (str(exported("tnt_mini_patch4_28", f)) for f in FORMATS)
    images = str(image_folder / "val")
    for ckpt, runtime, match in (
        (onnx_file, "torch", "--runtime torch runs PyTorch checkpoints and .pt2 files"),
        (
            pt2_file,
            "openvino",
            "--runtime openvino runs .onnx files; tnt_mini_patch4_28.pt2 is a torch.export",
        ),
        (pt2_file, "onnxruntime", "--runtime onnxruntime runs .onnx files"),
        (str(folder), "openvino", "model is a PyTorch checkpoint, which runs in PyTorch"),
    ):
        data = ["--data", str(image_folder), "--split", "val", "--out", str(tmp_path / "e")]
        _one_line_exit_2(capsys, ["eval", "--checkpoint", ckpt, *data, "--runtime", runtime], match)
        _one_line_exit_2(capsys, ["predict", "--checkpoint", ckpt, images, "--runtime", runtime], match)
    _one_line_exit_2(capsys, ["bench", "--checkpoint", pt2_file, "--runtime", "openvino"], "runs .onnx files")
    _one_line_exit_2(capsys, ["bench", "--checkpoint", onnx_file, "--runtime", "torch"], "is an ONNX file")
    _one_line_exit_2(
        capsys, ["bench", "--model", "tnt_mini_patch4_28", "--runtime", "openvino"], "--model runs in PyTorch"
    )
    _one_line_exit_2(
        capsys, ["predict", "--checkpoint", onnx_file, images, "--runtime", "tvm"], "invalid choice"
    )
    assert list(tmp_path.iterdir()) == []
    # --runtime torch is what PyTorch checkpoints and .pt2 files run in anyway: accepted
    for ckpt in (str(folder), pt2_file):
        out = _run_json(capsys, ["predict", "--checkpoint", ckpt, images, "--runtime", "torch"])
        assert len(out["predictions"]) == 20
    assert resolve_runtime(onnx_file) == "onnxruntime" and resolve_runtime(pt2_file) == "torch"
    assert resolve_runtime(folder, "torch") == "torch"


def test_cli_runtime_choices_are_the_librarys():
    import tntvision.cli as cli

    assert cli.RUNTIMES == RUNTIMES


def test_missing_openvino_exits_2_naming_the_extra(exported, image_folder, tmp_path, capsys, monkeypatch):
    path = str(exported("tnt_mini_patch4_28", "onnx"))
    images = str(image_folder / "val")
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if it were not installed: import fails
    want = (
        "tnt predict: error: --runtime openvino needs the openvino package: pip install 'tntvision[openvino]'"
    )
    _one_line_exit_2(capsys, ["predict", "--checkpoint", path, images, "--runtime", "openvino"], want)
    data = ["--data", str(image_folder), "--split", "val", "--out", str(tmp_path / "e")]
    _one_line_exit_2(
        capsys, ["eval", "--checkpoint", path, *data, "--runtime", "openvino"], "tntvision[openvino]"
    )
    _one_line_exit_2(capsys, ["bench", "--checkpoint", path, "--runtime", "openvino"], "tntvision[openvino]")
    with pytest.raises(DependencyError, match=r"tntvision\[openvino\]"):
        load_exported(path, runtime="openvino")
    assert list(tmp_path.iterdir()) == []
    out = _run_json(capsys, ["predict", "--checkpoint", path, images])  # onnxruntime does not need it
    assert len(out["predictions"]) == 20


def test_calibration_images_from_an_image_folder_are_preprocessed_like_eval(saved, tmp_path):
    from tntvision.data import eval_transform, open_image
    from tntvision.tools.export import calibration_batches

    _, model = saved("tnt_mini_patch4_28")
    root = make_image_folder(tmp_path / "d", per_class=4, size=40, splits=("train",))
    batches = calibration_batches(str(root), model.meta, images=10, batch_size=4)
    assert [b.shape for b in batches] == [(4, 1, 28, 28), (4, 1, 28, 28), (2, 1, 28, 28)]
    assert all(b.dtype == np.float32 for b in batches)
    # a seeded sample of the train images, each exactly as `tnt eval` would see it
    every = {p: eval_transform(model.meta)(open_image(p)).numpy() for p in sorted(root.rglob("*.png"))}
    for image in np.concatenate(batches):
        assert any(np.array_equal(image, e) for e in every.values())
    again = calibration_batches(str(root), model.meta, images=10, batch_size=4)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again, strict=True))
    with pytest.raises(ConfigError):
        calibration_batches(str(root), model.meta, images=0)
