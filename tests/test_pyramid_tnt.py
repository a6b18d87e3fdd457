"""PyramidTNT: the authors' architecture (counts, key layout, logits), any input size, backbone contract."""

from __future__ import annotations

import pytest
import torch

from tntvision.errors import CheckpointError, ConfigError, InputError
from tntvision.models import create_model, list_models, load_model, save_model
from tntvision.models.pyramid_tnt import PyramidTNT, resample_relative_pos, stage_grids
from tntvision.models.saving import model_from_weights
from tntvision.tools.info import count_macs

from .conftest import fewer_blocks
from .pyramid_reference import reference_logits

PYRAMIDS = list_models("ptnt_*")

# (parameters of the authors' module, GMACs in the paper) per variant
PAPER = {
    "ptnt_ti_patch16_192": (10_578_529, 0.6),
    "ptnt_s_patch16_256": (31_953_200, 3.3),
    "ptnt_m_patch16_256": (84_943_572, 8.2),
    "ptnt_b_patch16_256": (156_990_072, 16.0),
}


def perturbed(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Move every parameter and BatchNorm statistic away from its init, so a wrong wiring shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            noise = torch.randn(t.shape, generator=g) * scale
            t.copy_(t.abs() + 0.5 + noise if name.endswith("running_var") else t + noise)
    return model


def test_registered_variants():
    assert sorted(PAPER) == PYRAMIDS


@pytest.mark.parametrize("name", PYRAMIDS)
def test_parameters_and_macs_match_the_paper(name):
    model = create_model(name)
    params, gmacs = PAPER[name]
    assert sum(p.numel() for p in model.parameters()) == params
    assert count_macs(model) / 1e9 == pytest.approx(gmacs, abs=0.05)


@pytest.mark.parametrize("name", PYRAMIDS)
def test_forward_backward_every_variant(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, **fewer_blocks(name)).train()  # every stage, fewer blocks
    y = model(torch.randn(2, 3, 64, 96))
    assert y.shape == (2, 7) and torch.isfinite(y).all()
    y.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


# The authors' state-dict keys for PyramidTNT-Ti, written out from their module definitions
# (tnt_pytorch/pyramid_tnt.py: Stem, Stage, Block, Attention, Mlp, Word/SentenceAggregation).
_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
_STEM = (
    [f"patch_embed.common_conv.0.{p}" for p in ("weight", "bias")]
    + [f"patch_embed.common_conv.1.{p}" for p in _BN]
    + [f"patch_embed.inner_convs.0.{p}" for p in ("weight", "bias")]
    + [f"patch_embed.inner_convs.1.{p}" for p in _BN]
    + [f"patch_embed.outer_convs.{i}.{p}" for i in (0, 3, 6) for p in ("weight", "bias")]
    + [f"patch_embed.outer_convs.{i}.{p}" for i in (1, 4, 7) for p in _BN]
)
_INNER = [
    "inner_norm1.weight", "inner_norm1.bias", "inner_attn.q.weight", "inner_attn.kv.weight",
    "inner_attn.proj.weight", "inner_attn.proj.bias", "inner_norm2.weight", "inner_norm2.bias",
    "inner_mlp.fc1.weight", "inner_mlp.fc1.bias", "inner_mlp.fc2.weight", "inner_mlp.fc2.bias",
    "proj_norm1.weight", "proj_norm1.bias", "proj.weight", "proj_norm2.weight", "proj_norm2.bias",
]  # fmt: skip
_OUTER = [
    "outer_norm1.weight", "outer_norm1.bias", "outer_attn.q.weight", "outer_attn.kv.weight",
    "outer_attn.proj.weight", "outer_attn.proj.bias", "outer_norm2.weight", "outer_norm2.bias",
    "outer_mlp.fc1.weight", "outer_mlp.fc1.bias", "outer_mlp.fc2.weight", "outer_mlp.fc2.bias",
]  # fmt: skip
_SR = ["outer_attn.linear.weight", "outer_attn.linear.bias", "outer_attn.norm.weight", "outer_attn.norm.bias"]
AUTHORS_TI_KEYS = set(
    _STEM
    + ["outer_pos", "inner_pos", "norm.weight", "norm.bias", "head.weight", "head.bias"]
    + [f"{m}_merges.{i}.{p}" for m in ("word", "sentence") for i in range(3) for p in
       ("norm.weight", "norm.bias", "conv.0.weight", "conv.0.bias")]
    + [f"stages.{i}.relative_pos" for i in range(4)]
    + [
        f"stages.{i}.blocks.{j}.{k}"
        for i, depth in enumerate((2, 6, 3, 2))
        for j in range(depth)
        for k in (_INNER if j == 0 else []) + _OUTER + (_SR if i < 2 else [])
    ]
)  # fmt: skip


def test_state_dict_keys_are_the_authors():
    assert set(create_model("ptnt_ti_patch16_192").state_dict()) == AUTHORS_TI_KEYS


def _authors_checkpoint(tmp_path, name, seed=1):
    """Weights in the authors' layout (wrapped and prefixed as their training script saves them)."""
    model = perturbed(create_model(name), seed=seed)
    sd = {f"module.{k}": v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / "checkpoint.pth.tar"
    torch.save({"epoch": 299, "state_dict_ema": sd, "state_dict": {}}, path)
    return path, {k[len("module.") :]: v for k, v in sd.items()}


@pytest.mark.parametrize("name", ["ptnt_ti_patch16_192", "ptnt_s_patch16_256"])
def test_authors_checkpoint_gives_the_authors_logits(tmp_path, name):
    path, sd = _authors_checkpoint(tmp_path, name)
    model = create_model(name, pretrained=str(path)).eval()
    size = model.cfg.img_size
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(3))
    cfg = model.cfg
    want = reference_logits(sd, x, heads=cfg.outer_heads, inner_heads=cfg.inner_heads)
    with torch.no_grad():
        got = model(x)
    assert (got.double() - want).abs().max().item() < 1e-4 * want.abs().max().item()
    assert model.load_report.wrapper == "state_dict_ema"
    # the variant is recognised from the weights alone (`tnt convert`)
    assert model_from_weights(path).model_name == name


def test_odd_grid_padding_matches_the_authors(tmp_path):
    """A 13x11-sentence grid exercises the word merge's padding; tables are made for that grid."""
    model = perturbed(create_model("ptnt_ti_patch16_192", img_size=104)).eval()
    x = torch.randn(1, 3, 104, 88)
    grids = stage_grids(104, 88)
    assert grids[0] == (13, 11)
    rel = [stage.relative_table(grids[i]) for i, stage in enumerate(model.stages)]
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    # the reference uses each stage's table as given: hand it the tables for this grid
    for i, table in enumerate(rel):
        sd[f"stages.{i}.relative_pos"] = table.detach()
    from tntvision.models.layers import resample_pos_embed

    sd["outer_pos"] = resample_pos_embed(model.outer_pos, grids[0], old_grid=model.grid_size, num_prefix=0)
    want = reference_logits(sd, x, heads=model.cfg.outer_heads, inner_heads=model.cfg.inner_heads)
    with torch.no_grad():
        got = model(x)
    assert (got.double() - want).abs().max().item() < 1e-4 * want.abs().max().item()


def test_other_input_size_resamples_tables_at_load_and_on_the_fly(tmp_path):
    path, sd = _authors_checkpoint(tmp_path, "ptnt_ti_patch16_192")
    at_192 = create_model("ptnt_ti_patch16_192", pretrained=str(path)).eval()
    at_256 = create_model("ptnt_ti_patch16_192", pretrained=str(path), img_size=256).eval()
    assert at_256.load_report.resampled_pos == (24, 24)
    assert at_256.stages[0].relative_pos.shape == (1, 2, 32 * 32, 8 * 8)
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():  # resampled when loading == resampled on the fly by the 192-px model
        got = at_256(x)
        assert torch.allclose(at_192(x), got, atol=1e-5)
    # independently: the authors' logits with their 192-px tables resized by separable 1-D bicubic
    # matrices (antialiased for the absolute table, as timm resizes it; plain for the relative ones)
    sd = dict(sd)
    sd["outer_pos"] = _resize_grid(sd["outer_pos"][0], (24, 24), (32, 32), antialias=True)[None]
    grids_256 = stage_grids(256, 256)
    for i, sr in enumerate((4, 2, 1, 1)):
        key = f"stages.{i}.relative_pos"
        old_q, new_q = stage_grids(192, 192)[i], grids_256[i]
        old_k, new_k = ((h // sr, w // sr) for h, w in (old_q, new_q))
        t = sd[key][0].transpose(0, 1)  # (Nq, heads, Nk)
        t = _resize_grid(t.flatten(1), old_q, new_q).reshape(-1, t.shape[1], t.shape[2])  # (Nq', heads, Nk)
        heads = t.shape[1]
        t = _resize_grid(t.permute(2, 0, 1).flatten(1), old_k, new_k)  # (Nk', Nq' * heads)
        t = t.reshape(-1, new_q[0] * new_q[1], heads)  # (Nk', Nq', heads)
        sd[key] = t.permute(2, 1, 0)[None]  # (1, heads, Nq', Nk')
    want = reference_logits(sd, x, heads=at_256.cfg.outer_heads, inner_heads=at_256.cfg.inner_heads)
    assert (got.double() - want).abs().max().item() < 1e-4 * want.abs().max().item()


def _bicubic_matrix(n_old: int, n_new: int, *, antialias: bool) -> torch.Tensor:
    """(n_new, n_old) weights of 1-D bicubic resizing, read off by resizing the identity."""
    # one-hot signals as channels, constant along a width of 3 that is kept (a width of 1 takes another
    # code path in the antialiased kernel)
    eye = torch.eye(n_old, dtype=torch.float64).reshape(1, n_old, n_old, 1).expand(1, n_old, n_old, 3)
    out = torch.nn.functional.interpolate(
        eye.contiguous(), size=(n_new, 3), mode="bicubic", align_corners=False, antialias=antialias
    )
    return out[0, :, :, 1].t()  # (n_new, n_old)


def _resize_grid(
    t: torch.Tensor, old: tuple[int, int], new: tuple[int, int], *, antialias=False
) -> torch.Tensor:
    """(old_h * old_w, C) rows on a grid -> (new_h * new_w, C), one 1-D matrix per axis."""
    rows = _bicubic_matrix(old[0], new[0], antialias=antialias)
    cols = _bicubic_matrix(old[1], new[1], antialias=antialias)
    grid = t.double().reshape(old[0], old[1], -1)  # (h, w, C)
    out = torch.einsum("Hh,Ww,hwc->HWc", rows, cols, grid)
    return out.reshape(new[0] * new[1], -1)


def test_relative_table_resampling_is_separable_bicubic():
    g = torch.Generator().manual_seed(0)
    table = torch.randn(1, 2, 4 * 4, 2 * 2, generator=g)
    same = resample_relative_pos(table, (4, 4), (2, 2), old_grid=(4, 4), old_kv_grid=(2, 2))
    assert same is table
    up = resample_relative_pos(table, (8, 6), (4, 3), old_grid=(4, 4), old_kv_grid=(2, 2))
    assert up.shape == (1, 2, 48, 12)
    # a table that depends only on the key position keeps that dependence after the query resampling
    only_key = torch.randn(1, 2, 1, 4, generator=g).expand(1, 2, 16, 4)
    out = resample_relative_pos(only_key, (8, 8), (2, 2), old_grid=(4, 4), old_kv_grid=(2, 2))
    assert torch.allclose(out, only_key[:, :, :1].expand(1, 2, 64, 4), atol=1e-6)


@pytest.mark.parametrize("name", ["ptnt_ti_patch16_192", "ptnt_s_patch16_256"])
def test_features_only_stages(name):
    model = create_model(name, features_only=True, **fewer_blocks(name))
    maps = model(torch.randn(1, 3, 200, 136))
    assert [m.shape[1] for m in maps] == [f["num_chs"] for f in model.feature_info]
    assert [f["reduction"] for f in model.feature_info] == [8, 16, 32, 64]
    assert [tuple(m.shape[-2:]) for m in maps] == [(25, 17), (13, 9), (7, 5), (4, 3)]
    two = create_model(name, features_only=True, out_indices=(1, 3))
    assert [f["reduction"] for f in two.feature_info] == [16, 64]


def test_forward_intermediates_and_head_agree():
    model = perturbed(create_model("ptnt_ti_patch16_192", num_classes=5)).eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        final, feats = model.forward_intermediates(x, norm=False)
        assert len(feats) == 4
        tokens = feats[-1].flatten(2).transpose(1, 2)
        assert torch.allclose(model.norm(tokens), final, atol=1e-6)
        assert torch.allclose(model.forward_head(final), model(x), atol=1e-6)
    with pytest.raises(ConfigError):
        model.forward_intermediates(x, indices=[0], norm=True)


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = perturbed(create_model("ptnt_ti_patch16_192", num_classes=3))
    x = torch.randn(2, 3, 64, 64)
    model(x).sum().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, plain[n], atol=1e-5), n


def test_save_and_load_model_folder(tmp_path):
    model = perturbed(create_model("ptnt_ti_patch16_192", num_classes=4, img_size=64)).eval()
    save_model(model, tmp_path / "m", class_names=list("abcd"))
    again = load_model(tmp_path / "m").eval()
    assert isinstance(again, PyramidTNT) and again.class_names == list("abcd")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))


def test_bad_inputs_and_weights(tmp_path):
    model = create_model("ptnt_ti_patch16_192")
    with pytest.raises(InputError, match="multiple of 8"):
        model(torch.randn(1, 3, 100, 100))
    with pytest.raises(InputError, match="too small"):
        model(torch.randn(1, 3, 16, 16))
    with pytest.raises(ConfigError):
        create_model("ptnt_ti_patch16_192", depths=(2, 2, 2))
    path, _ = _authors_checkpoint(tmp_path, "ptnt_ti_patch16_192")
    with pytest.raises(CheckpointError, match="ptnt_s_patch16_256 has depths"):
        create_model("ptnt_s_patch16_256", pretrained=str(path))
    with pytest.raises(CheckpointError, match="not a TNT"):
        create_model("tnt_s_patch16_224", pretrained=str(path))
    tnt = tmp_path / "tnt.pth"
    torch.save(create_model("tnt_mini_patch4_28").state_dict(), tnt)
    with pytest.raises(CheckpointError, match="not a PyramidTNT"):
        create_model("ptnt_ti_patch16_192", pretrained=str(tnt))
