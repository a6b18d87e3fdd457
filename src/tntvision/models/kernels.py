"""Fused kernels: TNT's inner transformer as one operation, ``torch.ops.tntvision.inner_transformer``.

The inner transformer of a block (LayerNorm, qkv, attention over the words of each patch, projection,
LayerNorm, MLP, both residuals and their drop-path scales) runs as one C++ operation on the CPU
(``tntvision/csrc/inner_transformer.cpp``): tiles of ~256 words stay in cache through every step, the small
GEMMs (K = 8..40) use a register-blocked micro-kernel, and backward recomputes a tile's forward instead of
keeping activations. It is registered with ``torch.library`` (fake kernel and autograd formula included),
so autograd, ``torch.compile(fullgraph=True)`` and ``torch.export`` see a single op.

**One build for every CPU.** The extension is compiled with portable flags (``-O3 -fopenmp``, no
``-march=native``): the per-tile code is compiled once per instruction set inside the one source file
(AVX-512 with 16-float vectors, AVX2 with 8-float vectors, a generic baseline) and the copy to run is picked
at run time from the CPU's features. So a cache folder, a container image or a wheel moves between
machines, and what runs does not depend on where it was built. It needs GCC or Clang (GNU vector
extensions, target pragmas, OpenMP). Under bf16 autocast or with bf16 inputs, CPUs with AMX run the
forward's GEMMs in bf16 with fp32 accumulation (PyTorch's oneDNN micro-kernels, ``cpublas::brgemm``); on
other CPUs, where bf16 GEMMs are no faster than fp32 ones, they stay fp32. :func:`kernel_dispatch` says
what runs here; ``TNTVISION_KERNEL_ISA`` (``auto``, ``avx512``, ``avx512-w8``, ``avx2``, ``baseline``,
``avx2-w16``) and ``TNTVISION_KERNEL_BF16`` (``auto``, ``fp32``, ``brgemm``) override it, and so does
:func:`set_kernel_dispatch`.

It is compiled at first use (or ahead of time: ``tnt kernels build``, :func:`build`) into
``$TNTVISION_CACHE`` or ``~/.cache/tntvision/kernels/<key>``, where the key covers the sources, torch's
version, the compiler flags and the architecture. When it cannot be built, one warning says why and every
model runs the pure-PyTorch reference path, which computes the same numbers. ``TNTVISION_FUSED=0`` (or
:func:`set_fused_kernels` / :func:`fused_kernels`) turns the fused path off; the reference path is always
what the fused one is tested against. A model compiled with ``torch.compile`` or exported with
``torch.export`` before any eager call builds (or loads) the kernel during tracing and runs the fused op
whenever eager would.

On CUDA tensors the same formula runs as a Triton op, ``torch.ops.tntvision.inner_transformer_triton``
(:mod:`tntvision.models.triton_op`), with the same autograd formula (:func:`register_autograd`).
:func:`kernel_backend` says which op a device's words get (``cpu``, ``triton`` or ``reference``);
``TNTVISION_KERNEL_BACKEND`` (``auto``, ``cpu``, ``triton``) or :func:`set_kernel_backend` choose.

Which path runs is decided from static facts only (device, dtype, shapes, dropout settings, whether
attention maps are being recorded, whether an ONNX export is tracing, whether each slot of the inner
transformer holds exactly the module the op computes, with no hooks or parametrizations: see
:func:`exactly`); never from timing or tensor values.
"""

from __future__ import annotations

import contextlib
import contextvars
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
from torch.nn.modules import module as nn_module
from torch.nn.utils import parametrize

from ..errors import ConfigError

__all__ = [
    "BACKENDS",
    "build",
    "compute_dtype",
    "exactly",
    "fused_available",
    "fused_backend",
    "fused_kernels",
    "fused_kernels_enabled",
    "global_hooks",
    "inner_transformer",
    "kernel_backend",
    "kernel_backend_set",
    "kernel_backend_setting",
    "kernel_dispatch",
    "kernels_info",
    "plain_module",
    "set_fused_kernels",
    "set_kernel_backend",
    "set_kernel_dispatch",
]

_CSRC = Path(__file__).resolve().parents[1] / "csrc"
_SOURCE = _CSRC / "inner_transformer.cpp"
_SOURCES = (_SOURCE, _CSRC / "inner_transformer_tile.h")  # what the build depends on
_LOCK = threading.Lock()
_STATE: dict[str, object] = {"loaded": None, "error": None}  # loaded: None (not tried), True, False
# On/off: a process default (TNTVISION_FUSED, set_fused_kernels) and, over it, what a `fused_kernels` block
# says in the current thread or asyncio task (a context variable: another thread keeps its own setting).
# The default is None until set_fused_kernels is called: the environment decides, read at each use.
_DEFAULT: list[bool | None] = [None]


def _fused_from_environment() -> tuple[bool | None, str]:
    """(on?, value) of ``TNTVISION_FUSED``, on when unset; None for a value that is neither
    1/true/yes/on nor 0/false/no/off."""
    flags = dict.fromkeys(("1", "true", "yes", "on"), True)
    flags |= dict.fromkeys(("0", "false", "no", "off"), False)
    value = os.environ.get("TNTVISION_FUSED", "1")
    return flags.get(value.strip().lower()), value


_ENVIRONMENT = _fused_from_environment()  # read once, at import
_OVERRIDE: contextvars.ContextVar[bool | None] = contextvars.ContextVar("tntvision_fused", default=None)
ISAS = ("auto", "avx512", "avx512-w8", "avx2", "baseline", "avx2-w16")
# Which fused op runs: auto (the C++ op on CPU tensors, the Triton op on CUDA tensors), cpu (the C++ op on
# CPU tensors, the reference path on others), triton (the Triton op on every device; on CPU tensors through
# Triton's interpreter, which needs TRITON_INTERPRET=1: how the GPU kernel is tested without a GPU).
BACKENDS = ("auto", "cpu", "triton")
_BACKEND: list[str | None] = [None]  # set_kernel_backend's choice; None: TNTVISION_KERNEL_BACKEND decides
_BACKEND_ENVIRONMENT = os.environ.get("TNTVISION_KERNEL_BACKEND", "auto")  # read once, at import
BF16_MODES = ("auto", "fp32", "brgemm")


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
    environment's kernel choice: a bad ``TNTVISION_KERNEL_ISA`` / ``TNTVISION_KERNEL_BF16`` raises on every
    call, not just the first."""
    loaded = _built()
    if loaded and not _STATE.get("dispatch_set"):
        isa = os.environ.get("TNTVISION_KERNEL_ISA", "auto")
        bf16 = os.environ.get("TNTVISION_KERNEL_BF16", "auto")
        set_kernel_dispatch(isa=isa, bf16=bf16, what="TNTVISION_KERNEL_ISA / TNTVISION_KERNEL_BF16")
        _STATE["dispatch_set"] = True
    return bool(loaded)


def _built() -> bool:
    """Whether the extension is loaded, building it on the first call (no kernel choice applied)."""
    return bool(_STATE["loaded"]) if _STATE["loaded"] is not None else _build_once()


def _build_once() -> bool:
    """Compile (first time on this machine) and load the extension; register fake and autograd kernels.
    One warning and False when it cannot be built."""
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
                sources=[str(_SOURCE)],  # includes the tile header; ninja tracks it
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


def build() -> Path:
    """Compile the extension now (a server or an image build calls this, or ``tnt kernels build``, so no
    request ever waits for the compiler) and return its folder; :class:`ConfigError` with the compiler's
    reason when it cannot be built."""
    if not _load():
        raise ConfigError(f"the fused CPU kernel could not be built: {_STATE['error']}")
    return build_directory()


def kernel_dispatch() -> dict[str, object]:
    """What the fused op runs on this CPU: ``isa`` (the instruction set of the copy in use), ``bf16``
    (how the GEMMs of a low-precision call run: ``fp32``, ``brgemm-amx`` or ``brgemm-unpacked``) and
    ``cpu_isas`` (the copies this CPU can run). Builds the kernel if needed; None if it cannot be built."""
    if not _load():
        return {"isa": None, "bf16": None, "cpu_isas": [], "error": _STATE["error"]}
    isa, bf16, cpu = torch.ops.tntvision.kernel_dispatch()
    return {"isa": isa, "bf16": bf16, "cpu_isas": cpu.split(",")}


def set_kernel_dispatch(*, isa: str = "auto", bf16: str = "auto", what: str = "set_kernel_dispatch") -> None:
    """Choose the kernel copy (``isa``: one of :data:`ISAS`) and the bf16 GEMM mode (``bf16``: ``auto``
    = bf16 GEMMs where the CPU has AMX, ``fp32``, or ``brgemm`` = bf16 GEMMs through cpublas whatever the
    CPU); :class:`ConfigError` for an unknown name or an instruction set this CPU lacks."""
    if isa not in ISAS:
        raise ConfigError(f"{what}: unknown instruction set {isa!r}; choose one of {', '.join(ISAS)}")
    if bf16 not in BF16_MODES:
        raise ConfigError(f"{what}: unknown bf16 mode {bf16!r}; choose one of {', '.join(BF16_MODES)}")
    if not _built():
        raise ConfigError(f"the fused CPU kernel could not be built: {_STATE['error']}")
    try:
        torch.ops.tntvision.set_kernel_dispatch(isa, bf16)
    except RuntimeError as e:
        raise ConfigError(f"{what}: {str(e).splitlines()[0]}") from None
    _STATE["dispatch"] = (isa, bf16)


@contextlib.contextmanager
def kernel_options(*, isa: str = "auto", bf16: str = "auto") -> Iterator[None]:
    """Run the ``with`` block with another kernel copy or bf16 mode, then restore the previous choice."""
    _load()  # applies the environment's choice first, so that is what comes back
    before = _STATE.get("dispatch", ("auto", "auto"))
    set_kernel_dispatch(isa=isa, bf16=bf16)
    try:
        yield
    finally:
        set_kernel_dispatch(isa=before[0], bf16=before[1])


def fused_available() -> bool:
    """True when the fused CPU kernel is built and loaded (builds it on the first call)."""
    return _load()


def fused_kernels_enabled() -> bool:
    """Whether the fused path is on here: the innermost `fused_kernels` block of this thread (or asyncio
    task), else the process default."""
    override = _OVERRIDE.get()
    if override is not None:
        return override
    if _DEFAULT[0] is not None:
        return _DEFAULT[0]
    if _ENVIRONMENT[0] is None:  # a bad TNTVISION_FUSED: every call that needs it fails the same way
        raise ConfigError(f"TNTVISION_FUSED={_ENVIRONMENT[1]!r}: use 1/true/yes/on or 0/false/no/off")
    return _ENVIRONMENT[0]


def set_fused_kernels(enabled: bool) -> None:
    """Turn the fused path on or off by default for this process (the reference path runs when off).

    A `fused_kernels` block, in any thread, takes precedence inside it."""
    _DEFAULT[0] = bool(enabled)


@contextlib.contextmanager
def fused_kernels(enabled: bool) -> Iterator[None]:
    """Run the ``with`` block with the fused path on or off, restoring the previous setting after.

    The setting is the current thread's (a context variable): a thread that exports a model with the
    fused path off does not change the numbers another thread computes meanwhile."""
    token = _OVERRIDE.set(bool(enabled))
    try:
        yield
    finally:
        _OVERRIDE.reset(token)


def kernel_backend_setting() -> str:
    """The backend asked for: :func:`set_kernel_backend`'s, else ``TNTVISION_KERNEL_BACKEND`` (``auto``
    when unset). A bad value raises on every call that needs it."""
    name = _BACKEND[0] if _BACKEND[0] is not None else _BACKEND_ENVIRONMENT.strip().lower()
    if name not in BACKENDS:
        raise ConfigError(f"TNTVISION_KERNEL_BACKEND={name!r}: choose one of {', '.join(BACKENDS)}")
    return name


def set_kernel_backend(name: str) -> None:
    """Choose the fused op's backend for this process (one of :data:`BACKENDS`; ``None`` goes back to
    ``TNTVISION_KERNEL_BACKEND``)."""
    if name is not None and name not in BACKENDS:
        raise ConfigError(f"unknown kernel backend {name!r}; choose one of {', '.join(BACKENDS)}")
    _BACKEND[0] = name


@contextlib.contextmanager
def kernel_backend_set(name: str) -> Iterator[None]:
    """Run the ``with`` block with another backend (see :func:`set_kernel_backend`), then restore it."""
    before = _BACKEND[0]
    set_kernel_backend(name)
    try:
        yield
    finally:
        _BACKEND[0] = before


def kernel_backend(device: torch.device | str, dtype: torch.dtype = torch.float32) -> str:
    """Which inner transformer runs on ``device`` for words of ``dtype``: ``cpu`` (the C++ op), ``triton``
    (the Triton op) or ``reference`` (PyTorch modules), from static facts only: the device, the dtype, the
    setting (:func:`kernel_backend_setting`), whether the fused path is on, whether the C++ op builds and
    whether Triton imports (and, on CPU tensors, runs its interpreter). :class:`ConfigError` when the
    ``triton`` backend is asked for where it cannot run."""
    device = torch.device(device)
    if not fused_kernels_enabled():
        return "reference"
    setting = kernel_backend_setting()
    if setting == "triton" or (setting == "auto" and device.type == "cuda"):
        from . import triton_op

        ok, why = _triton_runs(device.type)
        if not ok and setting == "triton":
            raise ConfigError(f"TNTVISION_KERNEL_BACKEND=triton: {why}")
        return "triton" if ok and dtype in triton_op.DTYPES else "reference"
    if device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and _load():
        return "cpu"
    return "reference"


def kernels_info() -> dict[str, object]:
    """What ``tnt kernels info`` reports: the C++ op's copy, bf16 mode and build folder
    (:func:`kernel_dispatch`), the backend setting, the backend each device's words get
    (:func:`kernel_backend`, fp32) and Triton's version and mode."""
    from . import triton_op

    info: dict[str, object] = {**kernel_dispatch(), "build": str(build_directory())}
    info["backend_setting"] = kernel_backend_setting()
    backends = {}
    for device in ("cpu", "cuda"):
        try:
            backends[device] = kernel_backend(device)
        except ConfigError as e:
            backends[device] = f"unavailable ({e})"
    info["backends"] = backends
    info["cuda_available"] = torch.cuda.is_available()
    ok, why = triton_op.triton_status()
    version = triton_op.triton_version() if ok else None
    info["triton"] = {"version": version, "interpreted": ok and triton_op.interpreted(), "error": why or None}
    return info


def _triton_runs(device_type: str) -> tuple[bool, str]:
    """Whether the Triton op runs on tensors of this device type here (checked once per device type)."""
    if device_type not in _TRITON:
        from . import triton_op

        _TRITON[device_type] = triton_op.runs_on(torch.device(device_type))
    return _TRITON[device_type]


_TRITON: dict[str, tuple[bool, str]] = {}


def fused_backend(x: torch.Tensor) -> str | None:
    """The fused op that may run on words ``x`` (S, m, c) now: ``cpu``, ``triton``, or None for the
    reference path (static facts only; builds the C++ op on first use)."""
    if torch.onnx.is_in_onnx_export():
        return None
    if torch.compiler.is_compiling():  # dynamo runs these once at trace time and keeps the answers
        backend = _backend_for_trace(x.device.type, x.dtype)
    else:
        backend = kernel_backend(x.device, x.dtype)
    if backend == "triton":
        from . import triton_op

        capability = _capability(x.device.index) if x.device.type == "cuda" else None
        ok = triton_op.supports(x.shape[1], x.shape[2]) and triton_op.gpu_supports(
            capability, compute_dtype(x)
        )
        return "triton" if ok else None
    return None if backend == "reference" else backend


@torch.compiler.assume_constant_result
def _capability(index: int | None) -> tuple[int, int]:
    """The compute capability of CUDA device ``index`` (the current one for None)."""
    return torch.cuda.get_device_capability(index)


def _backend_for_trace(device_type: str, dtype: torch.dtype) -> str:
    """:func:`kernel_backend` inside a trace: a constant of the graph, so a model compiled or exported
    before any eager call still gets the fused op. torch 2.14's dynamo reads the on/off switch (a context
    variable) and guards on it; 2.13's cannot, so there it is read once per trace."""
    if _DYNAMO_TRACES_CONTEXTVARS and not fused_kernels_enabled():
        return "reference"
    return _constant_backend(device_type, dtype)


@torch.compiler.assume_constant_result
def _constant_backend(device_type: str, dtype: torch.dtype) -> str:
    return kernel_backend(torch.device(device_type), dtype)


# torch 2.14's dynamo traces ContextVar.get and guards on the value (switching the fused path recompiles);
# 2.13's cannot trace it, so there the switch is read once per trace, a constant of the compiled graph.
_DYNAMO_TRACES_CONTEXTVARS = torch.torch_version.TorchVersion(torch.__version__) >= (2, 14)


# Exactly what the fused op computes; a subclass may override forward, so types must match exactly.
PLAIN_MODULES = (torch.nn.Linear, torch.nn.LayerNorm, torch.nn.GELU, torch.nn.Dropout, torch.nn.Identity)
DROPOUT = (torch.nn.Dropout, torch.nn.Identity)  # a dropout slot: either computes x in eval


def global_hooks() -> bool:
    """Whether a global module hook is registered (``torch.nn.modules.module.register_module_*_hook``):
    forward, forward pre-, backward or backward pre-hooks, which must see every module call."""
    return bool(
        nn_module._global_forward_hooks
        or nn_module._global_forward_pre_hooks
        or nn_module._global_backward_hooks
        or nn_module._global_backward_pre_hooks
    )


def _hooked(mod: torch.nn.Module) -> bool:
    """A hook of the module's own: forward, forward pre-, backward (full or not) or backward pre-hook."""
    forward = mod._forward_hooks or mod._forward_pre_hooks
    return bool(forward or mod._backward_hooks or mod._backward_pre_hooks)


def _computes_its_type(mod: torch.nn.Module) -> bool:
    """No hook, no parametrization, plain parameters, and the variant of its type the shortcuts compute:
    an affine LayerNorm with a bias, the exact (erf) GELU."""
    if _hooked(mod) or parametrize.is_parametrized(mod):
        return False
    if isinstance(mod, torch.nn.GELU) and mod.approximate != "none":
        return False
    if isinstance(mod, torch.nn.LayerNorm) and (mod.weight is None or mod.bias is None):
        return False
    # a tensor-subclass weight (e.g. quantized) is not what the op reads; a trace holds fake tensors instead
    return torch.compiler.is_compiling() or all(
        type(p) is torch.nn.Parameter for p in mod._parameters.values() if p is not None
    )


def exactly(
    module: torch.nn.Module | None,
    kind: type | tuple[type, ...],
    slots: dict[str, type | tuple[type, ...]] | None = None,
) -> bool:
    """True when ``module`` is exactly of type ``kind`` (a subclass may compute something else) and holds,
    child by child, exactly the modules ``slots`` names (name -> the type(s) a shortcut computes for that
    slot; no child at all when None), each like ``module`` free of hooks (their own or global: forward,
    backward and their pre-hooks), parametrizations (``torch.nn.utils.parametrize``, weight norm) and
    tensor-subclass parameters.

    A fused op or a shortcut that reads weights instead of calling the modules may run only then:
    anything else (an ``nn.Identity`` where the GELU was, a LoRA adapter, a quantized Linear, a hook that
    inspects gradients) runs the user's modules."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if module is None or type(module) not in kinds or global_hooks() or not _computes_its_type(module):
        return False
    slots = slots or {}
    if set(module._modules) != set(slots):
        return False
    for name, child in module._modules.items():
        child_kinds = slots[name] if isinstance(slots[name], tuple) else (slots[name],)
        if child is None or type(child) not in child_kinds or child._modules:
            return False
        if not _computes_its_type(child):
            return False
    return True


def plain_module(module: torch.nn.Module, *, allowed: tuple[type, ...] = PLAIN_MODULES) -> bool:
    """True when ``module`` and every submodule are of exactly an ``allowed`` type and, like
    :func:`exactly` requires, free of hooks of any kind, parametrizations and tensor-subclass parameters.
    Checks types, not slots: to check what each slot holds, use :func:`exactly`."""
    if global_hooks():
        return False
    return all(type(mod) in allowed and _computes_its_type(mod) for mod in module.modules())


# ------------------------------------------------------------------------------- op registration


# The op's inputs (after x) that are tensors, in order, and which group of the backward's ``output_mask``
# each gradient belongs to: x, then each module's parameters together.
_PARAMS = ("ln1_w", "ln1_b", "qk_w", "qk_b", "v_w", "v_b", "proj_w", "proj_b")
_PARAMS += ("ln2_w", "ln2_b", "fc1_w", "fc1_b", "fc2_w", "fc2_b")
_GROUPS = (("x",), ("ln1_w", "ln1_b"), ("qk_w", "qk_b", "v_w", "v_b"), ("proj_w", "proj_b"))
_GROUPS += (("ln2_w", "ln2_b"), ("fc1_w", "fc1_b"), ("fc2_w", "fc2_b"))
_ALL = (True,) * len(_GROUPS)  # every gradient
_TENSORS = 1 + len(_PARAMS) + 2  # x, the parameters, keep1, keep2; then num_heads, eps, low_precision


def output_mask(needs_input_grad: tuple[bool, ...]) -> list[bool]:
    """The backward op's ``output_mask`` from autograd's ``needs_input_grad`` over the op's inputs: a group
    (the input, or one module's weight and bias) is computed when any of its tensors needs a gradient."""
    needs = dict(zip(("x", *_PARAMS), needs_input_grad, strict=False))
    return [any(needs[name] for name in group) for group in _GROUPS]


def fake_gradients(x, tensors, mask) -> list[torch.Tensor]:
    """What a backward op returns, as fake tensors: for ``x`` and each parameter (``tensors``, in the op's
    order) a contiguous gradient of its shape and dtype; what ``mask`` does not ask for, or an absent bias,
    an empty fp32 tensor, as from the real ops."""
    asked = {name: mask[i] for i, group in enumerate(_GROUPS) for name in group}
    return [
        t.new_empty(t.shape) if t is not None and asked[name] else x.new_empty((0,), dtype=torch.float32)
        for name, t in zip(("x", *_PARAMS), tensors, strict=True)
    ]


def register_autograd(op: str, backward_op) -> None:
    """The autograd formula of an inner-transformer op (``op``, the forward's qualified name) whose
    backward is ``backward_op(grad, x, *params, keep1, keep2, num_heads, eps, option, output_mask)``:
    saves the inputs, recomputes in backward, asks only for the gradients autograd needs."""

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*(t for t in inputs[:_TENSORS] if t is not None))
        ctx.present = [t is not None for t in inputs[:_TENSORS]]
        ctx.scalars = inputs[_TENSORS : _TENSORS + 3]  # num_heads, eps, and the op's precision option

    def backward(ctx, grad):
        saved = iter(ctx.saved_tensors)
        inputs = [next(saved) if present else None for present in ctx.present]
        grads = backward_op(grad, *inputs, *ctx.scalars, output_mask(ctx.needs_input_grad))
        # no gradient for keep1, keep2, num_heads, eps and the precision option
        out: list[torch.Tensor | None] = list(grads) + [None] * 5
        for i, needed in enumerate(ctx.needs_input_grad[: 1 + len(_PARAMS)]):
            if not needed or not ctx.present[i]:  # not asked for (came back empty), or an absent bias
                out[i] = None
        return tuple(out)

    torch.library.register_autograd(op, backward, setup_context=setup_context)


def _register_python_kernels() -> None:
    """Fake (meta) kernels for tracing and the autograd formula of the C++ ops."""

    @torch.library.register_fake("tntvision::inner_transformer")
    def _fake_forward(x, *args):
        return x.new_empty(x.shape)  # contiguous, as the op's output (whatever x's strides)

    @torch.library.register_fake("tntvision::inner_transformer_backward")
    def _fake_backward(
        grad, x, ln1_w, ln1_b, qk_w, qk_b, v_w, v_b, proj_w, proj_b, ln2_w, ln2_b, fc1_w, fc1_b, fc2_w, fc2_b,
        keep1, keep2, num_heads, eps, low_precision=False, output_mask=_ALL,
    ):  # fmt: skip
        tensors = (x, ln1_w, ln1_b, qk_w, qk_b, v_w, v_b, proj_w, proj_b)
        return fake_gradients(x, tensors + (ln2_w, ln2_b, fc1_w, fc1_b, fc2_w, fc2_b), output_mask)

    register_autograd("tntvision::inner_transformer", torch.ops.tntvision.inner_transformer_backward)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The precision of the fused op's products for words ``x``: bf16 / fp16 words, else the autocast
    dtype of x's device when autocast is on there, else fp32."""
    if x.dtype in (torch.bfloat16, torch.float16):
        return x.dtype
    device = x.device.type
    autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    return autocast if autocast in (torch.bfloat16, torch.float16) else torch.float32


def inner_transformer(
    x: torch.Tensor,
    block: torch.nn.Module,
    keep1: torch.Tensor | None,
    keep2: torch.Tensor | None,
    *,
    backend: str = "cpu",
) -> torch.Tensor:
    """Run ``block``'s inner transformer on words ``x`` (S, m, c) through the fused op ``backend``
    (``cpu`` or ``triton``: what :func:`fused_backend` said may run; the caller has checked).

    ``block`` is a :class:`~tntvision.models.tnt.TNTBlock` with an inner transformer; ``keep1`` / ``keep2``
    are per-sentence drop-path scales (S,) for the attention and MLP branches, or None. The products run in
    :func:`compute_dtype`: the Triton op takes it as it is; the C++ op is told it may compute its GEMMs in
    bf16 (``low_precision``), which it does where the CPU has AMX (see :func:`kernel_dispatch`).
    """
    attn, mlp = block.attn_in, block.mlp_in
    args = (
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
    if backend == "triton":
        return torch.ops.tntvision.inner_transformer_triton(*args, compute_dtype(x))
    return torch.ops.tntvision.inner_transformer(*args, compute_dtype(x) == torch.bfloat16)
