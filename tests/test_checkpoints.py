"""Parity with timm's reference TNT and loading of every checkpoint layout (docs/architecture.md).

timm is a development dependency: without it this file fails to import, it is not skipped.
"""

import pickle

import pytest
import timm
import torch
import torch.nn.functional as F

import tntvision
from tntvision.errors import CheckpointError

from .helpers import (
    AUTHORS_BLOCK,
    AUTHORS_SE,
    AUTHORS_TOP,
    authors_state_dict,
    authors_to_timm,
    mmpretrain_state_dict,
    random_tensor,
)


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


@pytest.mark.parametrize("name", ["tnt_s_patch16_224", "tnt_s_legacy_patch16_224", "tnt_b_patch16_224"])
def test_logits_match_timm_with_perturbed_norms_and_biases(name):
    """timm's init leaves LayerNorms at 1 / 0 and biases at 0: a swapped norm or a dropped bias would pass
    on those weights. Here every parameter is random, so each must be used where timm uses it."""
    ref = timm.create_model(name, img_size=64).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for key, p in ref.named_parameters():
            p.copy_(random_tensor(key, tuple(p.shape), gen))
    ours = tntvision.create_model(name, img_size=64).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = ref(x)
        assert expected.std() > 0.1  # the perturbed norms and biases reach the logits
        torch.testing.assert_close(ours(x), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("wrapper", [None, "state_dict", "state_dict_ema"])
def test_authors_layout_loads_with_same_logits(tmp_path, wrapper):
    """The authors' key names and shapes (a literal list from their tnt.py), random values: same logits as
    timm's model holding the same weights under its own names."""
    sd = authors_state_dict(n=196, k=1000)
    obj = {wrapper: sd, "epoch": 300} if wrapper else sd
    path = tmp_path / "tnt_s_81.5.pth.tar"
    torch.save(obj, path)
    ours = tntvision.create_model("tnt_s_patch16_224", pretrained=str(path)).eval()
    assert ours.load_report.layout == "authors"
    assert ours.load_report.dropped == ["outer_tokens"]
    ref = timm.create_model("tnt_s_patch16_224").eval()
    ref.load_state_dict(authors_to_timm(sd), strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-4)


def _mmpretrain_forward(sd: dict[str, torch.Tensor], x: torch.Tensor, *, depth: int = 12) -> torch.Tensor:
    """mmpretrain's TNT-S classifier, written from its tnt.py with torch's functional ops (4x4 words)."""
    g = {k.removeprefix("backbone."): v for k, v in sd.items()}
    c, d = g["pixel_pos"].shape[1], g["cls_token"].shape[-1]

    def ln(t, name):
        return F.layer_norm(t, t.shape[-1:], g[name + ".weight"], g[name + ".bias"])

    def lin(t, name):
        return F.linear(t, g[name + ".weight"], g.get(name + ".bias"))

    def block(t, p, heads):  # mmcv TransformerBlock: pre-norm MultiheadAttention and FFN, residuals
        h = ln(t, p + "norm_attn").transpose(0, 1)  # (L, B, C): torch's MultiheadAttention layout
        a = F.multi_head_attention_forward(
            h, h, h, t.shape[-1], heads, g[p + "attn.attn.in_proj_weight"], None, None, None, False, 0.0,
            g[p + "attn.attn.out_proj.weight"], g[p + "attn.attn.out_proj.bias"], training=False,
            need_weights=False,
        )[0]  # fmt: skip
        t = t + a.transpose(0, 1)
        return t + lin(F.gelu(lin(ln(t, p + "norm_ffn"), p + "ffn.layers.0.0")), p + "ffn.layers.1")

    B = x.shape[0]
    y = F.conv2d(x, g["pixel_embed.proj.weight"], g["pixel_embed.proj.bias"], stride=4, padding=3)
    y = F.unfold(y, kernel_size=4, stride=4)  # (B, c*16, N)
    N = y.shape[-1]
    words = (y.transpose(1, 2).reshape(B * N, c, 4, 4) + g["pixel_pos"]).reshape(B * N, c, 16).transpose(1, 2)
    patches = ln(lin(ln(words.reshape(B, N, -1), "norm1_proj"), "projection"), "norm2_proj")
    patches = torch.cat([g["cls_token"].expand(B, -1, -1), patches], dim=1) + g["patch_pos"]
    for i in range(depth):
        p = f"layers.{i}."
        words = block(words, p + "inner_block.", 4)
        add = lin(ln(words, p + "norm_proj").reshape(B, N, -1), p + "projection")
        patches = torch.cat([patches[:, :1], patches[:, 1:] + add], dim=1)
        patches = block(patches, p + "outer_block.", 6 if d == 384 else 10)
    return lin(ln(patches, "norm")[:, 0], "head.fc")


def test_mmpretrain_layout_loads_with_mmpretrain_logits(tmp_path):
    """mmpretrain's key names and shapes (literal list), random values: our legacy model gives the logits
    of mmpretrain's forward on the same weights, and the variant is found from the file alone."""
    sd = mmpretrain_state_dict(n=4, k=7)
    path = tmp_path / "tnt-small-p16_3rdparty_in1k.pth"
    torch.save({"meta": {"epoch": 300, "dataset_meta": {"classes": ["a"]}}, "state_dict": sd}, path)
    ours = tntvision.create_model(
        "tnt_s_legacy_patch16_224", pretrained=str(path), img_size=32, num_classes=7
    ).eval()
    assert ours.load_report.layout == "mmpretrain" and ours.load_report.wrapper == "state_dict"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = _mmpretrain_forward(sd, x)
        torch.testing.assert_close(ours(x), expected, rtol=1e-4, atol=1e-4)
    found = tntvision.load_model(path)
    assert found.model_name == "tnt_s_legacy_patch16_224" and found.num_classes == 7
    with pytest.raises(CheckpointError, match="legacy-structure"):
        tntvision.create_model("tnt_s_patch16_224", pretrained=str(path), img_size=32)


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
    with pytest.raises(CheckpointError, match="not a weights file"):
        tntvision.create_model("tnt_mini_patch4_28", pretrained=str(garbage))
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"x": _Evil()}))
    with pytest.raises(CheckpointError, match="not a weights file that loads without running pickled code"):
        tntvision.create_model("tnt_mini_patch4_28", pretrained=str(evil))
    with pytest.raises(CheckpointError, match="no such file"):
        tntvision.create_model("tnt_mini_patch4_28", pretrained=str(tmp_path / "missing.pth"))


def test_se_variant_authors_layout_and_gate(tmp_path):
    sd = authors_state_dict(n=4, k=1000, se=True)  # the authors' SE names: se_layer.fc.{0,1,3}
    path = tmp_path / "tnt_s_se.pth"
    torch.save({"state_dict": sd}, path)
    model = tntvision.create_model("tnt_s_se_patch16_224", img_size=32, pretrained=str(path)).eval()
    ours = model.state_dict()
    for i in (0, 11):  # each of the authors' tensors sits where their table (helpers.py) says
        for theirs, name, _ in AUTHORS_BLOCK + AUTHORS_SE:
            assert torch.equal(ours[f"blocks.{i}.{name}"], sd[f"blocks.{i}.{theirs}"]), theirs
    for theirs, name, _ in AUTHORS_TOP:
        if name not in (None, "pixel_pos"):
            assert torch.equal(ours[name], sd[theirs]), theirs
    with torch.no_grad():
        # the gate as the paper's code writes it: h + tanh(fc(LN(mean_tokens(h)))) * h
        se, h = model.blocks[0].se, torch.randn(2, 5, 384)
        fc = se.fc
        gate = torch.tanh(fc[3](torch.relu(fc[1](fc[0](h.mean(1, keepdim=True))))))
        torch.testing.assert_close(h + se(h), h + gate * h)
