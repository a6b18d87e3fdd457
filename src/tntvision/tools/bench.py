"""`tnt bench`: inference throughput, batch-1 latency, training-step speed and peak memory of a model.

Timings of two implementations are only comparable when they share the machine's state, so a comparison
(``compare=["timm"]``: timm's model of the same name, with our weights copied in) runs both models in this
process, interleaved round by round (A B, then B A, ...), and reports ratios of the medians. Peak memory
cannot be told apart inside one process (the allocator keeps freed pages), so it is measured in a fresh
child process per model: on CPU the RSS high-water mark (VmHWM) of that process, and the part of it
added by the timed work (peak minus the RSS just before the first step); on CUDA
``torch.cuda.max_memory_allocated``. Times on the CPU are wall time per call; on CUDA, where a call only
queues the GPU's work, CUDA events around each call (:data:`TIMING`, recorded in the result's ``timing``).

timm is a development dependency: it is imported lazily here, only when a comparison asks for it.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..kernels import fused_kernels, kernel_backend, set_fused_kernels
from ..models import create_model
from ..models.pretrained import get_pretrained_tag, split_name
from ..models.registry import get_model_entry
from ..utils.amp import WEIGHT_DTYPES, amp_dtype, autocast, weight_dtype
from ..utils.devices import device_name, resolve_device

__all__ = ["Impl", "bench_model", "format_report"]

AMP = ("none", "bfloat16")


@dataclass(frozen=True)
class Impl:
    """One implementation to time: ``"ours"``, ``"ours:reference"`` (our model on the pure-PyTorch path,
    fused kernels off), ``"tntvision:NAME"`` (another of our registered models), ``"timm"`` (timm's model
    of the same name) or ``"timm:NAME"`` (another timm model)."""

    spec: str

    @property
    def label(self) -> str:
        return self.spec

    @property
    def fused(self) -> bool:
        """Whether this implementation runs with our fused kernels enabled."""
        return self.spec != "ours:reference"

    def build(
        self,
        model_name: str,
        *,
        weights_from: nn.Module | None = None,
        lean_backward: bool = True,
        merge_tokens: int | Sequence[int] = 0,
        pretrained: bool = False,
        revision: str | None = None,
    ) -> nn.Module:
        """A fresh model; timm's model of our name gets ``weights_from``'s weights (same layout).

        ``lean_backward`` is our model's :meth:`~tntvision.models.tnt.TNT.set_lean_backward` setting;
        ``merge_tokens`` its token merging (our models only: timm's have none); ``pretrained`` gives our
        model (``ours``) the published weights of ``model_name``'s tag (``revision``: the hub revision).
        """
        if self.spec in ("ours", "ours:reference") or self.spec.startswith("tntvision:"):
            name = model_name if self.spec.startswith("ours") else self.spec.split(":", 1)[1]
            weights = pretrained and self.spec == "ours"
            model = create_model(name, merge_tokens=merge_tokens, pretrained=weights,
                                 revision=revision if weights else None)  # fmt: skip
            model.set_lean_backward(lean_backward)
            return model
        timm = _import_timm()
        name = split_name(model_name)[0] if self.spec == "timm" else self.spec.split(":", 1)[1]
        if name not in timm.list_models():
            raise ConfigError(f"timm has no model {name!r} to compare with")
        model = timm.create_model(name)
        if self.spec == "timm" and weights_from is not None:
            model.load_state_dict(weights_from.state_dict(), strict=True)
        return model


def _import_timm():
    try:
        return importlib.import_module("timm")
    except ImportError as e:
        raise ConfigError("--compare timm needs timm installed (pip install 'tntvision[dev]')") from e


def _parse_impls(compare: Sequence[str]) -> list[Impl]:
    impls = [Impl("ours")]
    for spec in compare:
        prefix, _, name = spec.partition(":")
        if spec not in ("timm", "ours:reference") and not (prefix in ("timm", "tntvision") and name):
            raise ConfigError(
                f"--compare takes 'timm', 'timm:MODEL_NAME', 'tntvision:MODEL_NAME' or 'ours:reference', "
                f"got {spec!r}"
            )
        if prefix == "tntvision":
            get_model_entry(name)
        impls.append(Impl(spec))
    return impls


def _autocast(device: str, amp: str) -> contextlib.AbstractContextManager:
    return autocast(torch.device(device), amp_dtype(amp))


def _on_path(fn: Callable[[], None], fused: bool) -> Callable[[], None]:
    """``fn`` run with our fused kernels on or off (see :mod:`tntvision.kernels`)."""

    def run() -> None:
        with fused_kernels(fused):
            fn()

    return run


def _sync(device: str) -> None:
    """Wait for the GPU's queued work (a no-op on the CPU, whose work is done when a call returns)."""
    if device == "cuda":
        torch.cuda.synchronize()


TIMING = {
    "cpu": "time.perf_counter around each call (CPU work is done when the call returns)",
    "cuda": "CUDA events recorded before and after each call on the current stream, GPU idle at the start "
    "(the previous call synchronised), elapsed_time read after synchronising the end event",
}


def _timer(device: str) -> Callable[[Callable[[], None]], float]:
    """Seconds one call of ``fn`` takes on ``device`` (see :data:`TIMING`).

    On CUDA the workloads only queue kernels, so host wall time would miss the GPU's work: two CUDA
    events bracket the call on the stream and the end event is waited for, so each call starts on an
    idle GPU and its time includes any gaps where the GPU waited for the host to launch kernels.
    """
    if device != "cuda":

        def wall(fn: Callable[[], None]) -> float:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0

        return wall

    def events(fn: Callable[[], None]) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3  # ms -> s

    return events


# ------------------------------------------------------------------------------------------ workloads


def _inference_fn(model: nn.Module, x: torch.Tensor, device: str, amp: str) -> Callable[[], None]:
    model.eval()

    def run() -> None:
        with torch.inference_mode(), _autocast(device, amp):
            model(x)

    return run


def _train_fn(model: nn.Module, x: torch.Tensor, device: str, amp: str) -> Callable[[], None]:
    """One step: forward, cross-entropy on random labels, backward, AdamW update."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    num_classes = model.num_classes
    target = torch.randint(0, num_classes, (x.shape[0],), device=x.device)

    def run() -> None:
        with _autocast(device, amp):
            loss = F.cross_entropy(model(x), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return run


def _time_interleaved(
    fns: dict[str, Callable[[], None]], *, warmup: int, rounds: int, device: str = "cpu"
) -> dict[str, list[float]]:
    """Seconds per call of each function, run round-robin with the order reversed every other round
    (timed as :func:`_timer` does on ``device``)."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    _sync(device)
    timer = _timer(device)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names if r % 2 == 0 else reversed(names):
            times[n].append(timer(fns[n]))
    return times


# ------------------------------------------------------------------------------------------ memory


def _memory_probe(
    impl_spec: str,
    model_name: str,
    batch: int,
    dtype: str,
    train: bool,
    steps: int,
    device: str,
    threads: int,
    lean_backward: bool = True,
    amp: str = "none",
    merge_tokens: int | list[int] = 0,
) -> dict[str, float]:
    """Runs in a fresh child process: peak memory of ``steps`` calls of one workload (MB)."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    impl = Impl(impl_spec)
    set_fused_kernels(impl.fused)
    model = impl.build(model_name, lean_backward=lean_backward, merge_tokens=merge_tokens)
    model = model.to(device, weight_dtype(dtype))
    x = torch.randn(batch, *_input_shape(model_name), device=device, dtype=weight_dtype(dtype))
    run = (_train_fn if train else _inference_fn)(model, x, device, amp)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        for _ in range(steps):
            run()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
        return {"peak_mb": peak, "added_mb": peak - before / 2**20, "before_mb": before / 2**20}
    before = _rss_mb()
    for _ in range(steps):
        run()
    peak = _proc_status_mb("VmHWM")
    return {"peak_mb": peak, "added_mb": peak - before, "before_mb": before}


def _proc_status_mb(field: str) -> float:
    """A memory line of /proc/self/status in MB (VmRSS: now; VmHWM: high-water mark of this process).

    VmHWM belongs to the address space, so unlike ``ru_maxrss`` it does not carry over the parent's peak
    into a spawned child.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field} line")


def _rss_mb() -> float:
    return _proc_status_mb("VmRSS")


def _peak_memory(args: tuple) -> dict[str, float]:
    """Run :func:`_memory_probe` in a fresh interpreter (no inherited heap, no import-guard needs)."""
    code = (
        "import json, sys; from tntvision.tools.bench import _memory_probe; "
        "print(json.dumps(_memory_probe(*json.loads(sys.argv[1]))))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(list(args))], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no message"]
        raise RuntimeError(f"memory probe failed: {tail[0]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _input_shape(model_name: str) -> tuple[int, int, int]:
    cfg = get_model_entry(split_name(model_name)[0]).config
    return (cfg.in_chans, cfg.img_size, cfg.img_size)


# ------------------------------------------------------------------------------------------ driver


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[int]:
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(old)


def _summarise(times: dict[str, list[float]], batch: int) -> dict[str, dict[str, float]]:
    out = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        out[name] = {
            "median_ms": 1e3 * med,
            "min_ms": 1e3 * min(ts),
            "max_ms": 1e3 * max(ts),
            "img_per_s": batch / med,
        }
    return out


def _workload(summary: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Per-implementation times and, against every other implementation, ``speedup`` = its time / ours
    (> 1: ours is faster) and ``time_ratio`` = our time / its time (the headline against DeiT-S)."""
    ours = summary["ours"]["median_ms"]
    others = {name: s["median_ms"] for name, s in summary.items() if name != "ours"}
    return {
        "per_impl": summary,
        "speedup": {k: v / ours for k, v in others.items()},
        "time_ratio": {k: ours / v for k, v in others.items()},
    }


def _macs(model: nn.Module, shape: tuple[int, ...]) -> int:
    """MACs of one image: ours as ``tnt info`` counts them (the paper's convention), others as run."""
    from ..models.pyramid_tnt import PyramidTNT
    from ..models.tnt import TNT
    from .info import count_macs, forward_macs

    if isinstance(model, (TNT, PyramidTNT)):
        return count_macs(model, shape[-1])
    return forward_macs(model, torch.zeros(1, *shape))


def profile_ops(fn: Callable[[], None], *, top: int = 15, device: str = "cpu") -> list[dict[str, Any]]:
    """The ``top`` operators of one call of ``fn`` by self time (``torch.profiler``), as plain data: CPU
    time on the CPU, GPU (kernel) time on CUDA, where the host only launches the work."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])

    def self_us(e) -> float:
        return e.self_device_time_total if device == "cuda" else e.self_cpu_time_total

    fn()  # warm
    _sync(device)
    with profile(activities=activities) as prof:
        fn()
        _sync(device)
    events = [e for e in prof.key_averages() if self_us(e) > 0]
    rows = sorted(events, key=self_us, reverse=True)[:top]
    total = sum(self_us(e) for e in events) or 1
    return [
        {"op": e.key, "self_ms": self_us(e) / 1e3, "share": self_us(e) / total, "calls": e.count}
        for e in rows
    ]


def _check_bench_args(
    dtype: str,
    amp: str,
    train: bool,
    batch_size: int,
    rounds: int,
    latency_rounds: int,
    warmup: int,
    workloads: Sequence[str],
    device: str,
) -> None:
    """:class:`ConfigError` for a bad :func:`bench_model` argument, before anything is built."""
    if dtype not in WEIGHT_DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {dtype!r}")
    if amp not in AMP:
        raise ConfigError(f"amp must be one of {', '.join(AMP)}, got {amp!r}")
    if train and dtype != "float32":
        raise ConfigError("a training step needs float32 weights; use amp='bfloat16' (--amp) for bf16")
    if batch_size < 1 or rounds < 1 or latency_rounds < 1 or warmup < 0:
        raise ConfigError("batch size and rounds must be positive, warmup not negative")
    if not set(workloads) <= {"inference", "latency"}:
        raise ConfigError(f"workloads are 'inference' and 'latency', got {list(workloads)}")
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"device must be cpu or cuda, got {device!r}")
    resolve_device(device)  # CUDA asked for where there is none: the message says why


def _build_models(
    model_name: str,
    impls: Sequence[Impl],
    *,
    lean_backward: bool,
    merge_tokens: int | Sequence[int],
    pretrained: bool = False,
    revision: str | None = None,
) -> dict[str, nn.Module]:
    """One fresh model per implementation, ours first (with the tag's published weights if
    ``pretrained``); timm's of our name gets our weights."""
    torch.manual_seed(0)
    ours = Impl("ours").build(model_name, lean_backward=lean_backward, merge_tokens=merge_tokens,
                              pretrained=pretrained, revision=revision)  # fmt: skip
    return {
        i.label: ours
        if i.spec == "ours"
        else i.build(model_name, weights_from=ours, merge_tokens=merge_tokens)
        for i in impls
    }


def _memory_section(impls: Sequence[Impl], args: tuple, *, train: bool, device: str) -> dict[str, Any]:
    """Peak memory of every implementation (one child process each; ``args`` as :func:`_memory_probe`
    takes them after the implementation) and ours / theirs."""
    mem = {i.label: _peak_memory((i.spec, *args)) for i in impls}
    return {
        "workload": "train" if train else "inference",
        "measured_as": "CUDA max_memory_allocated" if device == "cuda" else "RSS high-water mark",
        "per_impl": mem,
        "ratio": {k: mem["ours"]["peak_mb"] / v["peak_mb"] for k, v in mem.items() if k != "ours"},
    }


def bench_model(
    *,
    model_name: str,
    batch_size: int = 16,
    dtype: str = "float32",
    amp: str = "none",
    train: bool = False,
    compare: Sequence[str] = (),
    rounds: int = 6,
    warmup: int = 2,
    latency_rounds: int = 10,
    memory: bool = True,
    compile: bool | str = False,
    threads: int | None = None,
    device: str = "cpu",
    lean_backward: bool = True,
    profile: int = 0,
    workloads: Sequence[str] = ("inference", "latency"),
    merge_tokens: int | Sequence[int] = 0,
    pretrained: bool = False,
    revision: str | None = None,
) -> dict[str, Any]:
    """Measure one model (and the implementations in ``compare``) on random inputs.

    Inference: throughput at ``batch_size`` and latency at batch 1, under ``torch.inference_mode``
    (``workloads`` picks which of the two). ``train=True`` adds a training step (forward, cross-entropy,
    backward, AdamW) at ``batch_size``. ``dtype`` is the dtype the weights and inputs are held in
    (``"bfloat16"``: inference without autocast's per-call weight casts; training needs ``float32``);
    ``amp="bfloat16"`` runs every implementation under the same ``torch.autocast``. ``compile`` wraps every
    model in ``torch.compile`` (a string: that ``backend``, e.g. ``"eager"`` to trace without code
    generation; True: inductor) and reports the first (compiling) call's time separately. Peak memory
    (``memory=True``) comes from one child process per implementation (module docstring).
    ``lean_backward=False`` times our model with its reference-path inner activations kept for backward.
    ``profile=N`` adds the top N operators of one call of our model per workload (``torch.profiler``).
    ``merge_tokens`` turns on token merging in our models (the ``ours`` and ``tntvision:`` rows).
    ``model_name`` may carry a tag (``tnt_s_patch16_224.in1k``); ``pretrained=True`` times our model with
    that tag's published weights (the same speed as random ones; the memory children build random ones).

    Returns plain data: per workload, per implementation ``median_ms`` / ``min_ms`` / ``img_per_s``,
    ``speedup`` = other's median time / ours and ``time_ratio`` = ours / other's; ``macs`` per
    implementation (one image, ``torch.utils.flop_counter``) and ``flop_ratio`` = ours / other's.
    """
    _check_bench_args(dtype, amp, train, batch_size, rounds, latency_rounds, warmup, workloads, device)
    get_pretrained_tag(model_name)  # unknown names and tags fail here, with suggestions
    impls = _parse_impls(compare)
    result: dict[str, Any] = {
        "model": model_name,
        "batch_size": batch_size,
        "dtype": dtype,
        "amp": amp,
        "device": device,
        "device_name": device_name(torch.device(device)),
        "timing": TIMING[device],
        # the inner transformer our model runs here (fused C++ or Triton op, or the reference path), for
        # words in the weights' dtype; under --amp the Triton op takes the autocast dtype for its products
        "inner_backend": kernel_backend(torch.device(device), weight_dtype(dtype)),
        "torch": torch.__version__,
        "compile": compile,
        "lean_backward": lean_backward,
        "merge_tokens": merge_tokens if isinstance(merge_tokens, int) else list(merge_tokens),
        "implementations": [i.label for i in impls],
        "rounds": rounds,
    }
    wdtype = weight_dtype(dtype)
    with _threads(threads) as n_threads:
        result["threads"] = n_threads
        models = _build_models(model_name, impls, lean_backward=lean_backward, merge_tokens=merge_tokens,
                               pretrained=pretrained, revision=revision)  # fmt: skip
        shape = _input_shape(model_name)
        result["macs"] = {k: _macs(m, shape) for k, m in models.items()}
        macs = result["macs"]
        result["flop_ratio"] = {k: macs["ours"] / v for k, v in macs.items() if k != "ours"}
        models = {k: m.to(device, wdtype) for k, m in models.items()}
        fused = {i.label: i.fused for i in impls}
        x = torch.randn(batch_size, *shape, device=device, dtype=wdtype)
        x1 = torch.randn(1, *shape, device=device, dtype=wdtype)
        if compile:  # the first call of the first workload compiles; its time is reported apart
            result["compile_s"] = {}
            only_train = train and "inference" not in workloads
            result["compiled_first"] = "train" if only_train else "inference"
            first = _train_fn if only_train else _inference_fn
            for k, m in models.items():
                models[k] = torch.compile(m, backend=compile if isinstance(compile, str) else "inductor")
                t0 = time.perf_counter()
                _on_path(first(models[k], x, device, amp), fused[k])()
                _sync(device)
                result["compile_s"][k] = time.perf_counter() - t0

        def timed(make: Callable, inp: torch.Tensor, n_rounds: int, batch: int) -> dict[str, Any]:
            fns = {k: _on_path(make(m, inp, device, amp), fused[k]) for k, m in models.items()}
            times = _time_interleaved(fns, warmup=warmup, rounds=n_rounds, device=device)
            out = _workload(_summarise(times, batch))
            if profile:
                out["profile"] = profile_ops(fns["ours"], top=profile, device=device)
            return out

        if "inference" in workloads:
            result["inference"] = timed(_inference_fn, x, rounds, batch_size)
        if "latency" in workloads and not compile:  # a compiled model would recompile for batch 1
            result["latency"] = timed(_inference_fn, x1, latency_rounds, 1)
        if train:
            result["train"] = timed(_train_fn, x, rounds, batch_size)
        if memory and not compile:
            args = (model_name, batch_size, dtype, train, warmup + 1, device, n_threads, lean_backward, amp)
            result["memory"] = _memory_section(
                impls, (*args, result["merge_tokens"]), train=train, device=device
            )
    return result


def format_report(result: dict[str, Any]) -> str:
    """A human-readable table of :func:`bench_model`'s result; the headline is ours / each comparison."""
    amp = result.get("amp", "none")
    head = (
        f"{result['model']}  batch {result['batch_size']}  weights {result['dtype']}"
        + (f"  autocast {amp}" if amp != "none" else "")
        + f"  {result['device']}"
        + (f" ({result['device_name']})" if result["device"] == "cuda" else f"  {result['threads']} threads")
        + f"  torch {result['torch']}"
        + ("  compiled" if result["compile"] else "")
    )
    lines = [head, f"timing: {result['timing']}; median of {result['rounds']} calls (min-max)"]
    for name, ratio in result.get("flop_ratio", {}).items():
        lines.append(f"MACs ours / {name}: {ratio:.3f}  (flop counter, one image)")
    for key, title in (("inference", "inference"), ("latency", "latency (batch 1)"), ("train", "train step")):
        if key not in result:
            continue
        lines.append(f"{title}:")
        for name, s in result[key]["per_impl"].items():
            spread = f"({s['min_ms']:.1f}-{s['max_ms']:.1f})"
            lines.append(f"  {name:<34}{s['median_ms']:10.1f} ms {spread:>17}  {s['img_per_s']:8.2f} img/s")
        for name, r in result[key]["time_ratio"].items():
            flops = result.get("flop_ratio", {}).get(name)
            extra = f"  (MAC ratio {flops:.3f})" if flops else ""
            lines.append(f"  time ours / {name:<22}{r:10.3f}x{extra}")
        for row in result[key].get("profile", []):
            share, ms = 100 * row["share"], row["self_ms"]
            lines.append(f"    {ms:9.1f} ms {share:5.1f}% {row['calls']:6d}x  {row['op']}")
    if "compile_s" in result:
        took = ", ".join(f"{k} {v:.1f} s" for k, v in result["compile_s"].items())
        lines.append(f"compile (first {result.get('compiled_first', 'inference')} call): {took}")
    if "memory" in result:
        mem = result["memory"]
        lines.append(f"peak memory ({mem['workload']}, {mem['measured_as']}):")
        for name, m in mem["per_impl"].items():
            lines.append(f"  {name:<34}{m['peak_mb']:10.0f} MB  (+{m['added_mb']:.0f} MB by the workload)")
        for name, r in mem["ratio"].items():
            lines.append(f"  ours / {name:<27}{r:10.2f}x memory")
    return "\n".join(lines)
