"""The C++ inner transformer for CPUs (``csrc/inner_transformer.cpp``), built at first use.

One portable build (``-O3 -fopenmp``, no ``-march``) holds a copy of the tile code per instruction set
(AVX-512, AVX2, a baseline) and picks one at run time from the CPU's features, so a cache folder or an
image moves between machines. It is compiled into ``$TNTVISION_CACHE`` (default
``~/.cache/tntvision/kernels/<key>``, the key covering sources, torch, flags and architecture), or ahead of
time by ``tnt kernels build``. When it cannot be built, one warning says why and models run the reference
path. docs/performance.md has the kernel's design and its measurements.
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

from ..errors import ConfigError
from . import op

__all__ = ["ISAS", "BF16_MODES", "LAYOUTS", "build", "build_directory", "fused_available", "kernel_dispatch",
           "kernel_layout", "kernel_options", "set_kernel_dispatch"]  # fmt: skip

ISAS = ("auto", "avx512", "avx512-w8", "avx2", "baseline", "avx2-w16")
BF16_MODES = ("auto", "fp32", "brgemm")
LAYOUTS = ("auto", "rows", "lanes")

_CSRC = Path(__file__).resolve().parents[1] / "csrc"
_SOURCE = _CSRC / "inner_transformer.cpp"
_SOURCES = (_SOURCE, _CSRC / "inner_transformer_tile.h", _CSRC / "inner_transformer_lanes.h")  # build inputs
_LOCK = threading.Lock()


class _Build:
    """What happened to the extension in this process."""

    loaded: bool | None = None  # None: not tried yet
    error: str | None = None  # why it could not be built
    dispatch_applied = False  # the environment's TNTVISION_KERNEL_ISA / _BF16 / _LAYOUT choice, applied once
    dispatch: tuple[str, str, str] = ("auto", "auto", "auto")  # the last set_kernel_dispatch choice


def _cflags() -> list[str]:
    """Portable flags: the instruction sets are chosen inside the source, at run time (never -march)."""
    return ["-O3", "-fopenmp"]


def build_directory() -> Path:
    """Where the compiled extension of these sources, torch, flags and architecture lives."""
    key = hashlib.sha256()
    for src in _SOURCES:
        key.update(src.read_bytes())
    for part in (torch.__version__, " ".join(_cflags()), platform.machine(), platform.system()):
        key.update(part.encode())
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
    """Build and load the extension once (:func:`_build_once`); then, until it succeeds, apply the
    environment's kernel choice: a bad ``TNTVISION_KERNEL_ISA`` / ``_BF16`` / ``_LAYOUT`` raises on every
    call, not just the first."""
    loaded = _built()
    if loaded and not _Build.dispatch_applied:
        isa = os.environ.get("TNTVISION_KERNEL_ISA", "auto")
        bf16 = os.environ.get("TNTVISION_KERNEL_BF16", "auto")
        layout = os.environ.get("TNTVISION_KERNEL_LAYOUT", "auto")
        what = "TNTVISION_KERNEL_ISA / TNTVISION_KERNEL_BF16 / TNTVISION_KERNEL_LAYOUT"
        set_kernel_dispatch(isa=isa, bf16=bf16, layout=layout, what=what)
        _Build.dispatch_applied = True
    return bool(loaded)


def _built() -> bool:
    """Whether the extension is loaded, building it on the first call (no kernel choice applied)."""
    return bool(_Build.loaded) if _Build.loaded is not None else _build_once()


def _build_once() -> bool:
    """Compile (first time on this machine) and load the extension; register fake and autograd kernels.
    One warning and False when it cannot be built."""
    with _LOCK:
        if _Build.loaded is not None:
            return bool(_Build.loaded)
        try:
            _ninja_on_path()
            cpp_extension = _import_cpp_extension()
            build = build_directory()
            build.mkdir(parents=True, exist_ok=True)
            cpp_extension.load(
                name="tntvision_kernels",
                sources=[str(_SOURCE)],  # includes the tile header; ninja tracks it
                extra_cflags=_cflags(),
                extra_ldflags=["-fopenmp"],
                build_directory=str(build),
                is_python_module=False,
                verbose=False,
            )
            op.register_cpu_op_kernels()
            _Build.loaded = True
        except Exception as e:  # no compiler, no ninja, unwritable cache: the reference path runs
            _Build.loaded, _Build.error = False, f"{type(e).__name__}: {e}"
            warnings.warn(
                "tntvision: the fused CPU kernel could not be built; using the PyTorch reference path "
                f"(same numbers, slower). Reason: {str(e).strip().splitlines()[-1] if str(e) else type(e)}",
                RuntimeWarning,
                stacklevel=3,
            )
        return bool(_Build.loaded)


def build() -> Path:
    """Compile the extension now (a server or an image build calls this, or ``tnt kernels build``, so no
    request ever waits for the compiler) and return its folder; :class:`ConfigError` with the compiler's
    reason when it cannot be built."""
    if not _load():
        raise ConfigError(f"the fused CPU kernel could not be built: {_Build.error}")
    return build_directory()


def kernel_dispatch() -> dict[str, object]:
    """What the fused op runs on this CPU: ``isa`` (the instruction set of the copy in use), ``bf16``
    (how the GEMMs of a low-precision call run: ``fp32``, ``brgemm-amx`` or ``brgemm-unpacked``) and
    ``cpu_isas`` (the copies this CPU can run) and ``layout`` (the layout setting: ``auto`` chooses per
    shape, see :func:`kernel_layout`). Builds the kernel if needed; None if it cannot be built."""
    if not _load():
        return {"isa": None, "bf16": None, "cpu_isas": [], "layout": None, "error": _Build.error}
    isa, bf16, cpu, layout = torch.ops.tntvision.kernel_dispatch()
    return {"isa": isa, "bf16": bf16, "cpu_isas": cpu.split(","), "layout": layout}


def kernel_layout(words: int, dim: int) -> str | None:
    """The layout the C++ op's tiles take for sentences of ``words`` words of ``dim`` features with the
    current choices, for an fp32 call: ``rows`` (a word's features along the vector) or ``lanes``
    (sentences along the vector; ``auto`` takes it where a word's features or a sentence's words fill at
    most half a vector, and for every shape on the 16-float copy); None when the kernel cannot be built."""
    if not _load():
        return None
    return torch.ops.tntvision.kernel_layout(words, dim)


def set_kernel_dispatch(
    *, isa: str = "auto", bf16: str = "auto", layout: str = "auto", what: str = "set_kernel_dispatch"
) -> None:
    """Choose the kernel copy (``isa``: one of :data:`ISAS`), the bf16 GEMM mode (``bf16``: ``auto``
    = bf16 GEMMs where the CPU has AMX, ``fp32``, or ``brgemm`` = bf16 GEMMs through cpublas whatever the
    CPU) and the tile layout (``layout``: one of :data:`LAYOUTS`, see :func:`kernel_layout`);
    :class:`ConfigError` for an unknown name or an instruction set this CPU lacks."""
    if isa not in ISAS:
        raise ConfigError(f"{what}: unknown instruction set {isa!r}; choose one of {', '.join(ISAS)}")
    if bf16 not in BF16_MODES:
        raise ConfigError(f"{what}: unknown bf16 mode {bf16!r}; choose one of {', '.join(BF16_MODES)}")
    if layout not in LAYOUTS:
        raise ConfigError(f"{what}: unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if not _built():
        raise ConfigError(f"the fused CPU kernel could not be built: {_Build.error}")
    try:
        torch.ops.tntvision.set_kernel_dispatch(isa, bf16, layout)
    except RuntimeError as e:
        raise ConfigError(f"{what}: {str(e).splitlines()[0]}") from None
    _Build.dispatch = (isa, bf16, layout)


@contextlib.contextmanager
def kernel_options(*, isa: str = "auto", bf16: str = "auto", layout: str = "auto") -> Iterator[None]:
    """Run the ``with`` block with another kernel copy, bf16 mode or layout, then restore the previous
    choice."""
    _load()  # applies the environment's choice first, so that is what comes back
    before = _Build.dispatch
    set_kernel_dispatch(isa=isa, bf16=bf16, layout=layout)
    try:
        yield
    finally:
        set_kernel_dispatch(isa=before[0], bf16=before[1], layout=before[2])


def fused_available() -> bool:
    """True when the fused CPU kernel is built and loaded (builds it on the first call)."""
    return _load()
