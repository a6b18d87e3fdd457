"""The fused inner transformer (``torch.ops.tntvision.inner_transformer``) equals the reference path.

Every registered model, weights perturbed away from their init (so a swapped LayerNorm or a dropped bias
shows), outputs and every gradient compared between the fused op and the pure-PyTorch reference path:
fp32 within 1e-5 (gradients relative to each gradient's largest entry), bf16 within the tolerances of
test_speed_parity.py. A call counter on the op proves that the fused path really ran (or, where it must
not, that it did not).
"""

import copy
import os
import subprocess
import sys
from contextlib import contextmanager

import pytest
import torch

import tntvision
from tntvision import kernels
from tntvision.models.layers import drop_path_scale

from .conftest import TNT_MODELS, fewer_blocks, need_fused_kernel, small_input_size
from .helpers import fused_op

INNER_MODELS = [
    n for n in TNT_MODELS if tntvision.models.registry.get_model_entry(n).config.inner_blocks != ()
]


def test_the_kernel_builds_on_this_machine():
    """CI machines (Linux) have a compiler: the fused path must be what the other tests exercise, not
    skipped; elsewhere (no GCC/Clang with OpenMP) this skips, saying why."""
    need_fused_kernel()
    assert kernels.fused_available()


def _model(name: str, *, img_size: int | None = None, **kw) -> tntvision.models.tnt.TNT:
    """``name`` at its smallest cheap input (or ``img_size``), weights perturbed away from their init (zero
    qkv biases or unit LayerNorms would hide a dropped one)."""
    model = tntvision.create_model(name, img_size=img_size or small_input_size(name), **kw)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


@contextmanager
def _count_fused_calls():
    need_fused_kernel()  # a test that counts fused calls needs the op
    calls = []
    real = kernels.inner.inner_op  # what run_inner calls

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    kernels.inner.inner_op = counting
    try:
        yield calls
    finally:
        kernels.inner.inner_op = real


def _run(model, x, *, fused: bool, seed: int = 3, amp: bool = False):
    """Output, input gradient and parameter gradients of one forward/backward with the path chosen."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    with kernels.fused_kernels(fused), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        torch.manual_seed(seed)
        out = model(x)
        (out.float() * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach().float(), x.grad.float(), grads


def _assert_paths_agree(model, x, *, fused_calls: int) -> torch.Tensor:
    """One forward/backward on each path: the fused op ran ``fused_calls`` times, and outputs, the input
    gradient and every parameter gradient agree within 1e-5. Returns the fused output."""
    with _count_fused_calls() as calls:
        out, gx, grads = _run(model, x, fused=True)
    assert len(calls) == fused_calls
    ref, ref_gx, ref_grads = _run(model, x, fused=False)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(gx, ref_gx, rtol=0, atol=1e-5 * ref_gx.abs().max().item())
    _assert_grads_close(grads, ref_grads, rel=1e-5)
    return out


def _assert_grads_close(got: dict, want: dict, rel: float) -> None:
    assert got.keys() == want.keys()
    for name, g in want.items():
        err = (got[name].float() - g.float()).abs().max().item()
        assert err <= rel * g.float().abs().max().item() + 1e-7, f"{name}: max diff {err}"


@pytest.mark.parametrize("name", INNER_MODELS)
@pytest.mark.parametrize("mode", ["eval", "train", "drop_path"])
def test_fused_matches_reference_fp32(name, mode):
    rate = 0.3 if mode == "drop_path" else 0.0
    model = _model(name, drop_path_rate=rate, **fewer_blocks(name)).train(mode != "eval")
    x = torch.randn(3, model.in_chans, *(2 * [small_input_size(name)]))
    out = _assert_paths_agree(model, x, fused_calls=sum(b.has_inner for b in model.blocks))
    if mode == "drop_path":  # a different random stream must change the result: the masks matter
        other, _, _ = _run(model, x, fused=True, seed=4)
        assert (other - out).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["tnt_s_patch16_224", "tnt_mini_patch4_28"])
def test_fused_matches_reference_bf16_autocast(name):
    """Under autocast the reference path rounds every GEMM's operands to bf16; the fused op keeps its
    LayerNorms, softmax and GELU in fp32 and its GEMMs in bf16 only where the CPU has AMX (fp32 elsewhere),
    and its backward in fp32: its logits agree within bf16 tolerance, and its gradients are at least as
    close to the fp32 ones as the reference's."""
    model = _model(name, drop_path_rate=0.2).train()
    x = torch.randn(2, model.in_chans, *(2 * [small_input_size(name)]))
    with _count_fused_calls() as calls:
        out, _, grads = _run(model, x, fused=True, amp=True)
    assert calls
    ref, _, ref_grads = _run(model, x, fused=False, amp=True)
    _, _, fp32_grads = _run(model, x, fused=False)
    span = (ref.max() - ref.min()).item()
    torch.testing.assert_close(out, ref, rtol=0, atol=0.03 * span)
    _assert_grads_close(grads, ref_grads, rel=0.1)

    def distance(g: dict) -> float:  # summed over every gradient, relative to the fp32 gradients
        num = sum((g[k].float() - fp32_grads[k]).abs().sum().item() for k in fp32_grads)
        return num / sum(v.abs().sum().item() for v in fp32_grads.values())

    assert distance(grads) <= 1.1 * distance(ref_grads)


def test_fused_matches_reference_bf16_weights():
    """A model cast to bf16 runs the fused op on bf16 tensors (every block, output bf16); against the same
    bf16 weights evaluated in float64, its logits are no farther off than the reference path's."""
    model = _model("tnt_s_patch16_224").to(torch.bfloat16).eval()
    x = torch.randn(2, 3, 32, 32).to(torch.bfloat16)
    with torch.no_grad():
        with kernels.fused_kernels(True), _count_fused_calls() as calls:
            out = model(x)
        with kernels.fused_kernels(False):
            ref = model(x)
        exact = copy.deepcopy(model).double()
        with kernels.fused_kernels(False):
            want = exact(x.double())
    assert len(calls) == sum(b.has_inner for b in model.blocks)
    assert out.dtype == torch.bfloat16 and out.shape == want.shape
    err = (out.double() - want).abs().max().item()
    ref_err = (ref.double() - want).abs().max().item()
    print(f"bf16 weights: max |logit - fp64| fused {err:.3e}, reference path {ref_err:.3e}")
    assert ref_err > 0  # the bf16 model is not exact: the comparison has something to measure
    assert err <= 1.5 * ref_err


def test_the_switch_is_per_thread():
    """A thread inside ``fused_kernels(False)`` (exporting, say) leaves another thread on the fused path:
    its calls still run the fused op, and its numbers do not change."""
    import threading

    model = _model("tnt_mini_patch4_28").eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        alone = model(x)
    entered, release = threading.Event(), threading.Event()
    seen = {}

    def exporter():
        with kernels.fused_kernels(False):
            seen["exporter"] = kernels.fused_kernels_enabled()
            entered.set()
            release.wait(30)

    other = threading.Thread(target=exporter)
    other.start()
    try:
        assert entered.wait(30)
        with torch.no_grad(), _count_fused_calls() as calls:
            during = model(x)
        seen["here"] = kernels.fused_kernels_enabled()
    finally:
        release.set()
        other.join()
    assert seen == {"exporter": False, "here": True}
    assert len(calls) == sum(b.has_inner for b in model.blocks)
    assert torch.equal(during, alone)
    default = kernels.fused_kernels_enabled()
    kernels.set_fused_kernels(False)  # the process default: seen by every thread without a block of its own
    try:
        assert not kernels.fused_kernels_enabled()
        with kernels.fused_kernels(True):
            assert kernels.fused_kernels_enabled()
    finally:
        kernels.set_fused_kernels(default)


def test_dropout_takes_the_reference_path_with_the_same_stream():
    model = _model("tnt_mini_patch4_28", attn_drop_rate=0.1, proj_drop_rate=0.1, drop_path_rate=0.1).train()
    x = torch.randn(2, 1, 28, 28)
    with _count_fused_calls() as calls:
        out, _, _ = _run(model, x, fused=True)
    assert not calls  # dropout inside the inner transformer is only in the reference path
    ref, _, _ = _run(model, x, fused=False)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    with _count_fused_calls() as calls, torch.no_grad():
        model.eval()(x)
    assert calls  # in eval, dropout is off, so the fused op runs


def test_drop_path_scales_are_the_reference_stream():
    torch.manual_seed(7)
    a = drop_path_scale(1000, 0.25, dtype=torch.float32)
    torch.manual_seed(7)
    want = torch.empty(1000).bernoulli_(0.75) / 0.75  # stochastic depth as torchvision and timm draw it
    torch.testing.assert_close(a, want, rtol=0, atol=0)
    torch.manual_seed(7)
    b = tntvision.models.layers.drop_path(torch.ones(1000, 2, 3), 0.25, True)[:, 0, 0]
    torch.testing.assert_close(b, want, rtol=0, atol=0)
    assert 150 < (a == 0).sum() < 350


def test_fused_op_against_an_independent_formula():
    """The op on random weights against the block written out with torch.nn.functional."""
    need_fused_kernel()
    block = _model("tnt_mini_patch4_28").blocks[0]
    x = torch.randn(10, 4, 8)
    attn_scale, mlp_scale = torch.tensor([0.0, 2.0] * 5), torch.tensor([2.0, 0.0, 1.0, 1.0, 2.0] * 2)
    got = fused_op(x, block, attn_scale, mlp_scale)
    F = torch.nn.functional
    a, m = block.attn_in, block.mlp_in
    h = F.layer_norm(x, (8,), block.norm_in.weight, block.norm_in.bias)
    q, k = F.linear(h, a.qk.weight).chunk(2, dim=-1)
    v = F.linear(h, a.v.weight)
    q, k, v = (t.reshape(10, 4, 2, 4).transpose(1, 2) for t in (q, k, v))  # (S, heads, m, hd)
    att = ((q @ k.transpose(-1, -2)) / 2.0).softmax(-1) @ v  # scale 1/sqrt(4)
    y = F.linear(att.transpose(1, 2).reshape(10, 4, 8), a.proj.weight, a.proj.bias)
    x1 = x + attn_scale[:, None, None] * y
    z = F.linear(
        F.gelu(
            F.linear(
                F.layer_norm(x1, (8,), block.norm_mlp_in.weight, block.norm_mlp_in.bias),
                m.fc1.weight,
                m.fc1.bias,
            )
        ),
        m.fc2.weight,
        m.fc2.bias,
    )
    torch.testing.assert_close(got, x1 + mlp_scale[:, None, None] * z, rtol=0, atol=1e-5)


def test_compile_fullgraph_keeps_one_op_per_inner_transformer():
    need_fused_kernel()
    model = _model("tnt_s_patch16_224", depth=2).train()
    x = torch.randn(2, 3, 32, 32)
    graphs = []

    def recorder(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    out, gx, grads = _run(model, x, fused=True)
    compiled = torch.compile(model, fullgraph=True, backend=recorder)
    out_c, gx_c, grads_c = _run(compiled, x, fused=True)
    targets = [str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    assert targets.count("tntvision.inner_transformer") == 2
    torch.testing.assert_close(out_c, out, rtol=0, atol=1e-5)
    _assert_grads_close({k.removeprefix("_orig_mod."): v for k, v in grads_c.items()}, grads, rel=1e-5)


def test_compiled_training_step_runs_the_fake_backward():
    """torch.compile's training path (AOTAutograd) traces the backward with fake tensors, so it runs the
    op's fake backward: the backward graph holds one ``inner_transformer_backward`` per inner transformer,
    and the compiled step's outputs and gradients are eager's."""
    need_fused_kernel()
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    model = _model("tnt_mini_patch4_28").train()
    x = torch.randn(2, 1, 28, 28)
    graphs = {"forward": [], "backward": []}

    def keeping(kind):
        def compiler(gm, example_inputs):
            graphs[kind].append(gm)
            return make_boxed_func(gm.forward)

        return compiler

    backend = aot_autograd(fw_compiler=keeping("forward"), bw_compiler=keeping("backward"))
    out, gx, grads = _run(model, x, fused=True)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    out_c, gx_c, grads_c = _run(compiled, x, fused=True)

    def count(kind: str, op: str) -> int:
        nodes = [n for g in graphs[kind] for n in g.graph.nodes if n.op == "call_function"]
        return [str(n.target) for n in nodes].count(op)

    assert count("forward", "tntvision.inner_transformer.default") == len(model.blocks)
    assert count("backward", "tntvision.inner_transformer_backward.default") == len(model.blocks)
    torch.testing.assert_close(out_c, out, rtol=0, atol=1e-5)
    torch.testing.assert_close(gx_c, gx, rtol=0, atol=1e-5 * gx.abs().max().item())
    _assert_grads_close({k.removeprefix("_orig_mod."): v for k, v in grads_c.items()}, grads, rel=1e-5)


def test_torch_export_runs_the_fused_op():
    need_fused_kernel()
    model = _model("tnt_mini_patch4_28").eval()
    x = torch.randn(2, 1, 28, 28)
    prog = torch.export.export(model, (x,))
    ops = [str(n.target) for n in prog.graph.nodes if n.op == "call_function"]
    assert ops.count("tntvision.inner_transformer.default") == len(model.blocks)
    with torch.no_grad(), kernels.fused_kernels(False):
        ref = model(x)
    torch.testing.assert_close(prog.module()(x), ref, rtol=0, atol=1e-5)


def test_reference_path_when_the_kernel_cannot_be_built(tmp_path):
    """A machine where the build fails: one warning, the reference path, the same logits."""
    code = (
        "import warnings, torch, tntvision\n"
        "from torch.utils import cpp_extension\n"
        "def fail(*a, **k): raise RuntimeError('no compiler here')\n"
        "cpp_extension.load = fail\n"
        "from tntvision import kernels\n"
        "torch.manual_seed(0); m = tntvision.create_model('tnt_mini_patch4_28').eval()\n"
        "torch.manual_seed(1); x = torch.randn(2, 1, 28, 28)\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    with torch.no_grad(): y = m(x)\n"
        "print(kernels.fused_available(), len([i for i in w if 'reference path' in str(i.message)]))\n"
        "torch.save(y, r'%s')\n" % (tmp_path / "y.pt")
    )
    env = {**os.environ, "TNTVISION_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert proc.stdout.split() == ["False", "1"]
    torch.manual_seed(0)
    model = tntvision.create_model("tnt_mini_patch4_28").eval()
    torch.manual_seed(1)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        want = model(x)
    got = torch.load(tmp_path / "y.pt")
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_disabled_by_environment():
    code = "from tntvision import kernels; print(kernels.fused_kernels_enabled())"
    env = {**os.environ, "TNTVISION_FUSED": "0"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "False"


def test_bad_input_is_refused_by_the_op():
    need_fused_kernel()
    block = _model("tnt_mini_patch4_28").blocks[0]
    with pytest.raises(RuntimeError, match="sentences, words, dim"):
        fused_op(torch.randn(4, 8), block)
    with pytest.raises(RuntimeError, match="one drop-path scale per sentence"):
        fused_op(torch.randn(3, 4, 8), block, torch.ones(2))


# ------------------------------------------------- what a user puts on the inner modules is honoured


class LowRankAdapter(torch.nn.Module):
    """A LoRA-style wrapper (what peft puts in place of a Linear): base(x) + scale * B(A(x))."""

    def __init__(self, base: torch.nn.Linear, rank: int = 2) -> None:
        super().__init__()
        self.base = base
        self.A = torch.nn.Linear(base.in_features, rank, bias=False)
        self.B = torch.nn.Linear(rank, base.out_features, bias=False)
        torch.nn.init.normal_(self.B.weight, std=0.5)  # a trained adapter: not the zero init

    def forward(self, x):
        return self.base(x) + self.B(self.A(x))


class Doubled(torch.nn.Module):
    def forward(self, w):
        return 2 * w


def _hook_output(module, args, out):
    return out * 3.0


def _with_hook(block):
    block.attn_in.qk.register_forward_hook(_hook_output)


def _with_pre_hook(block):
    block.mlp_in.fc2.register_forward_pre_hook(lambda mod, args: (args[0] * 1.5,))


def _with_adapter(block):
    block.mlp_in.fc1 = LowRankAdapter(block.mlp_in.fc1)


def _with_parametrization(block):
    torch.nn.utils.parametrize.register_parametrization(block.attn_in.proj, "weight", Doubled())


def _with_weight_norm(block):
    torch.nn.utils.parametrizations.weight_norm(block.attn_in.v)
    with torch.no_grad():  # move the magnitude so the weight differs from the plain one
        block.attn_in.v.parametrizations.weight.original0.mul_(1.7)


def _with_other_activation(block):
    block.mlp_in.act = torch.nn.SiLU()


def _with_norm_hook(block):
    block.norm_in.register_forward_hook(lambda mod, args, out: out * 0.5)


class Halved(torch.nn.Module):
    """Stands where the block's DropPath was: halves every residual branch (not what the op computes)."""

    def forward(self, x):
        return 0.5 * x


def _with_identity_activation(block):  # a plain module of an allowed type, in the wrong slot
    block.mlp_in.act = torch.nn.Identity()


def _with_dropout_as_activation(block):
    block.mlp_in.act = torch.nn.Dropout(0.0)


def _with_linear_as_activation(block):
    hidden = block.mlp_in.fc1.out_features
    block.mlp_in.act = torch.nn.Linear(hidden, hidden)


def _with_norm_as_dropout(block):
    block.attn_in.proj_drop = torch.nn.LayerNorm(block.attn_in.proj.out_features)


def _with_norm_without_affine(block):
    block.norm_in = torch.nn.LayerNorm(block.norm_in.normalized_shape, elementwise_affine=False)


def _with_other_drop_path(block):
    block.drop_path = Halved()


def _with_other_eps(block):  # the op takes one eps for both LayerNorms
    block.norm_mlp_in.eps = 0.5


class TaggedParameter(torch.nn.Parameter):
    """A parameter of another type (as a quantized or sharded weight is): the op reads plain ones only."""


def _with_parameter_subclass(block):  # the same values: only the type tells the op it must not read it
    fc2 = block.mlp_in.fc2
    fc2.weight = TaggedParameter(fc2.weight.detach().clone())
    with torch.no_grad():
        fc2.weight.mul_(1.3)


def _with_bias_removed(block):  # a parameter set to None (register_parameter)
    block.attn_in.proj.bias = None


CHANGES = [_with_hook, _with_pre_hook, _with_adapter, _with_parametrization, _with_weight_norm]
CHANGES += [_with_other_activation, _with_norm_hook, _with_parameter_subclass, _with_bias_removed]
# an allowed type in the wrong slot, a LayerNorm the op cannot compute, a DropPath stand-in, another eps
CHANGES += [_with_identity_activation, _with_dropout_as_activation, _with_linear_as_activation]
CHANGES += [_with_norm_as_dropout, _with_norm_without_affine, _with_other_drop_path, _with_other_eps]


def _inner_by_calling_the_modules(block, words):
    """The inner transformer written out with a call of each of the block's modules (so the hooks, adapters
    and whatever stands in each slot run), the attention from the qk / v outputs in plain torch: an oracle
    that shares no code with either path. Eval mode (no dropout)."""
    attn, mlp = block.attn_in, block.mlp_in
    S, m, c = words.shape
    heads, hd = attn.num_heads, attn.head_dim
    h = block.norm_in(words)
    q, k = attn.qk(h).chunk(2, dim=-1)
    v = attn.v(h)
    q, k, v = (t.reshape(S, m, heads, hd).transpose(1, 2) for t in (q, k, v))  # (S, heads, m, hd)
    att = torch.softmax(q @ k.transpose(-1, -2) * hd**-0.5, dim=-1) @ v  # (S, heads, m, hd)
    y = attn.proj_drop(attn.proj(att.transpose(1, 2).reshape(S, m, c)))  # (S, m, c)
    words = words + block.drop_path(y)
    z = mlp.drop(mlp.fc2(mlp.drop(mlp.act(mlp.fc1(block.norm_mlp_in(words))))))
    return words + block.drop_path(z)


@pytest.mark.parametrize("change", CHANGES, ids=lambda f: f.__name__.removeprefix("_with_"))
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_the_fused_path_never_bypasses_what_is_on_the_inner_modules(change, train):
    """With a hook, an adapter, a parametrization, weight norm or another GELU on block 0's inner
    modules, that block runs the reference path (the op runs for the others), the reference path calls
    the user's modules, and both paths give the changed model's numbers, which differ from the plain
    model's."""
    model = _model("tnt_mini_patch4_28").train(train)
    x = torch.randn(2, 1, 28, 28)
    plain, _, _ = _run(model, x, fused=False)
    change(model.blocks[0])
    out = _assert_paths_agree(model, x, fused_calls=len(model.blocks) - 1)
    assert (out - plain).abs().max() > 1e-3  # the change is in the numbers


@pytest.mark.parametrize("change", CHANGES, ids=lambda f: f.__name__.removeprefix("_with_"))
def test_the_inner_transformer_computes_what_its_modules_compute(change):
    """Block 0's inner transformer, changed, on both paths, with and without autograd (the reference
    path's shortcuts differ between the two), equals the oracle that calls each module."""
    model = _model("tnt_mini_patch4_28").eval()
    block = model.blocks[0]
    change(block)
    words = torch.randn(6, 4, 8)
    with torch.no_grad():
        want = _inner_by_calling_the_modules(block, words)
    for fused in (True, False):
        with kernels.fused_kernels(fused):
            torch.testing.assert_close(kernels.run_inner(block, words), want, rtol=0, atol=1e-5)
            with torch.no_grad():
                torch.testing.assert_close(kernels.run_inner(block, words), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["backward", "backward_pre", "global_backward"])
def test_backward_hooks_fire_and_count_on_both_paths(kind):
    """A backward hook on an inner Linear (Grad-CAM, Captum, gradient inspection) fires on both paths,
    the hooked block runs its modules (the fused op never bypasses it), and what the hook returns is in
    the gradients, the same on both paths; a global backward hook keeps every block off the fused op."""
    model = _model("tnt_mini_patch4_28").train()
    x = torch.randn(2, 1, 28, 28)
    _, plain_gx, _ = _run(model, x, fused=False)
    fc1 = model.blocks[1].mlp_in.fc1
    fired = []

    def scale_grad_input(module, grad_input, grad_output):
        fired.append(module)
        return tuple(None if g is None else 2.0 * g for g in grad_input)

    def scale_grad_output(module, grad_output):
        fired.append(module)
        return tuple(None if g is None else 3.0 * g for g in grad_output)

    if kind == "backward":
        handle = fc1.register_full_backward_hook(scale_grad_input)
    elif kind == "backward_pre":
        handle = fc1.register_full_backward_pre_hook(scale_grad_output)
    else:
        register = torch.nn.modules.module.register_module_full_backward_hook
        handle = register(lambda module, grad_input, grad_output: fired.append(module))
    try:
        results = {}
        for fused in (True, False):
            fired.clear()
            with _count_fused_calls() as calls:
                results[fused] = _run(model, x, fused=fused)
            assert fired.count(fc1) == 1, f"fused={fused}: the hook on fc1 fired {fired.count(fc1)} times"
            blocks = sum(b.has_inner for b in model.blocks)
            assert len(calls) == (0 if not fused or kind == "global_backward" else blocks - 1)
    finally:
        handle.remove()
    out, gx, grads = results[True]
    ref, ref_gx, ref_grads = results[False]
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(gx, ref_gx, rtol=0, atol=1e-5 * ref_gx.abs().max().item())
    _assert_grads_close(grads, ref_grads, rel=1e-5)
    if kind != "global_backward":  # what the hook returned changed the gradients
        assert (gx - plain_gx).abs().max() > 1e-3 * plain_gx.abs().max()


@pytest.mark.parametrize("kind", ["forward", "backward"])
def test_hooks_on_the_word_embedding_conv_fire(kind):
    """The word embedding runs as one GEMM over the conv's folded weights; a hook on the conv sends it to
    the per-patch conv, which calls the module: the hook fires and what it returns is in the result."""
    model = _model("tnt_s_patch16_224").eval()
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    conv = model.pixel_embed.proj
    model.pixel_embed.fused = False  # the per-patch conv, unhooked: the numbers the hooked model starts from
    plain_out = model(x)
    (plain_gx,) = torch.autograd.grad(plain_out.sum(), x)
    model.pixel_embed.fused = True
    fired = []
    if kind == "forward":
        handle = conv.register_forward_hook(lambda mod, args, out: fired.append(mod) or out * 1.5)
    else:
        handle = conv.register_full_backward_hook(
            lambda mod, gi, go: fired.append(mod) or tuple(None if g is None else 2.0 * g for g in gi)
        )
    try:
        out = model(x)
        (gx,) = torch.autograd.grad(out.sum(), x)
    finally:
        handle.remove()
    assert fired == [conv]
    if kind == "forward":
        assert (out - plain_out).abs().max() > 1e-3
    else:
        torch.testing.assert_close(out, plain_out, rtol=0, atol=1e-5)
        torch.testing.assert_close(gx, 2.0 * plain_gx, rtol=0, atol=1e-6 * plain_gx.abs().max().item())


# Constructor options that change what the op receives, each through the whole model, fused vs reference.
OPTIONS = {
    "qkv_bias": ("tnt_mini_patch4_28", dict(qkv_bias=True), "train"),
    "qkv_bias_tnt_s": ("tnt_s_patch16_224", dict(qkv_bias=True, depth=2), "eval"),
    "se": ("tnt_s_se_patch16_224", dict(qkv_bias=True, depth=2), "train"),
    "inner_blocks": ("tnt_s_patch16_224", dict(inner_blocks=(0, 5, 11)), "train"),
    "drop_path": ("tnt_mini_patch4_28", dict(drop_path_rate=0.3, qkv_bias=True), "train"),
    "legacy_drop_path": ("tnt_s_legacy_patch16_224", dict(drop_path_rate=0.2, depth=2), "train"),
    "merging": ("tnt_s_patch16_224", dict(merge_tokens=2, img_size=64), "train"),
    "merging_mini": ("tnt_mini_patch4_28", dict(merge_tokens=4, qkv_bias=True), "eval"),
}


@pytest.mark.parametrize("option", OPTIONS)
def test_every_option_that_reaches_the_op_matches_the_reference(option):
    name, overrides, mode = OPTIONS[option]
    model = _model(name, **overrides).train(mode == "train")
    size = overrides.get("img_size", small_input_size(name))
    x = torch.randn(3, model.in_chans, size, size)
    out = _assert_paths_agree(model, x, fused_calls=sum(b.has_inner for b in model.blocks))
    if overrides.get("qkv_bias"):  # the biases reach the op: zeroing them changes the numbers
        with torch.no_grad():
            for b in model.blocks:
                if b.has_inner:
                    b.attn_in.qk.bias.zero_()
                    b.attn_in.v.bias.zero_()
        assert (_run(model, x, fused=True)[0] - out).abs().max() > 1e-4


def test_plain_module_is_exact():
    assert kernels.plain_module(torch.nn.GELU())
    assert not kernels.plain_module(torch.nn.GELU(approximate="tanh"))  # the op computes the erf GELU

    class MyLinear(torch.nn.Linear):
        pass

    assert not kernels.plain_module(MyLinear(2, 2))  # a subclass may compute something else
    register = torch.nn.modules.module
    for add_global in (
        register.register_module_forward_hook,
        register.register_module_forward_pre_hook,
        register.register_module_full_backward_hook,
        register.register_module_full_backward_pre_hook,
    ):
        handle = add_global(lambda *a: None)
        try:  # a global hook must see every call
            assert not kernels.plain_module(torch.nn.Linear(2, 2))
            assert not kernels.exactly(torch.nn.Linear(2, 2), torch.nn.Linear)
        finally:
            handle.remove()
    assert kernels.plain_module(torch.nn.Linear(2, 2))
    for add in ("register_full_backward_hook", "register_full_backward_pre_hook", "register_backward_hook"):
        lin = torch.nn.Linear(2, 2)
        getattr(lin, add)(lambda *a: None)
        assert not kernels.plain_module(lin) and not kernels.exactly(lin, torch.nn.Linear), add


def test_exactly_checks_each_slot():
    mlp = tntvision.models.layers.Mlp(8, hidden_dim=16)
    assert kernels.exactly(mlp, tntvision.models.layers.Mlp, mlp.SLOTS)
    for slot, other in [
        ("act", torch.nn.Identity()),
        ("fc1", torch.nn.GELU()),
        ("drop", torch.nn.Linear(8, 8)),
    ]:
        changed = copy.deepcopy(mlp)
        setattr(changed, slot, other)  # each an allowed type somewhere, in the wrong slot here
        assert not kernels.exactly(changed, tntvision.models.layers.Mlp, mlp.SLOTS), slot
    extra = copy.deepcopy(mlp)
    extra.adapter = torch.nn.Linear(8, 8)  # a child the shortcut would not call
    assert not kernels.exactly(extra, tntvision.models.layers.Mlp, mlp.SLOTS)
    assert not kernels.exactly(torch.nn.LayerNorm(4, bias=False), torch.nn.LayerNorm)
    assert not kernels.exactly(torch.nn.GELU(approximate="tanh"), torch.nn.GELU)


def test_a_forward_hook_sees_every_call_on_both_paths():
    model = _model("tnt_mini_patch4_28").eval()
    seen = []
    model.blocks[1].mlp_in.fc1.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    with torch.no_grad():
        for fused in (True, False):
            with kernels.fused_kernels(fused):
                model(torch.randn(2, 1, 28, 28))
    assert len(seen) == 2


def test_dynamic_quantization_runs_the_quantized_modules():
    """torch.ao dynamic int8 quantization replaces the Linears: the fused op must not run (it would read
    float weights that are no longer there), and the quantized model's output is its reference path's."""
    model = _model("tnt_mini_patch4_28").eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        want_float = model(x)
        q = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        with _count_fused_calls() as calls:
            got = q(x)
        assert not calls
        with kernels.fused_kernels(False):
            ref = q(x)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    assert 0 < (got - want_float).abs().max() < 0.1 * want_float.abs().max()  # int8 weights: close, not equal


@pytest.mark.parametrize("how", ["compile", "export"])
def test_compiled_or_exported_before_any_eager_call_runs_the_fused_op(how, tmp_path):
    """A fresh process whose first use of the model is torch.compile / torch.export gets the fused op in
    its graph (the kernel is loaded during tracing), with eager's numbers."""
    need_fused_kernel()
    code = f"""
import torch, tntvision
from tntvision import kernels
assert kernels.cpu._Build.loaded is None
torch.manual_seed(0)
model = tntvision.create_model("tnt_mini_patch4_28").eval()
x = torch.randn(2, 1, 28, 28)
if "{how}" == "compile":
    graphs = []
    def backend(gm, inputs):
        graphs.append(gm)
        return gm.forward
    with torch.no_grad():
        y = torch.compile(model, fullgraph=True, backend=backend)(x)
    targets = [str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    count = targets.count("tntvision.inner_transformer")
else:
    prog = torch.export.export(model, (x,))
    count = [str(n.target) for n in prog.graph.nodes].count("tntvision.inner_transformer.default")
    y = prog.module()(x)
with torch.no_grad(), kernels.fused_kernels(False):
    ref = model(x)
print(count, len(model.blocks), float((y - ref).abs().max()))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    count, blocks, diff = out.stdout.split()
    assert int(count) == int(blocks) and float(diff) <= 1e-5


def test_ninja_from_the_package_when_not_on_path(monkeypatch, tmp_path):
    """An unactivated venv's python has no ninja on PATH; the build must still find the package's."""
    import shutil

    monkeypatch.setenv("PATH", str(tmp_path))
    assert shutil.which("ninja") is None
    kernels.cpu._ninja_on_path()
    assert shutil.which("ninja") is not None


def test_autocast_tells_the_op_to_compute_its_gemms_in_bf16():
    """Under bf16 autocast the Python side passes ``low_precision`` to the op (bf16 GEMMs forced here, so
    any CPU runs them): its result equals the op's own low-precision call and differs from fp32 GEMMs."""
    need_fused_kernel()
    block = _model("tnt_s_patch16_224").blocks[0]
    words = torch.randn(6, 16, 24)
    with torch.no_grad(), kernels.kernel_options(bf16="brgemm"):
        fp32 = fused_op(words, block)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = fused_op(words, block)
        attn, mlp = block.attn_in, block.mlp_in
        args = (block.norm_in.weight, block.norm_in.bias, attn.qk.weight, attn.qk.bias, attn.v.weight)
        args += (attn.v.bias, attn.proj.weight, attn.proj.bias, block.norm_mlp_in.weight)
        args += (block.norm_mlp_in.bias, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias)
        direct = torch.ops.tntvision.inner_transformer(words, *args, None, None, attn.num_heads, 1e-5, True)
    assert torch.equal(auto.float(), direct.float())
    assert (auto.float() - fp32).abs().max() > 1e-4
