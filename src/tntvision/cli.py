"""The `tnt` command: argument parsing only, one small function per sub-command.

Contract (docs/cli.md): every sub-command takes --help; with --json, stdout carries exactly one JSON object
(under torchrun, rank 0's only); logs and progress go to stderr; a user error (bad argument, missing or
unwritable file, bad data, a full disk) exits 2 with a one-line message on stderr (`--verbose`, before or
after the sub-command, adds the chain of causes); an interrupted run exits 130; anything else, e.g. an
OSError about a path the user did not name, is the project's bug: exit 1 with a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .errors import UserError
from .utils.messages import log_stderr


def emit(args: argparse.Namespace, obj: Any, text: str | Callable[[], str]) -> None:
    """Print ``obj`` as one JSON object with --json, else the human-readable ``text``."""
    if getattr(args, "json", False):
        sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    else:
        sys.stdout.write((text() if callable(text) else text).rstrip("\n") + "\n")


log = log_stderr  # a line for the user on stderr (stdout is kept for results)

# --runtime of eval / predict / bench (tntvision.tools.exported.RUNTIMES; not imported here: it loads torch)
RUNTIMES = ("onnxruntime", "openvino", "torch")
RUNTIME_HELP = (
    "what runs the checkpoint: an .onnx file onnxruntime (default) or openvino; "
    "PyTorch checkpoints and .pt2 files run in torch (their only runtime)"
)


# ------------------------------------------------------------------------------------------ commands


def cmd_models(args: argparse.Namespace) -> None:
    from . import list_models

    if not args.pretrained:
        names = list_models(args.pattern)
        emit(args, {"models": names}, "\n".join(names))
        return
    from .models import get_pretrained_tag, list_pretrained

    tags = [get_pretrained_tag(n) for n in list_pretrained(args.pattern)]

    def text() -> str:
        rows = [f"{'name':<34}{'top-1':>7}  {'by':<9}{'license':<12}{'input':<9}source"]
        for t in tags:
            where = t.location if t.downloadable else f"by hand: {t.notes}"
            rows.append(f"{t.name:<34}{t.top1:>7.3f}  {t.top1_by.split()[0]:<9}{t.license:<12}"
                        f"{t.meta.input_size[1]:<9}{t.source}: {where}")  # fmt: skip
        return "\n".join(rows)

    emit(args, {"pretrained": [t.to_dict() for t in tags]}, text)


def cmd_info(args: argparse.Namespace) -> None:
    from .tools.info import model_info

    info = model_info(args.model, img_size=args.img_size)

    def text() -> str:
        lines = [
            f"model       {info['model']}",
            f"params      {info['params']:,} trainable ({info['params_total']:,} total)",
            f"MACs        {info['macs'] / 1e9:.3f} G at {info['img_size']}x{info['img_size']}",
            "config",
        ]
        lines += [f"  {k:<16}{v}" for k, v in info["config"].items()]
        lines += ["input"] + [f"  {k:<16}{v}" for k, v in info["meta"].items()]
        return "\n".join(lines)

    emit(args, info, text)


def cmd_convert(args: argparse.Namespace) -> None:
    from .models import save_model
    from .models.saving import model_from_weights

    model = model_from_weights(args.src, name=args.model, use_ema=not args.no_ema)
    out = save_model(model, args.out)
    for line in model.load_report.lines():
        log(line)
    cfg = model.cfg
    result = {
        "model": model.model_name,
        "out": str(out),
        "num_classes": cfg.num_classes,
        "img_size": cfg.img_size,
    }
    emit(args, result, f"wrote {out} ({model.model_name}, {cfg.num_classes} classes, {cfg.img_size}px)")


def cmd_predict(args: argparse.Namespace) -> None:
    from .tools.checkpoints import open_model
    from .tools.predict import predict_images
    from .utils.amp import weight_dtype
    from .utils.devices import resolve_device

    device = resolve_device(args.device)  # before the checkpoint is read
    model = open_model(_source(args), runtime=args.runtime, merge_tokens=args.merge_tokens)
    dtype = weight_dtype(args.dtype)
    report = predict_images(
        model,
        args.images,
        topk=args.topk,
        batch_size=args.batch_size,
        device=device,
        dtype=dtype,
        warn=log,
    )

    def text() -> str:
        lines = []
        for p in report.predictions:
            top = ", ".join(f"{lab} {prob:.3f}" for lab, prob in zip(p.labels, p.probs, strict=True))
            lines.append(f"{p.path}: {top}")
        return "\n".join(lines) or "no images"

    emit(args, report.to_dict(), text)


def _int_list(text: str | None, what: str) -> list[int] | None:
    """'1,6,12' -> [1, 6, 12]; a user error for anything else."""
    if text is None:
        return None
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        from .errors import InputError

        raise InputError(f"{what} must be comma-separated integers, got {text!r}") from None


def cmd_visualize(args: argparse.Namespace) -> None:
    from .tools.checkpoints import refuse_exported
    from .tools.visualize import visualize

    refuse_exported(args.checkpoint, why="it has no attention maps or block outputs to draw")
    source = _source(args)
    source.check(random_ok=True)
    model = source.load_pytorch()
    report = visualize(
        model,
        args.image,
        args.out,
        blocks=_int_list(args.blocks, "--blocks"),
        patch=_int_list(args.patch, "--patch"),
        words=[_int_list(w, "--words") for w in args.words] if args.words else None,
        img_size=args.img_size,
        warn=log,
    )
    if args.checkpoint is None and not args.pretrained:
        log(f"note: {args.model} has random weights; the figures show structure, not learned attention")
    emit(args, report.to_dict(), lambda: "\n".join(f"wrote {p}" for p in report.figures.values()))


def cmd_eval(args: argparse.Namespace) -> None:
    from .tools.evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(
        _source(args),
        args.data,
        split=args.split,
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
        amp=args.amp,
        dtype=args.dtype,
        out=args.out,
        runtime=args.runtime,
        merge_tokens=args.merge_tokens,
        warn=log,
    )

    def text() -> str:
        lines = [
            f"{args.split}: top-1 {result.top1:.2f}%  top-5 {result.top5:.2f}%  loss {result.loss:.4f}  "
            f"(n = {result.n})",
            "per-class accuracy:",
        ]
        for name, acc in result.per_class.items():
            lines.append(f"  {name:<24}{'-' if acc is None else f'{acc:6.2f}%'}")
        lines.append(f"confusion matrix: {result.confusion_png}")
        return "\n".join(lines)

    emit(args, result.to_dict(), text)


def cmd_export(args: argparse.Namespace) -> None:
    from .tools.export import export_model

    result = export_model(
        _source(args),
        format=args.format,
        out=args.out,
        img_size=args.img_size,
        opset=args.opset,
        quantize=args.quantize,
        calibrate=args.calibrate,
        calibration_images=args.calibration_images,
        merge_tokens=args.merge_tokens,
        warn=log,
    )
    size = "x".join(str(s) for s in result.input_size[1:])
    emit(
        args,
        result.to_dict(),
        f"wrote {result.out} ({result.model}, {result.format}"
        + (f" {result.quantize}" if result.quantize else "")
        + f", {size} px, dynamic batch, {result.size_bytes / 1e6:.1f} MB; "
        f"max |logit - PyTorch's| {result.max_abs_diff:.2e})",
    )


def cmd_bench(args: argparse.Namespace) -> None:
    from .tools.bench import bench_model, format_report

    if (args.pretrained or args.revision) and args.model is None:
        from .errors import ConfigError

        raise ConfigError("--pretrained takes the published weights of --model NAME[.TAG]")
    if args.checkpoint is not None:
        from .tools.exported import bench_exported, format_bench

        if (
            args.compare
            or args.train
            or args.dtype != "float32"
            or args.amp != "none"
            or args.compile
            or args.profile
            or args.merge_tokens
        ):
            from .errors import ConfigError

            raise ConfigError("--checkpoint FILE times the file and PyTorch in float32 inference only")
        result = bench_exported(
            args.checkpoint,
            batch_size=args.batch_size,
            rounds=args.rounds,
            warmup=args.warmup,
            threads=args.threads,
            runtime=args.runtime,
        )
        emit(args, result, lambda: format_bench(result))
        return
    if args.runtime not in (None, "torch"):
        from .errors import ConfigError

        raise ConfigError(
            f"--runtime {args.runtime} runs an .onnx file (--checkpoint FILE.onnx); --model runs in PyTorch"
        )
    if args.compare:
        log(f"timing ours and {', '.join(args.compare)} interleaved; peak memory in child processes")
    result = bench_model(
        model_name=args.model,
        batch_size=args.batch_size,
        dtype=args.dtype,
        amp=args.amp,
        train=args.train,
        compare=args.compare or (),
        rounds=args.rounds,
        warmup=args.warmup,
        latency_rounds=2 * args.rounds,
        memory=not args.no_memory,
        compile=args.compile,
        threads=args.threads,
        device=args.device,
        lean_backward=not args.keep_activations,
        profile=args.profile,
        merge_tokens=args.merge_tokens,
        pretrained=args.pretrained,
        revision=args.revision,
    )
    emit(args, result, lambda: format_report(result))


def cmd_kernels(args: argparse.Namespace) -> None:
    from . import kernels

    if args.action == "build":
        where = kernels.build()
        log(f"fused CPU kernel built in {where}")
    info = kernels.kernels_info()

    def text(v) -> str:
        if isinstance(v, dict):
            return ", ".join(f"{k}={text(x)}" for k, x in v.items())
        return ",".join(v) if isinstance(v, list) else str(v)

    emit(args, info, lambda: "\n".join(f"{k:<17}{text(v)}" for k, v in info.items()))


def cmd_serve(args: argparse.Namespace) -> int:
    from .utils.deps import require

    for module in ("fastapi", "uvicorn", "prometheus_client", "python_multipart"):
        require(module, "tnt serve", extra="serve")
    from .serve import ServeOptions, serve

    options = ServeOptions(
        checkpoint=_source(args),
        runtime=args.runtime,
        dtype=args.dtype,
        device=args.device,
        host=args.host,
        port=args.port,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        threads=args.threads,
        max_upload_mb=args.max_upload_mb,
        max_pixels=args.max_pixels,
        topk=args.topk,
        max_queue=args.max_queue,
        timeout_s=args.timeout or None,  # 0: no deadline
        name=args.name,
        drain_s=args.drain_s,
        stop_delay_s=args.stop_delay_s,
    )
    return serve(options, log=log, announce=lambda line: print(line, flush=True))


def cmd_train(args: argparse.Namespace) -> int:
    from .train import parse_set, resolve_train_config, train
    from .train.distributed import is_main_process

    overrides = parse_set(args.set or [])
    for key, value in (
        ("model", args.model),
        ("data", args.data),
        ("out", args.out),
        ("epochs", args.epochs),
        ("time_budget", args.time_budget),
        ("batch_size", args.batch_size),
        ("img_size", args.img_size),
        ("pretrained", args.pretrained),
        ("seed", args.seed),
        ("workers", args.workers),
        ("device", args.device),
    ):
        if value is not None:
            overrides[key] = value
    cfg = resolve_train_config(overrides=overrides, config_file=args.config, resume=args.resume)
    summary = train(cfg, resume=args.resume, log=log)
    if not is_main_process():
        return 130 if "interrupted" in summary else 0  # rank 0 prints the one summary of the job
    if "interrupted" in summary:
        if args.json:
            emit(args, summary, "")
        return 130
    emit(
        args,
        summary,
        lambda: (
            f"test top-1 {summary['top1']:.2f}%  top-5 {summary['top5']:.2f}%  loss {summary['loss']:.4f}  "
            f"(validation top-1 {summary['val_top1']:.2f}%) after {_epochs_text(summary['epochs'])}, "
            f"{summary['wall_seconds'] / 60:.1f} min, {summary['train_images_per_s']:.0f} train images/s\n"
            f"run folder {summary['out']}: model/ (weights + class names), curves.png, metrics.jsonl, "
            "summary.json, val_split.json, checkpoints/"
        ),
    )
    return 0


def _epochs_text(epochs: float) -> str:
    """6.34 -> '6 epochs and 34% of the 7th'; 3.0 -> '3 epochs'."""
    whole = int(epochs)
    part = round(100 * (epochs - whole))
    text = f"{whole} epoch{'s' if whole != 1 else ''}"
    if part == 0:
        return text
    nth = whole + 1
    suffix = "th" if 10 <= nth % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(nth % 10, "th")
    return f"{text} and {part}% of the {nth}{suffix}"


# ------------------------------------------------------------------------------------------- parser


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (``tnt train: error: ...``) and exit 2."""

    def error(self, message: str):  # noqa: D102 - argparse's hook
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# Arguments several sub-commands share, worded once.
SERVE_MAX_PIXELS = 40_000_000  # tntvision.serve.engine.DEFAULT_MAX_PIXELS, without importing the serve extra
CHECKPOINT_HELP = "run folder, model/ folder, weights file or exported .onnx/.pt2"
DTYPE_HELP = "dtype of weights and images (bfloat16: inference without autocast's weight casts)"


def _model_args(
    p: argparse.ArgumentParser, *, checkpoint_help: str = CHECKPOINT_HELP, random: bool = False
) -> None:
    """--checkpoint, or --model NAME[.TAG] with --pretrained (published weights) or --checkpoint FILE (a
    weights file for it), as timm's scripts take them (tntvision.tools.checkpoints.ModelSource)."""
    p.add_argument("--checkpoint", help=checkpoint_help + "; with --model: a weights file for that model")
    p.add_argument(
        "--model",
        metavar="NAME[.TAG]",
        help="a registered model by name (tags: `tnt models --pretrained`)"
        + (", random weights unless --pretrained or --checkpoint" if random else ""),
    )
    p.add_argument(
        "--pretrained",
        action="store_true",
        help="with --model: the tag's published weights (downloaded once, then cached; "
        "HF_HUB_OFFLINE=1: the cache only)",
    )
    p.add_argument("--revision", help="with --pretrained: the hub revision to take (default: main)")


def _source(args: argparse.Namespace):
    """The model the options name (a tntvision.tools.checkpoints.ModelSource)."""
    from .tools.checkpoints import ModelSource

    return ModelSource(
        checkpoint=args.checkpoint, model=args.model, pretrained=args.pretrained, revision=args.revision
    )


def _json_flag(p: argparse.ArgumentParser, help: str = "print one JSON object") -> None:
    p.add_argument("--json", action="store_true", help=help)


def _dtype_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help=DTYPE_HELP)


def _merge_tokens(text: str) -> int | list[int]:
    """--merge-tokens: 'R' (every block) or 'R1,R2,...' (one per block)."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an int or a comma-separated list of ints, got {text!r}"
        ) from None
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"token counts must be >= 0, got {text!r}")
    return values[0] if len(values) == 1 else values


def _merge_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--merge-tokens",
        type=_merge_tokens,
        default=0,
        metavar="R|R1,R2,...",
        help="token merging (ToMe) in TNT models: R patches and their words merged per block, or one R per "
        "block (default: 0, off)",
    )


def _verbose_flag(p: argparse.ArgumentParser, default: Any = argparse.SUPPRESS) -> None:
    """--verbose, on ``tnt`` itself (default False) and on every sub-command (default SUPPRESS: a
    sub-command's parser leaves alone what ``tnt --verbose`` already set)."""
    p.add_argument(
        "--verbose",
        action="store_true",
        default=default,
        help="on an error, print the whole chain of causes (a traceback) after the one-line message",
    )


DEVICES = ("cpu", "cuda")
DEVICE_HELP = "where the model runs: cpu (default) or cuda (the current GPU; CUDA_VISIBLE_DEVICES picks it)"


def _device_arg(
    p: argparse.ArgumentParser,
    help: str = DEVICE_HELP,
    *,
    choices: Sequence[str] = DEVICES,
    default: str | None = "cpu",
) -> None:
    """--device: every command that runs a model (tntvision.utils.devices.resolve_device checks it)."""
    p.add_argument("--device", choices=choices, default=default, help=help)


def _runtime_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runtime", choices=RUNTIMES, default=None, help=RUNTIME_HELP)


def _add_models(sub) -> None:
    p = sub.add_parser("models", help="list registered model names, or the published weights' tags")
    p.add_argument("pattern", nargs="?", help="shell-style filter, e.g. 'tnt_s*'")
    p.add_argument(
        "--pretrained",
        action="store_true",
        help="list NAME.TAG of published weights: source, reported top-1, license, input size",
    )
    _json_flag(p)
    p.set_defaults(func=cmd_models)


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="parameters, MACs and config of a model")
    p.add_argument("model", help="a registered model name (see `tnt models`)")
    p.add_argument("--img-size", type=int, default=None, help="input size (default: the model's)")
    _json_flag(p)
    p.set_defaults(func=cmd_info)


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="weights of the authors' code, timm or mmpretrain -> a model folder")
    p.add_argument("src", help="weights file (.pth, .pth.tar, .bin, .safetensors) or folder")
    p.add_argument("--out", required=True, help="output folder (model.safetensors + config.json)")
    p.add_argument("--model", default=None, help="registered name (default: matched from the weights)")
    p.add_argument(
        "--no-ema", action="store_true", help="take 'state_dict' even when 'state_dict_ema' exists"
    )
    _json_flag(p)
    p.set_defaults(func=cmd_convert)


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="top-k classes of image files and folders")
    _model_args(p)
    p.add_argument(
        "images", nargs="+", metavar="IMAGE_OR_DIR", help="image files, or folders (walked for image files)"
    )
    p.add_argument("--topk", type=int, default=5, help="classes per image (default: 5)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: 32)")
    _dtype_arg(p)
    _device_arg(p)
    _runtime_arg(p)
    _merge_arg(p)
    _json_flag(p)
    p.set_defaults(func=cmd_predict)


def _add_visualize(sub) -> None:
    p = sub.add_parser("visualize", help="PNG figures of attention, word embeddings and feature maps")
    _model_args(p, checkpoint_help="run folder, model/ folder or weights file", random=True)
    p.add_argument("image", help="any image file Pillow reads")
    p.add_argument("--out", required=True, help="folder for the PNG figures")
    p.add_argument("--blocks", help="1-based blocks to show, e.g. 1,6,12 (default: first, middle, last)")
    p.add_argument("--patch", help="ROW,COL of the patch for inner and outer attention (default: centre)")
    p.add_argument("--words", nargs="+", metavar="ROW,COL", help="query words in that patch (0-based)")
    p.add_argument("--img-size", type=int, default=None, help="input size (default: the model's)")
    _json_flag(p)
    p.set_defaults(func=cmd_visualize)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="top-1/top-5, loss, per-class accuracy and confusion matrix")
    _model_args(p)
    p.add_argument("--data", required=True, help="'fashion-mnist' or an ImageFolder root")
    p.add_argument("--split", choices=("val", "test"), default="test", help="split (default: test)")
    p.add_argument(
        "--out",
        default=None,
        help="folder for the confusion matrix (default: the run folder; with --model: ./NAME[.TAG])",
    )
    p.add_argument("--batch-size", type=int, default=256, help="images per batch (default: 256)")
    p.add_argument("--workers", type=int, default=0, help="data loader worker processes (default: 0)")
    p.add_argument(
        "--amp", choices=("none", "bfloat16", "float16"), default="none", help="autocast (default: none)"
    )
    _dtype_arg(p)
    _device_arg(p)
    _runtime_arg(p)
    _merge_arg(p)
    _json_flag(p)
    p.set_defaults(func=cmd_eval)


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train or fine-tune a model on fashion-mnist or an ImageFolder tree",
        description="Train (or fine-tune) a model. Defaults: the paper's DeiT-style recipe for 224 px "
        "models, the small-image recipe (configs/fashion_mnist.yaml) for models of 64 px or less. "
        "Multi-process: torchrun --nproc_per_node=N -m tntvision.cli train ...",
    )
    p.add_argument("--model", help="registered model name (see `tnt models`)")
    p.add_argument("--data", help="'fashion-mnist' or an ImageFolder root with train/ and val/ (or test/)")
    p.add_argument(
        "--out", required=True, help="run folder (refused if it already holds a run, unless --resume)"
    )
    p.add_argument("--config", help="YAML recipe (e.g. configs/imagenet_tnt_s.yaml)")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config key, e.g. optim.lr=1e-3 (repeatable)",
    )
    p.add_argument("--epochs", type=int, help="epochs to train")
    p.add_argument(
        "--time-budget", type=float, metavar="MINUTES", help="stop cleanly (evaluate, save) after this"
    )
    p.add_argument("--batch-size", type=int, help="global batch per optimizer step (all processes)")
    p.add_argument("--img-size", type=int, help="input size (position tables are resampled)")
    p.add_argument(
        "--pretrained",
        metavar="PATH|NAME.TAG",
        help="start from these weights: a file or folder, or published weights by name (NAME.TAG, see "
        "`tnt models --pretrained`; --model defaults to its architecture); a head for other classes is "
        "fresh, position tables are resampled to --img-size",
    )
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--seed", type=int, help="random seed (runs with the same seed are identical)")
    p.add_argument("--workers", type=int, help="DataLoader worker processes")
    _device_arg(
        p,
        "cpu or cuda (under torchrun: the GPU LOCAL_RANK, DDP over nccl); default: the config's device, "
        "auto: cuda when there is a GPU",
        choices=("auto", *DEVICES),
        default=None,
    )
    _json_flag(p, "print the summary as one JSON object")
    p.set_defaults(func=cmd_train)


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="throughput, latency, training-step speed and peak memory")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--model",
        metavar="NAME[.TAG]",
        help="a registered model by name (random weights unless --pretrained)",
    )
    which.add_argument(
        "--checkpoint",
        metavar="FILE.onnx|.pt2",
        help="an exported file: its runtime against eager PyTorch on the same architecture",
    )
    p.add_argument("--pretrained", action="store_true", help="with --model: time it with the tag's weights")
    p.add_argument("--revision", help="with --pretrained: the hub revision to take (default: main)")
    p.add_argument("--batch-size", type=int, default=16, help="images per batch (default: 16)")
    _dtype_arg(p)
    p.add_argument("--amp", choices=("none", "bfloat16"), default="none", help="autocast (default: none)")
    p.add_argument("--train", action="store_true", help="also time a training step (fwd + bwd + AdamW)")
    p.add_argument(
        "--compare",
        action="append",
        metavar="timm|timm:NAME|tntvision:NAME|ours:reference",
        help="also run timm's model of the same name (same weights), another timm model (e.g. "
        "timm:deit_small_patch16_224, the headline for TNT-S), another of our models, or our model on its "
        "pure-PyTorch path, interleaved",
    )
    p.add_argument(
        "--profile", type=int, default=0, metavar="N", help="show the top N ops of our model per workload"
    )
    p.add_argument("--rounds", type=int, default=6, help="timed calls per implementation (default: 6)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls first (default: 2)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--compile", action="store_true", help="torch.compile every model (time reported)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    p.add_argument(
        "--keep-activations",
        action="store_true",
        help="lean_backward off: our PyTorch-run attention/MLP modules keep their activations for backward "
        "(with the fused op on, the outer blocks only: the fused op always recomputes)",
    )
    _device_arg(p, "cpu (default) or cuda: timed with CUDA events, peak memory max_memory_allocated")
    _runtime_arg(p)
    _merge_arg(p)
    _json_flag(p)
    p.set_defaults(func=cmd_bench)


def _add_serve(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="a model as a batched HTTP service and a web page",
        description="Serve a model over HTTP: POST /predict, /predict/batch and /explain, the Open Inference "
        "Protocol (KServe v2) under /v2, GET /health, /metadata, /metrics (Prometheus), /openapi.json, /docs "
        "and a web page at /. Requests that arrive within --max-wait-ms run as one batch; a full queue "
        "answers 503, a request past --timeout 504. SIGTERM / SIGINT: readiness 503, finish the requests in "
        "flight, exit 0; a model that fails its warm-up exits 1.",
    )
    _model_args(p)
    _runtime_arg(p)
    _dtype_arg(p)
    _device_arg(p, "where batches run: cpu (default) or cuda (PyTorch checkpoints; /explain stays on cpu)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0: a free one)")
    p.add_argument(
        "--name", default=None, help="the model's name in /v2/models/NAME (default: its registry name)"
    )
    p.add_argument("--max-batch", type=int, default=32, help="images per forward pass, at most (default: 32)")
    p.add_argument(
        "--max-wait-ms",
        type=float,
        default=5.0,
        help="how long a request waits for others to share its batch (default: 5)",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=256,
        help="images waiting or running, at most; more are refused with 503 and Retry-After (default: 256)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        help="seconds from a request's arrival to its answer; later: 504, and work not started is dropped "
        "(default: 30; 0: none)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument(
        "--max-upload-mb", type=float, default=10.0, help="largest request body in MB (default: 10)"
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        default=SERVE_MAX_PIXELS,
        help="largest image in pixels, as declared and once resized for the model (default: 40000000)",
    )
    p.add_argument("--topk", type=int, default=5, help="classes listed when ?topk is not given (default: 5)")
    p.add_argument(
        "--drain-s",
        type=float,
        default=30.0,
        help="after SIGTERM, how long requests in flight may take before the server stops (default: 30)",
    )
    p.add_argument(
        "--stop-delay-s",
        type=float,
        default=0.0,
        help="after SIGTERM, keep serving this long with readiness 503, so load balancers stop sending "
        "first (default: 0)",
    )
    p.set_defaults(func=cmd_serve)


def _add_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="a saved model -> ONNX (optionally int8) or a torch.export .pt2 file",
        description="Export a saved model with a dynamic batch dimension; model name, class names and "
        "preprocessing travel inside the file, which `tnt eval` and `tnt predict` take as --checkpoint.",
    )
    _model_args(p, checkpoint_help="run folder, model/ folder or weights file")
    p.add_argument("--format", required=True, choices=("onnx", "pt2"), help="file format")
    p.add_argument("--out", required=True, help="file to write (ending in .onnx or .pt2)")
    p.add_argument("--img-size", type=int, default=None, help="input size (default: the model's)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    p.add_argument(
        "--quantize",
        choices=("int8",),
        default=None,
        help="int8 with onnxruntime (dynamic unless --calibrate)",
    )
    p.add_argument(
        "--calibrate",
        metavar="DATA",
        default=None,
        help="static (QDQ) int8 calibrated on train images of 'fashion-mnist' or an ImageFolder root",
    )
    p.add_argument(
        "--calibration-images", type=int, default=256, help="images --calibrate uses (default: 256)"
    )
    _merge_arg(p)
    _json_flag(p)
    p.set_defaults(func=cmd_export)


def _add_kernels(sub) -> None:
    p = sub.add_parser(
        "kernels",
        help="build the fused CPU kernel ahead of time, or show which of its instruction sets runs here",
    )
    p.add_argument(
        "action",
        choices=("build", "info"),
        help="build: compile now (an install step or an image build, so no request waits for it); "
        "info: the instruction set and bf16 mode in use",
    )
    _json_flag(p)
    p.set_defaults(func=cmd_kernels)


SUBCOMMANDS = (
    _add_models,
    _add_info,
    _add_convert,
    _add_predict,
    _add_visualize,
    _add_eval,
    _add_train,
    _add_bench,
    _add_serve,
    _add_export,
    _add_kernels,
)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tnt", description="Transformer-iN-Transformer vision models.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"tntvision {__version__}")
    _verbose_flag(parser, default=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    for command in subcommand_parsers(parser).values():  # `tnt predict ... --verbose`, `tnt --verbose ...`
        _verbose_flag(command)
    return parser


def subcommand_parsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The sub-command parsers of ``parser`` (as :func:`build_parser` makes it), by command name."""
    (commands,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(commands.choices)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
    except UserError as e:
        print(f"tnt {args.command}: error: {_first_line(str(e))}{_cause(e)}", file=sys.stderr)
        _explain(args, e)
        return 2
    except OSError as e:
        if not _users_path_or_disk(e, args):
            raise  # not about a path the user named: the project's bug (exit 1, traceback)
        where = f"{e.filename}: " if e.filename else ""
        print(f"tnt {args.command}: error: {where}{e.strerror or _first_line(str(e))}", file=sys.stderr)
        _explain(args, e)
        return 2
    except KeyboardInterrupt:
        print(f"tnt {args.command}: interrupted", file=sys.stderr)
        if getattr(args, "json", False):
            emit(args, {"interrupted": "SIGINT"}, "")
        return 130
    return int(code or 0)


def _cause(e: BaseException) -> str:
    """`` (cause: PermissionError)`` when a user error was raised from another exception, else ``""``."""
    cause = e.__cause__
    return f" (cause: {type(cause).__name__}; --verbose shows it)" if cause is not None else ""


def _explain(args: argparse.Namespace, e: BaseException) -> None:
    if getattr(args, "verbose", False):
        import traceback

        traceback.print_exception(e, file=sys.stderr)


def _users_path_or_disk(e: OSError, args: argparse.Namespace) -> bool:
    """Whether an OSError is the user's to fix: a full disk or quota, or a path that is one the user named
    on the command line, lies inside it, or is a folder on its way (``--out a_file/m.onnx``). Any other
    OSError is the project's own bug."""
    import errno
    from pathlib import Path

    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    named = []
    for value in vars(args).values():
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, str) and v:
                named.append(Path(v).expanduser().absolute())
    for filename in (e.filename, e.filename2):
        if filename is None:
            continue
        path = Path(str(filename)).expanduser().absolute()
        if any(path == n or n in path.parents or path in n.parents for n in named):  # it, inside, its folders
            return True
    return False


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "unknown error"


if __name__ == "__main__":
    raise SystemExit(main())
