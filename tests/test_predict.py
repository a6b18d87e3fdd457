"""`tnt predict`: every image mode, folders with other files, batching, labels and the error contract."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import tntvision
from tntvision.cli import main
from tntvision.data import eval_transform, open_image
from tntvision.errors import DataError, InputError
from tntvision.tools.predict import predict_images

CLASSES = [f"class_{i}" for i in range(10)]


@pytest.fixture(scope="module")
def grey_model_dir(tmp_path_factory):
    """A saved random tnt_mini (1 channel, 28 px) with class names."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("grey") / "model"
    tntvision.save_model(tntvision.create_model("tnt_mini_patch4_28"), folder, class_names=CLASSES)
    return folder


@pytest.fixture(scope="module")
def rgb_model_dir(tmp_path_factory):
    """A saved random 3-channel tnt_mini, for the colour modes."""
    torch.manual_seed(1)
    folder = tmp_path_factory.mktemp("rgb") / "model"
    tntvision.save_model(
        tntvision.create_model("tnt_mini_patch4_28", in_chans=3), folder, class_names=CLASSES
    )
    return folder


@pytest.fixture(scope="module")
def grey_model(grey_model_dir):
    return tntvision.load_model(grey_model_dir)


@pytest.fixture(scope="module")
def rgb_model(rgb_model_dir):
    return tntvision.load_model(rgb_model_dir)


def noise(shape, *, seed=0, dtype=np.uint8, high=256):
    return np.random.default_rng(seed).integers(0, high, shape, dtype=dtype)


def probs_of(model, path) -> list[float]:
    """Class probabilities of one image, by hand: eval_transform + forward + softmax."""
    x = eval_transform(model.meta)(open_image(path)).unsqueeze(0)
    with torch.no_grad():
        return model.eval()(x).softmax(-1)[0].tolist()


def full_probs(model, path) -> list[float]:
    """All class probabilities from predict_images, in class order."""
    pred = predict_images(model, [path], topk=len(CLASSES)).predictions[0]
    out = [0.0] * len(CLASSES)
    for i, p in zip(pred.indices, pred.probs, strict=True):
        out[i] = p
    return out


def test_prediction_is_softmax_of_the_model_sorted(grey_model, tmp_path):
    model = grey_model
    path = tmp_path / "a.png"
    Image.fromarray(noise((50, 37))).save(path)
    pred = predict_images(model, [path], topk=3).predictions[0]
    expected = probs_of(model, path)
    order = sorted(range(10), key=lambda i: -expected[i])[:3]
    assert pred.indices == order
    assert pred.labels == [CLASSES[i] for i in order]
    np.testing.assert_allclose(pred.probs, [expected[i] for i in order], rtol=0, atol=1e-6)


def test_bf16_weights_predict_close_to_fp32_and_leave_the_model_alone(grey_model, tmp_path):
    path = tmp_path / "a.png"
    Image.fromarray(noise((40, 40))).save(path)
    want = full_probs(grey_model, path)
    pred = predict_images(grey_model, [path], topk=len(CLASSES), dtype=torch.bfloat16).predictions[0]
    got = [0.0] * len(CLASSES)
    for i, p in zip(pred.indices, pred.probs, strict=True):
        got[i] = p
    np.testing.assert_allclose(got, want, rtol=0, atol=0.02)
    assert got != want  # bf16 really ran
    assert all(p.dtype == torch.float32 for p in grey_model.parameters())


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "CMYK", "L", "I;16", "LA", "1", "F"])
def test_every_image_mode_is_predicted(grey_model, rgb_model, tmp_path, mode):
    if mode == "I;16":
        img = Image.fromarray(noise((33, 45), dtype=np.uint16, high=65536))
    elif mode == "F":
        img = Image.fromarray(noise((33, 45)).astype(np.float32))
    else:
        img = Image.fromarray(noise((33, 45, 3))).convert(mode)
    assert img.mode == mode
    path = tmp_path / ("img.tiff" if mode in ("CMYK", "F") else "img.png")
    img.save(path)
    for model in (grey_model, rgb_model):
        pred = predict_images(model, [path], topk=2).predictions[0]
        assert len(pred.labels) == 2 and all(np.isfinite(pred.probs))
        assert pred.probs[0] >= pred.probs[1] > 0


def test_sixteen_bit_is_scaled_not_clipped(grey_model, tmp_path):
    """A 16-bit image predicts like the 8-bit image it was scaled up from (v * 257)."""
    model = grey_model
    base = noise((28, 28), seed=3)
    Image.fromarray(base).save(tmp_path / "l8.png")
    Image.fromarray(base.astype(np.uint16) * 257).save(tmp_path / "l16.png")
    assert Image.open(tmp_path / "l16.png").mode == "I;16"
    np.testing.assert_allclose(
        full_probs(model, tmp_path / "l16.png"), full_probs(model, tmp_path / "l8.png"), atol=1e-6
    )


def test_cmyk_predicts_like_its_rgb_conversion(rgb_model, tmp_path):
    model = rgb_model
    cmyk = Image.fromarray(noise((30, 30, 3), seed=4)).convert("CMYK")
    cmyk.save(tmp_path / "c.tiff")
    cmyk.convert("RGB").save(tmp_path / "c_rgb.png")
    np.testing.assert_allclose(
        full_probs(model, tmp_path / "c.tiff"), full_probs(model, tmp_path / "c_rgb.png"), atol=1e-6
    )


def test_exif_orientation_is_applied(rgb_model, tmp_path):
    """An image stored sideways with EXIF orientation 6 predicts like the upright image."""
    model = rgb_model
    stored = Image.fromarray(noise((40, 56, 3), seed=5))
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise
    stored.save(tmp_path / "exif.png", exif=exif.tobytes())
    stored.transpose(Image.Transpose.ROTATE_270).save(tmp_path / "upright.png")
    stored.save(tmp_path / "sideways.png")
    rotated = full_probs(model, tmp_path / "exif.png")
    np.testing.assert_allclose(rotated, full_probs(model, tmp_path / "upright.png"), atol=1e-6)
    assert not np.allclose(rotated, full_probs(model, tmp_path / "sideways.png"), atol=1e-6)


def test_folders_are_walked_and_unreadable_images_reported(grey_model_dir, tmp_path, capsys):
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    Image.fromarray(noise((28, 28), seed=1)).save(root / "b.png")
    Image.fromarray(noise((64, 48, 3), seed=2)).save(root / "sub" / "a.jpg")
    (root / "notes.txt").write_text("not an image")  # not an image by its name: left out, not reported
    (root / "sub" / "truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (root / ".DS_Store").write_bytes(b"\0\0")
    extra = tmp_path / "c.bmp"
    Image.fromarray(noise((20, 20, 3), seed=3)).save(extra)

    code = main(
        ["predict", "--checkpoint", str(grey_model_dir), str(root), str(extra), "--topk", "3", "--json"]
    )
    out = capsys.readouterr()
    assert code == 0
    result = json.loads(out.out)
    paths = [p["path"] for p in result["predictions"]]
    assert paths == [str(root / "b.png"), str(root / "sub" / "a.jpg"), str(extra)]
    assert [s["path"] for s in result["skipped"]] == [str(root / "sub/truncated.png")]
    assert "skipped" in out.err and "truncated.png" in out.err and "notes.txt" not in out.err
    for p in result["predictions"]:
        assert [t["label"] for t in p["top"]] == [CLASSES[t["index"]] for t in p["top"]]
        probs = [t["prob"] for t in p["top"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True)


def test_a_folder_leaves_out_files_that_are_not_images_by_name(grey_model, tmp_path):
    """docs/examples holds a README.md next to its images: predicting the folder neither reports nor
    skips it, while an image extension in any case (``.PNG``) is taken."""
    (tmp_path / "README.md").write_text("# Example images\n")
    (tmp_path / "labels.json").write_text("{}")
    Image.fromarray(noise((28, 28), seed=1)).save(tmp_path / "a.png")
    Image.fromarray(noise((28, 28), seed=2)).save(tmp_path / "B.PNG")
    notes: list[str] = []
    report = predict_images(grey_model, [tmp_path], topk=1, warn=notes.append)
    assert [p.path for p in report.predictions] == [str(tmp_path / "B.PNG"), str(tmp_path / "a.png")]
    assert report.skipped == [] and not any("README" in n for n in notes)


def test_batching_does_not_change_results(grey_model, tmp_path):
    model = grey_model
    for i in range(5):
        Image.fromarray(noise((28 + 3 * i, 30), seed=10 + i)).save(tmp_path / f"{i}.png")
    one = predict_images(model, [tmp_path], topk=10, batch_size=1).predictions
    many = predict_images(model, [tmp_path], topk=10, batch_size=4).predictions
    assert [p.path for p in one] == [p.path for p in many]
    for a, b in zip(one, many, strict=True):
        assert a.indices == b.indices
        np.testing.assert_allclose(a.probs, b.probs, atol=1e-6)


def test_missing_class_names_fall_back_to_indices(tmp_path, capsys):
    tntvision.save_model(tntvision.create_model("tnt_mini_patch4_28"), tmp_path / "model")
    img = tmp_path / "x.png"
    Image.fromarray(noise((28, 28))).save(img)
    assert main(["predict", "--checkpoint", str(tmp_path / "model"), str(img), "--topk", "10", "--json"]) == 0
    out = capsys.readouterr()
    top = json.loads(out.out)["predictions"][0]["top"]
    assert sorted(t["label"] for t in top) == sorted(str(i) for i in range(10))
    assert all(t["label"] == str(t["index"]) for t in top)
    assert "no class names" in out.err
    assert main(["predict", "--checkpoint", str(tmp_path / "model"), str(tmp_path / "missing.png")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1  # the error alone, no note before it


def test_topk_is_capped_and_validated(grey_model, tmp_path):
    model = grey_model
    img = tmp_path / "x.png"
    Image.fromarray(noise((28, 28))).save(img)
    pred = predict_images(model, [img], topk=50).predictions[0]
    assert sorted(pred.indices) == list(range(10))
    assert abs(sum(pred.probs) - 1) < 1e-5
    with pytest.raises(InputError):
        predict_images(model, [img], topk=0)


def test_explicit_non_image_and_missing_paths_raise(grey_model, tmp_path):
    model = grey_model
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    with pytest.raises(DataError, match="not a readable image"):
        predict_images(model, [bad])
    with pytest.raises(InputError, match="no such file"):
        predict_images(model, [tmp_path / "missing.png"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no image files"):
        predict_images(model, [tmp_path / "empty"])
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "README.md").write_text("no images here")
    with pytest.raises(InputError, match="no image files"):
        predict_images(model, [tmp_path / "docs"])


def test_bad_input_exits_2_with_one_line(grey_model_dir, tmp_path, capsys):
    img = tmp_path / "x.png"
    Image.fromarray(noise((28, 28))).save(img)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    cases = [
        ([str(grey_model_dir), str(tmp_path / "missing.png")], "no such file"),
        ([str(grey_model_dir), str(text)], "not a readable image"),
        ([str(text), str(img)], "not a weights file"),  # a checkpoint that is not a model
        ([str(tmp_path / "nowhere"), str(img)], "no such file"),
    ]
    for (ckpt, image), msg in cases:
        assert main(["predict", "--checkpoint", ckpt, image]) == 2
        out = capsys.readouterr()
        assert msg in out.err and len(out.err.strip().splitlines()) == 1
        assert out.out == ""
    # The same through a real process: no traceback.
    proc = subprocess.run(
        [sys.executable, "-m", "tntvision.cli", "predict", "--checkpoint", str(grey_model_dir), str(text)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stdout == ""
