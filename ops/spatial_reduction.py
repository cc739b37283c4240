"""Spatial-reduction attention (PVT, Wang et al. 2021; PVT v2, 2022): queries at full resolution, keys and
values from a shorter sequence, so attention over an H x W map costs O(N * M) with M << N.

x (B, N, C) holds an H x W map in row-major order. `reduce_map` (modules) / `reduce_tokens` (weights) shrink
it to M tokens:
  conv (linear=False): Conv2d(C, C, k=sr, stride=sr) -> LayerNorm; M = (H // sr) * (W // sr). The rows and
      columns past the last full sr x sr cell are dropped (a stride-sr conv without padding), as in PVT.
  linear (PVT v2-li):  AdaptiveAvgPool2d(pool) -> Conv2d(C, C, 1) -> LayerNorm -> GELU; M = pool * pool, so
      the cost is linear in N.
(PVT skips the reduction, and its norm, when sr == 1 in conv mode: plain self-attention.)
`sr_attention(q, kv, num_heads)` attends projected queries q (B, N, C) to projected keys/values kv (B, M, 2C)
([k | v] on the last axis, each split into heads), through ops.attention's one dispatch; returns (B, N, C).

`reference_reduce_tokens` / `reference_sr_attention` are the plain-torch definitions they are tested against:
patchify + matmul instead of the strided conv, explicit pooling bins, LayerNorm, GELU and softmax written out.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ops.attention import attention


def _check(x: torch.Tensor, hw: tuple[int, int]) -> tuple[int, int, int]:
    B, N, C = x.shape
    if N != hw[0] * hw[1]:
        raise ValueError(f"{N} tokens do not form the {hw[0]}x{hw[1]} map they are said to hold")
    return B, N, C


def reduce_map(
    x: torch.Tensor,
    hw: tuple[int, int],
    conv: Callable[[torch.Tensor], torch.Tensor],
    norm: Callable[[torch.Tensor], torch.Tensor],
    linear: bool = False,
    pool_size: int = 7,
) -> torch.Tensor:
    """(B, N, C) tokens of an H x W map -> (B, M, C) reduced tokens, with the reduction `conv` (maps -> maps) and
    `norm` (tokens -> tokens) given as callables: models pass their nn.Modules, so the module hooks run (ZeRO-3
    gathers a module's parameters only when its own forward is called)."""
    B, N, C = _check(x, hw)
    maps = x.transpose(1, 2).reshape(B, C, *hw)  # (B, C, H, W)
    if linear:
        maps = F.adaptive_avg_pool2d(maps, pool_size)  # (B, C, p, p)
    y = norm(conv(maps).flatten(2).transpose(1, 2))  # (B, M, C)
    return F.gelu(y) if linear else y


def reduce_tokens(
    x: torch.Tensor,
    hw: tuple[int, int],
    sr_ratio: int,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    eps: float = 1e-6,
    linear: bool = False,
    pool_size: int = 7,
) -> torch.Tensor:
    """`reduce_map` with explicit weights: `weight` is the reduction conv's (C, C, sr, sr), or (C, C, 1, 1) when
    `linear` (see the module docstring)."""
    C = x.shape[-1]
    stride = 1 if linear else sr_ratio
    conv = functools.partial(F.conv2d, weight=weight, bias=bias, stride=stride)
    norm = functools.partial(F.layer_norm, normalized_shape=(C,), weight=norm_weight, bias=norm_bias, eps=eps)
    return reduce_map(x, hw, conv, norm, linear, pool_size)


def sr_attention(
    q: torch.Tensor, kv: torch.Tensor, num_heads: int, backend: str = "auto", dropout_p: float = 0.0
) -> torch.Tensor:
    """q (B, N, C), kv (B, M, 2C) = [keys | values] -> (B, N, C): softmax(q k^T / sqrt(hd)) v per head."""
    B, N, C = q.shape
    hd = C // num_heads
    q = q.view(B, N, num_heads, hd).transpose(1, 2)  # (B, h, N, hd)
    k, v = kv.view(B, kv.shape[1], 2, num_heads, hd).unbind(2)  # each (B, M, h, hd)
    k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, h, M, hd)
    out = attention(q, k, v, dropout_p=dropout_p, backend=backend)  # (B, h, N, hd)
    return out.transpose(1, 2).reshape(B, N, C)


# --- plain-torch references -----------------------------------------------------------------------------


def _bins(size: int, out: int) -> list[tuple[int, int]]:
    """AdaptiveAvgPool's windows: bin i covers [floor(i * size / out), ceil((i + 1) * size / out))."""
    return [((i * size) // out, -((-(i + 1) * size) // out)) for i in range(out)]


def reference_reduce_tokens(
    x: torch.Tensor,
    hw: tuple[int, int],
    sr_ratio: int,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    eps: float = 1e-6,
    linear: bool = False,
    pool_size: int = 7,
) -> torch.Tensor:
    B, N, C = _check(x, hw)
    H, W = hw
    grid = x.reshape(B, H, W, C)
    if linear:
        rows, cols = _bins(H, pool_size), _bins(W, pool_size)
        cell_means = [[grid[:, r0:r1, c0:c1].mean(dim=(1, 2)) for c0, c1 in cols] for r0, r1 in rows]
        pooled = torch.stack([torch.stack(row, 1) for row in cell_means], 1)  # (B, p, p, C)
        cells, w = pooled.reshape(B, -1, C), weight.reshape(C, C)  # a 1x1 conv is a linear map
    else:
        s = sr_ratio
        h, w_ = H // s, W // s
        cells = grid[:, : h * s, : w_ * s].reshape(B, h, s, w_, s, C)  # the remainder rows/columns dropped
        cells = cells.permute(0, 1, 3, 2, 4, 5).reshape(
            B, h * w_, s * s * C
        )  # one (ky, kx, c) patch per cell
        w = weight.permute(0, 2, 3, 1).reshape(C, s * s * C)  # (C_out, ky * kx * C_in)
    y = cells @ w.T + (0 if bias is None else bias)  # (B, M, C)
    mu = y.mean(-1, keepdim=True)
    var = (y - mu).square().mean(-1, keepdim=True)
    y = (y - mu) / torch.sqrt(var + eps) * norm_weight + norm_bias
    return 0.5 * y * (1 + torch.erf(y / math.sqrt(2))) if linear else y


def reference_sr_attention(q: torch.Tensor, kv: torch.Tensor, num_heads: int) -> torch.Tensor:
    B, N, C = q.shape
    hd = C // num_heads
    k, v = kv.split(C, dim=-1)  # each (B, M, C)
    out = []
    for h in range(num_heads):
        sl = slice(h * hd, (h + 1) * hd)
        logits = q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(hd)  # (B, N, M)
        p = torch.exp(logits - logits.amax(-1, keepdim=True))
        out.append((p / p.sum(-1, keepdim=True)) @ v[..., sl])  # (B, N, hd)
    return torch.cat(out, dim=-1)  # (B, N, C)
