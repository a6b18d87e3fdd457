"""`tnt models`, `tnt info`, `tnt convert` and the CLI's error contract."""

import json
import subprocess
import sys

import torch

import tntvision
from tntvision.cli import main

from .helpers import authors_state_dict


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tntvision.cli", *args], capture_output=True, text=True)


def test_models_json(capsys):
    assert main(["models", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["models"] == tntvision.list_models()


def test_info_json(capsys):
    assert main(["info", "tnt_s_patch16_224", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["params"] == 23_768_584
    assert abs(info["macs"] / 5.217e9 - 1) < 0.005
    assert info["config"]["embed_dim"] == 384


def test_unknown_model_exits_2_with_suggestion():
    proc = run("info", "tnt_s_patch16")
    assert proc.returncode == 2
    assert "did you mean" in proc.stderr and "tnt_s_patch16_224" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_convert_authors_checkpoint(tmp_path, capsys):
    path = tmp_path / "authors.pth.tar"
    torch.save({"state_dict_ema": authors_state_dict(n=196, k=5)}, path)
    src = tntvision.create_model("tnt_s_patch16_224", num_classes=5, pretrained=str(path)).eval()
    assert main(["convert", str(path), "--out", str(tmp_path / "conv"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model"] == "tnt_s_patch16_224" and result["num_classes"] == 5
    model = tntvision.load_model(tmp_path / "conv").eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), src(x), rtol=0, atol=1e-6)


def test_convert_unreadable_file_exits_2(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_text("hello")
    proc = run("convert", str(bad), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
