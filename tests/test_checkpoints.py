"""Parity with timm's reference TNT and loading of every checkpoint layout (spec sections 6, 7)."""

import pickle

import pytest
import torch

import tntvision
from tntvision.errors import CheckpointError

from .helpers import to_authors_layout

timm = pytest.importorskip("timm")


def _timm_and_ours(name: str, img_size: int = 224):
    ref = timm.create_model(name, img_size=img_size).eval()
    ours = tntvision.create_model(name, img_size=img_size).eval()
    return ref, ours


@pytest.mark.parametrize(
    "name, img_size",
    [
        ("tnt_s_patch16_224", 224),
        ("tnt_b_patch16_224", 224),
        ("tnt_s_legacy_patch16_224", 224),
        ("tnt_s_patch16_224", 384),
    ],
)
def test_logits_match_timm(name, img_size):
    ref, ours = _timm_and_ours(name, img_size)
    ours.load_state_dict(ref.state_dict(), strict=True)  # our layout is timm's: names and shapes
    x = torch.randn(2, 3, img_size, img_size)
    with torch.no_grad():
        expected = ref(x)
        torch.testing.assert_close(ours(x), expected, rtol=0, atol=1e-5)
        ours.pixel_embed.fused = False  # the per-patch conv reference path agrees too
        torch.testing.assert_close(ours(x), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("wrapper", [None, "state_dict", "state_dict_ema"])
def test_authors_layout_loads_with_same_logits(tmp_path, wrapper):
    ref, _ = _timm_and_ours("tnt_s_patch16_224")
    sd = to_authors_layout(ref.state_dict(), num_patches=196, embed_dim=384)
    obj = {wrapper: sd, "epoch": 300} if wrapper else sd
    path = tmp_path / "tnt_s_81.5.pth.tar"
    torch.save(obj, path)
    ours = tntvision.create_model("tnt_s_patch16_224", pretrained=str(path)).eval()
    assert ours.load_report.layout == "authors"
    assert ours.load_report.dropped == ["outer_tokens"]
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-5)


def test_timm_file_loads_through_create_model(tmp_path):
    ref, _ = _timm_and_ours("tnt_s_legacy_patch16_224")
    path = tmp_path / "pytorch_model.bin"
    torch.save({"module." + k: v for k, v in ref.state_dict().items()}, path)  # a DDP-wrapped save
    ours = tntvision.create_model("tnt_s_legacy_patch16_224", pretrained=str(path)).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-5)


def test_wrong_structure_is_refused(tmp_path):
    ref, _ = _timm_and_ours("tnt_s_legacy_patch16_224")
    path = tmp_path / "legacy.pth"
    torch.save(ref.state_dict(), path)
    with pytest.raises(
        CheckpointError, match="legacy-structure.*official structure.*tnt_s_legacy_patch16_224"
    ):
        tntvision.create_model("tnt_s_patch16_224", pretrained=str(path))


def test_wrong_width_is_refused(tmp_path):
    path = tmp_path / "b.pth"
    torch.save(tntvision.create_model("tnt_b_patch16_224", img_size=32).state_dict(), path)
    with pytest.raises(CheckpointError, match="embed_dim=640.*expects embed_dim=384"):
        tntvision.create_model("tnt_s_patch16_224", pretrained=str(path))


def test_other_size_classes_and_channels_adapt(tmp_path):
    src = tntvision.create_model("tnt_s_patch16_224").eval()
    path = tmp_path / "s224.pth"
    torch.save(src.state_dict(), path)
    model = tntvision.create_model(
        "tnt_s_patch16_224", pretrained=str(path), img_size=384, num_classes=10, in_chans=1
    )
    report = model.load_report
    assert report.resampled_pos == (14, 14)
    assert report.head_reset
    assert report.adapted_in_chans == (3, 1)
    assert model.patch_pos.shape == (1, 1 + 24 * 24, 384)
    torch.testing.assert_close(model.patch_pos[:, 0], src.patch_pos[:, 0])  # class-token row kept
    assert model(torch.randn(1, 1, 384, 384)).shape == (1, 10)
    # a grey image through the summed conv gives the RGB model's words for the same grey image
    grey = torch.rand(1, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(
            model.pixel_embed(grey, model.pixel_pos),
            src.pixel_embed(grey.expand(1, 3, 16, 16), src.pixel_pos),
        )


def test_missing_keys_are_reported(tmp_path):
    sd = tntvision.create_model("tnt_s_patch16_224", img_size=32).state_dict()
    del sd["blocks.3.mlp.fc1.weight"]
    sd["extra.weight"] = torch.zeros(1)
    path = tmp_path / "broken.pth"
    torch.save(sd, path)
    with pytest.raises(
        CheckpointError, match=r"missing 1 keys \(blocks.3.mlp.fc1.weight\).*unexpected 1 keys"
    ):
        tntvision.create_model("tnt_s_patch16_224", img_size=32, pretrained=str(path))


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_unreadable_and_unsafe_files_are_refused(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a readable weights file"):
        tntvision.create_model("tnt_mini_patch4_28", pretrained=str(garbage))
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"x": _Evil()}))
    with pytest.raises(CheckpointError, match="not a readable weights file"):
        tntvision.create_model("tnt_mini_patch4_28", pretrained=str(evil))
    with pytest.raises(CheckpointError, match="no such file"):
        tntvision.create_model("tnt_mini_patch4_28", pretrained=str(tmp_path / "missing.pth"))


def test_se_variant_authors_layout_and_gate(tmp_path):
    src = tntvision.create_model("tnt_s_se_patch16_224", img_size=32).eval()
    sd = to_authors_layout(src.state_dict(), num_patches=4, embed_dim=384)
    assert "blocks.0.se_layer.fc.1.weight" in sd  # the authors' SE names
    path = tmp_path / "tnt_s_se.pth"
    torch.save({"state_dict": sd}, path)
    model = tntvision.create_model("tnt_s_se_patch16_224", img_size=32, pretrained=str(path)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), src(x), rtol=0, atol=0)
        # the gate as the paper's code writes it: h + tanh(fc(LN(mean_tokens(h)))) * h
        se, h = model.blocks[0].se, torch.randn(2, 5, 384)
        fc = se.fc
        gate = torch.tanh(fc[3](torch.relu(fc[1](fc[0](h.mean(1, keepdim=True))))))
        torch.testing.assert_close(h + se(h), h + gate * h)
