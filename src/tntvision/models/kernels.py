"""Fused kernels: TNT's inner transformer as one operation, ``torch.ops.tntvision.inner_transformer``.

The inner transformer of a block (LayerNorm, qkv, attention over the words of each patch, projection,
LayerNorm, MLP, both residuals and their drop-path scales) runs as one C++ operation on the CPU
(``tntvision/csrc/inner_transformer.cpp``): tiles of ~256 words stay in cache through every step, the small
GEMMs (K = 8..40) use a register-blocked micro-kernel, and backward recomputes a tile's forward instead of
keeping activations. It is registered with ``torch.library`` (fake kernel and autograd formula included),
so autograd, ``torch.compile(fullgraph=True)`` and ``torch.export`` see a single op.

The extension is compiled at first use with the machine's C++ compiler (``-O3 -march=native`` on x86-64
and aarch64; any compiler that torch's ``cpp_extension`` accepts) into ``$TNTVISION_CACHE`` or
``~/.cache/tntvision/kernels/<key>``, where the key covers the source, torch's version, the compiler flags
and the CPU's model and flags, so a cached build never runs on a CPU it was not built for. When it cannot
be built, one warning says why and every model runs the pure-PyTorch reference path, which computes the
same numbers. ``TNTVISION_FUSED=0`` (or :func:`set_fused_kernels` / :func:`fused_kernels`) turns the fused
path off; the reference path is always what the fused one is tested against.

Which path runs is decided from static facts only (device, dtype, dropout settings, whether attention maps
are being recorded, whether an ONNX export is tracing); never from timing or tensor values.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import shutil
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

__all__ = [
    "fused_available",
    "fused_kernels",
    "fused_kernels_enabled",
    "inner_transformer",
    "set_fused_kernels",
]

_SOURCE = Path(__file__).resolve().parents[1] / "csrc" / "inner_transformer.cpp"
_LOCK = threading.Lock()
_STATE: dict[str, object] = {"loaded": None, "error": None}  # loaded: None (not tried), True, False
_ENABLED = [os.environ.get("TNTVISION_FUSED", "1") not in ("0", "false", "no", "off")]


def _cflags() -> list[str]:
    flags = ["-O3", "-fopenmp"]
    if platform.machine().lower() in ("x86_64", "amd64", "aarch64", "arm64"):
        flags.append("-march=native")
    return flags


def _cpu_signature() -> str:
    """The CPU's model name and feature flags (Linux), so builds are keyed by what they may use."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [ln for ln in text.splitlines() if ln.split(":")[0].strip() in ("model name", "flags", "Features")]
    return "\n".join(sorted(set(keep)))


def build_directory() -> Path:
    """Where the compiled extension of this source, torch, flags and CPU lives."""
    key = hashlib.sha256()
    for part in (_SOURCE.read_bytes(), torch.__version__.encode(), " ".join(_cflags()).encode()):
        key.update(part)
    key.update(_cpu_signature().encode())
    root = Path(os.environ.get("TNTVISION_CACHE", Path.home() / ".cache" / "tntvision" / "kernels"))
    return root / key.hexdigest()[:16]


def _import_cpp_extension():
    """``torch.utils.cpp_extension``, without its import-time "No CUDA runtime is found" warning (it is
    about CUDA builds; this CPU extension does not need CUDA)."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        logger.setLevel(level)
    return cpp_extension


def _ninja_on_path() -> None:
    """torch's extension builder runs ``ninja`` from PATH; the ``ninja`` package (a dependency) ships the
    binary next to the interpreter, which is not on PATH when a virtual env's python runs unactivated."""
    if shutil.which("ninja") is not None:
        return
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def _load() -> bool:
    """Compile (first time on this machine) and load the extension; register fake and autograd kernels."""
    with _LOCK:
        if _STATE["loaded"] is not None:
            return bool(_STATE["loaded"])
        try:
            _ninja_on_path()
            cpp_extension = _import_cpp_extension()
            build = build_directory()
            build.mkdir(parents=True, exist_ok=True)
            cpp_extension.load(
                name="tntvision_kernels",
                sources=[str(_SOURCE)],
                extra_cflags=_cflags(),
                extra_ldflags=["-fopenmp"],
                build_directory=str(build),
                is_python_module=False,
                verbose=False,
            )
            _register_python_kernels()
            _STATE["loaded"] = True
        except Exception as e:  # no compiler, no ninja, unwritable cache: the reference path runs
            _STATE["loaded"], _STATE["error"] = False, f"{type(e).__name__}: {e}"
            warnings.warn(
                "tntvision: the fused CPU kernel could not be built; using the PyTorch reference path "
                f"(same numbers, slower). Reason: {str(e).strip().splitlines()[-1] if str(e) else type(e)}",
                RuntimeWarning,
                stacklevel=3,
            )
        return bool(_STATE["loaded"])


def fused_available() -> bool:
    """True when the fused CPU kernel is built and loaded (builds it on the first call)."""
    return _load()


def fused_kernels_enabled() -> bool:
    return _ENABLED[0]


def set_fused_kernels(enabled: bool) -> None:
    """Turn the fused path on or off for this process (the reference path runs when off)."""
    _ENABLED[0] = bool(enabled)


@contextlib.contextmanager
def fused_kernels(enabled: bool) -> Iterator[None]:
    """Run the ``with`` block with the fused path on or off, restoring the previous setting after."""
    before = _ENABLED[0]
    _ENABLED[0] = bool(enabled)
    try:
        yield
    finally:
        _ENABLED[0] = before


def use_fused(x: torch.Tensor) -> bool:
    """Whether the fused op may run on ``x`` now (static facts only; builds the kernel on first use)."""
    if not _ENABLED[0] or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16):
        return False
    if torch.onnx.is_in_onnx_export():
        return False
    if torch.compiler.is_compiling():  # never build inside a trace: use what eager use already loaded
        return _STATE["loaded"] is True
    return _load()


# ------------------------------------------------------------------------------- op registration


def _register_python_kernels() -> None:
    """Fake (meta) kernels for tracing and the autograd formula of the C++ ops."""

    @torch.library.register_fake("tntvision::inner_transformer")
    def _fake_forward(x, *args):
        return torch.empty_like(x)

    @torch.library.register_fake("tntvision::inner_transformer_backward")
    def _fake_backward(grad, x, *rest):
        out = [torch.empty_like(x)]
        for p in rest[:14]:  # the parameters; then keep1, keep2, num_heads, eps
            out.append(x.new_empty((0,), dtype=torch.float32) if p is None else torch.empty_like(p))
        return out

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*(t for t in inputs[:17] if t is not None))
        ctx.present = [t is not None for t in inputs[:17]]
        ctx.num_heads, ctx.eps = inputs[17], inputs[18]

    def backward(ctx, grad):
        saved = iter(ctx.saved_tensors)
        inputs = [next(saved) if present else None for present in ctx.present]
        grads = torch.ops.tntvision.inner_transformer_backward(grad, *inputs, ctx.num_heads, ctx.eps)
        out = list(grads) + [None, None, None, None]  # keep1, keep2, num_heads, eps
        for i, present in enumerate(ctx.present[1:15], start=1):  # optional qkv biases
            if not present:
                out[i] = None
        return tuple(out)

    torch.library.register_autograd("tntvision::inner_transformer", backward, setup_context=setup_context)


def inner_transformer(
    x: torch.Tensor,
    block: torch.nn.Module,
    keep1: torch.Tensor | None,
    keep2: torch.Tensor | None,
) -> torch.Tensor:
    """Run ``block``'s inner transformer on words ``x`` (S, m, c) through the fused op.

    ``block`` is a :class:`~tntvision.models.tnt.TNTBlock` with an inner transformer; ``keep1`` / ``keep2``
    are per-sentence drop-path scales (S,) for the attention and MLP branches, or None.
    """
    attn, mlp = block.attn_in, block.mlp_in
    return torch.ops.tntvision.inner_transformer(
        x,
        block.norm_in.weight,
        block.norm_in.bias,
        attn.qk.weight,
        attn.qk.bias,
        attn.v.weight,
        attn.v.bias,
        attn.proj.weight,
        attn.proj.bias,
        block.norm_mlp_in.weight,
        block.norm_mlp_in.bias,
        mlp.fc1.weight,
        mlp.fc1.bias,
        mlp.fc2.weight,
        mlp.fc2.bias,
        keep1,
        keep2,
        attn.num_heads,
        block.norm_in.eps,
    )
