"""tntvision.detection: TNT and hierarchical models as FPN backbones of torchvision's detectors."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

import tntvision
from tntvision.detection import LayerNorm2d, evenly_spaced_blocks, tnt_fpn_backbone
from tntvision.errors import ConfigError, UnknownModelError
from tntvision.models import registry

from .data_helpers import make_fashion_mnist

MINI = dict(in_chans=3)  # tnt_mini_patch4_28 is a 1-channel model; detectors feed RGB
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "detect_fashion_mnist.py"


def perturb(module: nn.Module, scale: float = 0.05) -> None:
    """Move every parameter away from its init (unit LayerNorms, zero biases and tables hide mistakes)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)


def ceil_div(size: int, stride: Fraction) -> int:
    return math.ceil(Fraction(size) / stride)


# ------------------------------------------------------------------- a stand-in hierarchical model


@dataclasses.dataclass(frozen=True)
class FakePyramidConfig:
    img_size: int = 64
    in_chans: int = 3
    num_classes: int = 0
    size_divisible: int | None = None
    reductions: tuple[int, ...] = (8, 16, 32, 64)


class FakePyramid(nn.Module):
    """Four stages at reductions 8, 16, 32, 64 (a stride-8 stem, then 2x2 / stride-2 merging convs, which
    need every stage's input even: inputs must be multiples of 64), with the features_only contract."""

    def __init__(self, cfg: FakePyramidConfig) -> None:
        super().__init__()
        chs = (8, 16, 24, 32)
        self.blocks = nn.ModuleList(
            [nn.Conv2d(cfg.in_chans, chs[0], 8, stride=8)]
            + [nn.Conv2d(chs[i], chs[i + 1], 2, stride=2) for i in range(3)]
        )
        self.feature_info = [
            dict(module=f"blocks.{i}", num_chs=c, reduction=r)
            for i, (c, r) in enumerate(zip(chs, cfg.reductions, strict=True))
        ]
        if cfg.size_divisible is not None:
            self.size_divisible = cfg.size_divisible

    def forward_intermediates(self, x, indices, *, stop_early, intermediates_only, output_fmt):
        assert intermediates_only and output_fmt == "NCHW"
        out = []
        for i in range(max(indices) + 1):
            if x.shape[-1] % self.blocks[i].stride[0] or x.shape[-2] % self.blocks[i].stride[0]:
                raise ValueError(f"stage {i} got odd size {tuple(x.shape)}")
            x = F.gelu(self.blocks[i](x))
            if i in indices:
                out.append(x)
        return out


@pytest.fixture
def fake_pyramid(monkeypatch):
    """Registers ``fake_pyramid`` (and ``fake_mixed``) for one test only."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    registry.register_model("fake_pyramid", FakePyramid, FakePyramidConfig(), registry.ModelMeta())
    registry.register_model(
        "fake_mixed", FakePyramid, FakePyramidConfig(reductions=(8, 16, 16, 32)), registry.ModelMeta()
    )
    return "fake_pyramid"


HIERARCHICAL = ["fake_pyramid", *tntvision.list_models("ptnt_*")]


def first_layer_weight(backbone) -> torch.Tensor:
    model = backbone.body.model
    if isinstance(model, tntvision.TNT):
        return model.pixel_embed.proj.weight
    # a hierarchical model's stem: its first weight matrix or kernel that is not a position table or token
    return next(p for n, p in model.named_parameters() if p.ndim >= 2 and "pos" not in n and "token" not in n)


# ----------------------------------------------------------------------------------------- pieces


def test_evenly_spaced_blocks():
    assert evenly_spaced_blocks(12) == (2, 5, 8, 11)  # the paper's blocks 3, 6, 9, 12
    assert evenly_spaced_blocks(4) == (0, 1, 2, 3)
    assert evenly_spaced_blocks(24) == (5, 11, 17, 23)
    with pytest.raises(ConfigError):
        evenly_spaced_blocks(3)


def test_layernorm2d_is_layernorm_over_channels():
    norm = LayerNorm2d(6)
    perturb(norm)
    x = torch.randn(2, 6, 3, 5)
    ref = F.layer_norm(x.permute(0, 2, 3, 1), (6,), norm.weight, norm.bias).permute(0, 3, 1, 2)
    torch.testing.assert_close(norm(x), ref)


@pytest.mark.parametrize(
    "name, overrides, patch",
    [("tnt_mini_patch4_28", MINI, 4), ("tnt_ti_patch16_224", dict(img_size=64), 16)],
)
def test_output_strides_for_odd_sizes(name, overrides, patch):
    backbone = tnt_fpn_backbone(name, out_channels=16, **overrides).eval()
    assert backbone.strides == [4, 8, 16, 32]
    assert backbone.size_divisible == patch  # inputs are padded to a multiple of the patch size only
    for H, W in [(33, 17), (64, 96), (101, 77)]:
        with torch.no_grad():
            out = backbone(torch.randn(1, 3, H, W))
        assert list(out) == ["0", "1", "2", "3", "pool"]
        for key, stride in zip(out, [4, 8, 16, 32, 64], strict=True):
            assert out[key].shape == (1, 16, math.ceil(H / stride), math.ceil(W / stride)), (key, H, W)


@pytest.mark.parametrize(
    "patch, img, strides, steps",
    [
        (8, 32, [4, 8, 16, 32], [1, 0, -1, -2]),
        (14, 28, [Fraction(7, 2), 7, 14, 28], [2, 1, 0, -1]),  # nearest doublings, as ViTDet
        (32, 64, [4, 8, 16, 32], [3, 2, 1, 0]),
    ],
)
def test_stride_rule_for_other_patch_sizes(patch, img, strides, steps):
    backbone = tnt_fpn_backbone("tnt_mini_patch4_28", out_channels=8, patch_size=patch, img_size=img, **MINI)
    assert backbone.strides == strides
    deconvs = [sum(isinstance(m, nn.ConvTranspose2d) for m in level.modules()) for level in backbone.neck]
    assert deconvs == [max(s, 0) for s in steps]
    H, W = 2 * patch + 3, 3 * patch - 1
    with torch.no_grad():
        out = backbone.eval()(torch.randn(1, 3, H, W))
    for key, stride in zip(["0", "1", "2", "3"], strides, strict=True):
        assert out[key].shape[-2:] == (ceil_div(H, Fraction(stride)), ceil_div(W, Fraction(stride)))


def test_neck_numbers_follow_the_recipe():
    """FPN inputs = blocks 3/6/9/12 through deconv-norm-GELU-deconv, deconv, identity, 2x max pool."""
    backbone = tnt_fpn_backbone("tnt_ti_patch16_224", out_channels=8, img_size=64, neck_norm="group").eval()
    perturb(backbone)
    seen = {}
    backbone.fpn.register_forward_pre_hook(lambda _m, args: seen.update(args[0]))
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        backbone(x)
        f = backbone.body.model.forward_intermediates(x, [2, 5, 8, 11], intermediates_only=True)
        up4 = backbone.neck[0]
        assert [type(m) for m in up4] == [nn.ConvTranspose2d, nn.GroupNorm, nn.GELU, nn.ConvTranspose2d]
        ref = [
            up4[3](F.gelu(F.group_norm(up4[0](f[0]), 32, up4[1].weight, up4[1].bias))),
            backbone.neck[1][0](f[1]),
            f[2],
            F.max_pool2d(f[3], 2, ceil_mode=True),
        ]
    for i, r in enumerate(ref):
        assert r.shape[-2:] == (math.ceil(64 / 4 / 2**i), math.ceil(80 / 4 / 2**i))
        torch.testing.assert_close(seen[str(i)], r, rtol=1e-4, atol=1e-5)


def test_pretrained_weights_reach_the_body(tmp_path):
    model = tntvision.create_model("tnt_mini_patch4_28")
    perturb(model)
    tntvision.save_model(model, tmp_path / "m")
    backbone = tnt_fpn_backbone("tnt_mini_patch4_28", str(tmp_path / "m"), out_channels=8)
    torch.testing.assert_close(backbone.body.model.proj.weight, model.proj.weight)
    torch.testing.assert_close(backbone.body.model.blocks[3].mlp.fc2.weight, model.blocks[3].mlp.fc2.weight)
    assert isinstance(backbone.body.model.head, nn.Identity)  # the classifier is dropped


def test_trainable_blocks_freezes_the_rest():
    backbone = tnt_fpn_backbone("tnt_mini_patch4_28", out_channels=8, trainable_blocks=1, **MINI)
    model = backbone.body.model
    assert not model.pixel_embed.proj.weight.requires_grad and not model.patch_pos.requires_grad
    assert not any(p.requires_grad for b in model.blocks[:3] for p in b.parameters())
    assert all(p.requires_grad for p in model.blocks[3].parameters())
    assert all(p.requires_grad for p in backbone.fpn.parameters())
    frozen = tnt_fpn_backbone("tnt_mini_patch4_28", out_channels=8, trainable_blocks=0, **MINI)
    assert not any(p.requires_grad for p in frozen.body.parameters())


def test_bad_arguments_raise_config_error(fake_pyramid):
    bad = [
        dict(out_channels=0),
        dict(out_channels=2.5),
        dict(neck_norm="instance"),
        dict(fpn_norm="bogus"),
        dict(out_indices=(1, 3)),  # an isotropic model needs four blocks
        dict(out_indices=3),
        dict(trainable_blocks=5),
        dict(trainable_blocks=-1),
        dict(extra_blocks="pool"),
        dict(no_such_field=1),
    ]
    for kwargs in bad:
        with pytest.raises(ConfigError):
            tnt_fpn_backbone("tnt_mini_patch4_28", **kwargs)
    with pytest.raises(ConfigError, match="neither stay equal"):
        tnt_fpn_backbone("fake_mixed")
    with pytest.raises(UnknownModelError):
        tnt_fpn_backbone("tnt_nano")


# ------------------------------------------------------------------------------------- hierarchical


@pytest.mark.parametrize("name", HIERARCHICAL)
def test_hierarchical_maps_go_straight_into_the_fpn(name, fake_pyramid):
    backbone = tnt_fpn_backbone(name, out_channels=16).eval()
    reductions = [info["reduction"] for info in backbone.body.feature_info]
    assert backbone.neck is None and backbone.strides == reductions
    assert reductions == sorted(set(reductions))
    if name == "fake_pyramid":
        assert reductions == [8, 16, 32, 64] and backbone.size_divisible == 64
    for H, W in [(64, 96), (70, 45)]:
        with torch.no_grad():
            out = backbone(torch.randn(1, 3, H, W))
        assert list(out) == ["0", "1", "2", "3", "pool"]
        for key, stride in zip(out, [*reductions, 2 * reductions[-1]], strict=True):
            assert out[key].shape == (1, 16, math.ceil(H / stride), math.ceil(W / stride)), (key, H, W)


def test_hierarchical_size_divisible_attribute_is_used(fake_pyramid):
    registry.register_model(
        "fake_div", FakePyramid, FakePyramidConfig(size_divisible=128), registry.ModelMeta()
    )
    assert tnt_fpn_backbone("fake_div", out_channels=8).size_divisible == 128


# ----------------------------------------------------------------------------------------- detectors


def synthetic_batch(n: int = 2, H: int = 64, W: int = 96, num_classes: int = 3):
    gen = torch.Generator().manual_seed(0)
    images = [torch.rand(3, H, W, generator=gen) for _ in range(n)]
    targets = []
    for i in range(n):
        boxes = torch.tensor([[4.0, 6.0, 30.0, 40.0], [40.0, 10.0, 90.0, 58.0]]) + i
        targets.append(dict(boxes=boxes, labels=torch.tensor([1 + i % (num_classes - 1), 2])))
    return images, targets


def small_faster_rcnn(
    backbone,
    *,
    size: tuple[int, int] = (64, 96),
    num_classes: int = 3,
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0),
    representation: int = 32,
) -> FasterRCNN:
    anchors = AnchorGenerator(sizes=((16,), (32,), (64,), (128,), (256,)), aspect_ratios=(aspect_ratios,) * 5)
    return FasterRCNN(
        backbone,
        min_size=min(size),
        max_size=max(size),
        rpn_anchor_generator=anchors,
        box_head=TwoMLPHead(backbone.out_channels * 49, representation),
        box_predictor=FastRCNNPredictor(representation, num_classes),
        rpn_batch_size_per_image=64,
        box_batch_size_per_image=32,
    )


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("tnt_mini_patch4_28", MINI),
        ("tnt_ti_patch16_224", dict(img_size=64)),
        *[(n, {}) for n in HIERARCHICAL],
    ],
)
def test_faster_rcnn_trains_and_predicts(name, overrides, fake_pyramid):
    backbone = tnt_fpn_backbone(name, out_channels=16, **overrides)
    detector = small_faster_rcnn(backbone)
    images, targets = synthetic_batch()
    detector.train()
    losses = detector(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    grad = first_layer_weight(backbone).grad
    assert grad is not None and grad.abs().sum() > 0
    detector.eval()
    with torch.no_grad():
        preds = detector(images)
    assert len(preds) == 2
    for p in preds:
        assert set(p) == {"boxes", "labels", "scores"}
        assert p["boxes"].shape == (len(p["labels"]), 4) and p["scores"].shape == p["labels"].shape


# Two disjoint squares, one per image, each exactly a 32 px anchor (centres on the stride-8 grid).
SQUARES = ((8, 8, 40, 40), (56, 24, 88, 56))


def square_images() -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """One 64x96 image per square: a bright frame around a darker core on a dark background. (In a uniform
    square, a box inside it looks like the square itself to a 7x7 RoIAlign: the fit then sometimes ranks
    such a box first.)"""
    images, targets = [], []
    for x0, y0, x1, y1 in SQUARES:
        image = torch.full((3, 64, 96), 0.1)
        image[:, y0:y1, x0:x1] = 0.9
        image[:, y0 + 8 : y1 - 8, x0 + 8 : x1 - 8] = 0.4
        images.append(image)
        targets.append(
            dict(boxes=torch.tensor([[x0, y0, x1, y1]], dtype=torch.float32), labels=torch.tensor([1]))
        )
    return images, targets


def fit_squares(
    *, zero_features: bool = False, seed: int = 0, steps: int = 40
) -> tuple[list[float], list[float], list[int]]:
    """Fits a small Faster R-CNN with a TNT backbone on :func:`square_images` (AdamW, cosine decay to 0,
    both images in every step); returns the loss of each step, and per image the IoU of the top-scoring box
    with the square (0 if there is none) and that box's label. ``zero_features`` zeroes the body's feature
    maps (the neck and FPN still run)."""
    from torchvision.ops import box_iou

    torch.manual_seed(seed)
    backbone = tnt_fpn_backbone("tnt_mini_patch4_28", out_channels=16, **MINI)
    if zero_features:
        backbone.body.register_forward_hook(lambda _m, _args, feats: [torch.zeros_like(f) for f in feats])
    # square anchors only, and a wider box head than the other tests': with three aspect ratios some seeds
    # of this fit ranked a flat or a tall box inside a square first, with 32 features some put the box off
    detector = small_faster_rcnn(backbone, aspect_ratios=(1.0,), representation=128)
    images, targets = square_images()
    opt = torch.optim.AdamW(detector.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    detector.train()
    losses = []
    for _ in range(steps):
        loss = sum(detector(images, targets).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
        losses.append(loss.item())
    with torch.no_grad():
        preds = detector.eval()(images)
    ious, labels = [], []
    for pred, target in zip(preds, targets, strict=True):
        if len(pred["boxes"]) == 0:
            ious.append(0.0)
            labels.append(0)
            continue
        best = pred["scores"].argmax()
        ious.append(box_iou(pred["boxes"][best : best + 1], target["boxes"]).item())
        labels.append(pred["labels"][best].item())
    return losses, ious, labels


def test_faster_rcnn_with_the_backbone_learns_a_box():
    """A short fit on two images, each with one square at its own place, lowers the loss, and afterwards the
    detector's top box in each image is that image's square (IoU > 0.5) with the right label: the
    backbone's features carry where things are. The squares are disjoint, and a box with IoU > 0.5 with a
    square covers more than half of itself with it, so no box passes for both: a detector that found the
    same boxes in both images fails (the control below).

    The margin, measured on a Xeon (one thread): over seeds 0-47 of this fit the lowest IoU was 0.72 and the
    largest loss ratio 0.17; with seed 0, the avx512, avx512-w8, avx2 and baseline copies of the fused
    kernel and the unfused path give IoUs of 0.95-0.98 and loss ratios of 0.08-0.11."""
    losses, ious, labels = fit_squares()
    ratio = sum(losses[-3:]) / sum(losses[:3])
    assert ratio < 0.5, (ratio, losses)
    assert labels == [1, 1] and min(ious) > 0.5, (ious, labels)


def test_the_box_fit_fails_without_features():
    """The control of the test above: with the body's feature maps zeroed, everything after it sees the same
    input in both images, so it predicts the same boxes in both, and its top box cannot pass for both
    squares."""
    _, ious, _ = fit_squares(zero_features=True)
    assert min(ious) <= 0.5, ious


@pytest.mark.parametrize("kind", ["retinanet", "fcos", "maskrcnn"])
def test_other_detectors_accept_the_backbone(kind):
    size = dict(min_size=64, max_size=96)
    if kind == "maskrcnn":
        backbone = tnt_fpn_backbone("tnt_mini_patch4_28", out_channels=16, **MINI)
        detector = MaskRCNN(backbone, num_classes=3, **size)
    elif kind == "retinanet":  # its head uses GroupNorm(32, C): 32 channels at least
        backbone = tnt_fpn_backbone("tnt_mini_patch4_28", out_channels=32, **MINI)
        detector = RetinaNet(backbone, num_classes=3, **size)  # default anchors: 5 levels, as "0".."pool"
    else:  # P6 and P7 instead of "pool": six levels, so six anchor sizes
        p6p7 = LastLevelP6P7(32, 32)
        backbone = tnt_fpn_backbone("tnt_mini_patch4_28", out_channels=32, extra_blocks=p6p7, **MINI)
        anchors = AnchorGenerator(sizes=tuple((8 * 2**i,) for i in range(6)), aspect_ratios=((1.0,),) * 6)
        detector = FCOS(backbone, num_classes=3, anchor_generator=anchors, **size)
    images, targets = synthetic_batch()
    if kind == "maskrcnn":
        for t in targets:
            t["masks"] = torch.zeros(len(t["boxes"]), 64, 96, dtype=torch.uint8)
            for m, (x0, y0, x1, y1) in zip(t["masks"], t["boxes"].int().tolist(), strict=True):
                m[y0:y1, x0:x1] = 1
    losses = detector.train()(images, targets)
    assert losses and all(torch.isfinite(v) for v in losses.values())
    with torch.no_grad():
        preds = detector.eval()(images)
    assert len(preds) == 2 and all("boxes" in p and "scores" in p for p in preds)


# ------------------------------------------------------------------------------ the example's data


def load_example():
    spec = importlib.util.spec_from_file_location("detect_fashion_mnist", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_canvases_have_tight_boxes_around_their_items():
    example = load_example()
    gen = torch.Generator().manual_seed(0)
    images = torch.zeros(50, 28, 28, dtype=torch.uint8)
    for img in images:  # an item: a random patch of non-zero pixels somewhere in the 28x28 tile
        y0, x0 = torch.randint(0, 14, (2,), generator=gen).tolist()
        h, w = torch.randint(6, 14, (2,), generator=gen).tolist()
        img[y0 : y0 + h, x0 : x0 + w] = torch.randint(60, 256, (h, w), generator=gen, dtype=torch.uint8)
    labels = torch.arange(50) % 10
    canvases = example.make_canvases(images, labels, count=40, seed=3, canvas=96)
    again = example.make_canvases(images, labels, count=40, seed=3, canvas=96)
    for (img, boxes, classes), (img2, boxes2, _) in zip(canvases, again, strict=True):
        assert np.array_equal(img, img2) and np.array_equal(boxes, boxes2)  # seeded
        assert img.shape == (96, 96) and img.dtype == np.uint8
        assert 1 <= len(boxes) <= 4 and boxes.shape == (len(classes), 4)
        assert ((classes >= 1) & (classes <= 10)).all()
        assert (
            (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= 96).all() and (boxes[:, 2:] > boxes[:, :2]).all()
        )
        covered = np.zeros_like(img, dtype=bool)
        for x0, y0, x1, y1 in boxes.astype(int):
            inside = img[y0:y1, x0:x1] > 0
            assert (
                inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
            )  # tight
            assert not covered[y0:y1, x0:x1].any()  # boxes do not overlap
            covered[y0:y1, x0:x1] = True
        assert not (img[~covered] > 0).any()  # every item pixel lies in a box
    inputs, targets = example.to_inputs(canvases[:2])
    assert inputs[0].shape == (3, 96, 96) and inputs[0].max() <= 1
    assert targets[0]["boxes"].dtype == torch.float32 and targets[0]["labels"].dtype == torch.int64


def test_example_runs_end_to_end(tmp_path, monkeypatch):
    """Two training steps and the evaluation on a small Fashion-MNIST-format folder: all outputs written."""
    import torchmetrics  # noqa: F401  (the detection extra, in dev: its absence fails, not skips)

    monkeypatch.setenv("TNT_FASHION_MNIST_DIR", str(make_fashion_mnist(tmp_path / "fm", n_train=64)))
    example = load_example()
    out = tmp_path / "run"
    argv = ["--out", str(out), "--steps", "2", "--minutes", "0", "--eval-canvases", "4", "--canvas", "64"]
    assert example.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["images_seen"] == 16 and summary["eval_canvases"] == 4
    assert 0.0 <= summary["map_50"] <= 1.0 and 0.0 <= summary["map"] <= summary["map_50"]
    assert (out / "detections.png").stat().st_size > 0
    state = torch.load(out / "detector.pt", weights_only=True)
    assert any(k.startswith("backbone.fpn.") for k in state)
