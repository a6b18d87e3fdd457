"""Token merging (ToMe) in TNT: patches and their words merge, sizes weigh the attention.

The model's batched merging is checked against a slow reference written here with Python loops over
images, tokens and heads (explicit softmax, its own bipartite matching and weighted sums), in float64.
Weights are perturbed away from their init so that a dropped bias or a swapped norm would show.
"""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

import tntvision
from tntvision import kernels
from tntvision.cli import main
from tntvision.data import eval_transform, open_image
from tntvision.errors import ConfigError
from tntvision.models.merging import TokenSizes, bipartite_soft_matching, decreasing_schedule, merge_schedule
from tntvision.tools.export import export_model
from tntvision.tools.exported import load_exported

from .conftest import TNT_MODELS, fewer_blocks, need_fused_kernel, small_input_size
from .data_helpers import make_image_folder


def _perturbed(name: str, seed: int = 3, **kw) -> torch.nn.Module:
    model = tntvision.create_model(name, **kw)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.eval()


# ------------------------------------------------------------------------------ the slow reference


def _outer_attention(attn, x, sizes):
    """Loop over heads: explicit softmax with log(size) per key. x (n, d) -> (out (n, d), keys (n, hd))."""
    d, h = x.shape[1], attn.num_heads
    hd = d // h
    qk = x @ attn.qk.weight.t() + (0 if attn.qk.bias is None else attn.qk.bias)
    v = x @ attn.v.weight.t() + (0 if attn.v.bias is None else attn.v.bias)
    q, k = qk[:, :d], qk[:, d:]
    bias = torch.log(torch.tensor(sizes, dtype=x.dtype))
    heads, keys = [], []
    for j in range(h):
        qh, kh, vh = (t[:, j * hd : (j + 1) * hd] for t in (q, k, v))
        scores = qh @ kh.t() / math.sqrt(hd) + bias[None, :]
        heads.append(torch.softmax(scores, dim=-1) @ vh)
        keys.append(kh)
    out = torch.cat(heads, dim=1) @ attn.proj.weight.t() + attn.proj.bias
    return out, sum(keys) / h


def _match(keys, r):
    """Bipartite soft matching with loops: returns {merged A index: B index} and the kept A indices."""
    n = keys.shape[0]
    a_idx, b_idx = list(range(0, n, 2)), list(range(1, n, 2))
    r = min(r, (n - 1) // 2)
    best = {}
    for i in a_idx[1:]:  # the class token (index 0) never merges
        sims = [F.cosine_similarity(keys[i], keys[j], dim=0).item() for j in b_idx]
        j = max(range(len(b_idx)), key=lambda t: sims[t])
        best[i] = (sims[j], b_idx[j])
    ranked = sorted(best, key=lambda i: -best[i][0])
    merged = {i: best[i][1] for i in ranked[:r]}
    kept = [i for i in a_idx if i not in merged]
    return merged, kept, b_idx


def _reference(model, x, schedule, *, unmerge_at=()):
    """Logits of ``model`` with token merging, one image and one token at a time, and the unmerged
    (N, d) block outputs of the blocks in ``unmerge_at``."""
    with torch.no_grad():
        words_all, patches_all = model._embed(x)  # the embedding is not what is tested here
    B, n0 = patches_all.shape[0], patches_all.shape[1]
    logits, unmerged = [], []
    for b in range(B):
        toks = [patches_all[b, t] for t in range(n0)]
        words = [None] + [words_all[b * (n0 - 1) + t] for t in range(n0 - 1)]  # (m, c) per patch
        sizes = [1.0] * n0
        owner = list(range(n0))  # owner[t]: the token original token t is part of now
        feats = {}
        for i, blk in enumerate(model.blocks):
            if blk.has_inner:
                for t in range(1, len(toks)):
                    w = words[t][None]  # (1, m, c): the modules' own math, on the reference path
                    w = w + blk.attn_in(blk.norm_in(w))
                    w = w + blk.mlp_in(blk.norm_mlp_in(w))
                    words[t] = w[0]
                    toks[t] = toks[t] + blk.words_to_patches(words[t][None], 1)[0, 0]
            xs = torch.stack(toks)
            out, keys = _outer_attention(blk.attn_out, blk.norm_out(xs), sizes)
            toks = [toks[t] + out[t] for t in range(len(toks))]
            r = schedule[i]
            if r > 0 and len(toks) >= 3:
                merged, kept, b_idx = _match(keys, r)
                new_toks, new_words, new_sizes, new_of_old = [], [], [], {}
                for i_a in kept:
                    new_of_old[i_a] = len(new_toks)
                    new_toks.append(toks[i_a])
                    new_words.append(words[i_a])
                    new_sizes.append(sizes[i_a])
                for j in b_idx:
                    new_of_old[j] = len(new_toks)
                    group = [j] + [i_a for i_a, dst in merged.items() if dst == j]
                    total = sum(sizes[g] for g in group)
                    new_toks.append(sum(sizes[g] * toks[g] for g in group) / total)
                    new_words.append(sum(sizes[g] * words[g] for g in group) / total)
                    new_sizes.append(total)
                for i_a, dst in merged.items():
                    new_of_old[i_a] = new_of_old[dst]
                owner = [new_of_old[o] for o in owner]
                toks, words, sizes = new_toks, new_words, new_sizes
                assert words[0] is None  # the class token stayed first, alone
            toks = [t + blk.mlp(blk.norm_mlp(t[None]))[0] for t in toks]
            if i in unmerge_at:
                feats[i] = torch.stack([toks[owner[t]] for t in range(1, n0)])  # (N, d)
        final = model.norm(torch.stack(toks))
        if model.global_pool == "avg":
            w = torch.tensor(sizes[1:], dtype=final.dtype)[:, None]
            pooled = (final[1:] * w).sum(0) / w.sum()
        else:
            pooled = final[0]
        logits.append(model.head(pooled))
        unmerged.append(feats)
    return torch.stack(logits), unmerged


# ---------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", TNT_MODELS)
def test_r0_is_the_plain_model_bit_for_bit(name):
    model = _perturbed(name, **fewer_blocks(name))
    size = small_input_size(name)
    x = torch.randn(2, model.cfg.in_chans, size, size)
    with torch.no_grad():
        want = model(x)
        model.set_token_merging(0)
        assert torch.equal(model(x), want)
        model.set_token_merging([0] * len(model.blocks))
        assert torch.equal(model(x), want)
        model.set_token_merging(2)
        assert not torch.equal(model(x), want)  # merging does change the numbers
    fresh = tntvision.create_model(name, merge_tokens=0, **fewer_blocks(name))
    assert fresh.merge_r == (0,) * len(fresh.blocks)


@pytest.mark.parametrize(
    ("name", "img", "overrides", "schedule"),
    [
        ("tnt_mini_patch4_28", 28, {}, (5, 5, 5, 5)),
        ("tnt_mini_patch4_28", 28, dict(global_pool="avg"), (8, 0, 6, 3)),
        ("tnt_mini_patch4_28", 28, dict(inner_blocks=(0, 2)), (4, 4, 4, 4)),
        ("tnt_s_patch16_224", 96, {}, (3,) * 12),  # 36 patches: merging runs out of tokens
        ("tnt_s_legacy_patch16_224", 64, {}, (2,) * 12),
    ],
    ids=["mini", "mini-avg-pool", "mini-some-inner", "tnt_s-96px", "legacy-64px"],
)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reference"])
def test_merged_logits_equal_a_slow_loop_implementation(name, img, overrides, schedule, fused):
    """Both paths (the fused op on the merged words, and the reference modules) against the float64 loop."""
    model = _perturbed(name, img_size=img, **overrides)
    model.set_token_merging(list(schedule))
    x = torch.randn(3, model.cfg.in_chans, img, img)
    with torch.no_grad(), kernels.fused_kernels(False):
        want, _ = _reference(copy.deepcopy(model).double(), x.double(), schedule)
    with torch.no_grad(), kernels.fused_kernels(fused):
        got = model(x)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)


def test_unmerged_intermediates_equal_the_slow_loop_implementation():
    model = _perturbed("tnt_mini_patch4_28")
    schedule = (6, 5, 4, 3)
    model.set_token_merging(list(schedule))
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad(), kernels.fused_kernels(False):
        _, feats = _reference(copy.deepcopy(model).double(), x.double(), schedule, unmerge_at=(1, 3))
        got = model.forward_intermediates(x, indices=[1, 3], output_fmt="NLC", intermediates_only=True)
        maps = tntvision.create_model("tnt_mini_patch4_28", features_only=True, out_indices=(1, 3))
        maps.model.load_state_dict(model.state_dict())
        maps.model.set_token_merging(list(schedule))
        nchw = maps.eval()(x)
    for k, block in enumerate((1, 3)):
        want = torch.stack([f[block] for f in feats])  # (B, N, d)
        torch.testing.assert_close(got[k].double(), want, rtol=0, atol=1e-5)
        assert nchw[k].shape == (2, 128, 7, 7)
        torch.testing.assert_close(nchw[k], got[k].reshape(2, 7, 7, 128).permute(0, 3, 1, 2), rtol=0, atol=0)


def test_sizes_count_every_patch_once_and_tokens_shrink_by_r():
    model = _perturbed("tnt_mini_patch4_28")
    x = torch.randn(4, 1, 28, 28)
    r = 6
    with torch.no_grad():
        words, patches = model._embed(x)
        sizes = TokenSizes.start(patches)
        n = 50
        for blk in model.blocks:
            blk.merge_r = r
            words, patches, sizes = blk(words, patches, sizes)
            size = sizes.size
            n -= min(r, (n - 1) // 2)
            assert patches.shape == (4, n, 128) and size.shape == (4, n, 1)
            assert words.shape == (4 * (n - 1), 4, 8)  # every patch still owns its m words
            torch.testing.assert_close(size[:, 1:].sum(dim=1), torch.full((4, 1), 49.0))  # all patches
            assert torch.equal(size[:, 0], torch.ones(4, 1))  # the class token never merges
            assert (size >= 1).all()


def test_merge_new_index_maps_every_token_to_the_one_it_joined():
    gen = torch.Generator().manual_seed(0)
    metric = torch.randn(3, 11, 8, generator=gen)
    merge = bipartite_soft_matching(metric, 4)
    new = merge.new_index(11)  # (B, 11)
    one_hot = torch.eye(11).expand(3, -1, -1)  # token t carries e_t
    merged = merge(one_hot)  # (B, 7, 11): row i sums the originals that went into new token i
    assert merged.shape == (3, 7, 11)
    assert torch.equal(merged.argmax(dim=1), new)
    assert torch.equal(merged.sum(dim=1), torch.ones(3, 11))  # each original lands in exactly one
    assert torch.equal(new[:, 0], torch.zeros(3, dtype=torch.long))  # class token first


def test_fused_and_reference_paths_agree_with_merging_outputs_and_gradients(monkeypatch):
    need_fused_kernel()
    model = _perturbed("tnt_s_patch16_224", img_size=64).train()
    model.set_token_merging(3)
    x = torch.randn(2, 3, 64, 64)
    sentences = []
    real = kernels.inner.inner_op  # what run_inner calls

    def spy(words, *args, **kwargs):
        sentences.append(words.shape[0])
        return real(words, *args, **kwargs)

    monkeypatch.setattr(kernels.inner, "inner_op", spy)
    grads = {}
    for fused in (True, False):
        model.zero_grad()
        sentences.clear()
        with kernels.fused_kernels(fused):
            out = model(x)
        # 16 patches of 2 images, 3 fewer per image and block until one pair is left: the op's sentences
        assert sentences == ([32, 26, 20, 14, 8, 4, 2, 2, 2, 2, 2, 2] if fused else [])
        out.square().sum().backward()
        grads[fused] = (
            out.detach(),
            {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
        )
    torch.testing.assert_close(grads[True][0], grads[False][0], rtol=0, atol=1e-5)
    for n, g in grads[False][1].items():
        torch.testing.assert_close(grads[True][1][n], g, rtol=0, atol=1e-5 * max(1.0, g.abs().max().item()))


def test_bf16_weights_with_merging_stay_close_to_fp32():
    model = _perturbed("tnt_mini_patch4_28", merge_tokens=4)
    model.set_token_merging(4)
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        want = model(x)
        got = model.to(torch.bfloat16)(x.bfloat16())
    assert got.dtype == torch.bfloat16
    assert (got.float().argmax(1) == want.argmax(1)).float().mean() >= 0.75
    assert (got.float() - want).abs().max() < 0.1 * want.abs().max()


def test_merging_runs_under_torch_compile():
    """One graph (fullgraph), traced through AOTAutograd, with eager's numbers. Static shapes: r is fixed, and
    inductor's dynamic-shape codegen of the gathers can take minutes when an earlier test of the same
    model made dynamo mark the batch dynamic."""
    model = _perturbed("tnt_mini_patch4_28")
    model.set_token_merging([6, 4, 2, 0])
    x = torch.randn(2, 1, 28, 28)
    torch._dynamo.reset()
    graphs = []

    def backend(gm, inputs):
        graphs.append(gm)
        return torch._dynamo.backends.common.aot_autograd(fw_compiler=lambda g, _: g.forward)(gm, inputs)

    with torch.no_grad():
        want = model(x)
        got = torch.compile(model, fullgraph=True, dynamic=False, backend=backend)(x)
    assert len(graphs) == 1
    targets = [str(n.target) for n in graphs[0].graph.nodes if n.op in ("call_function", "call_method")]
    assert any("gather" in t for t in targets) and any("scatter_add" in t for t in targets)  # merging traced
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_schedules_and_bad_values():
    assert merge_schedule(3, 4) == (3, 3, 3, 3)
    assert merge_schedule([1, 2, 3, 4], 4) == (1, 2, 3, 4)
    assert decreasing_schedule(8, 5) == (16, 12, 8, 4, 0) and sum(decreasing_schedule(8, 5)) == 40
    for bad in (-1, [1, 2], [1, 2, 3, -4], 1.5, True, "3"):
        with pytest.raises(ConfigError):
            merge_schedule(bad, 4)
    with pytest.raises(ConfigError, match="token merging"):
        tntvision.create_model("ptnt_ti_patch16_192", merge_tokens=4)
    model = tntvision.create_model("tnt_mini_patch4_28", merge_tokens=[2, 2, 1, 0])
    assert model.merge_r == (2, 2, 1, 0)


# ------------------------------------------------------------------------------ CLI and export


@pytest.fixture(scope="module")
def saved_mini(tmp_path_factory):
    """A perturbed tnt_mini saved with class names, and a small ImageFolder val split for it."""
    torch.manual_seed(0)
    model = _perturbed("tnt_mini_patch4_28")
    with torch.no_grad():
        model.head.weight.mul_(30)  # logits of a few units: merging moves the loss visibly
    root = tmp_path_factory.mktemp("tome")
    tntvision.save_model(model, root / "model", class_names=[f"c{i}" for i in range(10)])
    data = make_image_folder(root / "data", classes=tuple(f"c{i}" for i in range(10)), per_class=2, size=28)
    return root / "model", data


def _json(capsys, argv):
    capsys.readouterr()
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _hand_loss(model, data):
    """Mean cross-entropy over data/val, one image at a time (eval_transform + forward)."""
    transform = eval_transform(model.meta)
    losses = []
    for label, folder in enumerate(sorted((data / "val").iterdir())):
        for path in sorted(folder.iterdir()):
            with torch.no_grad():
                logits = model(transform(open_image(path))[None])
            losses.append(F.cross_entropy(logits.double(), torch.tensor([label])).item())
    return sum(losses) / len(losses)


def test_eval_and_predict_take_merge_tokens(saved_mini, tmp_path, capsys):
    folder, data = saved_mini
    merged = tntvision.load_model(folder).eval()
    merged.set_token_merging([8, 4, 2, 0])
    plain = tntvision.load_model(folder).eval()
    want, want_plain = _hand_loss(merged, data), _hand_loss(plain, data)
    assert abs(want - want_plain) > 1e-3  # merging changes the numbers, so the flag is seen to act

    base = [
        "eval",
        "--checkpoint",
        str(folder),
        "--data",
        str(data),
        "--split",
        "val",
        "--out",
        str(tmp_path),
    ]
    got = _json(capsys, [*base, "--merge-tokens", "8,4,2,0"])
    assert got["loss"] == pytest.approx(want, abs=1e-5)
    assert _json(capsys, base)["loss"] == pytest.approx(want_plain, abs=1e-5)

    image = sorted((data / "val" / "c3").iterdir())[0]
    pred = _json(
        capsys, ["predict", "--checkpoint", str(folder), str(image), "--topk", "10", "--merge-tokens", "8"]
    )
    merged.set_token_merging(8)
    with torch.no_grad():
        probs = merged(eval_transform(merged.meta)(open_image(image))[None]).softmax(-1)[0]
    top = pred["predictions"][0]["top"]
    assert [t["label"] for t in top] == [f"c{i}" for i in probs.argsort(descending=True).tolist()]
    torch.testing.assert_close(
        torch.tensor([t["prob"] for t in top]), probs.sort(descending=True).values, atol=1e-6, rtol=0
    )


def test_bad_merge_tokens_exit_2_with_one_line(saved_mini, tmp_path, capsys):
    folder, data = saved_mini
    out = tmp_path / "out"
    base = ["eval", "--checkpoint", str(folder), "--data", str(data), "--split", "val", "--out", str(out)]
    for value in ("-1", "two"):  # refused by the argument parser, which exits 2
        with pytest.raises(SystemExit) as exc:
            main([*base, "--merge-tokens", value])
        assert exc.value.code == 2
        assert "--merge-tokens" in capsys.readouterr().err
    assert main([*base, "--merge-tokens", "1,2"]) == 2  # 2 values for 4 blocks
    err = capsys.readouterr().err
    assert "one int per block (4)" in err and len(err.strip().splitlines()) == 1
    ptnt = tmp_path / "ptnt"
    tntvision.save_model(tntvision.create_model("ptnt_ti_patch16_192", img_size=64, num_classes=10), ptnt)
    assert main([*base[:2], str(ptnt), *base[3:], "--merge-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "does not support token merging" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()  # nothing was evaluated


def test_onnx_export_fixes_r_in_the_file(saved_mini, tmp_path, capsys):
    folder, _ = saved_mini
    out = tmp_path / "merged.onnx"
    result = export_model(folder, format="onnx", out=out, merge_tokens=[6, 4, 2, 0])
    model = tntvision.load_model(folder).eval()
    model.set_token_merging([6, 4, 2, 0])
    file_model = load_exported(out)
    assert file_model.metadata["merge_tokens"] == [6, 4, 2, 0]
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        got, want, plain = file_model(x), model(x), tntvision.load_model(folder).eval()(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    assert (got - plain).abs().max() > 1e-2  # the file merges: it is not the plain model
    assert result.max_abs_diff <= 1e-4
    # r is fixed in the file: asking again is refused before anything runs
    assert main(["predict", "--checkpoint", str(out), str(tmp_path), "--merge-tokens", "2"]) == 2
    assert "fixed when it is exported" in capsys.readouterr().err


def test_bench_times_and_counts_the_merged_model(monkeypatch):
    from tntvision.tools import bench
    from tntvision.tools.info import count_macs

    built = []
    real_build = bench.Impl.build

    def spy(self, name, **kw):
        model = real_build(self, name, **kw)
        built.append((self.spec, model.merge_r))
        return model

    monkeypatch.setattr(bench.Impl, "build", spy)
    result = bench.bench_model(
        model_name="tnt_mini_patch4_28",
        batch_size=4,
        rounds=1,
        warmup=0,
        latency_rounds=1,
        memory=False,
        merge_tokens=8,
        compare=["ours:reference"],
    )
    assert result["merge_tokens"] == 8
    assert built == [("ours", (8, 8, 8, 8)), ("ours:reference", (8, 8, 8, 8))]
    merged = tntvision.create_model("tnt_mini_patch4_28", merge_tokens=8)
    assert (
        result["macs"]["ours"]
        == count_macs(merged)
        < 0.75 * count_macs(tntvision.create_model("tnt_mini_patch4_28"))
    )


def test_the_benchmarks_deit_wrapper_is_timm_at_r0_and_merges_otherwise():
    """benchmarks/token_merging.py's MergedViT (DeiT-S merged by our functions, the speed comparison)."""
    import importlib.util
    from pathlib import Path

    import timm

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "token_merging.py"
    spec = importlib.util.spec_from_file_location("token_merging_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=5
    ).eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for p in vit.parameters():  # off the init, so that merging moves the logits visibly
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
        want = vit(x)
        torch.testing.assert_close(bench.MergedViT(vit, 0)(x), want, rtol=0, atol=0)
        seen = []
        hooks = [b.mlp.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1])) for b in vit.blocks]
        got = bench.MergedViT(vit, [3, 2, 0])(x)
        for h in hooks:
            h.remove()
    assert seen == [14, 12, 12]  # 17 tokens (class + 16), 3 then 2 merged, none in the last block
    assert got.shape == want.shape and (got - want).abs().max() > 1e-4
