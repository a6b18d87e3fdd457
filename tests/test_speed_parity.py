"""The fast paths compute the same numbers as a plain reference: attention, MLP, whole models, gradients.

fp32: outputs within 1e-5 of timm and of the readable formulas below. bf16 autocast: the same autocast
on both sides; logits within 3% of the logit range (bf16 keeps 8 bits of mantissa), gradients within 5%
of each gradient's largest entry.
"""

import json

import pytest
import timm  # the reference: its absence fails the suite
import torch
import torch.nn.functional as F

import tntvision
from tntvision import kernels
from tntvision.cli import main
from tntvision.kernels.lean import SMALL_ATTN_TOKENS
from tntvision.models.layers import Attention, Mlp
from tntvision.tools.bench import bench_model

from .conftest import need_fused_kernel

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


def reference_attention(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """The paper's attention, written out: softmax(q k^T / sqrt(hd)) v, heads concatenated, proj."""
    B, N, C = x.shape
    h = attn.num_heads
    q, k = attn.qk(x).chunk(2, dim=-1)  # (B, N, C) each
    v = attn.v(x)
    q, k, v = (t.reshape(B, N, h, C // h).transpose(1, 2) for t in (q, k, v))  # (B, h, N, hd)
    weights = ((q @ k.transpose(-2, -1)) * attn.head_dim**-0.5).softmax(dim=-1)
    return attn.proj((weights @ v).transpose(1, 2).reshape(B, N, C))


def _grads(module: torch.nn.Module, x: torch.Tensor, fn) -> tuple[torch.Tensor, dict, torch.Tensor]:
    module.zero_grad()
    x = x.detach().requires_grad_(True)
    out = fn(x)
    (out.float() * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in module.named_parameters()}, x.grad


def _close_grads(got: dict, want: dict, rel: float) -> None:
    for name, g in want.items():
        err = (got[name] - g).abs().max().item()
        assert err <= rel * g.abs().max().item() + 1e-7, f"{name}: max diff {err}"


@pytest.mark.parametrize(
    "dim, heads, tokens",
    [(24, 4, 16), (384, 6, 5), (384, 6, SMALL_ATTN_TOKENS + 13)],  # inner tile, short outer, SDPA outer
)
def test_attention_paths_match_reference_fp32(dim, heads, tokens):
    attn = Attention(dim, num_heads=heads).train()
    x = torch.randn(3, tokens, dim)
    out, grads, gx = _grads(attn, x, attn)
    ref, ref_grads, ref_gx = _grads(attn, x, lambda t: reference_attention(attn, t))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(gx, ref_gx, rtol=1e-4, atol=1e-5)
    _close_grads(grads, ref_grads, rel=1e-5)
    with torch.no_grad():  # the inference path (no lean autograd Function) agrees too
        torch.testing.assert_close(attn(x), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("tokens", [16, SMALL_ATTN_TOKENS + 13])
def test_attention_paths_match_reference_bf16(tokens):
    attn = Attention(48, num_heads=4).train()
    x = torch.randn(3, tokens, 48)
    with torch.autocast(**BF16):
        out, grads, _ = _grads(attn, x, attn)
        ref, ref_grads, _ = _grads(attn, x, lambda t: reference_attention(attn, t))
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), rtol=0, atol=0.03 * ref.float().abs().max().item())
    _close_grads(grads, ref_grads, rel=0.05)


def test_recorded_attention_is_a_softmax_over_keys():
    attn = Attention(24, num_heads=4).eval()
    attn.keep_attn = True
    x = torch.randn(2, 16, 24)
    with torch.no_grad():
        out = attn(x)
    assert attn.last_attn.shape == (2, 4, 16, 16)
    torch.testing.assert_close(attn.last_attn.sum(-1), torch.ones(2, 4, 16))
    torch.testing.assert_close(out, reference_attention(attn, x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("recompute_fc1", [False, True])
@pytest.mark.parametrize("autocast", [False, True])
def test_mlp_lean_backward_matches_autograd(recompute_fc1, autocast):
    mlp = Mlp(24, hidden_dim=96, recompute_fc1=recompute_fc1).train()
    x = torch.randn(5, 16, 24)
    with torch.autocast(**BF16, enabled=autocast):
        out, grads, gx = _grads(mlp, x, mlp)
        ref, ref_grads, ref_gx = _grads(mlp, x, lambda t: mlp.fc2(F.gelu(mlp.fc1(t))))
    assert out.dtype == ref.dtype
    if autocast:  # the same bf16 operations in the same order: equal up to summation order
        torch.testing.assert_close(out.float(), ref.float(), rtol=0, atol=0.02)
        _close_grads(grads, ref_grads, rel=0.02)
    else:
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
        torch.testing.assert_close(gx, ref_gx, rtol=0, atol=1e-6)
        _close_grads(grads, ref_grads, rel=1e-5)
    with torch.no_grad():  # the in-place GELU inference path
        torch.testing.assert_close(mlp(x), mlp.fc2(F.gelu(mlp.fc1(x))), rtol=0, atol=1e-6)


def _timm_pair(name: str, img_size: int, **kw):
    ref = timm.create_model(name, img_size=img_size, **kw)
    ours = tntvision.create_model(name, img_size=img_size, **kw)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


# 144 px: 81 patches + class token, so the outer attention takes the SDPA path and the inner the tiles
@pytest.mark.parametrize(
    "name, img_size",
    [("tnt_s_patch16_224", 144), ("tnt_s_legacy_patch16_224", 32)],
)
@pytest.mark.parametrize("lean", [True, False], ids=["lean", "keep"])
def test_model_training_gradients_match_timm(name, img_size, lean):
    # 3 of the 12 blocks, the same in both: every block runs the same code (the logits of all 12 at 224 px
    # are compared in test_checkpoints.py)
    ref, ours = _timm_pair(name, img_size, depth=3)
    ours.set_lean_backward(lean)
    x = torch.randn(2, 3, img_size, img_size)
    out_ref, grads_ref, gx_ref = _grads(ref.train(), x, ref)
    out, grads, gx = _grads(ours.train(), x, ours)
    torch.testing.assert_close(out, out_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(gx, gx_ref, rtol=0, atol=1e-5 * gx_ref.abs().max().item())
    _close_grads(grads, grads_ref, rel=1e-4)


def test_bf16_autocast_logits_and_gradients_match_timm():
    ref, ours = _timm_pair("tnt_s_patch16_224", 144)
    x = torch.randn(1, 3, 144, 144)
    with torch.autocast(**BF16):
        with torch.inference_mode():
            want, got = ref.eval()(x).float(), ours.eval()(x).float()
        _, grads_ref, _ = _grads(ref.train(), x, ref)
        _, grads, _ = _grads(ours.train(), x, ours)
    span = (want.max() - want.min()).item()
    torch.testing.assert_close(got, want, rtol=0, atol=0.03 * span)
    _close_grads(grads, grads_ref, rel=0.05)


def test_compiled_training_step_matches_eager():
    model = tntvision.create_model("tnt_mini_patch4_28", depth=1).train()  # one block keeps compiling short
    x = torch.randn(4, 1, 28, 28)
    out, grads, _ = _grads(model, x, model)
    compiled = torch.compile(model, fullgraph=True)  # through the custom autograd Functions
    out_c, grads_c, _ = _grads(model, x, compiled)
    torch.testing.assert_close(out_c, out, rtol=1e-4, atol=1e-5)
    _close_grads(grads_c, grads, rel=1e-4)


def test_bench_times_what_it_runs(monkeypatch):
    """A compared model slowed by 30 ms in its forward shows up 30 ms slower in every workload, and ours
    (the same architecture, not slowed) as faster: the table times the models it names. The clock is a
    fake one that only the slowed model's forward moves (plus 1 us a reading), so the numbers are exact
    whatever else runs on the machine."""
    from tntvision.tools import bench

    delay = 0.03
    real_build = bench.Impl.build
    now = [0.0]

    def clock() -> float:
        now[0] += 1e-6
        return now[0]

    def slowed(*_):
        now[0] += delay

    def build(self, model_name, **kw):
        model = real_build(self, model_name, **kw)
        if self.spec.startswith("tntvision:"):
            model.register_forward_pre_hook(slowed)
        return model

    monkeypatch.setattr(bench.Impl, "build", build)
    monkeypatch.setattr(bench.time, "perf_counter", clock)
    slow = "tntvision:tnt_mini_patch4_28"
    result = bench_model(
        model_name="tnt_mini_patch4_28",
        batch_size=2,
        train=True,
        rounds=2,
        warmup=1,
        latency_rounds=2,
        compare=[slow],
    )
    for key, batch in (("inference", 2), ("latency", 1), ("train", 2)):
        per = result[key]["per_impl"]
        assert per[slow]["min_ms"] >= 1e3 * delay
        assert per[slow]["median_ms"] - per["ours"]["median_ms"] >= 0.9e3 * delay
        assert result[key]["time_ratio"][slow] < 1 < result[key]["speedup"][slow]
        for s in per.values():
            assert s["img_per_s"] == pytest.approx(batch / (s["median_ms"] / 1e3))
            assert s["min_ms"] <= s["median_ms"]
    assert result["flop_ratio"][slow] == pytest.approx(1.0)  # the same architecture: only time differs
    mem = result["memory"]["per_impl"]["ours"]
    assert mem["peak_mb"] >= mem["before_mb"] > 0
    assert result["memory"]["workload"] == "train"


def test_bench_cli_compares_with_timm(capsys):
    code = main(
        ["bench", "--model", "tnt_s_patch16_224", "--batch-size", "1", "--rounds", "1", "--warmup", "0"]
        + ["--no-memory", "--compare", "timm", "--json"]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["implementations"] == ["ours", "timm"]
    assert result["inner_backend"] == kernels.kernel_backend("cpu")  # "cpu" where the C++ op builds
    assert set(result["inference"]["per_impl"]) == set(result["latency"]["per_impl"]) == {"ours", "timm"}
    per = result["inference"]["per_impl"]
    ratio = result["inference"]["speedup"]["timm"]
    assert ratio == pytest.approx(per["timm"]["median_ms"] / per["ours"]["median_ms"])
    assert result["inference"]["time_ratio"]["timm"] == pytest.approx(1 / ratio)


def test_bench_keep_activations_times_the_plain_backward(capsys):
    from tntvision.tools.bench import Impl

    kept = Impl("ours").build("tnt_mini_patch4_28", lean_backward=False)
    switches = [m.lean_backward for m in kept.modules() if isinstance(m, (Attention, Mlp))]
    assert switches and not any(switches)
    assert all(
        m.lean_backward
        for m in Impl("ours").build("tnt_mini_patch4_28").modules()
        if hasattr(m, "lean_backward")
    )
    argv = ["bench", "--model", "tnt_mini_patch4_28", "--batch-size", "2", "--rounds", "1", "--train"]
    assert main(argv + ["--warmup", "0", "--no-memory", "--keep-activations", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["lean_backward"] is False and result["train"]["per_impl"]["ours"]["img_per_s"] > 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "tnt_mini_patch4_28", "--compare", "timm"], "timm has no model"),
        (["--model", "tnt_s_patch16_224", "--compare", "deit"], "--compare takes"),
        (["--model", "tnt_nope"], "tnt_nope"),
    ],
)
def test_bench_cli_user_errors_exit_2(argv, message, capsys):
    assert main(["bench", *argv, "--no-memory"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bench_headline_ratios_macs_and_profile(capsys):
    from tntvision.tools.info import count_macs

    need_fused_kernel()  # the profile must show the fused op

    vit = "tntvision:vit_mini_patch4_28"
    argv = ["bench", "--model", "tnt_mini_patch4_28", "--batch-size", "2", "--rounds", "1", "--warmup", "0"]
    argv += ["--no-memory", "--compare", vit, "--compare", "ours:reference", "--profile", "40", "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    want = count_macs(tntvision.create_model("tnt_mini_patch4_28")) / count_macs(
        tntvision.create_model("vit_mini_patch4_28")
    )
    assert result["flop_ratio"][vit] == pytest.approx(want)
    assert (
        result["macs"]["ours"]
        == result["macs"]["ours:reference"]
        == count_macs(tntvision.create_model("tnt_mini_patch4_28"))
    )
    ops = [row["op"] for row in result["inference"]["profile"]]
    assert "tntvision::inner_transformer" in ops  # the profile is of our model, on the fused path


def test_bench_bf16_weights_and_refused_bf16_training(capsys, monkeypatch):
    from tntvision.tools import bench

    seen = []
    real = bench._inference_fn

    def spy(model, x, device, amp):
        seen.append((next(model.parameters()).dtype, x.dtype))
        return real(model, x, device, amp)

    monkeypatch.setattr(bench, "_inference_fn", spy)
    argv = ["bench", "--model", "tnt_mini_patch4_28", "--batch-size", "2", "--rounds", "1", "--warmup", "0"]
    assert main([*argv, "--no-memory", "--dtype", "bfloat16", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["dtype"] == "bfloat16" and result["amp"] == "none"
    assert seen and all(dtypes == (torch.bfloat16, torch.bfloat16) for dtypes in seen)  # weights, input
    assert main([*argv, "--no-memory", "--dtype", "bfloat16", "--train"]) == 2
    assert "float32 weights" in capsys.readouterr().err
