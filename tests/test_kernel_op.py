"""The fused op itself (``torch.ops.tntvision.inner_transformer``) against an independent float64 formula.

Every instruction-set copy of the kernel this CPU can run (and ``avx2-w16``, the AVX-512 copy's 16-float
code on AVX2), in both tile layouts (rows and lanes, forced), on the word counts that take every branch
of the attention code (1, 3, 4, 16, 20, 28 and 36 words: 1-5 vectors of 8 and the general loop), head
sizes that leave a tail, with and without the qkv bias, on one and two threads, batch 1 and many tiles:
outputs and every gradient within 1e-5. Then the
bf16 GEMM path against the same formula with its GEMM operands rounded to bf16, argument checks, and the
dispatch controls.
"""

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tntvision import kernels
from tntvision.errors import ConfigError

from .conftest import need_fused_kernel

NAMES = ["ln1_w", "ln1_b", "qk_w", "qk_b", "v_w", "v_b", "proj_w", "proj_b"]
NAMES += ["ln2_w", "ln2_b", "fc1_w", "fc1_b", "fc2_w", "fc2_b"]


def _dispatch() -> dict:
    need_fused_kernel()
    return kernels.kernel_dispatch()


@pytest.fixture(autouse=True)
def _kernel():  # every test here runs the op itself
    need_fused_kernel()


def _isas() -> list[str]:
    cpu = _dispatch()["cpu_isas"]
    return cpu + (["avx2-w16"] if "avx2" in cpu else [])


def params(c: int, H: int, *, bias: bool, seed: int = 0) -> dict[str, torch.Tensor | None]:
    """Random weights of one inner transformer, away from any init (scaled like trained ones)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0, base=0.0):
        return base + scale * torch.randn(*shape, generator=g)

    return {
        "ln1_w": r(c, scale=0.2, base=1.0),
        "ln1_b": r(c, scale=0.1),
        "qk_w": r(2 * c, c, scale=c**-0.5),
        "qk_b": r(2 * c, scale=0.1) if bias else None,
        "v_w": r(c, c, scale=c**-0.5),
        "v_b": r(c, scale=0.1) if bias else None,
        "proj_w": r(c, c, scale=c**-0.5),
        "proj_b": r(c, scale=0.1),
        "ln2_w": r(c, scale=0.2, base=1.0),
        "ln2_b": r(c, scale=0.1),
        "fc1_w": r(H, c, scale=c**-0.5),
        "fc1_b": r(H, scale=0.1),
        "fc2_w": r(c, H, scale=H**-0.5),
        "fc2_b": r(c, scale=0.1),
    }


def op(x, p, attn_scale, mlp_scale, heads, *, eps=1e-5, low_precision=False):
    args = [p[n] for n in NAMES]
    return torch.ops.tntvision.inner_transformer(x, *args, attn_scale, mlp_scale, heads, eps, low_precision)


def formula(x, p, attn_scale, mlp_scale, heads, *, eps=1e-5, gemm_dtype=None):
    """The inner transformer written out with torch.nn.functional, in x's dtype. With ``gemm_dtype``,
    each GEMM's operands are rounded to it first (what a bf16 GEMM with exact accumulation computes), and
    its gradients are those of the unrounded operands (what an fp32 backward of that forward computes)."""

    def lin(a, w, b):
        if gemm_dtype is None:
            return F.linear(a, w, b)
        exact = F.linear(a, w, b)  # the value of rounded operands, the gradient of exact ones (what a
        rounded = F.linear(a.to(gemm_dtype).to(x.dtype), w.to(gemm_dtype).to(x.dtype), b)  # bf16 forward
        return exact + (rounded - exact).detach()  # followed by an fp32 backward computes)

    p = {k: None if v is None else v.to(x.dtype) for k, v in p.items()}
    S, m, c = x.shape
    hd = c // heads
    h = F.layer_norm(x, (c,), p["ln1_w"], p["ln1_b"], eps)
    q, k = lin(h, p["qk_w"], p["qk_b"]).chunk(2, dim=-1)
    v = lin(h, p["v_w"], p["v_b"])
    q, k, v = (t.reshape(S, m, heads, hd).transpose(1, 2) for t in (q, k, v))  # (S, heads, m, hd)
    att = torch.softmax((q @ k.transpose(-1, -2)) * hd**-0.5, dim=-1) @ v  # (S, heads, m, hd)
    y = lin(att.transpose(1, 2).reshape(S, m, c), p["proj_w"], p["proj_b"])  # (S, m, c)
    k1 = 1.0 if attn_scale is None else attn_scale.to(x.dtype)[:, None, None]
    k2 = 1.0 if mlp_scale is None else mlp_scale.to(x.dtype)[:, None, None]
    x1 = x + k1 * y
    z = lin(
        F.gelu(lin(F.layer_norm(x1, (c,), p["ln2_w"], p["ln2_b"], eps), p["fc1_w"], p["fc1_b"])),
        p["fc2_w"],
        None,
    )
    return x1 + k2 * (z + p["fc2_b"])


# (sentences, words, dim, heads, hidden): TNT-S's and the mini's shapes, then every attention branch
SHAPES = [
    (5, 16, 24, 4, 96),  # TNT-S: 16 words of 24, 4 heads of 6
    (7, 4, 8, 2, 32),  # the mini: 4 words of 8
    (3, 3, 12, 3, 48),  # 3 words
    (3, 20, 16, 2, 64),  # 20 words: 3 vectors of 8
    (2, 28, 16, 4, 40),  # 28 words: 4 vectors; hidden 40
    (2, 36, 12, 2, 24),  # 36 words: the general loop; head size 6 leaves a tail of the 4-blocks
    (1, 16, 24, 4, 96),  # batch 1 of one sentence
    (40, 16, 24, 4, 96),  # several tiles of 16 sentences
    (4, 1, 8, 1, 16),  # one word
    (300, 4, 8, 2, 32),  # the mini, several tiles of the lane layout and a part-filled last group
]


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx2-w16", "avx512", "avx512-w8"])
@pytest.mark.parametrize("layout", ["rows", "lanes"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "qkvbias"])
def test_op_matches_the_formula(isa, layout, shape, bias, threads):
    if isa not in _isas():
        pytest.skip(
            f"this CPU cannot run the {isa} kernels (it runs {_isas()}); they are tested where it can"
        )
    S, m, c, heads, H = shape
    p = params(c, H, bias=bias, seed=S * m + c)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(S, m, c, generator=g)
    attn_scale = torch.tensor([0.0, 1.25, 1.25, 2.0] * S)[:S]
    mlp_scale = torch.tensor([1.25, 0.0, 2.0] * S)[:S]
    grad = torch.randn(S, m, c, generator=g)

    leaves = {k: v.clone().requires_grad_(True) for k, v in p.items() if v is not None}
    pp = {k: leaves.get(k) for k in p}
    xr = x.clone().requires_grad_(True)
    with kernels.kernel_options(isa=isa, layout=layout):
        y = op(xr, pp, attn_scale, mlp_scale, heads)
        y.backward(grad)

    x64 = x.double().requires_grad_(True)
    leaves64 = {k: v.detach().double().requires_grad_(True) for k, v in leaves.items()}
    want = formula(x64, {k: leaves64.get(k) for k in p}, attn_scale, mlp_scale, heads)
    want.backward(grad.double())

    torch.testing.assert_close(y.detach().double(), want.detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(xr.grad.double(), x64.grad, rtol=0, atol=1e-5 * max(1.0, x64.grad.abs().max()))
    for k, leaf in leaves.items():
        ref = leaves64[k].grad
        err = (leaf.grad.double() - ref).abs().max().item()
        assert err <= 1e-5 * max(1.0, ref.abs().max().item()), f"{isa} {k}: max diff {err}"


@pytest.mark.parametrize("layout", ["rows", "lanes"])
def test_no_sentences(layout):
    p = {k: None if v is None else v.requires_grad_(True) for k, v in params(8, 32, bias=False).items()}
    x = torch.zeros(0, 4, 8, requires_grad=True)
    with kernels.kernel_options(layout=layout):
        y = op(x, p, None, None, 2)
        assert y.shape == (0, 4, 8)
        y.sum().backward()
    assert x.grad.shape == (0, 4, 8)
    assert torch.equal(p["fc1_w"].grad, torch.zeros(32, 8))


@pytest.mark.parametrize("layout", ["rows", "lanes"])
def test_backward_is_deterministic_across_runs(threads, layout):
    """Gradients are summed per chunk of tiles in a fixed order: no dependence on thread scheduling."""
    p = {k: None if v is None else v.requires_grad_(True) for k, v in params(24, 96, bias=True).items()}
    x = torch.randn(100, 16, 24)
    grad = torch.randn_like(x)
    runs = []
    for _ in range(3):
        for v in p.values():
            if v is not None:
                v.grad = None
        with kernels.kernel_options(layout=layout):
            op(x, p, None, None, 4).backward(grad)
        runs.append(torch.cat([p[k].grad.flatten() for k in NAMES if p[k] is not None]))
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512", "avx512-w8"])
def test_auto_layout_follows_the_shape(isa):
    """``auto`` takes the lane layout on the 16-float copy, and elsewhere where a word's features or a
    sentence's words fill at most half of the copy's vector (the mini); the row layout for TNT-S and
    TNT-B on 8-float copies; an explicit layout wins over the shape."""
    if isa not in _isas():
        pytest.skip(f"this CPU cannot run the {isa} kernels")
    width = {"baseline": 4, "avx2": 8, "avx512": 16, "avx512-w8": 8}[isa]
    with kernels.kernel_options(isa=isa):
        assert kernels.kernel_dispatch()["layout"] == "auto"
        for m, c in [(4, 8), (16, 12), (16, 24), (16, 40), (1, 8)]:
            want = "lanes" if 2 * c <= width or 2 * m <= width or width == 16 else "rows"
            assert kernels.kernel_layout(m, c) == want, (m, c)
    for layout in ("rows", "lanes"):
        with kernels.kernel_options(isa=isa, layout=layout):
            assert kernels.kernel_dispatch()["layout"] == layout
            assert {kernels.kernel_layout(m, c) for m, c in [(4, 8), (16, 24)]} == {layout}


@pytest.mark.parametrize("layout", ["rows", "lanes"])
def test_the_layouts_agree_on_bf16_words(layout):
    """bf16 words in and out: both layouts compute in fp32 inside (no AMX here, or lanes), so they give
    the fp32 result of the bf16 input, rounded once to bf16."""
    p = params(8, 32, bias=True, seed=2)
    x = torch.randn(50, 4, 8).to(torch.bfloat16)
    with kernels.kernel_options(layout=layout, bf16="fp32"):
        got = op(x, p, None, None, 2, low_precision=True)
    assert got.dtype == torch.bfloat16
    want = formula(x.double(), {k: None if v is None else v.double() for k, v in p.items()}, None, None, 2)
    torch.testing.assert_close(got.double(), want.to(torch.bfloat16).double(), rtol=0, atol=2**-7 * 4)


# ------------------------------------------------------------------------------------------ bf16


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx2-w16", "avx512", "avx512-w8"])
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16])
def test_bf16_gemms_round_their_operands_and_accumulate_in_fp32(isa, xdtype):
    """The bf16 GEMM path (AMX where the CPU has it; cpublas's unpacked bf16 GEMM elsewhere, forced
    here) equals the formula whose GEMM operands are rounded to bf16, far closer than to the fp32
    formula: so the bf16 GEMMs really ran, and everything around them stayed fp32."""
    if isa not in _isas():
        pytest.skip(f"this CPU cannot run the {isa} kernels")
    p = params(24, 96, bias=True, seed=5)
    x = torch.randn(20, 16, 24).to(xdtype)
    with kernels.kernel_options(isa=isa, bf16="brgemm"):
        got = op(x, p, None, None, 4, low_precision=True).double()
        assert kernels.kernel_dispatch()["bf16"].startswith("brgemm")
    x64 = x.double()
    rounded = formula(
        x64,
        {k: None if v is None else v.double() for k, v in p.items()},
        None,
        None,
        4,
        gemm_dtype=torch.bfloat16,
    )
    exact = formula(x64, {k: None if v is None else v.double() for k, v in p.items()}, None, None, 4)
    # mean errors: a bf16 rounding that flips the other way (inputs differ by fp32-vs-fp64 sums) moves one
    # value by 2^-8 and what depends on it, so the max is noisy; the mean shows which formula it follows
    if xdtype == torch.bfloat16:  # the output is rounded to bf16 too
        rounded, exact = (t.to(torch.bfloat16).double() for t in (rounded, exact))
    err_rounded = (got - rounded).abs().mean().item()
    err_exact = (got - exact).abs().mean().item()
    print(
        f"bf16 GEMMs ({isa}, x {xdtype}): mean error {err_rounded:.2e} against the bf16-rounded formula, "
        f"{err_exact:.2e} against the fp32 one"
    )
    assert err_rounded <= 0.2 * err_exact
    assert err_exact > 1e-3  # the GEMMs were bf16 indeed


@pytest.mark.parametrize(
    "c, H, m, heads, bias",
    [
        (8, 32, 4, 2, False),  # the demo model: packed blocks of 8 and 24 columns (qkv 24, fc1 32)
        (24, 96, 16, 4, True),  # TNT-S: qkv 72 = 32 + 32 + 8
        (40, 160, 16, 4, False),  # TNT-B: qkv 120 = 3 x 32 + 24, K = 40 and 160
        (20, 52, 36, 5, True),  # odd K (kp = K), m > 32, a 20-column last block
    ],
)
def test_bf16_gemms_over_the_shapes_the_models_use(c, H, m, heads, bias):
    """The forced bf16 GEMM path (packed for AMX where the CPU has it) on the widths that cut the packed
    weights into full and partial blocks: within bf16-operand rounding of the formula, far from fp32."""
    p = params(c, H, bias=bias, seed=c + m)
    x = torch.randn(9, m, c)
    with kernels.kernel_options(bf16="brgemm"):
        got = op(x, p, None, None, heads, low_precision=True).double()
        mode = kernels.kernel_dispatch()["bf16"]
    p64 = {k: None if v is None else v.double() for k, v in p.items()}
    rounded = formula(x.double(), p64, None, None, heads, gemm_dtype=torch.bfloat16)
    exact = formula(x.double(), p64, None, None, heads)
    err_rounded = (got - rounded).abs().mean().item()
    err_exact = (got - exact).abs().mean().item()
    print(f"bf16 GEMMs ({mode}, c={c} H={H} m={m}): mean error {err_rounded:.2e} vs {err_exact:.2e} (fp32)")
    assert err_rounded <= 0.2 * err_exact
    assert (got - rounded).abs().max().item() <= 1e-2 * rounded.abs().max().item()


def test_low_precision_in_the_default_mode_runs_what_the_cpu_is_best_at():
    """In ``auto``, a low-precision call computes its GEMMs in bf16 exactly when the CPU has AMX (the
    packed path), and in fp32 elsewhere; either way within the matching formula. Prints which."""
    info = _dispatch()
    print(
        f"\nfused kernel here: isa={info['isa']}, low-precision GEMMs={info['bf16']}, cpu={info['cpu_isas']}"
    )
    p = params(24, 96, bias=False, seed=2)
    x = torch.randn(30, 16, 24)
    with kernels.kernel_options():
        got = op(x, p, None, None, 4, low_precision=True).double()
        mode = kernels.kernel_dispatch()["bf16"]
    p64 = {k: None if v is None else v.double() for k, v in p.items()}
    if mode == "brgemm-amx":
        want = formula(x.double(), p64, None, None, 4, gemm_dtype=torch.bfloat16)
        tol = 2e-4 * want.abs().max().item()
    else:
        assert mode == "fp32"
        want, tol = formula(x.double(), p64, None, None, 4), 1e-5
    assert (got - want).abs().max().item() <= tol


def _use_layout(layout: str, request) -> None:
    """The rest of the test runs with the op's tiles in ``layout``."""
    options = kernels.kernel_options(layout=layout)
    options.__enter__()
    request.addfinalizer(lambda: options.__exit__(None, None, None))


def _grads(x, p, heads, *, use_formula=False, **kw):
    """Gradients of the op (or of the ``formula``) for a fixed output gradient, as {name: tensor}, x's
    included."""
    x = x.detach().clone().requires_grad_(True)
    p = {k: None if v is None else v.detach().clone().requires_grad_(True) for k, v in p.items()}
    y = formula(x, p, None, None, heads, **kw) if use_formula else op(x, p, None, None, heads, **kw)
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(9))  # fp32 draws, then y's dtype
    y.backward(grad.to(y.dtype))
    return {"x": x.grad, **{k: v.grad for k, v in p.items() if v is not None}}


def test_bf16_backward_is_the_fp32_backward_of_the_bf16_forward():
    """A low-precision call's backward recomputes the forward with the same bf16 GEMMs and then runs
    fp32 GEMMs: its gradients follow the float64 formula with bf16-rounded forward operands and exact
    backward ones, not the fp32 formula's (mean errors, as in the forward test: a rounding that flips the
    other way moves single values by 2^-8); an fp32 call follows the fp32 formula."""
    p = params(16, 64, bias=True, seed=3)
    x = torch.randn(12, 16, 16)
    p64 = {k: None if v is None else v.double() for k, v in p.items()}
    want_bf16 = _grads(x.double(), p64, 2, use_formula=True, gemm_dtype=torch.bfloat16)
    want_fp32 = _grads(x.double(), p64, 2, use_formula=True)
    with kernels.kernel_options(bf16="brgemm"):
        low = _grads(x, p, 2, low_precision=True)
        full = _grads(x, p, 2, low_precision=False)
    for k in want_fp32:
        scale = want_fp32[k].abs().mean().item()
        to_bf16 = (low[k].double() - want_bf16[k]).abs().mean().item() / scale
        to_fp32 = (low[k].double() - want_fp32[k]).abs().mean().item() / scale
        print(f"{k}: low-precision backward, mean error {to_bf16:.1e} (bf16 forward) vs {to_fp32:.1e} (fp32)")
        assert to_bf16 <= 1e-5, k
        if k != "fc2_b":  # (fc2's bias gradient sums the output gradient: the same for either forward)
            assert to_fp32 > 1e-4, k  # the two formulas differ here: the comparison tells them apart
        torch.testing.assert_close(
            full[k].double(), want_fp32[k], rtol=0, atol=1e-5 * want_fp32[k].abs().max()
        )


@contextlib.contextmanager
def _recording_masks():
    """The ``output_mask`` of every backward call of the op while the block runs, in call order."""
    masks, real = [], kernels.op.output_mask

    def spy(needs):
        masks.append(real(needs))
        return masks[-1]

    kernels.op.output_mask = spy
    try:
        yield masks
    finally:
        kernels.op.output_mask = real


@pytest.mark.parametrize("layout", ["rows", "lanes"])
@pytest.mark.parametrize("frozen", ["all", "fc1", "proj", "ln2", "attention", "x"])
def test_backward_computes_only_the_gradients_asked_for(frozen, layout, request):
    """Autograd's needs_input_grad reaches the op as ``output_mask`` (one flag for x and one per module's
    weight and bias): what is not asked for comes back empty from the op and None from autograd, the rest
    bit for bit what a full backward gives."""
    _use_layout(layout, request)
    p = params(24, 96, bias=True, seed=4)
    x = torch.randn(10, 16, 24)
    full = _grads(x, p, 4)
    frozen_names = {
        "all": set(p),
        "fc1": {"fc1_w", "fc1_b"},
        "proj": {"proj_w", "proj_b"},
        "ln2": {"ln2_w", "ln2_b"},
        "attention": {"ln1_w", "ln1_b", "qk_w", "qk_b", "v_w", "v_b", "proj_w", "proj_b"},
        "x": {"x"},
    }[frozen]
    xx = x.clone().requires_grad_("x" not in frozen_names)
    pp = {k: v.clone().requires_grad_(k not in frozen_names) for k, v in p.items() if v is not None}
    with _recording_masks() as masks:
        y = op(xx, pp | {k: None for k in p if p[k] is None}, None, None, 4)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(9)))  # as _grads
    groups = ["x", "ln1", "qkv", "proj", "ln2", "fc1", "fc2"]
    asked = {name: [g for g in groups if g != name] for name in ("fc1", "proj", "ln2")}
    asked |= {"all": ["x"], "attention": ["x", "ln2", "fc1", "fc2"], "x": groups[1:]}
    assert masks == [[g in asked[frozen] for g in groups]]
    got = {"x": xx.grad, **{k: v.grad for k, v in pp.items()}}
    for k, g in got.items():
        if k in frozen_names:
            assert g is None, k
        else:
            assert torch.equal(g, full[k]), k
    raw = torch.ops.tntvision.inner_transformer_backward(
        torch.ones_like(x), x, *[p[n] for n in NAMES], None, None, 4, 1e-5, False, masks[0]
    )
    for name, g in zip(["x", *NAMES], raw, strict=True):
        if name in frozen_names or p.get(name, 0) is None:
            assert g.numel() == 0, name  # not computed
        else:
            assert g.shape == (x if name == "x" else p[name]).shape, name


def test_a_frozen_backbone_asks_the_op_for_the_input_gradient_only():
    """Saliency through a frozen TNT (parameters without gradients, the image with one): each fused call's
    backward is asked for the words' gradient alone, and the image gradient is the reference path's."""
    import tntvision

    model = tntvision.create_model("tnt_mini_patch4_28").eval().requires_grad_(False)
    x = torch.randn(2, 1, 28, 28, requires_grad=True)
    with _recording_masks() as masks:
        model(x).logsumexp(-1).sum().backward()
    assert masks == [[True] + [False] * 6] * len(model.blocks)
    fused_grad = x.grad.clone()
    x.grad = None
    with kernels.fused_kernels(False):
        model(x).logsumexp(-1).sum().backward()
    torch.testing.assert_close(fused_grad, x.grad, rtol=0, atol=1e-5 * x.grad.abs().max().item())


# ---------------------------------------------------------------------------------- torch.library


def _opcheck_samples():
    """Inputs that exercise the op's schema: fp32 and bf16, with and without qkv biases and drop-path
    scales, a non-contiguous x (the output is contiguous whatever x's strides), inputs with gradients."""
    for dtype, bias, keep, strided in [
        (torch.float32, True, True, False),
        (torch.float32, False, False, True),
        (torch.bfloat16, True, False, False),
        (torch.bfloat16, False, True, True),
    ]:
        p = {
            k: None if v is None else v.to(dtype).requires_grad_(True)
            for k, v in params(8, 32, bias=bias).items()
        }
        x = (
            torch.randn(4, 5, 8, dtype=dtype).transpose(0, 1)
            if strided
            else torch.randn(5, 4, 8, dtype=dtype)
        )
        x.requires_grad_(True)
        attn_scale = torch.tensor([0.0, 2.0, 2.0, 0.0, 2.0], dtype=dtype) if keep else None
        yield (x, *[p[n] for n in NAMES], attn_scale, None, 2, 1e-5, dtype == torch.bfloat16)


@pytest.mark.parametrize("sample", range(4))
def test_opcheck_forward(sample):
    """torch.library.opcheck: schema, fake (meta) kernel against the real one, autograd registration,
    and AOTAutograd with dynamic shapes (which runs the fake backward)."""
    args = list(_opcheck_samples())[sample]
    torch.library.opcheck(torch.ops.tntvision.inner_transformer.default, args)


@pytest.mark.parametrize(
    "mask", [[True] * 7, [True] + [False] * 6, [False, True, False, True, False, True, False]]
)
def test_opcheck_backward(mask):
    p = params(8, 32, bias=True)
    x = torch.randn(5, 4, 8)
    args = (torch.randn(5, 4, 8), x, *[p[n] for n in NAMES], None, torch.ones(5), 2, 1e-5, False, mask)
    torch.library.opcheck(torch.ops.tntvision.inner_transformer_backward.default, args)


# ------------------------------------------------------------------------------- argument checks


def _call_with(**change):
    p = params(8, 32, bias=True)
    args = {"x": torch.randn(3, 4, 8), **p, "attn_scale": None, "mlp_scale": None, "heads": 2, "eps": 1e-5}
    args.update(change)
    pp = {k: args[k] for k in NAMES}
    return op(args["x"], pp, args["attn_scale"], args["mlp_scale"], args["heads"], eps=args["eps"])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"x": torch.randn(4, 8)}, "sentences, words, dim"),
        ({"x": torch.randn(3, 4, 8, dtype=torch.float64)}, "float32 or bfloat16"),
        ({"x": torch.randn(3, 5000, 8)}, "words per sentence"),
        ({"heads": 3}, "not divisible by num_heads"),
        ({"heads": 0}, "not divisible by num_heads"),
        ({"eps": 0.0}, "eps must be positive"),
        ({"qk_b": None}, "given together"),
        ({"v_b": None}, "given together"),
        ({"qk_w": torch.randn(8, 8)}, "qk_w must have shape"),
        ({"v_w": torch.randn(8, 4)}, "v_w must have shape"),
        ({"proj_b": torch.randn(7)}, "proj_b must have shape"),
        ({"ln1_w": torch.randn(9)}, "ln1_w must have shape"),
        ({"ln2_b": torch.randn(8, 1)}, "ln2_b must have shape"),
        ({"fc1_b": torch.randn(31)}, "fc1_b must have shape"),
        ({"fc2_w": torch.randn(8, 31)}, "fc2_w must have shape"),
        ({"fc2_w": torch.ones(8, 32, dtype=torch.int64)}, "floating-point"),
        ({"attn_scale": torch.ones(2)}, "one drop-path scale per sentence"),
        ({"mlp_scale": torch.ones(3, 1)}, "one drop-path scale per sentence"),
    ],
    ids=lambda v: v if isinstance(v, str) else "-".join(v),
)
def test_bad_arguments_are_refused_with_a_clear_message(change, message):
    with pytest.raises(RuntimeError, match=message):
        _call_with(**change)


def test_backward_refuses_a_gradient_of_another_shape():
    p = params(8, 32, bias=False)
    x = torch.randn(3, 4, 8)
    with pytest.raises(RuntimeError, match="grad has shape"):
        torch.ops.tntvision.inner_transformer_backward(
            torch.randn(3, 4, 7), x, *[p[n] for n in NAMES], None, None, 2, 1e-5, False
        )


# ------------------------------------------------------------------------------------- dispatch


def test_unknown_or_unavailable_instruction_sets_are_config_errors():
    running = _dispatch()["isa"]
    with pytest.raises(ConfigError, match="unknown instruction set 'sse9'"):
        kernels.set_kernel_dispatch(isa="sse9")
    with pytest.raises(ConfigError, match="unknown bf16 mode"):
        kernels.set_kernel_dispatch(bf16="fp8")
    for isa in ("avx512", "avx2"):
        if isa not in _dispatch()["cpu_isas"]:
            with pytest.raises(ConfigError, match=f"cannot run the '{isa}' kernels"):
                kernels.set_kernel_dispatch(isa=isa)
    assert _dispatch()["isa"] == running  # the refusals changed nothing


def test_the_best_copy_runs_by_default_and_the_environment_overrides_it():
    """auto takes the widest instruction set the CPU has (AVX-512 with 8-float vectors on AMD Zen 4,
    whose AVX-512 units are 256 bits wide); TNTVISION_KERNEL_ISA picks another, and
    TNTVISION_KERNEL_LAYOUT the layout."""
    cpu = _dispatch()["cpu_isas"]
    flags = Path("/proc/cpuinfo").read_text()
    if "avx512" in cpu:
        zen4 = "AuthenticAMD" in flags and "\ncpu family\t: 25\n" in flags
        assert _dispatch()["isa"] == ("avx512-w8" if zen4 else "avx512")
    else:
        assert _dispatch()["isa"] == ("avx2" if "avx2" in cpu else "baseline")
    assert ("avx2" in cpu) == (" avx2 " in flags and " fma " in flags)
    code = (
        "from tntvision import kernels; d = kernels.kernel_dispatch(); "
        "print(d['isa'], d['bf16'], d['layout'], kernels.kernel_layout(4, 8))"
    )
    env = {**os.environ, "TNTVISION_KERNEL_ISA": "baseline", "TNTVISION_KERNEL_BF16": "fp32"}
    env["TNTVISION_KERNEL_LAYOUT"] = "rows"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["baseline", "fp32", "rows", "rows"]
    env["TNTVISION_KERNEL_ISA"] = "sse9"
    bad = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert bad.returncode != 0 and "TNTVISION_KERNEL_ISA" in bad.stderr and "sse9" in bad.stderr


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("TNTVISION_KERNEL_ISA", "sse9"),
        ("TNTVISION_KERNEL_BF16", "fp8"),
        ("TNTVISION_KERNEL_LAYOUT", "columns"),
        ("TNTVISION_FUSED", "maybe"),
    ],
)
def test_a_bad_setting_fails_every_call_the_same_way(variable, value):
    """Not once and then silently ignored: three model calls and the query of the setting each raise the
    same ConfigError naming the variable and its value."""
    code = f"""
import torch, tntvision
from tntvision.errors import ConfigError
from tntvision import kernels
model = tntvision.create_model("tnt_mini_patch4_28").eval()
query = kernels.fused_kernels_enabled if "{variable}" == "TNTVISION_FUSED" else kernels.kernel_dispatch
calls = [lambda: model(torch.randn(1, 1, 28, 28))] * 3 + [query]
for call in calls:
    try:
        with torch.no_grad():
            call()
        print("ran")
    except ConfigError as e:
        print("refused:", e)
"""
    env = {**os.environ, variable: value}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    lines = out.stdout.splitlines()
    assert len(lines) == 4, out.stdout
    assert len(set(lines)) == 1 and lines[0].startswith("refused:"), out.stdout
    assert variable in lines[0] and value in lines[0]


def test_one_portable_build():
    """No -march flag anywhere in the build (checked in the build file ninja ran), and a cache key made of
    the sources, torch's version, the flags and the architecture alone: computing it reads no file but
    the sources (not /proc/cpuinfo), so the same folder serves every CPU of this architecture; each of
    its parts changes it."""
    assert kernels.fused_available()
    ninja = (kernels.build_directory() / "build.ninja").read_text()
    assert "-march" not in ninja and "-O3" in ninja
    opened = []

    def audit(event, args):
        if event == "open" and isinstance(args[0], str | Path):
            opened.append(Path(args[0]).resolve())

    sys.addaudithook(audit)  # (an audit hook stays for the process: it only records while `opened` grows)
    key = kernels.build_directory()
    files, opened[:] = list(opened), []
    assert files and set(files) <= {src.resolve() for src in kernels.cpu._SOURCES}, files
    real_version, real_flags = torch.__version__, kernels.cpu._cflags
    try:
        torch.__version__ = real_version + "+other"
        other_torch = kernels.build_directory()
        torch.__version__ = real_version
        kernels.cpu._cflags = lambda: [*real_flags(), "-DOTHER"]
        other_flags = kernels.build_directory()
    finally:
        torch.__version__, kernels.cpu._cflags = real_version, real_flags
    assert len({key, other_torch, other_flags}) == 3


def test_tnt_kernels_build_and_info():
    from tntvision.cli import main

    assert main(["kernels", "build"]) == 0
    out = subprocess.run(
        [sys.executable, "-m", "tntvision.cli", "kernels", "info", "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    import json

    info = json.loads(out.stdout)
    assert info["isa"] == _dispatch()["isa"] and info["build"] == str(kernels.build_directory())
