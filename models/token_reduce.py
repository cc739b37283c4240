"""Less work per step for ViT: token merging (ToMe) and token pruning (EViT), as switches on a ViT's blocks.

ToMe (Bolya et al. 2023, "Token Merging: Your ViT but Faster"): in every block, between the attention and the
MLP, `r` patch tokens are merged into others by bipartite soft matching on the attention keys:
  - the patch tokens alternate into two sets, A (even positions) and B (odd);
  - each A token's most similar B token (cosine similarity of the keys, averaged over heads) is its match;
  - the r A tokens with the most similar matches are merged into them: a size-weighted mean, sizes added;
  - the rest of A, then all of B, go on (order kept within each set).
Every token carries its size (how many patches it stands for), and the attention is proportional: log(size)
is added to the logits of each key, so a merged token weighs as much as the patches it replaced.

EViT (Liang et al. 2022, "Not All Patches are What You Need"): at the blocks in `evit_locs`, after the
attention, only the `evit_keep_rate` fraction of patch tokens that the cls token attends to most (its
attention averaged over heads) go on; the others are fused into one token (their mean weighted by that
attention), appended after the kept ones, before the MLP.

The prefix tokens (cls, DeiT's distillation token) are never merged or pruned and stay first. With r = 0 and
keep rate 1 the blocks run exactly the plain path (bit-identical: tests/test_token_reduce.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.layers import drop_path


def _attend(blk: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """blk.attn on norm1(x) with an additive key bias (B, 1, 1, N) or None: (out (B, N, D), q, k), q and k
    (B, H, N, hd) for the matching metric and the cls attention."""
    return blk.attn(blk.norm1(x), bias, return_qk=True)


def bipartite_merge(
    x: torch.Tensor, size: torch.Tensor, metric: torch.Tensor, r: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge r tokens of x (B, N, D) with sizes (B, N, 1) by bipartite soft matching on metric (B, N, C):
    -> (B, N - r, D), (B, N - r, 1). r is capped at floor(N / 2), the size of set B (ToMe's cap)."""
    r = min(r, x.shape[1] // 2)
    if r <= 0:
        return x, size
    m = F.normalize(metric, dim=-1)
    scores = m[:, 0::2] @ m[:, 1::2].transpose(1, 2)  # (B, Na, Nb) cosine similarity A -> B
    best, match = scores.max(dim=-1)  # (B, Na): each A token's most similar B token
    order = best.argsort(dim=-1, descending=True)
    src = order[:, :r]  # (B, r): the A tokens merged away
    keep = order[:, r:].sort(dim=-1).values  # (B, Na - r): the rest of A, in their original order
    dst = match.gather(1, src)  # (B, r): where each goes in B

    def take(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return t.gather(1, idx.unsqueeze(-1).expand(-1, -1, t.shape[-1]))

    xs = x * size  # size-weighted sums; divided by the merged sizes below
    a, b = xs[:, 0::2], xs[:, 1::2]
    sa, sb = size[:, 0::2], size[:, 1::2]
    b = b.scatter_add(1, dst.unsqueeze(-1).expand(-1, -1, b.shape[-1]), take(a, src))
    sb = sb.scatter_add(1, dst.unsqueeze(-1), take(sa, src))
    merged = torch.cat([take(a, keep), b], dim=1)  # (B, N - r, D)
    sizes = torch.cat([take(sa, keep), sb], dim=1)  # (B, N - r, 1)
    return merged / sizes, sizes


def evit_select(
    x: torch.Tensor, cls_attn: torch.Tensor, keep_rate: float, prefix: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """EViT's token identification on x (B, P + L, D) with the cls token's attention to the patches (B, L):
    -> (B, P + K + 1, D) (prefix, the K most attended patches in attention order, the fused token) and the
    kept patch indices (B, K). K = ceil(keep_rate * L); keep_rate 1 (or K >= L) returns x as is."""
    L = x.shape[1] - prefix
    k = math.ceil(keep_rate * L)
    if k >= L:
        return x, torch.arange(L, device=x.device).expand(x.shape[0], -1)
    patches = x[:, prefix:]
    order = cls_attn.argsort(dim=-1, descending=True)
    kept, rest = order[:, :k], order[:, k:]  # (B, K), (B, L - K)

    def take(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return t.gather(1, idx.unsqueeze(-1).expand(-1, -1, t.shape[-1]))

    w = cls_attn.gather(1, rest).unsqueeze(-1)  # (B, L - K, 1)
    fused = (take(patches, rest) * w).sum(dim=1, keepdim=True) / w.sum(dim=1, keepdim=True)  # (B, 1, D)
    return torch.cat([x[:, :prefix], take(patches, kept), fused], dim=1), kept


def reduced_block(
    blk: nn.Module,
    x: torch.Tensor,
    size: torch.Tensor,
    prefix: int,
    r: int = 0,
    keep_rate: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One models.layers.Block (its own weights) on x (B, N, D) with token sizes (B, N, 1), merging r patch
    tokens (ToMe, proportional attention) or pruning to keep_rate (EViT) between attention and MLP."""
    bias = size.log().transpose(1, 2).unsqueeze(1) if r > 0 else None  # (B, 1, 1, N): proportional attention
    out, q, k = _attend(blk, x, bias)
    x = x + drop_path(out, blk.drop_path, blk.training)
    if r > 0:
        metric = k.mean(dim=1)[:, prefix:]  # (B, L, hd): the keys averaged over heads
        patches, psize = bipartite_merge(x[:, prefix:], size[:, prefix:], metric, r)
        x = torch.cat([x[:, :prefix], patches], dim=1)
        size = torch.cat([size[:, :prefix], psize], dim=1)
    elif keep_rate < 1.0:
        # the cls query's attention probabilities (softmax over all N keys), averaged over heads
        logits = (q[:, :, :1] @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, H, 1, N)
        probs = (logits - logits.logsumexp(dim=-1, keepdim=True)).exp()[:, :, 0, prefix:]  # (B, H, L)
        cls_attn = probs.mean(dim=1)  # (B, L)
        x, _ = evit_select(x, cls_attn, keep_rate, prefix)
        size = x.new_ones(x.shape[0], x.shape[1], 1)
    return x + drop_path(blk.mlp(blk.norm2(x)), blk.drop_path, blk.training), size


def check_reduction(tome_r: int, evit_keep_rate: float, evit_locs: tuple[int, ...], depth: int) -> None:
    """The switches' values, with errors naming them."""
    if tome_r < 0:
        raise ValueError(f"tome_r must be >= 0 (tokens merged per block), got {tome_r}")
    if not 0.0 < evit_keep_rate <= 1.0:
        raise ValueError(f"evit_keep_rate must be in (0, 1], got {evit_keep_rate}")
    if tome_r > 0 and evit_keep_rate < 1.0:
        raise ValueError("tome_r and evit_keep_rate are two ways to drop tokens: set one of them")
    bad = [i for i in evit_locs if not 0 <= i < depth]
    if bad:
        raise ValueError(f"evit_locs: block indices {bad} are outside 0..{depth - 1}")
