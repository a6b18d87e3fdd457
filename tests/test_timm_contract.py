"""What code written for timm reads off a model, for every registered model: ``pretrained_cfg``,
``feature_info``, ``features_only`` options, torch.fx tracing, timm's data pipeline and registry.

timm is the reference here (a dev dependency); expectations come from the registry entries, from running
the model, or from timm's own code, never from the attribute under test.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import timm  # a dev dependency: without it the suite fails rather than skipping these tests
import torch
from PIL import Image, ImageDraw
from torchvision.models.feature_extraction import create_feature_extractor

import tntvision
from tntvision.errors import ConfigError, InputError
from tntvision.models.registry import get_model_entry
from tntvision.tools.predict import predict_images

from .conftest import ALL_MODELS, PYRAMID_MODELS, fewer_blocks, small_input_size


def _config(name):
    return get_model_entry(name).config


def _fx_size(name: str) -> int:
    """The model's smallest input: one patch (TNT), 32 px (PyramidTNT); 2x2 patches for the minis."""
    cfg = _config(name)
    return 32 if name in PYRAMID_MODELS else (2 * cfg.patch_size if cfg.img_size > 32 else cfg.img_size)


def _images(name: str, size: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, _config(name).in_chans, size, size)


# ------------------------------------------------------------------------------------- pretrained_cfg


@pytest.mark.parametrize("name", ALL_MODELS)
def test_pretrained_cfg_describes_the_model(name):
    entry = get_model_entry(name)
    size = small_input_size(name)
    model = tntvision.create_model(name, img_size=size, **fewer_blocks(name)).eval()
    cfg = model.pretrained_cfg
    assert model.default_cfg == cfg
    c = entry.config.in_chans
    assert cfg["architecture"] == name
    assert cfg["input_size"] == (c, size, size)
    assert cfg["mean"] == entry.meta.mean and cfg["std"] == entry.meta.std
    assert (cfg["crop_pct"], cfg["interpolation"]) == (entry.meta.crop_pct, entry.meta.interpolation)
    assert cfg["num_classes"] == entry.config.num_classes == model.head.out_features
    assert cfg["license"] == "apache-2.0" and cfg["fixed_input_size"] is False
    # the stem's first conv takes the images; the classifier is a Linear to the classes
    state = model.state_dict()
    first = model.get_submodule(cfg["first_conv"])
    assert isinstance(first, torch.nn.Conv2d) and first.in_channels == c
    assert f"{cfg['first_conv']}.weight" in state
    assert state[f"{cfg['classifier']}.weight"].shape == (entry.config.num_classes, model.num_features)
    # min_input_size runs; one stem stride less does not
    c_min, h_min, w_min = cfg["min_input_size"]
    with torch.no_grad():
        assert model(torch.randn(1, c_min, h_min, w_min)).shape == (1, entry.config.num_classes)
        step = 8 if name in PYRAMID_MODELS else entry.config.patch_size
        with pytest.raises(InputError):
            model(torch.randn(1, c_min, h_min - step, w_min - step))
        # pool_size: the last feature map's grid at the input size (None for TNT, as in timm)
        last = model.forward_intermediates(torch.randn(1, *cfg["input_size"]), intermediates_only=True)[-1]
    if name in PYRAMID_MODELS:
        assert cfg["pool_size"] == tuple(last.shape[-2:])
    else:
        assert cfg["pool_size"] is None


@pytest.mark.parametrize("name", ALL_MODELS)
def test_pretrained_cfg_follows_overrides_reset_and_loading(name, tmp_path):
    entry = get_model_entry(name)
    size = small_input_size(name)
    other_chans = 1 if entry.config.in_chans == 3 else 3
    model = tntvision.create_model(
        name, img_size=size, in_chans=other_chans, num_classes=3, **fewer_blocks(name)
    )
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (other_chans, size, size)
    grey_or_rgb = sum(entry.meta.mean) / len(entry.meta.mean)  # per-channel statistics averaged
    assert cfg["mean"] == pytest.approx((grey_or_rgb,) * other_chans)
    assert len(cfg["std"]) == other_chans and cfg["num_classes"] == 3
    model.reset_classifier(5)
    assert model.pretrained_cfg["num_classes"] == 5
    tntvision.save_model(model, tmp_path / "m", class_names=list("abcde"))
    loaded = tntvision.load_model(tmp_path / "m")
    assert loaded.pretrained_cfg == {**model.pretrained_cfg, "label_names": tuple("abcde")}
    bigger = tntvision.load_model(tmp_path / "m", img_size=2 * size)  # an override when loading
    assert bigger.pretrained_cfg["input_size"] == (other_chans, 2 * size, 2 * size)
    assert bigger.meta.input_size == (other_chans, 2 * size, 2 * size)  # what predict resizes to
    weights = tntvision.load_model(tmp_path / "m" / "model.safetensors")  # a bare weights file
    assert weights.pretrained_cfg["input_size"] == (other_chans, size, size)


def _photo(path, size: tuple[int, int], mode: str) -> None:
    """A picture with smooth gradients, edges and shapes, so resampling differences show."""
    w, h = size
    img = Image.radial_gradient("L").resize((w, h)).convert("RGB")
    draw = ImageDraw.Draw(img)
    draw.ellipse((w // 5, h // 4, 3 * w // 4, 4 * h // 5), fill=(200, 40, 90), outline=(10, 250, 30), width=3)
    draw.rectangle((2, 2, w // 3, h // 3), fill=(30, 60, 220))
    for i in range(0, w, 7):
        draw.line((i, 0, w - i, h - 1), fill=(i * 5 % 256, 255 - i % 256, 128))
    img.convert(mode).save(path)


@pytest.mark.parametrize(
    ("name", "mode", "sizes"),
    [("tnt_mini_patch4_28", "L", [(61, 45), (28, 28), (20, 33)]), ("tnt_s_patch16_224", "RGB", [(317, 263)])],
)
def test_timm_data_config_gives_the_preprocessing_of_tnt_predict(name, mode, sizes, tmp_path):
    """timm.data.resolve_model_data_config + create_transform give the very tensors `tnt predict` feeds the
    model (same resize, crop and normalisation; float rounding apart), for a model loaded as predict does."""
    tntvision.save_model(tntvision.create_model(name), tmp_path / "model")
    model = tntvision.load_model(tmp_path / "model")
    data_cfg = timm.data.resolve_model_data_config(model)
    entry = get_model_entry(name)
    assert data_cfg["input_size"] == entry.meta.input_size  # not timm's 224 px RGB fallback
    timm_transform = timm.data.create_transform(**data_cfg)
    fed = []
    model.register_forward_pre_hook(lambda _m, args: fed.append(args[0].clone()))
    for i, size in enumerate(sizes):
        path = tmp_path / f"img{i}.png"
        _photo(path, size, mode)
        predict_images(model, [path], topk=1, batch_size=1)
        expected = timm_transform(Image.open(path).convert(mode))
        torch.testing.assert_close(fed[-1][0], expected, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------- feature_info


def _levels(name: str) -> list[dict]:
    cfg = _config(name)
    if name in PYRAMID_MODELS:
        return [dict(module=f"stages.{i}", num_chs=cfg.outer_dims[i], reduction=8 * 2**i) for i in range(4)]
    return [
        dict(module=f"blocks.{i}", num_chs=cfg.embed_dim, reduction=cfg.patch_size) for i in range(cfg.depth)
    ]


@pytest.mark.parametrize("name", ALL_MODELS)
def test_feature_info_is_timms_interface_and_a_list(name):
    levels = _levels(name)
    depth = len(levels)
    out_indices = (0, depth - 1) if depth > 1 else (0,)
    model = tntvision.create_model(
        name,
        img_size=small_input_size(name),
        features_only=True,
        out_indices=out_indices,
        feature_cls="getter",
    )
    info = model.feature_info
    reference = timm.models.FeatureInfo([dict(d) for d in levels], out_indices)  # timm's own class
    assert info.channels() == reference.channels() == [levels[i]["num_chs"] for i in out_indices]
    assert info.reduction() == reference.reduction()
    assert info.module_name() == reference.module_name()
    for idx in (0, depth - 1, [0, depth - 1]):  # an index of the model's levels, returned or not
        assert info.channels(idx) == reference.channels(idx)
        assert info.module_name(idx) == reference.module_name(idx)
    assert info.get_dicts(keys=["num_chs", "reduction"]) == reference.get_dicts(keys=["num_chs", "reduction"])
    assert info.out_indices == tuple(out_indices) and len(info.info) == depth
    assert list(info) == [levels[i] for i in out_indices]  # the list: one entry per returned map
    assert isinstance(info, list) and len(info) == len(out_indices)
    # the base model's feature_info: every level
    assert list(model.model.feature_info) == levels and model.model.feature_info.channels() == [
        d["num_chs"] for d in levels
    ]
    assert "num_classes" not in model.pretrained_cfg and model.pretrained_cfg["input_size"]


@pytest.mark.parametrize("name", ALL_MODELS)
def test_feature_maps_come_from_the_modules_feature_info_names(name):
    """Each map is the output of the module ``feature_info`` names (its last block for a stage), with
    the channels and stride it gives, in both output formats."""
    size = small_input_size(name)
    h, w = size, 2 * size
    x = torch.randn(1, _config(name).in_chans, h, w)
    fewer = fewer_blocks(name)
    nchw = tntvision.create_model(name, img_size=size, features_only=True, **fewer).eval()
    nlc = tntvision.create_model(name, img_size=size, features_only=True, output_fmt="NLC", **fewer).eval()
    nlc.load_state_dict(nchw.state_dict())
    assert nlc.output_fmt == "NLC" and nchw.output_fmt == "NCHW"
    seen = {}
    for module_name in nchw.feature_info.module_name():
        mod = nchw.model.get_submodule(module_name)
        mod = mod.blocks[-1] if hasattr(mod, "blocks") else mod  # a PyramidTNT stage runs its blocks
        mod.register_forward_hook(lambda _m, _i, out, key=module_name: seen.__setitem__(key, out[1]))
    with torch.no_grad():
        maps, tokens = nchw(x), nlc(x)
    prefix = 0 if name in PYRAMID_MODELS else 1  # TNT's class token
    for fmap, tok, info in zip(maps, tokens, nchw.feature_info, strict=True):
        r = info["reduction"]
        assert fmap.shape == (1, info["num_chs"], -(-h // r), -(-w // r))
        assert torch.equal(seen[info["module"]][:, prefix:], tok)
        assert torch.equal(fmap.flatten(2).transpose(1, 2), tok)  # (B, C, H, W) -> (B, H*W, C)


def test_unsupported_feature_options_name_the_supported_ones():
    for kwargs, supported in [
        (dict(feature_cls="fx"), "'getter'"),
        (dict(feature_cls="hook"), "'getter'"),
        (dict(output_fmt="NHWC"), "'NCHW', 'NLC'"),
    ]:
        with pytest.raises(ConfigError, match=supported):
            tntvision.create_model("tnt_mini_patch4_28", features_only=True, **kwargs)
    with pytest.raises(ConfigError, match="features_only"):
        tntvision.create_model("tnt_mini_patch4_28", feature_cls="getter")


# ------------------------------------------------------------------------------------------- torch.fx


@pytest.mark.parametrize("name", ALL_MODELS)
def test_fx_trace_forward_and_feature_extractor_round_trip(name):
    size = _fx_size(name)
    model = tntvision.create_model(name, img_size=size, **fewer_blocks(name)).eval()
    x = _images(name, size)
    level = len(model.feature_info) // 2
    block = f"stages.{level}" if name in PYRAMID_MODELS else f"blocks.{level}"
    extractor = create_feature_extractor(
        model, return_nodes={block: "block", "norm": "tokens", "head": "logits"}
    )
    traced = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        logits = model(x)
        out = extractor(x)
        final, inter = model.forward_intermediates(x, [level], output_fmt="NLC")
        assert torch.equal(traced(x), logits)
    assert torch.equal(out["logits"], logits)
    assert torch.equal(out["tokens"], final)
    prefix = 0 if name in PYRAMID_MODELS else 1
    assert torch.equal(out["block"][:, prefix:], inter[0])
    # the input checks are nodes that run, not branches decided while tracing
    c = _config(name).in_chans
    with pytest.raises(InputError, match="channels"):
        traced(torch.randn(1, c + 1, size, size))


@pytest.mark.parametrize("name", ALL_MODELS)
def test_fx_trace_backward_matches_eager(name):
    size = _fx_size(name)
    model = tntvision.create_model(name, img_size=size, num_classes=7, **fewer_blocks(name)).train()
    extractor = create_feature_extractor(model, train_return_nodes=["head"], eval_return_nodes=["head"])
    x = _images(name, size)
    extractor(x)["head"].square().mean().backward()
    fx_grads = {n: p.grad for n, p in extractor.named_parameters()}
    assert len(fx_grads) == len(dict(model.named_parameters())) and all(
        g is not None for g in fx_grads.values()
    ), [n for n, g in fx_grads.items() if g is None]
    for p in model.parameters():
        p.grad = None
    model(x).square().mean().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(fx_grads[n], p.grad, msg=n)


def test_fx_trace_of_a_training_model_with_dropout_and_drop_path():
    """Random branches run inside the traced module as in eager mode: same numbers for the same seed."""
    model = tntvision.create_model("tnt_mini_patch4_28", drop_path_rate=0.2, proj_drop_rate=0.1).train()
    extractor = create_feature_extractor(model, train_return_nodes=["head"], eval_return_nodes=["head"])
    x = torch.randn(4, 1, 28, 28)
    torch.manual_seed(3)
    eager = model(x)
    torch.manual_seed(3)
    traced = extractor(x)["head"]
    torch.testing.assert_close(traced, eager)


# -------------------------------------------------------------------------------------- timm registry


def test_library_does_not_import_timm():
    code = (
        "import sys, tntvision, tntvision.cli, tntvision.integrations.timm, tntvision.detection; "
        "tntvision.create_model('tnt_mini_patch4_28'); print('timm' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_register_puts_every_model_in_timms_registry(tmp_path):
    from tntvision.integrations.timm import register

    names = register()
    assert register() == names  # a second call registers nothing new (timm would warn)
    assert names == ["tntvision_" + n for n in ALL_MODELS]
    assert set(names) <= set(timm.list_models("tntvision_*"))
    for name in ALL_MODELS:
        size = small_input_size(name)
        ours = tntvision.create_model(name, img_size=size, num_classes=3, **fewer_blocks(name))
        theirs = timm.create_model("tntvision_" + name, img_size=size, num_classes=3, **fewer_blocks(name))
        assert type(theirs) is type(ours) and theirs.pretrained_cfg == ours.pretrained_cfg
        # timm's registry (what its scripts and tests look sizes up in) has the variant as registered
        registered = get_model_entry(name).meta.input_size
        assert timm.get_pretrained_cfg_value("tntvision_" + name, "input_size") == registered
        for key in ("mean", "std", "crop_pct", "interpolation", "min_input_size", "first_conv"):
            assert timm.get_pretrained_cfg_value("tntvision_" + name, key) == ours.pretrained_cfg[key], key


def test_timm_create_model_features_and_weights(tmp_path):
    from tntvision.integrations.timm import register

    register()
    feats = timm.create_model(
        "tntvision_ptnt_ti_patch16_192",
        features_only=True,
        feature_cfg=dict(feature_cls="getter"),
        out_indices=(1, 3),
    )
    assert feats.feature_info.channels() == [160, 320] and feats.feature_info.reduction() == [16, 64]
    with pytest.raises(ConfigError, match="getter"):
        timm.create_model("tntvision_tnt_mini_patch4_28", features_only=True, feature_cls="fx")
    with pytest.raises(ConfigError, match="no weights to download"):
        timm.create_model("tntvision_tnt_mini_patch4_28", pretrained=True)
    saved = tntvision.create_model("tnt_mini_patch4_28")
    tntvision.save_model(saved, tmp_path / "m")
    loaded = timm.create_model(
        "tntvision_tnt_mini_patch4_28",
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(tmp_path / "m" / "model.safetensors")),
    )
    for key, value in saved.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
