"""`tnt eval`: its numbers equal a hand computation on a tiny ImageFolder set; bad input exits 2."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import tntvision
from tntvision.cli import main
from tntvision.data import eval_transform, open_image
from tntvision.errors import DataError, InputError
from tntvision.tools.evaluate import evaluate_checkpoint, report_folder

CLASSES = [f"class_{i}" for i in range(10)]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """val/<class>/ with 2-3 images per class, of different sizes and modes."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for k, name in enumerate(CLASSES):
        folder = root / "val" / name
        folder.mkdir(parents=True)
        for j in range(2 + k % 2):
            side = 20 + 4 * j + k
            arr = rng.integers(0, 256, (side, side + 3, 3), dtype=np.uint8)
            arr = (arr // 2 + 12 * k).astype(np.uint8)  # brightness differs by class
            img = Image.fromarray(arr)
            (img.convert("L") if j == 1 else img).save(folder / f"{j}.png")
    return root


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """A run folder (config.yaml beside model/) holding a random tnt_mini with class names."""
    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("run")
    (run / "config.yaml").write_text("model: tnt_mini_patch4_28\n")
    model = tntvision.create_model("tnt_mini_patch4_28")
    with torch.no_grad():  # spread the predictions over classes so the confusion matrix is not one column
        model.head.weight.mul_(50)
    tntvision.save_model(model, run / "model", class_names=CLASSES)
    return run


def hand_metrics(model, root):
    """Top-1, top-5 (percent), mean cross-entropy, per-class accuracy and confusion, image by image."""
    transform = eval_transform(model.meta)
    items = [
        (transform(open_image(path)), label)
        for label, name in enumerate(CLASSES)
        for path in sorted((root / "val" / name).iterdir())
    ]
    with torch.no_grad():
        all_logits = model.eval()(
            torch.stack([x for x, _ in items])
        )  # (n, 10): one forward, rows independent
    confusion = np.zeros((10, 10), dtype=np.int64)
    losses, top1, top5 = [], 0, 0
    for logits, (_, label) in zip(all_logits, items, strict=True):
        losses.append(-torch.log_softmax(logits.double(), 0)[label].item())
        ranked = logits.argsort(descending=True).tolist()
        top1 += ranked[0] == label
        top5 += label in ranked[:5]
        confusion[label, ranked[0]] += 1
    n = len(losses)
    per_class = {c: 100.0 * confusion[i, i] / confusion[i].sum() for i, c in enumerate(CLASSES)}
    return {
        "top1": 100.0 * top1 / n,
        "top5": 100.0 * top5 / n,
        "loss": float(np.mean(losses)),
        "n": n,
        "per_class": per_class,
        "confusion": confusion,
    }


@pytest.fixture(scope="module")
def expected(image_folder, run_folder):
    return hand_metrics(tntvision.load_model(run_folder), image_folder)


def test_eval_matches_hand_computation(image_folder, run_folder, expected, capsys):
    assert len(set(np.argmax(expected["confusion"], axis=1))) > 1  # predictions are not all one class

    args = ["eval", "--checkpoint", str(run_folder), "--data", str(image_folder), "--split", "val"]
    assert main([*args, "--batch-size", "4", "--json"]) == 0
    out = capsys.readouterr()
    result = json.loads(out.out)
    assert result["n"] == expected["n"] == 25
    assert result["top1"] == pytest.approx(expected["top1"], abs=1e-9)
    assert result["top5"] == pytest.approx(expected["top5"], abs=1e-9)
    assert result["loss"] == pytest.approx(expected["loss"], abs=1e-5)
    assert result["per_class"] == pytest.approx(expected["per_class"], abs=1e-9)
    np.testing.assert_array_equal(np.array(result["confusion"]), expected["confusion"])
    assert result["classes"] == CLASSES

    png = run_folder / "confusion_val.png"  # the run folder, not model/
    assert result["confusion_png"] == str(png)
    with Image.open(png) as img:
        assert img.format == "PNG" and min(img.size) >= 400
    saved = json.loads((run_folder / "eval_val.json").read_text())
    assert saved["top1"] == result["top1"] and saved["n"] == 25
    assert "eval val" in out.err  # progress bar on stderr


def test_text_output_with_uneven_batches(image_folder, run_folder, expected, tmp_path, capsys):
    args = ["eval", "--checkpoint", str(run_folder / "model"), "--data", str(image_folder), "--split", "val"]
    assert main([*args, "--batch-size", "3", "--out", str(tmp_path)]) == 0  # 25 = 8 x 3 + 1
    text = capsys.readouterr().out
    assert f"top-1 {expected['top1']:.2f}%  top-5 {expected['top5']:.2f}%" in text
    assert f"(n = {expected['n']})" in text
    for name, acc in expected["per_class"].items():
        assert f"{name:<24}{acc:6.2f}%" in text
    assert str(tmp_path / "confusion_val.png") in text and (tmp_path / "confusion_val.png").is_file()


def test_autocast_option(image_folder, run_folder, expected, tmp_path):
    modes = []  # (autocast on, its dtype) at every forward of a whole model
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda m, *_: (
            modes.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
            if hasattr(m, "pretrained_cfg")
            else None
        )
    )
    try:
        result = evaluate_checkpoint(
            run_folder, str(image_folder), split="val", amp="bfloat16", out=tmp_path, progress=False
        )
    finally:
        hook.remove()
    assert modes and set(modes) == {(True, torch.bfloat16)}
    assert result.n == 25 and int(result.confusion.sum()) == 25
    assert 0 < abs(result.loss - expected["loss"]) < 0.1  # bf16 rounding: different, and only slightly
    with pytest.raises(InputError):
        evaluate_checkpoint(run_folder, str(image_folder), split="val", amp="fp8", progress=False)


def test_bf16_weights_option(image_folder, run_folder, expected, tmp_path, capsys):
    result = evaluate_checkpoint(
        run_folder, str(image_folder), split="val", dtype="bfloat16", out=tmp_path, progress=False
    )
    assert result.n == 25 and int(result.confusion.sum()) == 25
    assert abs(result.loss - expected["loss"]) < 0.1  # bf16 rounding only
    assert result.loss != expected["loss"]  # it really ran in bf16
    args = ["eval", "--checkpoint", str(run_folder), "--data", str(image_folder), "--split", "val"]
    assert main([*args, "--dtype", "bfloat16", "--out", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 25
    with pytest.raises(InputError):
        evaluate_checkpoint(run_folder, str(image_folder), split="val", dtype="float16", progress=False)


def test_report_folder(run_folder, tmp_path):
    assert report_folder(run_folder) == run_folder
    assert report_folder(run_folder / "model") == run_folder
    assert report_folder(run_folder / "model" / "model.safetensors") == run_folder
    (tmp_path / "model").mkdir()
    assert report_folder(tmp_path / "model") == tmp_path / "model"  # no run folder around it


def test_missing_class_names_are_noted(image_folder, tmp_path, capsys):
    tntvision.save_model(tntvision.create_model("tnt_mini_patch4_28"), tmp_path / "m")
    notes = []
    result = evaluate_checkpoint(
        tmp_path / "m", str(image_folder), split="val", progress=False, warn=notes.append
    )
    assert result.n == 25 and result.classes == CLASSES
    assert any("no class names" in n for n in notes)


def test_class_mismatch_and_bad_input_exit_2(image_folder, run_folder, tmp_path, capsys):
    other = tntvision.create_model("tnt_mini_patch4_28")
    tntvision.save_model(other, tmp_path / "shuffled", class_names=CLASSES[::-1])
    tntvision.save_model(
        tntvision.create_model("tnt_mini_patch4_28", num_classes=3),
        tmp_path / "three",
        class_names=["a", "b", "c"],
    )
    (tmp_path / "notes.txt").write_text("hello")
    data = str(image_folder)
    cases = [
        (["--checkpoint", str(tmp_path / "shuffled"), "--data", data], "another order"),
        (["--checkpoint", str(tmp_path / "three"), "--data", data], "3"),
        (["--checkpoint", str(run_folder), "--data", str(tmp_path / "nowhere")], "no such data folder"),
        (["--checkpoint", str(tmp_path / "notes.txt"), "--data", data], "not a weights file"),
        (["--checkpoint", str(tmp_path / "missing"), "--data", data], "no such file"),
    ]
    for args, msg in cases:
        assert main(["eval", *args, "--split", "val"]) == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(DataError):
        evaluate_checkpoint(tmp_path / "three", data, split="val", progress=False)
