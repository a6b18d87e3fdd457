"""`tnt visualize`: figures for TNT-S at 224 and the 28 px models, drawn from the model's own attention."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import tntvision
from tntvision.cli import main
from tntvision.data import eval_transform, open_image
from tntvision.errors import InputError
from tntvision.tools.visualize import FIGURES, capture, default_blocks, visualize

from .conftest import PYRAMID_MODELS, TNT_MODELS, small_input_size


def photo(path, size, *, mode="RGB", seed=0):
    """A smooth random picture (blobs, not pixel noise) so attention and features vary over it."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    Image.fromarray(small).resize(size, Image.Resampling.BICUBIC).convert(mode).save(path)
    return path


def check_png(path, *, min_side=300):
    with Image.open(path) as img:
        assert img.format == "PNG"
        w, h = img.size
        assert min_side <= w <= 4000 and 150 <= h <= 3000, (path.name, img.size)
        arr = np.asarray(img.convert("L"), dtype=np.float32)
    assert arr.std() > 10, f"{path.name} looks blank"


def check_attention_is_the_models(model, x, cap):
    """Rows of the kept maps sum to 1 and equal what record_attention gives for a plain forward."""
    with torch.no_grad(), tntvision.record_attention(model) as maps:
        logits = model(x)
    for b, attn in cap.attn_out.items():
        torch.testing.assert_close(attn.sum(-1), torch.ones_like(attn[..., 0]), rtol=0, atol=1e-5)
        torch.testing.assert_close(attn, maps[f"blocks.{b}.attn_out"][0], rtol=0, atol=1e-6)
    for b, attn in cap.attn_in.items():
        torch.testing.assert_close(attn.sum(-1), torch.ones_like(attn[..., 0]), rtol=0, atol=1e-5)
        torch.testing.assert_close(attn, maps[f"blocks.{b}.attn_in"], rtol=0, atol=1e-6)
    if cap.probs is not None:
        torch.testing.assert_close(cap.probs, logits[0].softmax(-1), rtol=0, atol=1e-6)


def test_tnt_s_at_224_writes_every_figure(tmp_path):
    model = tntvision.create_model("tnt_s_patch16_224").eval()
    image = photo(tmp_path / "in.jpg", (300, 240))
    report = visualize(model, image, tmp_path / "out")
    assert list(report.figures) == list(FIGURES) and report.skipped == {}
    for path in report.figures.values():
        check_png(path)
    cap = report.capture
    assert cap.grid == (14, 14) and cap.words_per_side == 4
    assert sorted(cap.attn_out) == [0, 5, 11]  # the paper's blocks 1 / 6 / 12
    assert cap.attn_in[0].shape == (196, 4, 16, 16)
    assert cap.attn_out[11].shape == (6, 197, 197)
    assert cap.features[5].shape == (384, 14, 14)
    x = eval_transform(model.meta)(open_image(image)).unsqueeze(0)
    check_attention_is_the_models(model, x, cap)
    with torch.no_grad():
        feats = model.forward_intermediates(x, [0, 5, 11], intermediates_only=True)
        words = model.pixel_embed(x, model.pixel_pos)
    for b, f in zip([0, 5, 11], feats, strict=True):
        torch.testing.assert_close(cap.features[b], f[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(cap.words[-1], words, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["tnt_mini_patch4_28", "vit_mini_patch4_28"])
def test_28px_models_through_the_cli(name, tmp_path, capsys):
    model = tntvision.create_model(name)
    tntvision.save_model(model, tmp_path / "model", class_names=[f"c{i}" for i in range(10)])
    image = photo(tmp_path / "in.png", (28, 28), mode="L")
    out = tmp_path / "figs"
    code = main(
        ["visualize", "--checkpoint", str(tmp_path / "model"), str(image), "--out", str(out), "--json"]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    assert result["prediction"]["label"] in [f"c{i}" for i in range(10)]
    expected = [f for f in FIGURES if not (name.startswith("vit") and f == "inner_attention")]
    assert list(result["figures"]) == expected
    for f in expected:
        check_png(out / f"{f}.png")
    if name.startswith("vit"):
        assert "no inner transformer" in result["skipped"]["inner_attention"]
        assert "skipped inner_attention" in captured.err
        assert not (out / "inner_attention.png").exists()


def test_other_image_size_patch_and_words(tmp_path):
    # 4x4 one-pixel words per patch (the registered mini has 2x2); blocks 2 and 6 below
    model = tntvision.create_model("tnt_mini_patch4_28", depth=6, word_stride=1).eval()
    image = photo(tmp_path / "in.png", (90, 70), mode="L")
    report = visualize(
        model, image, tmp_path / "out", blocks=[2, 6], patch=(0, 13), words=[(1, 2), (3, 0)], img_size=56
    )
    cap = report.capture
    assert cap.grid == (14, 14) and cap.image.shape == (56, 56, 1)
    assert sorted(cap.attn_in) == [1, 5] and cap.attn_in[1].shape == (196, 2, 16, 16)
    meta = model.meta.resolved(img_size=56)
    check_attention_is_the_models(model, eval_transform(meta)(open_image(image)).unsqueeze(0), cap)
    for path in report.figures.values():
        check_png(path)


def test_blocks_without_inner_part_are_left_out_of_inner_figure(tmp_path):
    model = tntvision.create_model("tnt_mini_patch4_28", depth=6, inner_blocks=(0,)).eval()  # inner: block 1
    image = photo(tmp_path / "in.png", (28, 28), mode="L")
    report = visualize(model, image, tmp_path / "a", blocks=[1, 6])
    assert sorted(report.capture.attn_in) == [0] and "inner_attention" in report.figures
    report = visualize(model, image, tmp_path / "b", blocks=[3, 6])
    assert "inner_attention" not in report.figures
    assert "blocks [1] do" in report.skipped["inner_attention"]


@pytest.mark.parametrize("name", TNT_MODELS)
def test_capture_works_for_every_registered_model(name):
    """Every variant (legacy, SE, ViT-only ...) gives its own attention at a small input size."""
    size = small_input_size(name)
    model = tntvision.create_model(name, img_size=size).eval()
    x = torch.randn(1, model.in_chans, size, size)
    blocks = [b - 1 for b in default_blocks(len(model.blocks))]
    cap = capture(model, x, blocks=blocks)
    assert sorted(cap.attn_out) == blocks == sorted(cap.features)
    assert sorted(cap.attn_in) == [b for b in blocks if model.blocks[b].has_inner]
    check_attention_is_the_models(model, x, cap)


def test_capture_needs_one_image():
    model = tntvision.create_model("tnt_mini_patch4_28")
    with pytest.raises(InputError):
        capture(model, torch.randn(2, 1, 28, 28), blocks=[0])


def test_bad_arguments_exit_2(tmp_path, capsys):
    image = photo(tmp_path / "in.png", (28, 28), mode="L")
    base = ["visualize", "--model", "tnt_mini_patch4_28", "--out", str(tmp_path / "o")]
    cases = [
        ([str(image), "--blocks", "1,7"], "blocks are numbered 1.."),
        ([str(image), "--patch", "7,0"], "outside the 7x7 grid"),
        ([str(image), "--words", "0,2"], "outside the 2x2 grid"),
        ([str(image), "--blocks", "a,b"], "comma-separated integers"),
        ([str(image), "--img-size", "30"], "multiple of the patch size"),
        ([str(tmp_path / "missing.png")], "no such file"),
    ]
    for extra, msg in cases:
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1, err
    (tmp_path / "notes.txt").write_text("hello")
    assert main(base + [str(tmp_path / "notes.txt")]) == 2
    assert "not a readable image" in capsys.readouterr().err


def test_pyramid_stage_maps_through_the_cli(tmp_path, capsys):
    """PyramidTNT has no class token or patch grid of words: its figure is the four stages' outputs."""
    image = tmp_path / "img.png"
    Image.fromarray((np.random.default_rng(0).random((64, 80, 3)) * 255).astype(np.uint8)).save(image)
    out = tmp_path / "figs"
    name = "ptnt_ti_patch16_192"
    assert name in PYRAMID_MODELS
    code = main(["visualize", "--model", name, str(image), "--out", str(out), "--img-size", "96", "--json"])
    assert code in (0, None)
    report = json.loads(capsys.readouterr().out)
    assert list(report["figures"]) == ["stage_maps"] and (out / "stage_maps.png").stat().st_size > 10_000
    assert main(["visualize", "--model", name, str(image), "--out", str(out), "--patch", "1,1"]) == 2
    assert main(["visualize", "--model", name, str(image), "--out", str(out), "--blocks", "5"]) == 2
