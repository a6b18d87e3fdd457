"""Published weights by name (``create_model(NAME.TAG, pretrained=True)``), without the internet.

What is real here: huggingface_hub's and torch.hub's own download code, their caches and their settings
(``HF_HOME``, ``HF_HUB_OFFLINE``, ``HF_ENDPOINT``, ``TORCH_HOME``) and ours (``TNTVISION_WEIGHTS_MIRROR``),
talking to an HTTP server on 127.0.0.1 (tests/http_files.py) that serves files, errors, HTML pages,
truncated bodies and dropped connections, or to a Hugging Face cache laid out as huggingface_hub lays it
out. The weights are models the tests make, saved in timm's and the authors' layouts; the logits are
compared with timm's model (or a plain ``load_state_dict``) holding the same weights.

Nothing here reaches the real hub or release addresses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch

import tntvision
from tntvision.errors import CheckpointError, ConfigError, UnknownModelError
from tntvision.models import hub, pretrained
from tntvision.models.pretrained import PretrainedTag, get_pretrained_tag, list_pretrained, split_name
from tntvision.models.registry import get_model_entry, list_models

from .helpers import authors_state_dict, authors_to_timm, random_tensor
from .http_files import FileServer, Reply, hub_reply

MINI = "tnt_mini_patch4_28"
ROOT = Path(__file__).resolve().parents[1]


def mini_tag(tag: str, source: str, location: str, **kw) -> PretrainedTag:
    """A tag for the 28-px mini model (fast to build), as a test registers it."""
    return PretrainedTag(MINI, tag, source=source, location=location, top1=90.0, top1_by="tests",
                         license="apache-2.0", layout="timm", meta=get_model_entry(MINI).meta,
                         num_classes=10, labels="", **kw)  # fmt: skip


def perturbed_state_dict(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """The model's keys and shapes with values no init gives (so a wrong load changes the logits)."""
    gen = torch.Generator().manual_seed(seed)
    return {k: random_tensor(k, tuple(v.shape), gen) for k, v in model.state_dict().items()}


def mini_weights_file(path: Path, seed: int = 0) -> tuple[Path, dict[str, torch.Tensor]]:
    """The mini model's weights, perturbed, in ``path``: safetensors, or ``torch.save``'s zip for a
    ``.pth`` file (as release files are)."""
    sd = perturbed_state_dict(tntvision.create_model(MINI), seed)
    if path.suffix == ".safetensors":
        safetensors.torch.save_file(sd, str(path))
    else:
        torch.save({"state_dict": sd, "epoch": 3}, path)
    return path, sd


def logits_of(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The mini model holding ``sd`` by a plain, strict ``load_state_dict`` (no tntvision loading code)."""
    model = tntvision.create_model(MINI).eval()
    model.load_state_dict(sd, strict=True)
    with torch.no_grad():
        return model(x)


@pytest.fixture
def caches(tmp_path, monkeypatch):
    """Fresh, empty torch.hub and Hugging Face caches; no mirror; online."""
    from huggingface_hub import constants

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(hub.MIRROR_ENV, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return tmp_path


def register(monkeypatch, *tags: PretrainedTag) -> None:
    monkeypatch.setitem(pretrained._TAGS, tags[0].architecture, list(tags))


# ------------------------------------------------------------------------------------ names and tags


def test_names_split_and_resolve_like_timm():
    assert split_name("tnt_s_patch16_224.in1k") == ("tnt_s_patch16_224", "in1k")
    assert split_name("tnt_s_patch16_224") == ("tnt_s_patch16_224", None)
    with pytest.raises(ConfigError, match="tag after the dot"):
        split_name("tnt_s_patch16_224.")
    assert get_pretrained_tag("tnt_s_patch16_224").name == "tnt_s_patch16_224.in1k"  # the default
    assert get_pretrained_tag("tnt_s_patch16_224.authors_in1k").source == "url"
    assert get_pretrained_tag(MINI) is None
    with pytest.raises(UnknownModelError, match=r"tnt_s_patch16_224 has: tnt_s_patch16_224\.in1k, "):
        get_pretrained_tag("tnt_s_patch16_224.in22k")
    with pytest.raises(UnknownModelError, match="did you mean"):
        get_pretrained_tag("tnt_s_patch16_225.in1k")


def test_every_registered_tag_is_complete():
    names = list_pretrained()
    assert names == tntvision.list_models(pretrained=True) == sorted(names)
    assert {"tnt_s_patch16_224.in1k", "tnt_b_patch16_224.in1k", "tnt_s_legacy_patch16_224.in1k",
            "tnt_s_patch16_224.authors_in1k", "ptnt_s_patch16_256.in1k"} <= set(names)  # fmt: skip
    assert list_pretrained("tnt_b*") == ["tnt_b_patch16_224.authors_in1k", "tnt_b_patch16_224.in1k"]
    files = []
    for name in names:
        tag = get_pretrained_tag(name)
        assert tag.architecture in list_models()
        assert 0 < tag.top1 < 100 and tag.top1_by and tag.license and tag.layout
        assert tag.meta.input_size == get_model_entry(tag.architecture).meta.input_size
        if tag.source == "url":
            assert tag.location.startswith("https://") and tag.location.endswith(tag.filename)
            files.append(tag.filename)
        elif tag.source == "hf-hub":
            assert tag.location.count("/") == 1 and tag.filename == "model.safetensors"
        else:
            assert not tag.downloadable and tag.location in tag.notes and "password" in tag.notes
    assert len(files) == len(set(files))  # one cache folder and one mirror for every release file


def test_registering_a_tag_twice_or_for_an_unknown_model_is_refused(monkeypatch):
    register(monkeypatch, mini_tag("a", "url", "https://example.org/x/mini_a.pth"))
    with pytest.raises(ValueError, match="already registered"):
        pretrained.register_pretrained(mini_tag("a", "url", "https://example.org/x/mini_b.pth"))
    with pytest.raises(ValueError, match="already named"):
        pretrained.register_pretrained(mini_tag("b", "url", "https://example.org/y/mini_a.pth"))
    with pytest.raises(UnknownModelError):
        pretrained.register_pretrained(
            PretrainedTag("nope", "x", "url", "https://e/f", 1.0, "t", "mit", "timm", tntvision.ModelMeta())
        )


@pytest.mark.parametrize("value", [False, None, ""])
def test_pretrained_false_or_none_gives_random_weights(value):
    """The first line a timm user writes; it raised a TypeError for a bool."""
    model = tntvision.create_model(MINI, pretrained=value)
    assert model.load_report is None and model.class_names is None


def test_bad_pretrained_values_are_refused():
    with pytest.raises(ConfigError, match="True, False, None or a path"):
        tntvision.create_model(MINI, pretrained=1)
    with pytest.raises(ConfigError, match="no published weights"):
        tntvision.create_model(MINI, pretrained=True)
    with pytest.raises(ConfigError, match="revision applies"):
        tntvision.create_model(MINI, revision="main")


def test_pretrained_cfg_reports_the_tag():
    cfg = tntvision.create_model("tnt_s_patch16_224.authors_in1k", img_size=64).pretrained_cfg
    assert cfg["tag"] == "authors_in1k" and cfg["architecture"] == "tnt_s_patch16_224"
    assert cfg["url"].endswith("/tnt_s_81.5.pth.tar") and cfg["hf_hub_id"] is None
    assert cfg["top1"] == 81.5 and cfg["license"] == "apache-2.0" and cfg["layout"] == "authors"
    assert cfg["mean"] == (0.5, 0.5, 0.5) and cfg["crop_pct"] == 0.9 and cfg["interpolation"] == "bicubic"
    assert cfg["input_size"] == (3, 64, 64)  # the override, not the tag's 224
    default = tntvision.create_model("tnt_s_patch16_224", img_size=64).pretrained_cfg
    assert default["hf_hub_id"] == "timm/tnt_s_patch16_224.in1k" and default["top1"] == 81.506
    assert "tag" not in tntvision.create_model(MINI).pretrained_cfg


def test_manual_weights_say_where_and_how():
    with pytest.raises(CheckpointError) as e:
        tntvision.create_model("ptnt_ti_patch16_192", pretrained=True)
    msg = str(e.value)
    assert "https://pan.baidu.com/s/1xm3DSGcAJbvFQm4jmDAlnQ" in msg and "0r5t" in msg
    assert "pretrained=PATH" in msg and "--checkpoint PATH" in msg and "\n" not in msg


# ------------------------------------------------------------------------------- release files


def test_release_file_through_the_mirror_is_cached_and_loaded_strictly(caches, monkeypatch):
    with FileServer() as server:
        path, sd = mini_weights_file(caches / "mini_release.pth")
        server.routes["/mirror/mini_release.pth"] = Reply(path.read_bytes())
        register(monkeypatch, mini_tag("rel", "url", "https://unreachable.invalid/x/mini_release.pth"))
        monkeypatch.setenv(hub.MIRROR_ENV, server.url("/mirror/"))
        x = torch.randn(2, 1, 28, 28)
        model = tntvision.create_model(f"{MINI}.rel", pretrained=True).eval()
        with torch.no_grad():
            torch.testing.assert_close(model(x), logits_of(sd, x), rtol=0, atol=0)
        cached = caches / "torch" / "hub" / "checkpoints" / "mini_release.pth"
        assert cached.is_file() and model.load_report.source.endswith(f"({cached})")
        assert sorted(p.name for p in cached.parent.iterdir()) == ["mini_release.pth"]  # no temp left
        tntvision.create_model(f"{MINI}.rel", pretrained=True)
        assert server.gets("/mirror/mini_release.pth") == 1  # the second call read the cache


def test_torch_hub_entries_take_pretrained_and_a_tag(caches, monkeypatch):
    """``torch.hub.load(clone, NAME, pretrained=...)``: False raised a TypeError before; True with a tag."""
    assert torch.hub.load(str(ROOT), MINI, source="local", pretrained=False).load_report is None
    with FileServer() as server:
        path, sd = mini_weights_file(caches / "mini_hub.pth")
        server.routes["/mini_hub.pth"] = Reply(path.read_bytes())
        register(monkeypatch, mini_tag("hub", "url", server.url("/mini_hub.pth")))
        model = torch.hub.load(str(ROOT), MINI, source="local", pretrained=True, tag="hub").eval()
    x = torch.randn(1, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model(x), logits_of(sd, x), rtol=0, atol=0)


def test_authors_release_file_gives_timms_logits(caches, monkeypatch):
    """A real tag (TNT-S, the authors' release) with a file in the authors' layout and wrapper."""
    sd = authors_state_dict(n=196, k=1000, seed=3)
    with FileServer() as server:
        path = caches / "tnt_s_81.5.pth.tar"
        torch.save({"state_dict_ema": sd, "epoch": 300}, path)
        server.routes["/m/tnt_s_81.5.pth.tar"] = Reply(path.read_bytes())
        monkeypatch.setenv(hub.MIRROR_ENV, server.url("/m"))
        ours = tntvision.create_model("tnt_s_patch16_224.authors_in1k", pretrained=True).eval()
    assert ours.load_report.layout == "authors" and ours.load_report.wrapper == "state_dict_ema"
    ref = timm.create_model("tnt_s_patch16_224").eval()
    ref.load_state_dict(authors_to_timm(sd), strict=True)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-4)
    assert ours.class_names[:2] == ["tench", "goldfish"] and len(ours.class_names) == 1000
    assert ours.pretrained_cfg["label_names"][-1] == "toilet tissue"


@pytest.mark.parametrize(
    "reply, said",
    [
        (Reply(b"<!DOCTYPE html><html><body>Sign in</body></html>"), "an HTML page"),
        (Reply(b"Not Found", status=404), "answered 404"),
        (Reply(b"", status=503), "answered 503"),
        ("cut", "damaged or truncated"),
        (Reply(drop=True), "failed"),
    ],
    ids=["html", "404", "503", "truncated", "dropped"],
)
def test_a_bad_download_is_refused_and_nothing_is_kept(caches, monkeypatch, reply, said):
    path, _ = mini_weights_file(caches / "mini_bad.pth")
    if reply == "cut":  # Content-Length announces the whole file; the connection closes halfway
        reply = Reply(path.read_bytes(), send=path.stat().st_size // 2)
    with FileServer() as server:
        server.routes["/mini_bad.pth"] = reply
        register(monkeypatch, mini_tag("bad", "url", server.url("/mini_bad.pth")))
        with pytest.raises(CheckpointError, match=said) as e:
            tntvision.create_model(f"{MINI}.bad", pretrained=True)
    assert server.url("/mini_bad.pth") in str(e.value) and "\n" not in str(e.value)
    folder = caches / "torch" / "hub" / "checkpoints"
    assert not folder.exists() or list(folder.iterdir()) == []  # nothing, not even a temp file


def test_a_file_that_does_not_match_its_published_hash_is_refused(caches, monkeypatch):
    with FileServer() as server:
        path, _ = mini_weights_file(caches / "mini-0123abcd.pth")
        server.routes["/mini-0123abcd.pth"] = Reply(path.read_bytes())
        register(monkeypatch, mini_tag("h", "url", server.url("/mini-0123abcd.pth"), hash_prefix="0123abcd"))
        with pytest.raises(CheckpointError, match="SHA-256 does not start with 0123abcd"):
            tntvision.create_model(f"{MINI}.h", pretrained=True)
    assert list((caches / "torch" / "hub" / "checkpoints").iterdir()) == []


def test_a_damaged_cached_file_is_removed_and_said(caches, monkeypatch):
    cached = caches / "torch" / "hub" / "checkpoints" / "mini_cached.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"<html><head><title>502 Bad Gateway</title></head></html>")
    register(monkeypatch, mini_tag("c", "url", "http://127.0.0.1:9/mini_cached.pth"))
    with pytest.raises(CheckpointError, match=r"was an HTML page .* removed it from the cache"):
        tntvision.create_model(f"{MINI}.c", pretrained=True)
    assert not cached.exists()


def test_no_network_and_nothing_cached_is_one_line_naming_the_way_out(caches, monkeypatch):
    register(monkeypatch, mini_tag("n", "url", "http://127.0.0.1:9/mini_none.pth"))  # port 9: nothing there
    with pytest.raises(CheckpointError) as e:
        tntvision.create_model(f"{MINI}.n", pretrained=True)
    msg = str(e.value)
    assert "http://127.0.0.1:9/mini_none.pth" in msg and hub.MIRROR_ENV in msg
    assert "HF_HUB_OFFLINE" in msg and "pretrained=PATH" in msg and "\n" not in msg
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE=1 forbids downloading"):
        tntvision.create_model(f"{MINI}.n", pretrained=True)


def test_revision_is_for_hub_weights_only(caches):
    with pytest.raises(ConfigError, match="a revision applies to hub weights"):
        tntvision.create_model("tnt_s_patch16_224.authors_in1k", pretrained=True, revision="v1")


# ------------------------------------------------------------------------------- the hub's cache


def lay_out_hub_cache(cache: Path, repo: str, files: dict[str, bytes], *, commit: str, ref: str = "main"):
    """A Hugging Face cache as huggingface_hub writes it: blobs by hash, a snapshot of links, a ref."""
    import hashlib

    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / ref).write_text(commit)
    for name, data in files.items():
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = folder / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return folder


def test_timm_hub_weights_from_an_offline_cache_give_timms_logits(caches, monkeypatch):
    """The real default tag of TNT-S, its file in huggingface_hub's cache layout, HF_HUB_OFFLINE."""
    from huggingface_hub import constants

    ref = timm.create_model("tnt_s_patch16_224").eval()
    sd = perturbed_state_dict(ref, seed=5)
    ref.load_state_dict(sd, strict=True)
    data = safetensors.torch.save(sd)
    lay_out_hub_cache(Path(constants.HF_HUB_CACHE), "timm/tnt_s_patch16_224.in1k",
                      {"model.safetensors": data}, commit="c" * 40)  # fmt: skip
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    ours = tntvision.create_model("tnt_s_patch16_224", pretrained=True).eval()  # bare name: default tag
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-4)
    assert (
        ours.class_names[0] == "tench" and ours.pretrained_cfg["hf_hub_id"] == "timm/tnt_s_patch16_224.in1k"
    )
    # fine-tuning: another head and size from the same weights, no labels
    tuned = tntvision.create_model("tnt_s_patch16_224.in1k", pretrained=True, num_classes=10, img_size=96)
    assert tuned.load_report.head_reset and tuned.load_report.resampled_pos == (14, 14)
    assert tuned.class_names is None
    with pytest.raises(CheckpointError, match=r"revision v2\).*HF_HUB_OFFLINE=1 allows the cache only"):
        tntvision.create_model("tnt_s_patch16_224", pretrained=True, revision="v2")


def test_hub_weights_not_cached_and_offline_is_one_line(caches, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError) as e:
        tntvision.create_model("tnt_b_patch16_224.in1k", pretrained=True)
    msg = str(e.value)
    assert "timm/tnt_b_patch16_224.in1k (model.safetensors, revision main)" in msg
    assert "HF_HUB_OFFLINE" in msg and "HF_ENDPOINT" in msg and "pretrained=PATH" in msg and "\n" not in msg


def test_a_damaged_file_in_the_hub_cache_is_removed(caches, monkeypatch):
    from huggingface_hub import constants

    good, _ = mini_weights_file(caches / "w.safetensors")
    folder = lay_out_hub_cache(Path(constants.HF_HUB_CACHE), "tests/mini", {"model.safetensors":
                               good.read_bytes()[:-100]}, commit="d" * 40)  # fmt: skip
    register(monkeypatch, mini_tag("hub", "hf-hub", "tests/mini"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match="was damaged or truncated.*removed it from the cache"):
        tntvision.create_model(f"{MINI}.hub", pretrained=True)
    assert list((folder / "blobs").iterdir()) == []
    assert not (folder / "snapshots" / ("d" * 40) / "model.safetensors").exists()


# ------------------------------------------- the hub through HF_ENDPOINT, in a process of its own

_CHILD = textwrap.dedent(
    """
    import json, sys
    import safetensors.torch, torch
    import tntvision
    from tntvision.models.pretrained import PretrainedTag, register_pretrained
    from tntvision.models.registry import get_model_entry

    MINI = "tnt_mini_patch4_28"
    weights, scenarios = sys.argv[1], json.loads(sys.argv[2])
    meta = get_model_entry(MINI).meta
    for tag in sorted({s[0] for s in scenarios}):
        register_pretrained(PretrainedTag(MINI, tag, "hf-hub", f"tests/{tag}", 90.0, "tests", "apache-2.0",
                                          "timm", meta, num_classes=10, labels=""))
    ref = tntvision.create_model(MINI).eval()
    ref.load_state_dict(safetensors.torch.load_file(weights), strict=True)
    x = torch.randn(2, 1, 28, 28)
    out = []
    for tag, revision in scenarios:
        try:
            model = tntvision.create_model(f"{MINI}.{tag}", pretrained=True, revision=revision).eval()
            with torch.no_grad():
                out.append({"ok": True, "diff": (model(x) - ref(x)).abs().max().item()})
        except tntvision.CheckpointError as e:
            out.append({"ok": False, "msg": str(e)})
    print(json.dumps(out))
    """
)


def run_child(tmp_path: Path, weights: Path, scenarios: list, **env: str) -> list[dict]:
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "torch"), **env}
    env.pop("HF_HUB_CACHE", None)
    done = subprocess.run([sys.executable, "-c", _CHILD, str(weights), json.dumps(scenarios)], env=env,
                          capture_output=True, text=True, timeout=240, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_hub_downloads_through_hf_endpoint_and_then_works_offline(tmp_path):
    """huggingface_hub itself, pointed at the loopback server by HF_ENDPOINT, caching under HF_HOME."""
    weights, _ = mini_weights_file(tmp_path / "mini.safetensors")
    data = weights.read_bytes()
    other, _ = mini_weights_file(tmp_path / "other.safetensors", seed=1)
    with FileServer() as server:
        r = server.routes
        r["/tests/ok/resolve/main/model.safetensors"] = hub_reply(data, commit="1" * 40)
        r["/tests/ok/resolve/v2/model.safetensors"] = hub_reply(other.read_bytes(), commit="2" * 40)
        r["/tests/ok/resolve/v3/model.safetensors"] = Reply(b"", 404, {"X-Error-Code": "RevisionNotFound"})
        r["/tests/gone/resolve/main/model.safetensors"] = Reply(b"", 404, {"X-Error-Code": "RepoNotFound"})
        r["/tests/html/resolve/main/model.safetensors"] = hub_reply(b"<!doctype html><html>Error</html>")
        r["/tests/cut/resolve/main/model.safetensors"] = hub_reply(data, send=len(data) // 2)
        scenarios = [["ok", None], ["ok", "v2"], ["ok", "v3"], ["gone", None], ["html", None], ["cut", None]]
        ok, v2, v3, gone, html, cut = run_child(tmp_path, weights, scenarios, HF_ENDPOINT=server.base)
        assert ok == {"ok": True, "diff": 0.0}
        assert v2["ok"] and v2["diff"] > 0.1  # another revision, other weights
        assert "has no revision 'v3' of tests/ok" in v3["msg"]
        assert f"{server.base} has no repository tests/gone" in gone["msg"]
        assert "an HTML page" in html["msg"] and "removed it from the cache" in html["msg"]
        assert "nothing was kept" in cut["msg"]
        cache = tmp_path / "hf" / "hub"
        assert (cache / "models--tests--ok" / "snapshots" / ("1" * 40) / "model.safetensors").is_file()
        for repo in ("html", "cut"):  # no snapshot file: nothing the next call would load
            assert not list((cache / f"models--tests--{repo}").glob("snapshots/*/model.safetensors"))
        gets = server.gets("/tests/ok/resolve/main/model.safetensors")
        # offline: the cached revision loads without a request; what is not cached is one line
        again, missing = run_child(tmp_path, weights, [["ok", None], ["html", None]],
                                   HF_ENDPOINT=server.base, HF_HUB_OFFLINE="1")  # fmt: skip
        assert again == {"ok": True, "diff": 0.0}
        assert server.gets("/tests/ok/resolve/main/model.safetensors") == gets
        assert "HF_HUB_OFFLINE=1 allows the cache only" in missing["msg"]


# ------------------------------------------------------------------------------------------ the CLI


def run_cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    from tntvision.cli import main

    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_tnt_models_pretrained_lists_every_tag(capsys):
    code, out, _ = run_cli(capsys, ["models", "--pretrained"])
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 1 + len(list_pretrained())
    row = next(line for line in lines if line.startswith("tnt_s_patch16_224.in1k "))
    assert (
        "81.506" in row and "timm" in row and "apache-2.0" in row and "hf-hub: timm/tnt_s_patch16_224" in row
    )
    assert "by hand: the authors share them on BaiduDisk" in next(x for x in lines if x.startswith("ptnt_s"))
    code, out, _ = run_cli(capsys, ["models", "tnt_b*", "--pretrained", "--json"])
    tags = json.loads(out)["pretrained"]
    assert [t["name"] for t in tags] == ["tnt_b_patch16_224.authors_in1k", "tnt_b_patch16_224.in1k"]
    assert tags[1]["hf_hub_id"] == "timm/tnt_b_patch16_224.in1k" and tags[1]["input_size"] == [3, 224, 224]
    assert tags[0]["url"].endswith("/tnt_b_82.9.pth.tar") and tags[0]["top1"] == 82.9


def test_predict_with_hub_weights_by_name_gives_imagenet_names(caches, monkeypatch, capsys, tmp_path):
    from huggingface_hub import constants
    from PIL import Image

    sd = perturbed_state_dict(tntvision.create_model("tnt_s_patch16_224"), seed=7)
    lay_out_hub_cache(Path(constants.HF_HUB_CACHE), "timm/tnt_s_patch16_224.in1k",
                      {"model.safetensors": safetensors.torch.save(sd)}, commit="e" * 40)  # fmt: skip
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    image = tmp_path / "photo.png"
    Image.fromarray((torch.rand(200, 300, 3) * 255).to(torch.uint8).numpy()).save(image)
    argv = [
        "predict",
        "--model",
        "tnt_s_patch16_224.in1k",
        "--pretrained",
        str(image),
        "--topk",
        "3",
        "--json",
    ]
    code, out, err = run_cli(capsys, argv)
    assert code == 0, err
    (pred,) = json.loads(out)["predictions"]
    names = pretrained.imagenet_class_names()
    model = tntvision.create_model("tnt_s_patch16_224.in1k", pretrained=True).eval()
    from tntvision.data import eval_transform

    x = eval_transform(model.meta)(Image.open(image).convert("RGB"))[None]
    with torch.no_grad():
        top = model(x).softmax(-1)[0].topk(3)
    assert [p["label"] for p in pred["top"]] == [names[i] for i in top.indices]
    # nothing cached for TNT-B: one line, exit 2
    code, out, err = run_cli(capsys, ["predict", "--model", "tnt_b_patch16_224", "--pretrained", str(image)])
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "timm/tnt_b_patch16_224.in1k" in err and "HF_HUB_OFFLINE" in err and "pretrained=PATH" in err


@pytest.mark.parametrize(
    "argv, said",
    [
        (["predict", "--model", MINI, "x.png"], "has random weights: add --pretrained"),
        (["predict", "--pretrained", "x.png"], "--pretrained takes the published weights of --model"),
        (["predict", "x.png"], "name a model"),
        (["eval", "--model", "tnt_s_patch16_224.nope", "--pretrained", "--data", "d"], "has: tnt_s_patch16_"),
        (["predict", "--model", MINI, "--pretrained", "x.png"], "has no published weights"),
        (["bench", "--checkpoint", "m.onnx", "--pretrained"], "--pretrained takes the published weights"),
        (
            [
                "export",
                "--model",
                MINI,
                "--pretrained",
                "--checkpoint",
                "w.pth",
                "--format",
                "pt2",
                "--out",
                "m.pt2",
            ],
            "not both",
        ),
    ],
)
def test_bad_model_options_are_one_line(capsys, argv, said):
    code, out, err = run_cli(capsys, argv)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and said in err, err


def test_eval_visualize_bench_and_export_take_a_model_by_name(caches, monkeypatch, capsys, tmp_path):
    from .data_helpers import make_image_folder

    with FileServer() as server:
        path, sd = mini_weights_file(caches / "mini_cli.pth")
        server.routes["/mini_cli.pth"] = Reply(path.read_bytes())
        register(monkeypatch, mini_tag("cli", "url", server.url("/mini_cli.pth")))
        name = f"{MINI}.cli"
        data = make_image_folder(tmp_path / "data", classes=tuple("0123456789"), per_class=2, size=28,
                                 splits=("val",), mode="L")  # fmt: skip
        monkeypatch.chdir(tmp_path)
        code, out, err = run_cli(capsys, ["eval", "--model", name, "--pretrained", "--data", str(data),
                                          "--split", "val", "--json"])  # fmt: skip
        assert code == 0, err
        assert json.loads(out)["n"] == 20 and (tmp_path / name / "confusion_val.png").is_file()
        image = str(next(data.rglob("*.png")))
        code, out, err = run_cli(
            capsys, ["visualize", "--model", name, "--pretrained", image, "--out", "fig"]
        )
        assert code == 0 and "random weights" not in err, err
        argv = [
            "bench",
            "--model",
            name,
            "--pretrained",
            "--batch-size",
            "2",
            "--rounds",
            "1",
            "--warmup",
            "0",
        ]
        code, out, err = run_cli(capsys, [*argv, "--no-memory", "--json"])
        assert code == 0 and json.loads(out)["model"] == name, err
        # a file fetched by hand, into the model its tag names: the same weights
        code, out, err = run_cli(capsys, ["export", "--model", name, "--checkpoint", str(path), "--format",
                                          "pt2", "--out", "mini.pt2", "--json"])  # fmt: skip
        assert code == 0, err
        assert json.loads(out)["max_abs_diff"] < 1e-4
        assert server.gets("/mini_cli.pth") == 1  # eval downloaded it; the rest read the cache
    exported = torch.export.load(tmp_path / "mini.pt2").module()
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(exported(x), logits_of(sd, x), rtol=1e-4, atol=1e-4)


def test_train_fine_tunes_from_published_weights_by_name(caches, monkeypatch, capsys, tmp_path):
    from .data_helpers import make_image_folder

    with FileServer() as server:
        path, sd = mini_weights_file(caches / "mini_ft.pth")
        server.routes["/mini_ft.pth"] = Reply(path.read_bytes())
        register(monkeypatch, mini_tag("ft", "url", server.url("/mini_ft.pth")))
        data = make_image_folder(tmp_path / "data", per_class=4, size=28, mode="L")  # 3 classes, not 10
        argv = ["train", "--pretrained", f"{MINI}.ft", "--data", str(data), "--out", str(tmp_path / "run")]
        code, out, err = run_cli(capsys, [*argv, "--epochs", "1", "--batch-size", "4", "--workers", "0",
                                          "--set", "ema_decay=0", "--json"])  # fmt: skip
    assert code == 0, err[-2000:]
    assert f"fine-tuning from {MINI}.ft (3 classes" in err
    assert json.loads(out)["model"] == MINI
    tuned = tntvision.load_model(tmp_path / "run")
    assert tuned.num_classes == 3 and tuned.class_names == ["cat", "dog", "fox"]
    # the body started from the published weights: the word embedding moved little from them
    start = sd["pixel_embed.proj.weight"]
    assert (tuned.state_dict()["pixel_embed.proj.weight"] - start).abs().max() < 0.5 * start.abs().max()
    with pytest.raises(ConfigError, match="holds weights of tnt_mini_patch4_28, not of --model"):
        from tntvision.train import resolve_train_config

        resolve_train_config(overrides={"model": "vit_mini_patch4_28", "pretrained": f"{MINI}.ft",
                                        "data": "d", "out": str(tmp_path / "other")})  # fmt: skip


def test_imagenet_val_folders_of_wordnet_ids_are_taken_in_sorted_order():
    from tntvision.tools.evaluate import _check_classes

    notes: list[str] = []
    model = tntvision.create_model("tnt_s_patch16_224.in1k", img_size=32)
    model.class_names = list(pretrained.imagenet_class_names())
    wnids = [f"n{i:08d}" for i in range(1000)]
    _check_classes(model, wnids, notes.append)
    assert "WordNet ids" in notes[0]
    from tntvision.errors import DataError

    with pytest.raises(DataError, match="differ"):  # other names are still refused
        _check_classes(model, [f"c{i:04d}" for i in range(1000)], notes.append)
    model.pretrained_tag = None
    with pytest.raises(DataError, match="differ"):  # without ImageNet weights, ids are not names
        _check_classes(model, wnids, notes.append)
