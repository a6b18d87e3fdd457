"""TNT's inner transformer as one Triton op: ``torch.ops.tntvision.inner_transformer_triton``.

The GPU counterpart of the C++ CPU op (:mod:`tntvision.kernels.cpu`): same inputs, same formula, one
kernel launch per inner transformer forward (``triton_kernels.inner_forward_kernel``) and one plus a few
matrix products per backward (the kernel recomputes its tile's forward, writes the input gradient and the
per-word operands of the weight gradients; one ``torch.mm`` each turns those into weight gradients). It is
a ``torch.library`` custom op with a fake kernel and an autograd formula, so autograd,
``torch.compile(fullgraph=True)`` and ``torch.export`` see one op per inner transformer, and
``torch.profiler`` shows it as ``tntvision::inner_transformer_triton``.

It runs on CUDA tensors (compiled by Triton) and on CPU tensors through Triton's interpreter, which is
how it is tested on machines without a GPU (``TNTVISION_KERNEL_BACKEND=triton``, see
:func:`tntvision.kernels.kernel_backend`). Registering the op needs no Triton; running it does.

``compute_dtype`` is the precision of the products' operands (fp32, bf16 or fp16); LayerNorms, softmax,
GELU, residuals and every accumulation are fp32, the output has ``x``'s dtype and each gradient its
input's dtype.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from dataclasses import dataclass
from types import ModuleType

import torch

from . import op

__all__ = [
    "TileConfig",
    "gpu_supports",
    "inner_transformer_triton",
    "interpreted",
    "runs_on",
    "supports",
    "tile_config",
    "triton_status",
    "triton_version",
]

# The tile of one program, chosen from the compiled kernels' resource usage (benchmarks/triton_compile.py:
# registers and spills from ptxas's output, static facts, not timings; docs/performance.md): about 2048
# word features (64 rows of TNT-S's 24 padded to 32, 32 rows of TNT-B's 40 padded to 64), 4 warps for the
# forward up to 32 features and 8 above, 8 for the backward, which holds more tiles live.
TILE_ROWS = 64  # at most, words per program: whole sentences, e.g. 4 of TNT's 16 words
TILE_VALUES = 2048  # rows x padded features per program
MAX_WORDS = 128  # one sentence's (words x words) scores must fit a program's registers
MAX_DIM = 256  # nor may a tile's (rows x features) blocks outgrow them
HIDDEN_CHUNK = 32  # the MLP's hidden features go through registers this many at a time
BACKWARD_WARPS = 8


def triton_status() -> tuple[bool, str]:
    """(whether Triton imports here, why not)."""
    try:
        import triton  # noqa: F401
    except Exception as e:  # not installed (CPU-only torch wheels), or broken
        return False, f"{type(e).__name__}: {e}"
    return True, ""


def triton_version() -> str:
    import triton

    return triton.__version__


def interpreted() -> bool:
    """Whether Triton runs kernels through its interpreter (``TRITON_INTERPRET=1`` when Triton was
    imported): the only way the op runs on CPU tensors."""
    import triton

    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _kernels() -> ModuleType:
    """The Triton kernels (imported at first use: importing Triton takes a while)."""
    return importlib.import_module(".triton_kernels", __package__)


# Triton's oldest NVIDIA target with tensor cores for fp16 (Turing), and bf16's (Ampere): below them the
# reference path runs (a static fact of the GPU)
MIN_CAPABILITY = (7, 5)
BF16_CAPABILITY = (8, 0)


def gpu_supports(capability: tuple[int, int] | None, compute_dtype: torch.dtype) -> bool:
    """Whether a GPU of this compute capability runs the op's products in ``compute_dtype`` (None: not a
    GPU, the interpreter runs every dtype)."""
    if capability is None:
        return True
    return tuple(capability) >= (BF16_CAPABILITY if compute_dtype == torch.bfloat16 else MIN_CAPABILITY)


def runs_on(device: torch.device) -> tuple[bool, str]:
    """(whether the op can run on tensors of ``device`` here, why not)."""
    ok, why = triton_status()
    if not ok:
        return False, f"Triton does not import ({why})"
    if device.type == "cuda":
        return True, ""
    if device.type == "cpu" and interpreted():
        return True, ""
    if device.type == "cpu":
        return (
            False,
            "on CPU tensors the Triton op runs only under Triton's interpreter: set TRITON_INTERPRET=1 "
            "before Python starts",
        )
    return False, f"the Triton op does not run on {device.type} tensors"


def _pow2(n: int, least: int = 16) -> int:
    """The smallest power of two >= n and >= least (``tl.dot`` needs dimensions of 16 or more)."""
    return max(least, 1 << max(0, n - 1).bit_length())


@dataclass(frozen=True)
class TileConfig:
    """The compile-time shape of one program: ``BS`` sentences in ``R`` rows, ``CP`` / ``HDP`` the padded
    feature and head dims, ``CH`` the hidden chunk, ``DOT`` the products' operand precision; and the warps
    of the forward and backward programs."""

    BS: int
    R: int
    CP: int
    HDP: int
    CH: int
    DOT: int
    forward_warps: int
    backward_warps: int


_DOT = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_DOT_EMULATED_BF16 = 3  # bf16-rounded operands, fp32 products: the interpreter's bf16 tl.dot is wrong


def tile_config(words: int, dim: int, head_dim: int, compute_dtype: torch.dtype) -> TileConfig:
    """The program shape for sentences of ``words`` x ``dim`` (static facts only)."""
    cp = _pow2(dim)
    rows = max(16, min(TILE_ROWS, TILE_VALUES // cp))
    sentences = max(1, rows // words)
    dot = _DOT[compute_dtype]
    if interpreted() and dot == _DOT[torch.bfloat16]:
        dot = _DOT_EMULATED_BF16
    return TileConfig(
        BS=sentences,
        R=_pow2(sentences * words),
        CP=cp,
        HDP=_pow2(head_dim),
        CH=HIDDEN_CHUNK,
        DOT=dot,
        forward_warps=4 if cp <= 32 else 8,
        backward_warps=BACKWARD_WARPS,
    )


DTYPES = tuple(_DOT)  # the dtypes of words the op takes


def supports(words: int, dim: int) -> bool:
    """Whether the op computes sentences of ``words`` x ``dim`` (else the reference path runs): a
    sentence's (words x words) scores and a tile's words must fit a program's registers."""
    return 1 <= words <= MAX_WORDS and 1 <= dim <= MAX_DIM


def _check(
    x: torch.Tensor, tensors: tuple[torch.Tensor | None, ...], num_heads: int, compute_dtype: torch.dtype
) -> None:
    torch._check(
        x.dtype in DTYPES, lambda: f"inner_transformer_triton: x must be one of {DTYPES}, got {x.dtype}"
    )
    torch._check(compute_dtype in DTYPES, lambda: f"inner_transformer_triton: compute_dtype {compute_dtype}")
    torch._check(
        x.dim() == 3, lambda: f"inner_transformer_triton: x must be (sentences, words, dim), got {x.shape}"
    )
    torch._check(
        x.shape[2] % num_heads == 0, lambda: f"dim {x.shape[2]} is not divisible by {num_heads} heads"
    )
    devices = {t.device for t in tensors if t is not None} - {x.device}
    torch._check(not devices, lambda: f"inner_transformer_triton: tensors on {devices} and {x.device}")


def _device(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Launch on x's GPU (Triton launches on the current device)."""
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


def _launch_args(
    x: torch.Tensor, weights: tuple, attn_scale: torch.Tensor | None, mlp_scale: torch.Tensor | None
) -> list:
    """The 14 weights and the keep scales as contiguous tensors (``x`` stands in for an absent bias or
    keep scale: the kernel never reads it)."""
    return [(t if t is not None else x).contiguous() for t in (*weights, attn_scale, mlp_scale)]


def _constants(cfg: TileConfig, num_heads: int, qk_b, attn_scale, mlp_scale) -> dict[str, object]:
    """The compile-time arguments both kernels take."""
    tile = {"BS": cfg.BS, "R": cfg.R, "CP": cfg.CP, "HDP": cfg.HDP, "CH": cfg.CH, "DOT": cfg.DOT}
    present = {
        "HAS_QKV_BIAS": qk_b is not None,
        "HAS_ATTN_SCALE": attn_scale is not None,
        "HAS_MLP_SCALE": mlp_scale is not None,
    }
    return {"NH": num_heads, **tile, **present}


def _shapes(x: torch.Tensor, fc1_w: torch.Tensor, num_heads: int) -> tuple[int, int, int, int, int]:
    S, m, c = x.shape
    return S, m, c, fc1_w.shape[0], c // num_heads


@torch.library.custom_op("tntvision::inner_transformer_triton", mutates_args=(), device_types=("cpu", "cuda"))
def inner_transformer_triton(
    x: torch.Tensor,
    ln1_w: torch.Tensor,
    ln1_b: torch.Tensor,
    qk_w: torch.Tensor,
    qk_b: torch.Tensor | None,
    v_w: torch.Tensor,
    v_b: torch.Tensor | None,
    proj_w: torch.Tensor,
    proj_b: torch.Tensor,
    ln2_w: torch.Tensor,
    ln2_b: torch.Tensor,
    fc1_w: torch.Tensor,
    fc1_b: torch.Tensor,
    fc2_w: torch.Tensor,
    fc2_b: torch.Tensor,
    attn_scale: torch.Tensor | None,
    mlp_scale: torch.Tensor | None,
    num_heads: int,
    eps: float,
    compute_dtype: torch.dtype,
) -> torch.Tensor:
    """words (S, m, c) -> (S, m, c): ``x + attn_scale * attn(LN1(x))``, then ``+ mlp_scale * mlp(LN2(.))``."""
    _check(x, (ln1_w, qk_w, v_w, proj_w, fc1_w, fc2_w, attn_scale, mlp_scale), num_heads, compute_dtype)
    S, m, c, hidden, hd = _shapes(x, fc1_w, num_heads)
    x = x.contiguous()
    y = torch.empty_like(x)
    if S == 0:
        return y
    cfg = tile_config(m, c, hd, compute_dtype)
    weights = (ln1_w, ln1_b, qk_w, qk_b, v_w, v_b, proj_w, proj_b, ln2_w, ln2_b, fc1_w, fc1_b, fc2_w, fc2_b)
    args = _launch_args(x, weights, attn_scale, mlp_scale)
    grid = (-(-S // cfg.BS),)
    with _device(x):
        _kernels().inner_forward_kernel[grid](
            x, y, *args, S, m, c, hidden, hd, eps, hd**-0.5,
            **_constants(cfg, num_heads, qk_b, attn_scale, mlp_scale), num_warps=cfg.forward_warps,
        )  # fmt: skip
    return y


@inner_transformer_triton.register_fake
def _fake_forward(x, *args):
    op.check_inputs(x, dict(zip(op.INPUTS[1:], args, strict=False)), args[len(op.INPUTS) - 1])
    return x.new_empty(x.shape)  # contiguous, as the op's output


@torch.library.custom_op(
    "tntvision::inner_transformer_triton_backward", mutates_args=(), device_types=("cpu", "cuda")
)
def inner_transformer_triton_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    ln1_w: torch.Tensor,
    ln1_b: torch.Tensor,
    qk_w: torch.Tensor,
    qk_b: torch.Tensor | None,
    v_w: torch.Tensor,
    v_b: torch.Tensor | None,
    proj_w: torch.Tensor,
    proj_b: torch.Tensor,
    ln2_w: torch.Tensor,
    ln2_b: torch.Tensor,
    fc1_w: torch.Tensor,
    fc1_b: torch.Tensor,
    fc2_w: torch.Tensor,
    fc2_b: torch.Tensor,
    attn_scale: torch.Tensor | None,
    mlp_scale: torch.Tensor | None,
    num_heads: int,
    eps: float,
    compute_dtype: torch.dtype,
    output_mask: list[bool],
) -> list[torch.Tensor]:
    """Gradients for x and each parameter (the op's input order), each in its input's dtype; what
    ``output_mask`` (x, ln1, qkv, proj, ln2, fc1, fc2) does not ask for comes back as an empty fp32
    tensor."""
    _check(x, (grad, ln1_w, qk_w, v_w, proj_w, fc1_w, fc2_w, attn_scale, mlp_scale), num_heads, compute_dtype)
    torch._check(grad.shape == x.shape, lambda: f"grad has shape {grad.shape}, x has {x.shape}")
    S, m, c, hidden, hd = _shapes(x, fc1_w, num_heads)
    need = dict(zip(("x", "ln1", "qkv", "proj", "ln2", "fc1", "fc2"), output_mask, strict=True))
    x, grad = x.contiguous(), grad.contiguous()
    cfg = tile_config(m, c, hd, compute_dtype)
    programs = -(-S // cfg.BS)
    rows, dt = S * m, compute_dtype

    def buffer(needed: bool, width: int, dtype: torch.dtype = dt) -> torch.Tensor:
        return x.new_empty((rows, width) if needed else (1,), dtype=dtype)

    dx = torch.empty_like(x) if need["x"] else x.new_empty((1,))
    xn1, dqkv = buffer(need["qkv"], c), buffer(need["qkv"], 3 * c)
    o, da = buffer(need["proj"], c), buffer(need["proj"], c)
    xn2, dh, g = buffer(need["fc1"], c), buffer(need["fc1"], hidden), buffer(need["fc2"], hidden)
    ln_sums = x.new_zeros((max(programs, 1), 4, cfg.CP), dtype=torch.float32)
    weights = (ln1_w, ln1_b, qk_w, qk_b, v_w, v_b, proj_w, proj_b, ln2_w, ln2_b, fc1_w, fc1_b, fc2_w, fc2_b)
    args = _launch_args(x, weights, attn_scale, mlp_scale)
    if S > 0:
        with _device(x):
            _kernels().inner_backward_kernel[(programs,)](
                grad, x, dx, *args, xn1, dqkv, o, da, xn2, g, dh, ln_sums, S, m, c, hidden, hd, eps, hd**-0.5,
                **_constants(cfg, num_heads, qk_b, attn_scale, mlp_scale),
                NEED_X=need["x"], NEED_LN1=need["ln1"], NEED_QKV=need["qkv"], NEED_PROJ=need["proj"],
                NEED_LN2=need["ln2"], NEED_FC1=need["fc1"], NEED_FC2=need["fc2"],
                num_warps=cfg.backward_warps,
            )  # fmt: skip

    def empty() -> torch.Tensor:
        return x.new_empty((0,), dtype=torch.float32)

    def as_(t: torch.Tensor, like: torch.Tensor | None, needed: bool) -> torch.Tensor:
        """A fresh contiguous gradient in ``like``'s dtype (outputs never alias), or empty."""
        if not needed or like is None:
            return empty()
        return t.to(dtype=like.dtype, memory_format=torch.contiguous_format, copy=True).view(like.shape)

    sums = ln_sums.sum(0)[:, :c]  # (4, c): d ln1_w, d ln1_b, d ln2_w, d ln2_b
    out = [as_(dx, x, need["x"]), as_(sums[0], ln1_w, need["ln1"]), as_(sums[1], ln1_b, need["ln1"])]
    if need["qkv"]:
        w = dqkv.t() @ xn1  # (3c, c) in the compute dtype, fp32 accumulation
        b = dqkv.sum(0, dtype=torch.float32)
        out += [as_(w[: 2 * c], qk_w, True), as_(b[: 2 * c], qk_b, True)]
        out += [as_(w[2 * c :], v_w, True), as_(b[2 * c :], v_b, True)]
    else:
        out += [empty() for _ in range(4)]
    need_proj = need["proj"]
    out += [as_(da.t() @ o, proj_w, need_proj), as_(da.sum(0, dtype=torch.float32), proj_b, need_proj)]
    out += [as_(sums[2], ln2_w, need["ln2"]), as_(sums[3], ln2_b, need["ln2"])]
    out += [as_(dh.t() @ xn2, fc1_w, need["fc1"]), as_(dh.sum(0, dtype=torch.float32), fc1_b, need["fc1"])]
    if need["fc2"]:
        dm = grad if mlp_scale is None else grad * mlp_scale.to(grad.dtype).view(-1, 1, 1)
        dm = dm.reshape(rows, c).to(dt)  # the gradient of the MLP branch's output
        out += [as_(dm.t() @ g, fc2_w, True), as_(dm.sum(0, dtype=torch.float32), fc2_b, True)]
    else:
        out += [empty(), empty()]
    return out


@inner_transformer_triton_backward.register_fake
def _fake_backward(grad, x, *rest):
    named = dict(zip(op.INPUTS[1:], rest, strict=False))
    op.check_inputs(x, named, rest[len(op.INPUTS) - 1])
    torch._check(grad.shape == x.shape, lambda: f"grad is {tuple(grad.shape)}, words {tuple(x.shape)}")
    return op.fake_gradients(x, [x, *(named[p] for p in op.PARAMS)], rest[-1])


op.register_autograd("tntvision::inner_transformer_triton", inner_transformer_triton_backward)
