"""An independent PyramidTNT forward pass over a state dict in the authors' key layout (a test oracle).

Written from the authors' module semantics, in a different form from ``tntvision.models.pyramid_tnt``:
functional ops only, words cut with ``F.unfold`` and regrouped with slices and concatenations as the
authors' word merge does, attention as an explicit softmax with the relative table added to the scores,
BatchNorm from running statistics (eval mode).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _ln(sd, key, x):
    w = sd[key + ".weight"]
    return F.layer_norm(x, w.shape, w, sd[key + ".bias"], 1e-5)


def _lin(sd, key, x):
    return F.linear(x, sd[key + ".weight"], sd.get(key + ".bias"))


def _conv_bn_relu(sd, conv, bn, x, stride):
    x = F.conv2d(x, sd[conv + ".weight"], sd[conv + ".bias"], stride=stride, padding=1)
    x = F.batch_norm(
        x,
        sd[bn + ".running_mean"],
        sd[bn + ".running_var"],
        sd[bn + ".weight"],
        sd[bn + ".bias"],
        False,
        0.0,
        1e-5,
    )
    return F.relu(x)


def _attention(sd, key, x, heads, H=None, W=None, sr=1, rel=None):
    B, N, C = x.shape
    hd = C // heads
    q = _lin(sd, key + ".q", x).reshape(B, N, heads, hd).permute(0, 2, 1, 3)
    src = x
    if sr > 1:
        img = x.permute(0, 2, 1).reshape(B, C, H, W)
        src = F.avg_pool2d(img, sr, sr).reshape(B, C, -1).permute(0, 2, 1)
        src = _ln(sd, key + ".norm", _lin(sd, key + ".linear", src))
    kv = _lin(sd, key + ".kv", src).reshape(B, -1, 2, heads, hd).permute(2, 0, 3, 1, 4)
    scores = q @ kv[0].transpose(-2, -1) * hd**-0.5
    if rel is not None:
        scores = scores + rel
    out = (scores.softmax(-1) @ kv[1]).transpose(1, 2).reshape(B, N, C)
    return _lin(sd, key + ".proj", out)


def _mlp(sd, key, x):
    return _lin(sd, key + ".fc2", F.gelu(_lin(sd, key + ".fc1", x)))


def _block(sd, key, words, outer, H, W, heads, inner_heads, sr, rel):
    B, N, D = outer.shape
    if key + ".inner_norm1.weight" in sd:
        m = words.shape[1]
        words = words + _attention(
            sd,
            key + ".inner_attn",
            _ln(sd, key + ".inner_norm1", words.reshape(B, N, -1)).reshape(B * N, m, -1),
            inner_heads,
        )
        words = words + _mlp(
            sd,
            key + ".inner_mlp",
            _ln(sd, key + ".inner_norm2", words.reshape(B, N, -1)).reshape(B * N, m, -1),
        )
        proj = F.linear(_ln(sd, key + ".proj_norm1", words.reshape(B, N, -1)), sd[key + ".proj.weight"])
        outer = outer + _ln(sd, key + ".proj_norm2", proj)
    outer = outer + _attention(
        sd, key + ".outer_attn", _ln(sd, key + ".outer_norm1", outer), heads, H, W, sr, rel
    )
    outer = outer + _mlp(sd, key + ".outer_mlp", _ln(sd, key + ".outer_norm2", outer))
    return words, outer


def _word_merge(sd, key, x, H, W):
    C = x.shape[-1]
    x = _ln(sd, key + ".norm", x).reshape(-1, H, W, 4, 4, C)
    if H % 2 or W % 2:
        x = F.pad(x.permute(0, 3, 4, 5, 1, 2), (0, W % 2, 0, H % 2)).permute(0, 4, 5, 1, 2, 3)
    tl, bl, tr, br = x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]
    x = torch.cat([torch.cat([tl, bl], 3), torch.cat([tr, br], 3)], 4)  # (B, H/2, W/2, 8, 8, C)
    x = x.reshape(-1, 8, 8, C).permute(0, 3, 1, 2)
    x = F.conv2d(x, sd[key + ".conv.0.weight"], sd[key + ".conv.0.bias"], stride=2, padding=1)
    return x.reshape(x.shape[0], x.shape[1], 16).transpose(1, 2)


def _sentence_merge(sd, key, x, H, W):
    B, N, C = x.shape
    x = _ln(sd, key + ".norm", x).transpose(1, 2).reshape(B, C, H, W)
    x = F.conv2d(x, sd[key + ".conv.0.weight"], sd[key + ".conv.0.bias"], stride=2, padding=1)
    H, W = math.ceil(H / 2), math.ceil(W / 2)
    return x.reshape(B, -1, H * W).transpose(1, 2), H, W


@torch.no_grad()
def reference_logits(sd, x, *, heads, inner_heads, sr_ratios=(4, 2, 1, 1)):
    """Logits of the authors' PyramidTNT for weights ``sd`` (their key names) at the training size."""
    sd = {k: v.double() if v.is_floating_point() else v for k, v in sd.items()}
    x = x.double()
    B, _, H, W = x.shape
    Ho, Wo = H // 8, W // 8
    x = _conv_bn_relu(sd, "patch_embed.common_conv.0", "patch_embed.common_conv.1", x, 2)
    words = _conv_bn_relu(sd, "patch_embed.inner_convs.0", "patch_embed.inner_convs.1", x, 1)
    c = words.shape[1]
    words = F.unfold(words, kernel_size=4, stride=4).transpose(1, 2)  # (B, N, c*16), channel-major
    words = words.reshape(B * Ho * Wo, c, 16).transpose(1, 2)
    outer = x
    for conv, bn, s in (("0", "1", 2), ("3", "4", 2), ("6", "7", 1)):
        outer = _conv_bn_relu(
            sd, f"patch_embed.outer_convs.{conv}", f"patch_embed.outer_convs.{bn}", outer, s
        )
    outer = outer.permute(0, 2, 3, 1).reshape(B, Ho * Wo, -1)
    words = words + sd["inner_pos"]
    outer = outer + sd["outer_pos"]
    for i in range(4):
        if i > 0:
            words = _word_merge(sd, f"word_merges.{i - 1}", words, Ho, Wo)
            outer, Ho, Wo = _sentence_merge(sd, f"sentence_merges.{i - 1}", outer, Ho, Wo)
        j = 0
        while f"stages.{i}.blocks.{j}.outer_norm1.weight" in sd:
            words, outer = _block(
                sd,
                f"stages.{i}.blocks.{j}",
                words,
                outer,
                Ho,
                Wo,
                heads[i],
                inner_heads[i],
                sr_ratios[i],
                sd[f"stages.{i}.relative_pos"],
            )
            j += 1
    outer = _ln(sd, "norm", outer).mean(1)
    return _lin(sd, "head", outer)
