"""Token merging (ToMe, Bolya et al., ICLR 2023, arXiv:2210.09461) for TNT: patches merge, and so do
their words.

Between the outer attention and the outer MLP of a block, ``r`` patch tokens are merged into others by
bipartite soft matching on the attention keys: the tokens are split alternately into sets A and B, every A
token finds its most similar B token (cosine similarity of the keys, averaged over heads), and the ``r`` A
tokens with the most similar partners are merged into them. Merged tokens are size-weighted averages;
``size`` counts how many of the original patches a token stands for, and the outer attention adds
``log(size)`` to its keys' scores (proportional attention), so that a token standing for three patches
weighs as much as those three would. The class token is never merged.

TNT's addition: a patch owns ``m`` words, which the inner transformer attends over and which are projected
back into the patch. When two patches merge, their words merge with the same weights, word position by
word position: word ``j`` of the merged patch is the size-weighted average of word ``j`` of the patches
it stands for. The merged set is again a set of sentences of ``m`` words, so the inner transformer (fused
op or reference) and the words-to-patch projection run unchanged, over fewer sentences.

Everything here works on whole batches with fixed shapes (``r`` is a Python int), so it runs under
``torch.compile`` and exports to ONNX.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..errors import ConfigError

__all__ = [
    "Merge",
    "TokenSizes",
    "bipartite_soft_matching",
    "decreasing_schedule",
    "merge_schedule",
    "merge_weighted",
    "merge_words",
    "proportional_attention",
]


def size_bias(size: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``log(size)`` (B, N, 1) as an additive score bias over keys: (B, 1, 1, N)."""
    B, N = size.shape[0], size.shape[1]
    return size.log().to(dtype).view(B, 1, 1, N)


def proportional_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: torch.Tensor, *, dropout_p: float = 0.0
) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd) + log(size_key)) v for q, k, v (B, h, N, hd) and sizes (B, N, 1).

    A key standing for ``s`` merged tokens gets the weight those ``s`` tokens would have had together.
    """
    return F.scaled_dot_product_attention(q, k, v, attn_mask=size_bias(size, q.dtype), dropout_p=dropout_p)


@dataclass(frozen=True)
class Merge:
    """One block's merge, from :func:`bipartite_soft_matching`: which A tokens stay and where the rest go.

    Index tensors (all (B, k, 1), long): ``kept`` (A tokens that stay, in their original order, so the
    class token stays first), ``src`` (A tokens merged away) and ``dst`` (the B token each of them joins).
    """

    kept: torch.Tensor
    src: torch.Tensor
    dst: torch.Tensor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Sum-merge tokens (B, N, C) -> (B, N - r, C): kept A tokens first, then B with sources added."""
        C = x.shape[-1]
        a, b = x[:, ::2], x[:, 1::2]  # (B, ceil(N/2), C), (B, floor(N/2), C)
        kept = a.gather(1, self.kept.expand(-1, -1, C))  # (B, Na - r, C)
        src = a.gather(1, self.src.expand(-1, -1, C))  # (B, r, C)
        b = b.scatter_add(1, self.dst.expand(-1, -1, C), src)  # (B, Nb, C)
        return torch.cat([kept, b], dim=1)

    def new_index(self, num_tokens: int) -> torch.Tensor:
        """(B, N) long: the index after the merge of each of the N tokens before it (to unmerge)."""
        B, n_kept = self.kept.shape[0], self.kept.shape[1]
        dev = self.kept.device
        n_a = (num_tokens + 1) // 2
        a_new = torch.empty(B, n_a, dtype=torch.long, device=dev)  # (B, Na)
        a_new.scatter_(1, self.kept[..., 0], torch.arange(n_kept, device=dev).expand(B, -1))
        a_new.scatter_(1, self.src[..., 0], n_kept + self.dst[..., 0])
        b_new = n_kept + torch.arange(num_tokens // 2, device=dev).expand(B, -1)  # (B, Nb)
        out = torch.empty(B, num_tokens, dtype=torch.long, device=dev)
        out[:, ::2], out[:, 1::2] = a_new, b_new
        return out


def bipartite_soft_matching(metric: torch.Tensor, r: int, *, protected: int = 1) -> Merge:
    """ToMe's matching on ``metric`` (B, N, C), usually the keys averaged over heads.

    The first ``protected`` tokens (the class token) are never merged. ``r`` is cut to what one step can
    merge: at most half of the tokens.
    """
    N = metric.shape[1]
    r = min(r, (N - protected) // 2)
    if r <= 0:
        raise ValueError("bipartite_soft_matching needs r > 0 and at least two mergeable tokens")
    with torch.no_grad():  # an index choice: no gradient, as in ToMe
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[:, ::2], metric[:, 1::2]  # (B, Na, C), (B, Nb, C)
        scores = a @ b.transpose(1, 2)  # (B, Na, Nb) cosine similarities
        if protected:
            # A holds tokens 0, 2, 4...: the first ceil(protected/2) rows are the protected ones
            scores[:, : (protected + 1) // 2] = -torch.inf
        best, best_b = scores.max(dim=-1)  # (B, Na)
        order = best.argsort(dim=-1, descending=True)[..., None]  # (B, Na, 1), most similar first
        kept = order[:, r:].sort(dim=1).values  # (B, Na - r, 1): original order, class token first
        src = order[:, :r]  # (B, r, 1)
        dst = best_b[..., None].gather(1, src)  # (B, r, 1)
    return Merge(kept=kept, src=src, dst=dst)


def merge_weighted(merge: Merge, x: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average merge of tokens ``x`` (B, N, C) with sizes (B, N, 1) -> (merged, sizes)."""
    merged_size = merge(size)  # (B, N - r, 1)
    return (merge(x * size.to(x.dtype)) / merged_size.to(x.dtype)), merged_size


def merge_words(merge: Merge, words: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """The words (B*N, m, c) of patches merged by ``merge`` (sizes (B, 1+N, 1), the class token first) ->
    (B*N', m, c): word ``j`` of a merged patch is the size-weighted average of word ``j`` of its patches."""
    B, n_tokens = size.shape[0], size.shape[1]
    m, c = words.shape[1], words.shape[2]
    flat = words.reshape(B, n_tokens - 1, m * c)  # (B, N, m*c), word-major
    flat = torch.cat([flat.new_zeros(B, 1, m * c), flat], dim=1)  # (B, 1+N, m*c): a slot for the class token
    flat, _ = merge_weighted(merge, flat, size)  # the slot stays first, alone
    return flat[:, 1:].reshape(-1, m, c)  # (B*N', m, c)


class TokenSizes(NamedTuple):
    """What token merging carries from block to block: ``size`` (B, 1+N', 1), how many of the original
    patches each token stands for, and ``where`` (B, 1+N), the token each original one is part of now."""

    size: torch.Tensor
    where: torch.Tensor

    @classmethod
    def start(cls, tokens: torch.Tensor) -> TokenSizes:
        """Before any merge: every token (B, 1+N, d) stands for itself."""
        B, n = tokens.shape[0], tokens.shape[1]
        size = tokens.new_ones(B, n, 1, dtype=torch.float32)  # (B, 1+N, 1)
        return cls(size, torch.arange(n, device=tokens.device).expand(B, -1))  # (B, 1+N)

    def merged(self, merge: Merge, size: torch.Tensor) -> TokenSizes:
        """After ``merge``, whose tokens have sizes ``size``."""
        return TokenSizes(size, merge.new_index(self.size.shape[1]).gather(1, self.where))

    def unmerge(self, tokens: torch.Tensor) -> torch.Tensor:
        """Merged tokens (B, 1+N', d) -> (B, 1+N, d): every original token reads the one it is part of."""
        return tokens.gather(1, self.where[..., None].expand(-1, -1, tokens.shape[-1]))


def merge_schedule(r: int | Sequence[int], depth: int) -> tuple[int, ...]:
    """Per-block merge counts from an int (the same ``r`` in every block) or a list of ``depth`` ints.

    ``decreasing_schedule`` gives ToMe's alternative that merges more early and less late.
    """
    if isinstance(r, bool) or not isinstance(r, (int, Sequence)):
        raise ConfigError(f"merge_tokens must be an int or a list of ints, got {r!r}")
    rs = (r,) * depth if isinstance(r, int) else tuple(r)
    if len(rs) != depth or not all(isinstance(v, int) and not isinstance(v, bool) for v in rs):
        raise ConfigError(f"merge_tokens needs one int per block ({depth}), got {r!r}")
    if any(v < 0 for v in rs):
        raise ConfigError(f"merge_tokens must be >= 0, got {r!r}")
    return rs


def decreasing_schedule(r: int, depth: int) -> tuple[int, ...]:
    """ToMe's decreasing schedule: from 2r in the first block down to 0 in the last (same total as r
    per block, rounded)."""
    if depth == 1:
        return (r,)
    return tuple(round(2 * r * (depth - 1 - i) / (depth - 1)) for i in range(depth))
