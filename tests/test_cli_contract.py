"""The command line's contract, through real processes and every entry point that reads a file.

- Misuse of any sub-command exits 2 with one line on stderr, no traceback and nothing on stdout.
- A file that would run code when unpickled (a zip-format ``torch.save`` payload) is refused wherever a
  file is read, and its code does not run.
- ``--resume`` on a truncated or foreign ``last.pt`` exits 2 with one line and leaves the run folder as
  it was.
- A user error keeps its cause (the exception chain, ``--verbose``); an OSError exits 2 only when it is
  about a path the user named or a full disk, anything else is a bug.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tntvision
from tntvision.cli import build_parser, main, subcommand_parsers

from .data_helpers import make_image_folder

REPO = Path(__file__).resolve().parents[1]
MINI = "tnt_mini_patch4_28"


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.mark.slow
def test_misuse_of_every_subcommand_exits_2_with_one_line(tmp_path):
    data = make_image_folder(tmp_path / "d", per_class=2, size=28)
    img = next((data / "val").rglob("*.png"))
    missing = str(tmp_path / "missing.pth")
    blocker = tmp_path / "a_file"
    blocker.write_text("in the way")
    cases = {
        "no command": [],
        "models: unknown flag": ["models", "--nope"],
        "info: unknown model": ["info", "tnt_nope"],
        "convert: missing file": ["convert", missing, "--out", str(tmp_path / "c")],
        "predict: missing checkpoint": ["predict", "--checkpoint", missing, str(img)],
        "predict: no image": ["predict", "--checkpoint", missing],
        "visualize: unknown model": [
            "visualize",
            "--model",
            "tnt_nope",
            str(img),
            "--out",
            str(tmp_path / "v"),
        ],
        "eval: missing checkpoint": ["eval", "--checkpoint", missing, "--data", str(data)],
        "eval: bad split": ["eval", "--checkpoint", missing, "--data", str(data), "--split", "dev"],
        "train: no --out": ["train", "--model", MINI, "--data", str(data)],
        "train: bad --epochs": ["train", "--model", MINI, "--data", str(data), "--out", "o", "--epochs", "x"],
        "train: --out under a file": [
            *("train", "--model", MINI, "--data", str(data), "--out", str(blocker / "run")),
            *("--batch-size", "3", "--set", "workers=0", "--set", "amp=none"),
        ],
        "train: nothing to resume": ["train", "--out", str(tmp_path / "none"), "--resume"],
        "bench: unknown model": ["bench", "--model", "tnt_nope", "--no-memory"],
    }
    procs = {  # all at once: most of each is importing torch
        name: subprocess.Popen(
            [sys.executable, "-m", "tntvision.cli", *argv],
            env=_env(),
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, argv in cases.items()
    }
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, (name, proc.returncode, err[-1500:])
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, (name, err)
        assert out == "", (name, out)
    assert blocker.read_text() == "in the way"


# --------------------------------------------------------------------------------------- unsafe files


class _Payload:
    """Unpickling this runs code that writes ``marker`` (what an attacker's checkpoint would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('the payload ran')",))


def _unsafe_file(path: Path, marker: Path) -> Path:
    """A zip-format torch.save file: real-looking weights next to a payload."""
    torch.save({"state_dict": tntvision.create_model(MINI).state_dict(), "extra": _Payload(marker)}, path)
    return path


def test_the_payload_is_live(tmp_path):
    """The check below means something: loading the file without weights_only runs the payload."""
    marker = tmp_path / "marker"
    torch.load(_unsafe_file(tmp_path / "evil.pth", marker), weights_only=False)
    assert marker.read_text() == "the payload ran"


def test_unsafe_file_refused_by_every_entry_point(tmp_path, capsys):
    marker = tmp_path / "marker"
    evil = _unsafe_file(tmp_path / "evil.pth", marker)
    data = make_image_folder(tmp_path / "d", per_class=2, size=28)
    img = str(next((data / "val").rglob("*.png")))
    with pytest.raises(tntvision.CheckpointError, match="refused as unsafe") as refused:
        tntvision.create_model(MINI, pretrained=str(evil))
    assert refused.value.__cause__ is not None  # torch's own error stays the cause
    with pytest.raises(tntvision.CheckpointError, match="refused as unsafe"):
        tntvision.load_model(evil)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    _unsafe_file(run / "checkpoints" / "last.pt", marker)
    train = ["train", "--model", MINI, "--data", str(data), "--batch-size", "3", "--set", "workers=0"]
    commands = {
        "convert": ["convert", str(evil), "--out", str(tmp_path / "conv")],
        "eval": ["eval", "--checkpoint", str(evil), "--data", str(data)],
        "predict": ["predict", "--checkpoint", str(evil), img],
        "visualize": ["visualize", "--checkpoint", str(evil), img, "--out", str(tmp_path / "vis")],
        "train --pretrained": [*train, "--out", str(tmp_path / "ft"), "--pretrained", str(evil)],
        "train --resume": ["train", "--out", str(run), "--resume"],
    }
    for name, argv in commands.items():
        assert main(argv) == 2, name
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "refused as unsafe" in err, (name, err)
    assert not marker.exists()
    assert not (tmp_path / "conv").exists() and not (tmp_path / "ft").exists()


@pytest.mark.parametrize("damage", ["truncated", "foreign", "empty", "older format"])
def test_resume_on_a_damaged_checkpoint_changes_nothing(tmp_path, capsys, damage):
    data = make_image_folder(tmp_path / "d", per_class=4, size=28)
    run = tmp_path / "run"
    argv = ["train", "--model", MINI, "--data", str(data), "--out", str(run), "--epochs", "1"]
    assert main([*argv, "--batch-size", "3", "--set", "workers=0", "--set", "amp=none"]) == 0
    last = run / "checkpoints" / "last.pt"
    if damage == "truncated":
        last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    elif damage == "foreign":
        torch.save(tntvision.create_model(MINI).state_dict(), last)  # weights, not a training state
    elif damage == "empty":
        last.write_bytes(b"")
    else:
        state = torch.load(last, weights_only=True)
        torch.save({**state, "format": "tntvision-train/1"}, last)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "--epochs", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "last.pt" in err, err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


# ------------------------------------------------------------------------- errors keep their cause


def test_a_permission_error_says_so_and_stays_the_cause(tmp_path, monkeypatch, capsys):
    """Reading weights the user may not read: the message says "permission denied" (not "damaged"),
    the PermissionError is the cause, the CLI exits 2 naming it, and --verbose prints the chain."""
    folder = tmp_path / "m"
    tntvision.save_model(tntvision.create_model(MINI), folder)
    weights = folder / "model.safetensors"
    import safetensors.torch

    def denied(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(safetensors.torch, "load_file", denied)
    with pytest.raises(tntvision.CheckpointError, match="permission denied") as refused:
        tntvision.load_model(folder)
    assert isinstance(refused.value.__cause__, PermissionError)
    assert str(weights) in str(refused.value)
    argv = ["convert", str(folder), "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "permission denied" in err and "cause: PermissionError" in err
    for verbose in (["--verbose", *argv], [*argv, "--verbose"]):  # before or after the sub-command
        assert main(verbose) == 2
        err = capsys.readouterr().err
        assert "Traceback" in err and "PermissionError: [Errno 13] Permission denied" in err, verbose


# The fewest arguments each sub-command parses with.
MINIMAL_ARGV = {
    "models": [],
    "info": [MINI],
    "convert": ["w.pth", "--out", "o"],
    "predict": ["--checkpoint", "c", "x.png"],
    "visualize": ["--model", MINI, "x.png", "--out", "o"],
    "eval": ["--checkpoint", "c", "--data", "d"],
    "train": ["--out", "o"],
    "bench": ["--model", MINI],
    "serve": ["--checkpoint", "c"],
    "export": ["--checkpoint", "c", "--format", "onnx", "--out", "o.onnx"],
    "kernels": ["info"],
}


def test_every_subcommand_has_its_minimal_argv():
    assert set(MINIMAL_ARGV) == set(subcommand_parsers(build_parser()))


@pytest.mark.parametrize("command", sorted(MINIMAL_ARGV))
def test_verbose_goes_before_or_after_every_subcommand(command):
    """`tnt COMMAND ... --verbose` sets the flag `tnt --verbose COMMAND ...` sets, and the sub-command's
    parser does not reset the flag given before it."""
    argv = [command, *MINIMAL_ARGV[command]]
    parser = build_parser()
    assert parser.parse_args(argv).verbose is False
    assert parser.parse_args([*argv, "--verbose"]).verbose is True
    assert parser.parse_args(["--verbose", *argv]).verbose is True


@pytest.mark.parametrize(
    "error, code",
    [
        (OSError(errno.EACCES, "Permission denied", "/proc/internal/cache"), None),  # not the user's path
        (OSError(errno.EACCES, "Permission denied", "{out}/figures/a.png"), 2),  # inside --out
        (OSError(errno.ENOSPC, "No space left on device"), 2),  # a full disk: the user's to fix
        (RuntimeError("a bug"), None),
    ],
)
def test_only_the_users_own_paths_and_disks_exit_2(tmp_path, monkeypatch, error, code):
    """An OSError about a path the user named (or one inside it) or a full disk exits 2; one about a path
    the project chose, like any other exception, propagates (exit 1 with a traceback from python -m)."""
    import tntvision.cli as cli

    out = tmp_path / "vis"
    if isinstance(error, OSError) and error.filename:
        error.filename = error.filename.format(out=out)

    def fail(_args):
        raise error

    monkeypatch.setattr(cli, "cmd_visualize", fail)
    argv = ["visualize", "--model", MINI, "img.png", "--out", str(out)]
    if code is None:
        with pytest.raises(type(error)):
            main(argv)
    else:
        assert main(argv) == code
