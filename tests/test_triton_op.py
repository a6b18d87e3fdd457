"""The Triton op (``torch.ops.tntvision.inner_transformer_triton``), the GPU kernel of the inner transformer.

Without a GPU it runs on CPU tensors through Triton's interpreter (conftest.py turns it on where there is
no GPU); on a GPU (``benchmarks/gpu_check.py``) the same tests run compiled on CUDA tensors. Against an
independent float64 formula: outputs and every gradient, fp32 within 1e-5 of the values' scale, over the
registry's inner shapes and odd ones (1, 3, 9, 25 words; head dims 4-10; batch 1), with and without qkv
biases and drop-path scales. Then bf16 and fp16, the op's registration (opcheck, torch.compile, torch.export,
the profiler), the models on the Triton backend against the reference path, and the dispatch.

bf16 under the interpreter: triton 3.8's interpreter computes ``tl.dot`` on bf16 operands wrongly, so
there the kernel rounds the operands to bf16 and multiplies them in fp32 (``DOT=3``), which is what a
tensor core computes for bf16 up to the order of its fp32 sums; the bf16 ``tl.dot`` itself runs only on
a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import tntvision
from tntvision import kernels
from tntvision.errors import ConfigError
from tntvision.kernels import triton_op
from tntvision.models.tnt import TNTBlock

from .conftest import TNT_MODELS, small_input_size
from .test_kernel_op import NAMES, params  # the op's parameter names; random weights scaled like trained ones


def _device_param(kind: str):
    if kind == "cuda":
        return pytest.param("cuda", marks=pytest.mark.cuda, id="cuda")
    return pytest.param("cpu", id="interpreter")


@pytest.fixture(params=[_device_param("cpu"), _device_param("cuda")])
def device(request) -> str:
    """Where the op runs: CPU tensors through the interpreter, or a GPU (compiled)."""
    ok, why = triton_op.triton_status()
    if not ok:
        pytest.fail(f"Triton must import where torch ships it: {why}")
    if request.param == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("no CUDA GPU here: the compiled kernel runs in benchmarks/gpu_check.py on a GPU")
        if triton_op.interpreted():
            pytest.skip("Triton's interpreter is on: the CUDA case runs where TRITON_INTERPRET is unset")
    elif not triton_op.interpreted():
        pytest.skip("Triton's interpreter is off (a GPU is present): the CPU case runs without a GPU")
    return request.param


def op(x, p, attn_scale, mlp_scale, heads, compute_dtype=torch.float32, eps=1e-5):
    args = [p[n] for n in NAMES]
    return torch.ops.tntvision.inner_transformer_triton(
        x, *args, attn_scale, mlp_scale, heads, eps, compute_dtype
    )


def formula(x, p, attn_scale, mlp_scale, heads, *, eps=1e-5, dot_dtype=None):
    """The inner transformer written out in x's dtype (float64 here). With ``dot_dtype`` the operands of
    every product (the linear layers, q k^T and p v) are rounded to it first: what the kernel's products
    compute in bf16 or fp16, accumulating exactly."""

    def rnd(t):
        return t if dot_dtype is None else t.to(dot_dtype).to(x.dtype)

    def lin(a, w, b):
        y = rnd(a) @ rnd(w).t()
        return y if b is None else y + b

    p = {k: None if v is None else v.to(x.dtype) for k, v in p.items()}
    S, m, c = x.shape
    hd = c // heads
    h = F.layer_norm(x, (c,), p["ln1_w"], p["ln1_b"], eps)
    q, k = lin(h, p["qk_w"], p["qk_b"]).chunk(2, dim=-1)
    v = lin(h, p["v_w"], p["v_b"])
    q, k, v = (t.reshape(S, m, heads, hd).transpose(1, 2) for t in (q, k, v))  # (S, heads, m, hd)
    att = torch.softmax(rnd(q) @ rnd(k).transpose(-1, -2) * hd**-0.5, dim=-1)  # (S, heads, m, m)
    y = lin((rnd(att) @ rnd(v)).transpose(1, 2).reshape(S, m, c), p["proj_w"], p["proj_b"])  # (S, m, c)
    k1 = 1.0 if attn_scale is None else attn_scale.to(x.dtype)[:, None, None]
    k2 = 1.0 if mlp_scale is None else mlp_scale.to(x.dtype)[:, None, None]
    x1 = x + k1 * y
    z = lin(
        F.gelu(lin(F.layer_norm(x1, (c,), p["ln2_w"], p["ln2_b"], eps), p["fc1_w"], p["fc1_b"])),
        p["fc2_w"],
        None,
    )
    return x1 + k2 * (z + p["fc2_b"])


def _grads(fn, x, p, grad) -> dict[str, torch.Tensor]:
    """Output and gradients of ``fn(x, p)`` for the output gradient ``grad``: {"y", "x", name: ...}."""
    x = x.detach().clone().requires_grad_(True)
    p = {k: None if v is None else v.detach().clone().requires_grad_(True) for k, v in p.items()}
    y = fn(x, p)
    y.backward(grad.to(y.dtype))
    return {"y": y.detach(), "x": x.grad, **{k: v.grad for k, v in p.items() if v is not None}}


def _assert_fp32_close(got: dict, want: dict, what: str) -> None:
    """Each tensor within 1e-5 of the scale of its values (1 for values below 1)."""
    assert got.keys() == want.keys()
    for k, ref in want.items():
        err = (got[k].double().cpu() - ref).abs().max().item()
        assert err <= 1e-5 * max(1.0, ref.abs().max().item()), f"{what} {k}: max diff {err}"


# The registry's inner transformers (words, dim, heads, hidden) and odd ones: (sentences, words, dim,
# heads, hidden, qkv bias, drop-path scales)
REGISTRY_INNER = {
    "tnt_mini_patch4_28": (4, 8, 2, 32),
    "tnt_ti_patch16_224": (16, 12, 2, 48),
    "tnt_s_patch16_224": (16, 24, 4, 96),
    "tnt_b_patch16_224": (16, 40, 4, 160),
}
SHAPES = [(6, *shape, False, True) for shape in REGISTRY_INNER.values()]
SHAPES += [
    (1, 16, 24, 4, 96, True, False),  # batch 1: one sentence, 60 of the tile's 64 rows are padding
    (5, 1, 8, 2, 32, True, True),  # one word per sentence: attention is the identity
    (3, 3, 20, 2, 80, False, True),  # 3 words; head dim 10
    (4, 9, 14, 2, 56, True, False),  # 9 words (7 sentences a tile, one row spare); head dim 7
    (3, 25, 27, 3, 54, False, True),  # 25 words (2 sentences a tile, 14 spare rows); head dim 9; hidden 2c
    (2, 16, 10, 2, 40, True, True),  # head dim 5
    (9, 4, 16, 4, 64, False, False),  # head dim 4; 9 sentences of 4 words: tiles of 16, the last short
]


def test_the_registry_inner_shapes_are_the_ones_tested():
    """REGISTRY_INNER lists every inner transformer shape the registry builds (so SHAPES covers them)."""
    found = set()
    for name in TNT_MODELS:
        model = tntvision.create_model(name, img_size=small_input_size(name), depth=2)  # same blocks, fewer
        for block in model.blocks:
            if isinstance(block, TNTBlock) and block.has_inner:
                c, hidden = block.norm_in.normalized_shape[0], block.mlp_in.fc1.out_features
                found.add((block.proj.in_features // c, c, block.attn_in.num_heads, hidden))
    assert found == set(REGISTRY_INNER.values())


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:5])) + ("-bias" if s[5] else ""))
def test_op_matches_the_float64_formula(device, shape):
    S, m, c, heads, H, bias, keep = shape
    p = params(c, H, bias=bias, seed=S * m + c)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(S, m, c, generator=g)
    grad = torch.randn(S, m, c, generator=g)
    attn_scale = torch.tensor([0.0, 1.25, 1.25, 2.0] * S)[:S] if keep else None
    mlp_scale = torch.tensor([1.25, 0.0, 2.0] * S)[:S] if keep else None
    on = {k: None if v is None else v.to(device) for k, v in p.items()}
    k1, k2 = (None if t is None else t.to(device) for t in (attn_scale, mlp_scale))
    got = _grads(lambda x, p: op(x, p, k1, k2, heads), x.to(device), on, grad.to(device))
    p64 = {k: None if v is None else v.double() for k, v in p.items()}
    want = _grads(lambda x, p: formula(x, p, attn_scale, mlp_scale, heads), x.double(), p64, grad.double())
    _assert_fp32_close(got, want, f"{shape} on {device}")


def test_no_sentences(device):
    p = {k: None if v is None else v.to(device) for k, v in params(8, 32, bias=True).items()}
    x = torch.zeros(0, 4, 8, device=device, requires_grad=True)
    y = op(x, p, None, None, 2)
    assert y.shape == (0, 4, 8)
    y.sum().backward()
    assert x.grad.shape == (0, 4, 8)


@pytest.mark.parametrize(
    "mask", [[True] + [False] * 6, [False, True, False, True, False, True, False], [False] * 6 + [True]]
)
def test_backward_computes_only_what_output_mask_asks_for(device, mask):
    """A gradient not asked for comes back empty; those asked for equal the full backward's."""
    p = {k: None if v is None else v.to(device) for k, v in params(24, 96, bias=True, seed=4).items()}
    x = torch.randn(5, 16, 24, device=device)
    grad = torch.randn(5, 16, 24, device=device)
    keep = torch.tensor([1.0, 0.0, 2.0, 1.0, 1.0], device=device)
    args = (grad, x, *[p[n] for n in NAMES], keep, keep, 4, 1e-5, torch.float32)
    full = torch.ops.tntvision.inner_transformer_triton_backward(*args, [True] * 7)
    some = torch.ops.tntvision.inner_transformer_triton_backward(*args, mask)
    groups = [0, 1, 1, 2, 2, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6]  # the group of each output (x, then params)
    for i, (a, b) in enumerate(zip(full, some, strict=True)):
        if mask[groups[i]]:
            torch.testing.assert_close(b, a, rtol=0, atol=0)
        else:
            assert b.numel() == 0


def test_frozen_backbone_gets_its_input_gradient(device):
    """Weights without gradients (a frozen inner transformer): autograd asks only for x's."""
    p = {k: None if v is None else v.to(device) for k, v in params(12, 48, bias=False, seed=2).items()}
    x = torch.randn(3, 16, 12, device=device)
    grad = torch.randn_like(x)
    xr = x.clone().requires_grad_(True)
    op(xr, p, None, None, 2).backward(grad)
    leaves = {k: None if v is None else v.clone().requires_grad_(True) for k, v in p.items()}
    xf = x.clone().requires_grad_(True)
    op(xf, leaves, None, None, 2).backward(grad)
    torch.testing.assert_close(xr.grad, xf.grad, rtol=0, atol=0)
    assert all(v.grad is None for v in p.values() if v is not None)


# ------------------------------------------------------------------------------- bf16 and fp16


def _mean_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double().cpu() - b.double().cpu()).abs().mean().item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("words_dtype", ["fp32", "low"], ids=["autocast", "lowweights"])
def test_low_precision_products_round_their_operands(device, dtype, words_dtype):
    """The products' operands in bf16 / fp16 and everything else in fp32: the output follows the float64
    formula whose product operands are rounded (mean error, as a rounding that flips the other way moves
    one value by an ulp), far closer than the exact formula; and it is closer to the exact formula than the
    reference path's own low-precision result."""
    c, H, m, heads = 24, 96, 16, 4
    p = params(c, H, bias=True, seed=7)
    x = torch.randn(12, m, c)
    if words_dtype == "low":  # a model cast to bf16 / fp16: words and weights in that dtype
        x, p = x.to(dtype), {k: None if v is None else v.to(dtype) for k, v in p.items()}
    on = {k: None if v is None else v.to(device) for k, v in p.items()}
    got = op(x.to(device), on, None, None, heads, compute_dtype=dtype).double().cpu()
    p64 = {k: None if v is None else v.double() for k, v in p.items()}
    rounded = formula(x.double(), p64, None, None, heads, dot_dtype=dtype)
    exact = formula(x.double(), p64, None, None, heads)
    if words_dtype == "low":  # the output is rounded to the words' dtype too
        rounded, exact = (t.to(dtype).double() for t in (rounded, exact))
    block = _block(c, m, heads, p)
    with kernels.fused_kernels(False), torch.no_grad():
        if words_dtype == "low":
            reference = kernels.run_inner(block.to(dtype), x)
        else:
            with torch.autocast("cpu", dtype=dtype):
                reference = kernels.run_inner(block, x)
    err_rounded, err_exact = _mean_err(got, rounded), _mean_err(got, exact)
    err_reference = _mean_err(reference, exact)
    print(f"{dtype} {words_dtype}: mean error {err_rounded:.2e} (rounded formula), {err_exact:.2e} (exact), ")
    print(f"reference path {err_reference:.2e}")
    assert err_rounded <= 0.25 * err_exact  # the products really ran in low precision, the rest did not
    assert err_exact <= err_reference


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_gradients_within_the_reference_paths_error(device, dtype):
    """Under autocast, every gradient's mean error against the float64 formula is within the reference
    path's own (autocast on the block's modules): at most 1.25x it for each, at most it on average. The
    fused backward rounds the same products' operands as autocast does, but not the same way in each."""
    c, H, m, heads = 24, 96, 16, 4
    p = params(c, H, bias=False, seed=8)
    g = torch.Generator().manual_seed(3)
    x, grad = torch.randn(10, m, c, generator=g), torch.randn(10, m, c, generator=g)
    on = {k: None if v is None else v.to(device) for k, v in p.items()}
    got = _grads(
        lambda x, p: op(x, p, None, None, heads, compute_dtype=dtype), x.to(device), on, grad.to(device)
    )
    p64 = {k: None if v is None else v.double() for k, v in p.items()}
    exact = _grads(lambda x, p: formula(x, p, None, None, heads), x.double(), p64, grad.double())
    block = _block(c, m, heads, p)
    xr = x.clone().requires_grad_(True)
    with kernels.fused_kernels(False), torch.autocast("cpu", dtype=dtype):
        y = kernels.run_inner(block, xr)
    y.float().backward(grad)
    reference = {"y": y.detach(), "x": xr.grad, **_block_grads(block)}
    ratios = {k: _mean_err(got[k], exact[k]) / _mean_err(reference[k], exact[k]) for k in exact}
    print(
        f"{dtype}: mean error / the reference path's, per gradient: ",
        {k: round(r, 2) for k, r in ratios.items()},
    )
    assert max(ratios.values()) <= 1.25, ratios
    assert sum(ratios.values()) / len(ratios) <= 1.0, ratios


def _block(c: int, m: int, heads: int, p: dict) -> TNTBlock:
    """A TNTBlock whose inner transformer has the weights ``p`` (fp32)."""
    block = TNTBlock(
        dim=32, inner_dim=c, num_words=m, num_heads=2, inner_num_heads=heads, mlp_ratio=4.0,
        inner_mlp_ratio=p["fc1_w"].shape[0] / c, qkv_bias=p["qk_b"] is not None, proj_drop=0.0,
        attn_drop=0.0, drop_path=0.0, legacy=False, se_ratio=0.0,
    )  # fmt: skip
    modules = _inner_modules(block)
    with torch.no_grad():
        for name, (module, attr) in modules.items():
            if p[name] is not None:
                getattr(module, attr).copy_(p[name].float())
    return block


def _inner_modules(block: TNTBlock) -> dict:
    a, mlp = block.attn_in, block.mlp_in
    mods = {"ln1": block.norm_in, "qk": a.qk, "v": a.v, "proj": a.proj, "ln2": block.norm_mlp_in}
    mods |= {"fc1": mlp.fc1, "fc2": mlp.fc2}
    out = {}
    for name in NAMES:
        prefix, kind = name.rsplit("_", 1)
        out[name] = (mods[prefix], "weight" if kind == "w" else "bias")
    return out


def _block_grads(block: TNTBlock) -> dict[str, torch.Tensor]:
    return {
        name: getattr(module, attr).grad
        for name, (module, attr) in _inner_modules(block).items()
        if getattr(module, attr) is not None
    }


def test_bf16_products_are_emulated_only_under_the_interpreter(monkeypatch):
    """On a GPU bf16 products are tl.dot on bf16 operands (DOT=2); the interpreter, whose bf16 tl.dot is
    wrong, rounds the operands and multiplies in fp32 (DOT=3); fp32 and fp16 are the same on both."""
    monkeypatch.setattr(triton_op, "interpreted", lambda: False)
    assert triton_op.tile_config(16, 24, 6, torch.bfloat16).DOT == 2
    assert triton_op.tile_config(16, 24, 6, torch.float16).DOT == 1
    monkeypatch.setattr(triton_op, "interpreted", lambda: True)
    assert triton_op.tile_config(16, 24, 6, torch.bfloat16).DOT == 3
    assert triton_op.tile_config(16, 24, 6, torch.float32).DOT == 0


def test_tiles_hold_whole_sentences():
    for words in (1, 3, 4, 9, 16, 25, 64, 100, 128):
        cfg = triton_op.tile_config(words, 24, 6, torch.float32)
        assert cfg.BS * words <= cfg.R and cfg.R >= 16 and cfg.R & (cfg.R - 1) == 0
        assert cfg.HDP >= 16 and cfg.CP >= 24
    assert not triton_op.supports(129, 24) and triton_op.supports(128, 24)
    # about 2048 padded features a tile: TNT-S 4 sentences (64 rows of 32), TNT-B 2 (32 rows of 64)
    tnt_s, tnt_b = (triton_op.tile_config(16, c, 6, torch.bfloat16) for c in (24, 40))
    assert (tnt_s.R, tnt_s.BS, tnt_s.forward_warps) == (64, 4, 4)
    assert (tnt_b.R, tnt_b.BS, tnt_b.forward_warps) == (32, 2, 8)


# ------------------------------------------------------------------------------- torch.library


def test_opcheck_forward_and_backward(device):
    """torch.library.opcheck: schema, fake kernels against the real ones, autograd registration and
    AOTAutograd (which runs the fake backward)."""
    p = {
        k: None if v is None else v.to(device).requires_grad_(True)
        for k, v in params(8, 32, bias=True).items()
    }
    x = torch.randn(5, 4, 8, device=device, requires_grad=True)
    keep = torch.tensor([0.0, 2.0, 2.0, 0.0, 2.0], device=device)
    args = (x, *[p[n] for n in NAMES], keep, None, 2, 1e-5, torch.float32)
    torch.library.opcheck(torch.ops.tntvision.inner_transformer_triton.default, args)
    grad = torch.randn(5, 4, 8, device=device)
    bargs = (
        grad,
        *[a.detach() if isinstance(a, torch.Tensor) else a for a in args],
        [True, False] * 3 + [True],
    )
    torch.library.opcheck(torch.ops.tntvision.inner_transformer_triton_backward.default, bargs)


def _model(name: str, device: str, **kw) -> torch.nn.Module:
    """``name`` with two blocks at its smallest cheap input, weights perturbed away from their init."""
    kw.setdefault("depth", 2)
    model = tntvision.create_model(name, img_size=small_input_size(name), **kw)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.to(device)


def _run(model, x, *, backend: str | None, seed: int = 3):
    """Output, input gradient and parameter gradients of one forward/backward on ``backend`` (None: the
    reference path)."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    fused = backend is not None
    with kernels.fused_kernels(fused), kernels.kernel_backend_set(backend or "auto"):
        torch.manual_seed(seed)
        out = model(x)
        (out.float() * torch.linspace(-1, 1, out.shape[-1], device=x.device)).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), x.grad, grads


def _assert_runs_agree(got, want) -> None:
    out, gx, grads = got
    ref, ref_gx, ref_grads = want
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(gx, ref_gx, rtol=0, atol=1e-5 * max(1.0, ref_gx.abs().max().item()))
    assert grads.keys() == ref_grads.keys()
    for k, g in ref_grads.items():
        err = (grads[k] - g).abs().max().item()
        assert err <= 1e-5 * max(1.0, g.abs().max().item()), f"{k}: max diff {err}"


INNER_TNT = [n for n in TNT_MODELS if n != "vit_mini_patch4_28"]


@pytest.mark.parametrize("name", INNER_TNT)
def test_models_on_the_triton_backend_match_the_reference_path(device, name):
    """Each registered TNT (two blocks of it), training mode with drop path: outputs, the input gradient
    and every parameter gradient within 1e-5 of the reference path, drawing the same drop-path stream;
    the Triton op ran once per block, the C++ op never."""
    model = _model(name, device, drop_path_rate=0.3).train()
    x = torch.randn(2, model.in_chans, *(2 * [small_input_size(name)]), device=device)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        got = _run(model, x, backend="triton")
    counts = {e.key: e.count for e in prof.key_averages()}
    assert counts.get("tntvision::inner_transformer_triton") == len(model.blocks)
    assert counts.get("tntvision::inner_transformer_triton_backward") == len(model.blocks)
    assert "tntvision::inner_transformer" not in counts
    _assert_runs_agree(got, _run(model, x, backend=None))


def test_the_profiler_names_the_op_triton(device):
    model = _model("tnt_mini_patch4_28", device).eval()
    x = torch.randn(2, 1, 28, 28, device=device)
    with kernels.kernel_backend_set("triton"), torch.no_grad(), torch.profiler.profile() as prof:
        model(x)
    names = [e.key for e in prof.key_averages() if "inner_transformer" in e.key]
    assert names and all("triton" in n for n in names)


def test_compile_fullgraph_sees_one_triton_op_per_inner_transformer(device):
    """torch.compile (AOTAutograd, fullgraph): one forward op and one backward op per block, the same
    outputs and gradients as eager."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    model = _model("tnt_mini_patch4_28", device).train()
    x = torch.randn(2, 1, 28, 28, device=device)
    graphs = {"forward": [], "backward": []}

    def keeping(kind):
        def compiler(gm, example_inputs):
            graphs[kind].append(gm)
            return make_boxed_func(gm.forward)

        return compiler

    eager = _run(model, x, backend="triton")
    torch._dynamo.reset()
    compiled = torch.compile(
        model,
        fullgraph=True,
        backend=aot_autograd(fw_compiler=keeping("forward"), bw_compiler=keeping("backward")),
    )
    got = _run(compiled, x, backend="triton")
    torch._dynamo.reset()

    def count(kind: str, op: str) -> int:
        return [str(n.target) for g in graphs[kind] for n in g.graph.nodes if n.op == "call_function"].count(
            op
        )

    assert count("forward", "tntvision.inner_transformer_triton.default") == len(model.blocks)
    assert count("backward", "tntvision.inner_transformer_triton_backward.default") == len(model.blocks)
    out, gx, grads = got
    _assert_runs_agree((out, gx, {k.removeprefix("_orig_mod."): v for k, v in grads.items()}), eager)


def test_torch_export_holds_the_triton_op(device):
    model = _model("tnt_mini_patch4_28", device).eval()
    x = torch.randn(2, 1, 28, 28, device=device)
    with kernels.kernel_backend_set("triton"):
        prog = torch.export.export(model, (x,))
    ops = [str(n.target) for n in prog.graph.nodes if n.op == "call_function"]
    assert ops.count("tntvision.inner_transformer_triton.default") == len(model.blocks)
    with torch.no_grad(), kernels.fused_kernels(False):
        ref = model(x)
    torch.testing.assert_close(prog.module()(x), ref, rtol=0, atol=1e-5)


def test_a_hooked_block_calls_its_modules_on_the_triton_backend(device):
    """A forward hook on block 0's fc1 sends that block to the reference path (the hook fires and changes
    the numbers); the other block keeps the Triton op."""
    model = _model("tnt_mini_patch4_28", device).eval()
    x = torch.randn(2, 1, 28, 28, device=device)
    with torch.no_grad(), kernels.kernel_backend_set("triton"):
        plain = model(x)
        calls = []
        handle = model.blocks[0].mlp_in.fc1.register_forward_hook(
            lambda mod, a, out: calls.append(1) or out * 1.5
        )
        with torch.profiler.profile() as prof:
            hooked = model(x)
        handle.remove()
    counts = {e.key: e.count for e in prof.key_averages()}
    assert calls == [1] and counts.get("tntvision::inner_transformer_triton") == len(model.blocks) - 1
    assert (hooked - plain).abs().max() > 1e-3


# ------------------------------------------------------------------------------------- dispatch


def test_backend_from_static_facts():
    assert kernels.kernel_backend("cuda") == "triton"  # Triton imports: CUDA tensors would take it
    assert kernels.kernel_backend("cuda", torch.float64) == "reference"
    with kernels.kernel_backend_set("cpu"):
        assert kernels.kernel_backend("cuda") == "reference"
    with kernels.fused_kernels(False):
        assert kernels.kernel_backend("cuda") == "reference" and kernels.kernel_backend("cpu") == "reference"
    if triton_op.interpreted():
        with kernels.kernel_backend_set("triton"):
            assert kernels.kernel_backend("cpu") == "triton"
            assert kernels.kernel_backend("cpu", torch.float16) == "triton"
    with pytest.raises(ConfigError, match="unknown kernel backend"):
        kernels.set_kernel_backend("cuda")


def test_words_outside_the_tile_take_the_reference_path():
    words = torch.zeros(2, 129, 8)
    with kernels.kernel_backend_set("triton"):
        assert kernels.fused_backend(words) is None
        assert kernels.fused_backend(torch.zeros(2, 128, 8)) == "triton"


def test_backend_setting_from_the_environment(monkeypatch):
    """TNTVISION_KERNEL_BACKEND (read at import) picks the backend; a bad value fails every call that
    needs it; asking for Triton on CPU tensors without the interpreter says how to get it."""
    monkeypatch.setattr(kernels.settings, "_BACKEND_ENVIRONMENT", "Triton ")
    assert kernels.kernel_backend_setting() == "triton"
    monkeypatch.setattr(kernels.settings, "_BACKEND_ENVIRONMENT", "gpu")
    for _ in range(2):
        with pytest.raises(ConfigError, match="auto, cpu, triton"):
            kernels.kernel_backend("cpu")
    code = "from tntvision import kernels\nkernels.kernel_backend('cpu')\n"
    env = {**os.environ, "TNTVISION_KERNEL_BACKEND": "triton", "TRITON_INTERPRET": "0"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode != 0 and "ConfigError" in out.stderr and "TRITON_INTERPRET=1" in out.stderr


def test_kernels_info_names_the_backend_of_each_device():
    out = subprocess.run(
        [sys.executable, "-m", "tntvision.cli", "kernels", "info", "--json"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["backends"]["cpu"] in ("cpu", "reference") and info["backends"]["cuda"] == "triton"
    assert info["triton"]["version"] and info["backend_setting"] == "auto"


def test_the_reference_path_attends_with_sdpa_on_a_gpu():
    """Short sequences (TNT's words) take the explicit transposed-softmax path on the CPU only; on CUDA
    every length goes to scaled_dot_product_attention."""
    from tntvision.kernels.lean import SMALL_ATTN_TOKENS, explicit_attention

    assert explicit_attention(16, torch.device("cpu")) and not explicit_attention(16, torch.device("cuda"))
    assert not explicit_attention(SMALL_ATTN_TOKENS + 1, torch.device("cpu"))


def test_the_kernels_compile_for_a_gpu(tmp_path):
    """Triton lowers both kernels to a cubin for an H100 (sm_90) here, without a GPU (ptxas ships with
    Triton): the compiled path, which the interpreter never takes, builds for TNT-S in bf16. The full
    matrix (every registry shape, fp32/bf16/fp16, sm_80/89/90) is benchmarks/triton_compile.py's."""
    out = tmp_path / "compile.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "triton_compile.py"
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    run = subprocess.run(
        [sys.executable, str(script), "--quick", "--json", str(out)], capture_output=True, text=True, env=env
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [r["kernel"] for r in rows] == ["forward", "backward"]
    for r in rows:
        assert 0 < r["registers"] <= 255 and r["warps_per_sm"] >= r["warps"], r


def test_compute_dtype_from_the_words_or_autocast():
    """The products' precision: bf16 / fp16 words keep theirs; fp32 words take their device's autocast
    dtype when autocast is on there (not another device's), else fp32."""
    x = torch.zeros(2, 4, 8)
    assert kernels.compute_dtype(x) == torch.float32
    assert (
        kernels.compute_dtype(x.half()) == torch.float16
        and kernels.compute_dtype(x.bfloat16()) == torch.bfloat16
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert kernels.compute_dtype(x) == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.float16):
        assert kernels.compute_dtype(x) == torch.float16
    with torch.autocast("cuda", dtype=torch.float16):  # another device's autocast
        assert kernels.compute_dtype(x) == torch.float32


def test_a_model_under_autocast_runs_the_triton_op_in_low_precision(device):
    """The mini under bf16 autocast on the Triton backend: its logits follow the reference path's autocast
    logits (mean difference well under the gap between the fp32 and the bf16 runs) and differ from the
    fp32 run, so the op was told to compute its products in bf16."""
    model = _model("tnt_mini_patch4_28", device).eval()
    x = torch.randn(4, 1, 28, 28, device=device)
    with torch.no_grad(), kernels.kernel_backend_set("triton"):
        fp32 = model(x).float()
        with torch.autocast(device, dtype=torch.bfloat16):
            triton_bf16 = model(x).float()
        with kernels.fused_kernels(False), torch.autocast(device, dtype=torch.bfloat16):
            reference_bf16 = model(x).float()
    gap = (fp32 - reference_bf16).abs().mean().item()
    assert (triton_bf16 - fp32).abs().mean().item() > 0.1 * gap > 0
    assert (triton_bf16 - reference_bf16).abs().mean().item() < 1.5 * gap


def test_gpus_too_old_for_the_products_take_the_reference_path(monkeypatch):
    """bf16 products need Ampere (8.0), fp16 and fp32 Turing (7.5): below, CUDA words take the reference
    path (the GPU's compute capability is a static fact; faked here, as there is no GPU)."""
    assert triton_op.gpu_supports((9, 0), torch.bfloat16) and triton_op.gpu_supports(None, torch.bfloat16)
    assert not triton_op.gpu_supports((7, 5), torch.bfloat16) and triton_op.gpu_supports(
        (7, 5), torch.float16
    )
    assert not triton_op.gpu_supports((7, 0), torch.float32)
    monkeypatch.setattr(kernels.backend, "kernel_backend", lambda device, dtype: "triton")
    for capability, dtype, want in [((8, 0), torch.bfloat16, "triton"), ((7, 5), torch.bfloat16, None)]:
        # what fused_backend reads of CUDA words (there is no GPU here to hold real ones)
        words = SimpleNamespace(device=torch.device("cuda", 0), dtype=dtype, shape=(2, 16, 24))
        monkeypatch.setattr(kernels.backend, "_capability", lambda index, c=capability: c)
        assert kernels.fused_backend(words) == want
