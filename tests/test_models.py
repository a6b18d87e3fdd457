"""Every registered model: shapes, gradients, dropout, checkpointing, intermediates, features, compile."""

import pytest
import torch

import tntvision
from tntvision.errors import ConfigError, InputError, UnknownModelError
from tntvision.models.registry import ModelMeta, register_model
from tntvision.models.tnt import TNTConfig, build_tnt
from tntvision.tools.info import count_macs, count_params

from .conftest import ALL_MODELS, SMALL_MODELS, TNT_MODELS, fewer_blocks, small_input_size

DROPS = dict(drop_rate=0.1, pos_drop_rate=0.1, proj_drop_rate=0.1, attn_drop_rate=0.1, drop_path_rate=0.2)


def _input(name: str, batch: int = 2) -> tuple[torch.Tensor, int]:
    size = small_input_size(name)
    cfg = tntvision.models.registry.get_model_entry(name).config
    return torch.randn(batch, cfg.in_chans, size, size), size


@pytest.mark.parametrize(
    "name, params, macs",
    [
        ("tnt_ti_patch16_224", 6_076_408, 1.404e9),
        ("tnt_s_patch16_224", 23_768_584, 5.217e9),
        ("tnt_b_patch16_224", 65_428_680, 14.049e9),
        ("tnt_s_legacy_patch16_224", 23_755_336, None),
    ],
)
def test_paper_params_and_macs(name, params, macs):
    model = tntvision.create_model(name)
    assert count_params(model) == params
    if macs is not None:
        assert abs(count_macs(model) / macs - 1) < 0.005


def test_se_variant_params():
    # the paper: 24.7M for TNT-S + SE
    assert round(count_params(tntvision.create_model("tnt_s_se_patch16_224")) / 1e6, 1) == 24.7


@pytest.mark.parametrize("name", ALL_MODELS)
def test_forward_backward_with_dropout(name):
    x, size = _input(name, batch=4)  # 4 samples: drop path (p <= 0.2) rarely drops a whole branch
    model = tntvision.create_model(name, img_size=size, **DROPS, **fewer_blocks(name)).train()
    out = model(x)
    assert out.shape == (4, model.num_classes)
    assert torch.isfinite(out).all()
    out.logsumexp(-1).sum().backward()
    no_grad = [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)
    ]
    assert no_grad == []
    # dropout is live in train mode and gone in eval mode
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


@pytest.mark.parametrize("name", ALL_MODELS)
def test_grad_checkpointing_same_output_and_grads(name):
    x, size = _input(name)
    model = tntvision.create_model(name, img_size=size, drop_path_rate=0.1, **fewer_blocks(name)).train()
    torch.manual_seed(1)
    ref = model(x)
    ref.sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    torch.manual_seed(1)
    out = model(x)
    out.sum().backward()
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("name", TNT_MODELS)  # PyramidTNT: tests/test_pyramid_tnt.py
def test_forward_intermediates_agree_with_forward_features(name):
    x, size = _input(name)
    model = tntvision.create_model(name, img_size=size, **fewer_blocks(name)).eval()
    with torch.no_grad():
        feats = model.forward_features(x)
        final, inter = model.forward_intermediates(x, norm=True)
        only = model.forward_intermediates(x, indices=[0, -1], intermediates_only=True, stop_early=True)
    depth, gh = len(model.blocks), size // model.patch_size
    assert len(inter) == depth
    assert inter[-1].shape == (2, model.embed_dim, gh, gh)
    torch.testing.assert_close(final, feats)
    # the last map is the final tokens (without the class token) laid out as a grid
    torch.testing.assert_close(inter[-1].flatten(2).transpose(1, 2), feats[:, 1:])
    assert len(only) == 2
    assert only[1].shape == inter[-1].shape


@pytest.mark.parametrize("name", ALL_MODELS)
def test_reset_classifier_and_heads(name):
    x, size = _input(name)
    model = tntvision.create_model(name, img_size=size, **fewer_blocks(name)).eval()
    model.reset_classifier(7)
    assert model(x).shape == (2, 7)
    assert model.cfg.num_classes == 7
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, model.num_features)
    model.reset_classifier(0, global_pool="avg")
    assert model(x).shape == (2, model.num_features)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_timm_contract_helpers(name):
    model = tntvision.create_model(name, img_size=small_input_size(name), **fewer_blocks(name))
    names = dict(model.named_parameters())
    assert model.no_weight_decay() <= set(names)
    assert set(model.group_matcher()) == {"stem", "blocks"}
    assert model.get_classifier() is model.head


@pytest.mark.parametrize("name", ALL_MODELS)
def test_features_only_maps_match_feature_info(name):
    """Every model: NCHW maps whose channels and strides are what ``feature_info`` says, at a
    non-square input."""
    size = small_input_size(name)
    h, w = size, 2 * size
    model = tntvision.create_model(name, img_size=size, features_only=True, **fewer_blocks(name)).eval()
    cfg = tntvision.models.registry.get_model_entry(name).config
    with torch.no_grad():
        maps = model(torch.randn(1, cfg.in_chans, h, w))
    assert len(maps) == len(model.feature_info) == min(4, len(model.model.feature_info))
    for fmap, info in zip(maps, model.feature_info, strict=True):
        r = info["reduction"]
        assert fmap.shape == (1, info["num_chs"], -(-h // r), -(-w // r)), (name, info)


def test_features_only():
    model = tntvision.create_model(
        "tnt_s_patch16_224", img_size=64, features_only=True, out_indices=(2, 5, 8, 11)
    )
    feats = model(torch.randn(1, 3, 64, 64))
    assert [f.shape for f in feats] == [torch.Size([1, 384, 4, 4])] * 4
    assert [i["module"] for i in model.feature_info] == ["blocks.2", "blocks.5", "blocks.8", "blocks.11"]


def test_other_input_sizes_and_channels():
    model = tntvision.create_model("tnt_s_patch16_224", img_size=64, in_chans=1).eval()
    assert model(torch.randn(1, 1, 64, 64)).shape == (1, 1000)
    # another multiple of the patch size: the position table is resampled on the fly
    assert model(torch.randn(1, 1, 48, 80)).shape == (1, 1000)
    with pytest.raises(InputError, match="multiple of the patch size"):
        model(torch.randn(1, 1, 50, 64))
    with pytest.raises(InputError, match="input channels"):
        model(torch.randn(1, 3, 64, 64))


def test_inner_blocks_option_makes_plain_vit_blocks():
    # the paper's TNT-S with inner transformers only in blocks 1 and 6 (1-based)
    model = tntvision.create_model("tnt_s_patch16_224", img_size=32, inner_blocks=(0, 5))
    assert [b.has_inner for b in model.blocks] == [i in (0, 5) for i in range(12)]
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 1000)


def test_word_pos_option_freezes_a_zero_word_position_table(tmp_path):
    # default: the word (pixel) position table is trained and initialised like the other tables
    on = tntvision.create_model("tnt_mini_patch4_28")
    assert on.cfg.word_pos is True
    assert on.pixel_pos.requires_grad and on.pixel_pos.abs().sum() > 0
    # word_pos=False (the paper's "w/o pixel PE"): zeros, not trained, not counted, same state dict keys
    off = tntvision.create_model("tnt_mini_patch4_28", word_pos=False)
    assert not off.pixel_pos.requires_grad and not off.pixel_pos.any()
    assert count_params(on) - count_params(off) == on.pixel_pos.numel()
    assert off.state_dict().keys() == on.state_dict().keys()
    x = torch.randn(2, 1, 28, 28)
    off(x).sum().backward()
    assert off.pixel_pos.grad is None
    # the same weights otherwise (same seed): the models differ only by the table that is added
    torch.manual_seed(0)
    a = tntvision.create_model("tnt_mini_patch4_28", word_pos=False)
    torch.manual_seed(0)
    b = tntvision.create_model("tnt_mini_patch4_28")
    with torch.no_grad():
        b.pixel_pos.zero_()
    a.eval(), b.eval()
    assert torch.equal(a(x), b(x))
    # the option is saved with the model
    tntvision.save_model(off, tmp_path / "model")
    loaded = tntvision.load_model(tmp_path / "model")
    assert loaded.cfg.word_pos is False and not loaded.pixel_pos.requires_grad


def test_fused_word_embedding_equals_per_patch_conv():
    for name in ("tnt_s_patch16_224", "tnt_mini_patch4_28"):
        x, size = _input(name)
        model = tntvision.create_model(name, img_size=size).eval()
        with torch.no_grad():
            fused = model(x)
            model.pixel_embed.fused = False
            ref = model(x)
        torch.testing.assert_close(fused, ref, rtol=0, atol=1e-5)


def test_config_roundtrip_and_registry_errors():
    cfg = tntvision.create_model("tnt_mini_patch4_28").cfg
    from dataclasses import asdict

    assert tntvision.TNT(**asdict(cfg)).cfg == cfg
    assert tntvision.TNT(cfg).cfg == cfg
    assert tntvision.TNT(cfg, num_classes=3).cfg == cfg.replace(num_classes=3)
    with pytest.raises(ConfigError, match="unknown TNT config"):
        tntvision.TNT(cfg, embed_dims=3)
    # TNTConfig is the one home of the defaults and of inner_blocks' normal form

    bare = tntvision.TNT(depth=3, img_size=32)
    assert bare.cfg == TNTConfig(depth=3, img_size=32, inner_blocks=(0, 1, 2))
    assert bare.model_name is None and bare.meta is None and bare.class_names is None
    assert TNTConfig(inner_blocks=[5, 0, 5]).inner_blocks == (0, 5)
    assert TNTConfig(depth=4).inner_block_indices() == (0, 1, 2, 3)
    with pytest.raises(UnknownModelError, match="did you mean tnt_s_patch16_224"):
        tntvision.create_model("tnt_s_patch16_22")
    with pytest.raises(ConfigError, match="did you mean.*num_classes"):
        tntvision.create_model("tnt_mini_patch4_28", num_clases=3)
    with pytest.raises(ConfigError, match="not a multiple"):
        tntvision.create_model("tnt_s_patch16_224", img_size=100)
    with pytest.raises(ValueError, match="already registered"):
        register_model("tnt_s_patch16_224", build_tnt, TNTConfig(), ModelMeta())
    assert tntvision.list_models("tnt_s*") == [n for n in ALL_MODELS if n.startswith("tnt_s")]


def test_save_and_load_model_roundtrip(tmp_path):
    model = tntvision.create_model("tnt_mini_patch4_28", num_classes=3).eval()
    tntvision.save_model(model, tmp_path / "model", class_names=["a", "b", "c"])
    loaded = tntvision.load_model(tmp_path / "model").eval()
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(model(x), loaded(x))
    assert loaded.class_names == ["a", "b", "c"]
    assert loaded.meta == model.meta
    # a run folder (parent of model/) and the weights file itself work too
    assert torch.equal(tntvision.load_model(tmp_path)(x), model(x))
    assert torch.equal(tntvision.load_model(tmp_path / "model" / "model.safetensors")(x), model(x))


@pytest.mark.parametrize("name", SMALL_MODELS)
def test_compile_fullgraph(name):
    x, size = _input(name)
    # 2 of the 4 blocks: inductor generates code per block, and the blocks are alike
    model = tntvision.create_model(name, depth=2).eval()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", SMALL_MODELS)
def test_record_attention(name):
    x, _ = _input(name)
    model = tntvision.create_model(name).eval()
    with torch.no_grad():
        ref = model(x)
        with tntvision.record_attention(model) as maps:
            out = model(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    outer = maps["blocks.0.attn_out"]
    assert outer.shape == (2, model.cfg.num_heads, 50, 50)
    torch.testing.assert_close(outer.sum(-1), torch.ones_like(outer.sum(-1)))
    if model.blocks[0].has_inner:
        words = (model.cfg.patch_size // model.cfg.word_stride) ** 2  # 2x2 for the mini, 4x4 for TNT-S
        assert maps["blocks.0.attn_in"].shape == (2 * 49, model.cfg.inner_num_heads, words, words)


def test_atomic_write_gives_normal_permissions(tmp_path):
    import os
    from pathlib import Path

    from tntvision.utils.files import atomic_write

    umask = os.umask(0o022)
    try:
        atomic_write(tmp_path / "a.txt", lambda tmp: Path(tmp).write_text("x"))
    finally:
        os.umask(umask)
    assert (tmp_path / "a.txt").read_text() == "x"
    assert os.stat(tmp_path / "a.txt").st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]  # no temp file left behind
