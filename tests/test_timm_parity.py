"""Parity with timm beyond plain logits: intermediates, resampled position tables, dropout and drop path
with the same random stream, and recorded attention against an independent computation.

Weights are perturbed away from timm's init (LayerNorms at 1/0 and zero biases would hide a swapped norm
or a dropped bias).
"""

import pytest
import timm  # the reference: its absence fails the suite
import torch
import torch.nn.functional as F
from timm.models.tnt import checkpoint_filter_fn

import tntvision
from tntvision.models.layers import Attention


def _perturb(model: torch.nn.Module, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)


def _pair(name: str, img_size: int, **kw):
    ref = timm.create_model(name, img_size=img_size, **kw)
    _perturb(ref)
    ours = tntvision.create_model(name, img_size=img_size, **kw)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


@pytest.mark.parametrize("norm", [False, True])
def test_forward_intermediates_match_timm(norm):
    ref, ours = _pair("tnt_s_patch16_224", 48)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        want_final, want = ref.eval().forward_intermediates(x, indices=[1, 5, 11], norm=norm)
        got_final, got = ours.eval().forward_intermediates(x, indices=[1, 5, 11], norm=norm)
        nlc = ours.forward_intermediates(x, indices=2, output_fmt="NLC", intermediates_only=True)
        want_nlc = ref.forward_intermediates(x, indices=2, output_fmt="NLC", intermediates_only=True)
    torch.testing.assert_close(got_final, want_final, rtol=0, atol=1e-5)
    assert len(got) == len(want) == 3
    for g, w in zip(got, want, strict=True):  # raw block outputs grow with depth: 1e-5 of their scale
        assert g.shape == w.shape == (2, 384, 3, 3)
        torch.testing.assert_close(g, w, rtol=0, atol=1e-5 * max(1.0, w.abs().max().item()))
    for g, w in zip(nlc, want_nlc, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-5 * max(1.0, w.abs().max().item()))


def test_position_table_resampling_matches_timm(tmp_path):
    """224-px weights used at 96 px: our loader and our on-the-fly resampling against timm's filter."""
    ref224, ours224 = _pair("tnt_s_patch16_224", 224)
    ref96 = timm.create_model("tnt_s_patch16_224", img_size=96)
    ref96.load_state_dict(checkpoint_filter_fn(ref224.state_dict(), ref96), strict=True)
    torch.save(ref224.state_dict(), tmp_path / "timm_224.pth")
    ours96 = tntvision.create_model("tnt_s_patch16_224", img_size=96, pretrained=tmp_path / "timm_224.pth")
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        want = ref96.eval()(x)
        torch.testing.assert_close(ours96.eval()(x), want, rtol=0, atol=1e-5)
        torch.testing.assert_close(ours224.eval()(x), want, rtol=0, atol=1e-5)  # resampled on the fly


@pytest.mark.parametrize(("old", "new"), [((3, 5), (6, 4)), ((4, 2), (4, 7)), ((2, 6), (3, 3))])
def test_position_table_resampling_of_a_non_square_grid_matches_timm(old, new):
    """A table laid out on a non-square grid (rows first): resampled as timm's filter does, class row kept.

    On a square grid rows and columns cannot be told apart; here a table read column-major would be
    resampled from another image."""
    from timm.layers import resample_abs_pos_embed

    from tntvision.models.layers import resample_pos_embed

    gen = torch.Generator().manual_seed(5)
    pos = torch.randn(1, 1 + old[0] * old[1], 8, generator=gen)
    got = resample_pos_embed(pos, new, old_grid=old)
    want = resample_abs_pos_embed(pos, new_size=list(new), old_size=list(old), num_prefix_tokens=1)
    assert got.shape == (1, 1 + new[0] * new[1], 8)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(got[:, 0], pos[:, 0], rtol=0, atol=0)


@pytest.mark.parametrize(
    "rates",
    [
        dict(drop_path_rate=0.3),
        dict(proj_drop_rate=0.2, attn_drop_rate=0.2),
        dict(drop_path_rate=0.2, proj_drop_rate=0.1, attn_drop_rate=0.1),
    ],
    ids=["drop_path", "dropout", "both"],
)
def test_dropout_and_drop_path_match_timm_with_the_same_stream(rates):
    ref, ours = _pair("tnt_s_patch16_224", 32, **rates)
    x = torch.randn(3, 3, 32, 32)
    torch.manual_seed(11)
    want = ref.train()(x)
    torch.manual_seed(11)
    got = ours.train()(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    torch.manual_seed(12)
    assert (ours(x) - want).abs().max() > 1e-3  # another stream gives another result: randomness is live


def test_recorded_attention_is_softmax_of_q_k_computed_independently():
    model = tntvision.create_model("tnt_mini_patch4_28").eval()
    _perturb(model)
    inputs = {}
    for name, mod in model.named_modules():
        if isinstance(mod, Attention):
            mod.register_forward_pre_hook(lambda m, args, name=name: inputs.__setitem__(name, args[0]))
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad(), tntvision.record_attention(model) as maps:
        model(x)
    assert set(maps) == set(inputs) and len(maps) == 8  # 4 blocks x (inner, outer)
    for name, t in inputs.items():
        mod = model.get_submodule(name)
        B, N, C = t.shape
        h = mod.num_heads
        q, k = (t @ mod.qk.weight.t()).split(C, dim=-1)  # no qkv bias in TNT
        q = q.reshape(B, N, h, C // h).transpose(1, 2)
        k = k.reshape(B, N, h, C // h).transpose(1, 2)
        want = F.softmax(q @ k.transpose(-1, -2) / (C // h) ** 0.5, dim=-1)  # (B, h, N, N)
        torch.testing.assert_close(maps[name], want, rtol=0, atol=1e-6)
