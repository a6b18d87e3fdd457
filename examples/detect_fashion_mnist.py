"""Train a Faster R-CNN with a TNT backbone on canvases of real Fashion-MNIST items, on the CPU.

Each canvas (96 x 96 by default, grey repeated to 3 channels, black background) holds 1 to 4 items cut
from the real Fashion-MNIST (IDX files from ``$TNT_FASHION_MNIST_DIR`` or
``/usr/share/datasets/fashion-mnist``), each scaled to 16-40 px (the side of its 28 x 28 image) and
placed at random without overlapping another item's box; a box is tightened to its item's non-zero pixels
and labelled with its class.
Training canvases are drawn afresh for every step from the 60,000 training images (seeded by
``--seed`` and the step); the held-out canvases come from the 10,000 test images (seeded too).

The detector is torchvision's ``FasterRCNN`` on :func:`tntvision.detection.tnt_fpn_backbone` (default
``tnt_mini_patch4_28`` at the canvas size, 3 input channels: strides 4, 8, 16, 32 + pool, FPN of 64
channels), with anchors of 12-256 px and a light box head (TwoMLPHead of 256). AdamW, linear warm-up
then cosine to zero over ``--steps`` or ``--minutes`` (whichever ends first). Then box mAP on the
held-out canvases (torchmetrics' ``MeanAveragePrecision``, COCO's mAP@[.5:.95] and mAP@0.5, per class).

Usage::

    OMP_NUM_THREADS=2 python examples/detect_fashion_mnist.py --out runs/det --minutes 10
    python examples/detect_fashion_mnist.py --out runs/det --pretrained runs/fm/model   # start from a
        # classifier trained by `make demo` / `tnt train` (its 1-channel stem is adapted to 3 channels)

Options: ``--out DIR`` (required), ``--minutes M`` (training time budget, default 10), ``--steps N``
(stop after N steps, default: no limit), ``--batch-size B`` (8), ``--lr LR`` (2e-4), ``--model NAME``
(tnt_mini_patch4_28), ``--pretrained PATH``, ``--canvas PX`` (96), ``--eval-canvases N`` (300),
``--seed S`` (0).

Writes into ``--out``: ``summary.json`` (mAP numbers, steps, images seen, times, loss history, arguments),
``detections.png`` (predicted boxes with class names and scores on held-out canvases, ground truth
dashed) and ``detector.pt`` (the detector's state dict). Needs the ``detection`` extra
(``pip install 'tntvision[detection]'``: torchmetrics and pycocotools).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from tntvision.data.datasets import FASHION_MNIST_CLASSES, FashionMNIST
from tntvision.detection import tnt_fpn_backbone
from tntvision.errors import DependencyError, UserError
from tntvision.models.registry import get_model_entry

CLASS_NAMES = ["background", *FASHION_MNIST_CLASSES]  # detector label = Fashion-MNIST class + 1

# a canvas: image (S, S) uint8, boxes (k, 4) xyxy float32, labels (k,) int64 in 1..10
Canvas = tuple[np.ndarray, np.ndarray, np.ndarray]


# ------------------------------------------------------------------------------------------- data


def make_canvas(
    images: torch.Tensor,
    labels: torch.Tensor,
    rng: np.random.Generator,
    *,
    canvas: int = 96,
    max_items: int = 4,
    min_size: int = 16,
    max_size: int = 40,
    tries: int = 30,
) -> Canvas:
    """One canvas of 1..``max_items`` items of ``images`` (N, 28, 28) uint8, with tight boxes and labels.

    Boxes are (x0, y0, x1, y1) in pixel-edge coordinates: the item's non-zero pixels are the columns
    x0 .. x1-1 and rows y0 .. y1-1. Items never overlap another item's box (a placement that would is
    drawn again, up to ``tries`` times, then the item is left out); the first item always fits.
    """
    if not 0 < min_size <= max_size <= canvas:
        raise ValueError(f"need 0 < min_size <= max_size <= canvas, got {min_size}, {max_size}, {canvas}")
    img = np.zeros((canvas, canvas), dtype=np.uint8)
    boxes: list[list[int]] = []
    classes: list[int] = []
    for _ in range(int(rng.integers(1, max_items + 1))):
        idx = int(rng.integers(len(images)))
        size = int(rng.integers(min_size, max_size + 1))
        tile = images[idx][None, None].float()  # (1, 1, 28, 28)
        tile = F.interpolate(tile, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        tile = tile[0, 0].round().clamp(0, 255).to(torch.uint8).numpy()  # (size, size)
        rows, cols = np.nonzero(tile)
        if len(rows) == 0:
            continue  # an empty image: nothing to detect
        r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1  # tight, within the tile
        for _ in range(tries):
            y, x = (int(v) for v in rng.integers(0, canvas - size + 1, size=2))
            box = [x + c0, y + r0, x + c1, y + r1]
            if all(box[2] <= b[0] or b[2] <= box[0] or box[3] <= b[1] or b[3] <= box[1] for b in boxes):
                break
        else:
            continue
        region = img[y : y + size, x : x + size]
        np.maximum(region, tile, out=region)  # the tile's zero pixels leave other items untouched
        boxes.append(box)
        classes.append(int(labels[idx]) + 1)
    return img, np.asarray(boxes, dtype=np.float32).reshape(-1, 4), np.asarray(classes, dtype=np.int64)


def make_canvases(images: torch.Tensor, labels: torch.Tensor, *, count: int, seed: int, **kw) -> list[Canvas]:
    """``count`` canvases drawn with ``np.random.default_rng(seed)`` (see :func:`make_canvas`)."""
    rng = np.random.default_rng(seed)
    return [make_canvas(images, labels, rng, **kw) for _ in range(count)]


def to_inputs(canvases: list[Canvas]) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Canvases -> torchvision's detection inputs: images (3, S, S) in [0, 1] and target dicts."""
    images = [torch.from_numpy(img).float().div(255).expand(3, -1, -1) for img, _, _ in canvases]
    targets = [dict(boxes=torch.from_numpy(b), labels=torch.from_numpy(lab)) for _, b, lab in canvases]
    return images, targets


# ------------------------------------------------------------------------------------------ model


def build_detector(model: str, pretrained: str | None, *, canvas: int) -> torch.nn.Module:
    """Faster R-CNN on a TNT FPN backbone, sized for ``canvas``-pixel images of 16-40 px items."""
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead

    overrides = dict(in_chans=3)
    if "img_size" in {f.name for f in dataclasses.fields(get_model_entry(model).config)}:
        overrides["img_size"] = canvas  # position table built (or resampled once) for the canvas grid
    backbone = tnt_fpn_backbone(model, pretrained, out_channels=64, **overrides)
    if hasattr(backbone.body.model, "set_lean_backward"):
        backbone.body.model.set_lean_backward(False)  # faster for a small model (same numbers)
    meta = getattr(backbone.body.model, "meta", None)
    mean = list(meta.mean) if meta is not None else [0.5] * 3
    std = list(meta.std) if meta is not None else [0.5] * 3
    sizes = ((12, 16), (24, 32), (48, 64), (96, 128), (192, 256))  # per level: strides 4, 8, 16, 32, 64
    anchors = AnchorGenerator(sizes=sizes, aspect_ratios=((0.5, 1.0, 2.0),) * 5)
    return FasterRCNN(
        backbone,
        num_classes=None,  # given by the box predictor
        min_size=canvas,  # no resizing: canvases go in at their size
        max_size=canvas,
        image_mean=mean,
        image_std=std,
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=600,
        rpn_post_nms_top_n_train=300,
        rpn_pre_nms_top_n_test=300,
        rpn_post_nms_top_n_test=150,
        box_head=TwoMLPHead(backbone.out_channels * 7 * 7, 256),
        box_predictor=FastRCNNPredictor(256, len(CLASS_NAMES)),
        box_batch_size_per_image=64,
        box_detections_per_img=30,
    )


# -------------------------------------------------------------------------------------- train/eval


def train(detector, train_set, args) -> dict:
    """Train for ``args.steps`` steps or ``args.minutes`` minutes; returns step counts, times, losses."""
    images, labels = train_set
    params = [p for p in detector.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05)
    budget = args.minutes * 60 if args.minutes else math.inf
    warmup = 30
    detector.train()
    history, window = [], []
    step, start = 0, time.perf_counter()
    bar = tqdm(total=args.steps or None, desc="train", unit="step", dynamic_ncols=True)
    while True:
        elapsed = time.perf_counter() - start
        progress = max(step / args.steps if args.steps else 0.0, elapsed / budget)
        if progress >= 1.0:
            break
        lr = args.lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * progress))
        for group in opt.param_groups:
            group["lr"] = lr
        rng = np.random.default_rng([args.seed, step])
        batch = [make_canvas(images, labels, rng, canvas=args.canvas) for _ in range(args.batch_size)]
        inputs, targets = to_inputs(batch)
        losses = detector(inputs, targets)  # dict of the RPN's and the box head's losses
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        opt.step()
        step += 1
        window.append({k: v.item() for k, v in losses.items()} | {"loss": loss.item()})
        if len(window) == 20:
            history.append({"step": step} | {k: round(sum(w[k] for w in window) / 20, 4) for k in window[0]})
            bar.set_postfix(loss=f"{history[-1]['loss']:.3f}", lr=f"{lr:.1e}")
            window = []
        bar.update()
    bar.close()
    seconds = time.perf_counter() - start
    return dict(
        steps=step, images_seen=step * args.batch_size, train_seconds=round(seconds, 1), history=history
    )


@torch.no_grad()
def evaluate(detector, canvases: list[Canvas], *, batch_size: int = 16) -> tuple[dict, list]:
    """Box mAP on ``canvases`` (torchmetrics, pycocotools backend); returns the numbers and predictions."""
    from torchmetrics.detection import MeanAveragePrecision

    metric = MeanAveragePrecision(
        box_format="xyxy", iou_type="bbox", class_metrics=True, backend="pycocotools"
    )
    detector.eval()
    predictions = []
    for i in tqdm(range(0, len(canvases), batch_size), desc="eval", unit="batch", dynamic_ncols=True):
        inputs, targets = to_inputs(canvases[i : i + batch_size])
        preds = detector(inputs)  # list of dicts: boxes (k, 4), labels (k,), scores (k,)
        metric.update(preds, targets)
        predictions.extend(preds)
    res = metric.compute()
    per_class = {}
    for cls, ap in zip(res["classes"].tolist(), res["map_per_class"].tolist(), strict=True):
        per_class[CLASS_NAMES[int(cls)]] = round(ap, 4)
    out = {k: round(float(res[k]), 4) for k in ("map", "map_50", "map_75", "mar_100")}
    return out | {"map_per_class": per_class}, predictions


def draw(canvases: list[Canvas], predictions: list, path: Path, *, threshold: float = 0.3) -> None:
    """Held-out canvases with predicted boxes (score >= threshold: class and score) and dashed truth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    n = min(8, len(canvases))
    cols = 4
    fig, axes = plt.subplots(math.ceil(n / cols), cols, figsize=(3.2 * cols, 3.3 * math.ceil(n / cols)))
    for ax, (img, boxes, _), pred in zip(np.ravel(axes), canvases[:n], predictions[:n], strict=False):
        ax.imshow(img, cmap="gray", vmin=0, vmax=255)
        for x0, y0, x1, y1 in boxes:
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="lime", ls="--", lw=0.8))
        for box, label, score in zip(pred["boxes"], pred["labels"], pred["scores"], strict=True):
            if score < threshold:
                continue
            x0, y0, x1, y1 = box.tolist()
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="red", lw=1.2))
            name = CLASS_NAMES[int(label)]
            style = dict(facecolor="red", alpha=0.7, pad=0.5, lw=0)
            ax.text(x0, y0 - 1, f"{name} {score:.2f}", color="white", fontsize=6.5, va="bottom", bbox=style)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in np.ravel(axes)[n:]:
        ax.axis("off")
    fig.suptitle(f"predictions (red, score >= {threshold}) and ground truth (green, dashed)", fontsize=9)
    fig.tight_layout(h_pad=1.2)
    fig.savefig(path, dpi=130)
    plt.close(fig)


# ------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--minutes", type=float, default=10.0, help="training time budget (0: none)")
    p.add_argument("--steps", type=int, default=0, help="stop after this many steps (0: no limit)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--model", default="tnt_mini_patch4_28")
    p.add_argument("--pretrained", default=None, help="weights for the backbone (file, model or run folder)")
    p.add_argument("--canvas", type=int, default=96, help="canvas side in pixels")
    p.add_argument("--eval-canvases", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not args.minutes and not args.steps:
        p.error("give --minutes or --steps")
    if args.batch_size < 1 or args.eval_canvases < 1:
        p.error("--batch-size and --eval-canvases must be at least 1")
    if args.canvas < 40:
        p.error("--canvas must be at least 40 pixels (the largest item)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for module, package in (("torchmetrics", "torchmetrics"), ("pycocotools", "pycocotools")):
        try:
            __import__(module)
        except ImportError:
            raise DependencyError(
                f"the mAP evaluation needs {package}: pip install 'tntvision[detection]'"
            ) from None
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    train_data, test_data = FashionMNIST(split="train"), FashionMNIST(split="test")
    held_out = make_canvases(
        test_data.images, test_data.targets, count=args.eval_canvases, seed=args.seed + 1, canvas=args.canvas
    )
    detector = build_detector(args.model, args.pretrained, canvas=args.canvas)
    run = train(detector, (train_data.images, train_data.targets), args)
    t0 = time.perf_counter()
    metrics, predictions = evaluate(detector, held_out)
    eval_seconds = time.perf_counter() - t0
    draw(held_out, predictions, args.out / "detections.png")
    torch.save(detector.state_dict(), args.out / "detector.pt")
    summary = {
        "model": args.model,
        "pretrained": args.pretrained,
        **{k: metrics[k] for k in ("map", "map_50", "map_75", "mar_100")},
        "map_per_class": metrics["map_per_class"],
        "eval_canvases": len(held_out),
        "eval_objects": int(sum(len(b) for _, b, _ in held_out)),
        "eval_seconds": round(eval_seconds, 1),
        **{k: run[k] for k in ("steps", "images_seen", "train_seconds")},
        "threads": torch.get_num_threads(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "loss_history": run["history"],
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"mAP@[.5:.95] {metrics['map']:.4f}  mAP@0.5 {metrics['map_50']:.4f}  ({len(held_out)} held-out "
        f"canvases, {run['steps']} steps in {run['train_seconds']:.0f} s)"
    )
    print(f"wrote {args.out / 'summary.json'}, {args.out / 'detections.png'}, {args.out / 'detector.pt'}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as e:  # a missing package or data set: one line, exit 2 (as the `tnt` CLI does)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
