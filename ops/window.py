"""Window and grid attention for hierarchical vision transformers (Swin, Swin V2, MaxViT).

Feature maps are channels-last (B, H, W, C). Two ways to cut them into groups of tokens that attend together:
  window_partition: non-overlapping (wh, ww) windows of neighbouring tokens (Swin; MaxViT's block attention)
  grid_partition:   a fixed (gh, gw) grid of tokens spaced H/gh, W/gw apart, i.e. dilated, global (MaxViT's grid)
Both return (B * nW, N, C) with N = wh * ww tokens per group and invert exactly. Sizes that do not divide are
padded first (`pad_to_multiple`); the padded tokens take part in attention unmasked, as in the reference Swin.

`window_attention` runs all windows through the one attention dispatch (ops.attention) with an additive mask:
a per-head relative position bias (H, N, N) plus an optional per-window mask (nW, N, N), e.g. Swin's shift mask.
Windows are folded into the head axis, (B, nW * H, N, hd), so the (nW * H, N, N) mask broadcasts over the batch
instead of being copied B times. `reference_window_attention` is the plain-torch definition it is tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ops.attention import attention

MASKED = (
    -100.0
)  # the shift-mask logit of the reference Swin: exp(-100) is 0 in fp32, and no row is all-masked


def pad_to_multiple(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Zero-pad (B, H, W, C) at the bottom/right so H, W are multiples of `size`."""
    H, W = x.shape[1:3]
    ph, pw = (-H) % size[0], (-W) % size[1]
    return F.pad(x, (0, 0, 0, pw, 0, ph)) if ph or pw else x


def window_partition(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, H, W, C) -> (B * nW, wh * ww, C); H, W must be multiples of the window."""
    B, H, W, C = x.shape
    wh, ww = size
    x = x.view(B, H // wh, wh, W // ww, ww, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, wh * ww, C)  # (B * nH * nW, wh * ww, C)


def window_reverse(windows: torch.Tensor, size: tuple[int, int], H: int, W: int) -> torch.Tensor:
    """(B * nW, wh * ww, C) -> (B, H, W, C), inverse of window_partition."""
    wh, ww = size
    C = windows.shape[-1]
    x = windows.view(-1, H // wh, W // ww, wh, ww, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, H, W, C)


def grid_partition(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, H, W, C) -> (B * nW, gh * gw, C): group g holds the tokens at (i * H/gh + a, j * W/gw + b)."""
    B, H, W, C = x.shape
    gh, gw = grid
    x = x.view(B, gh, H // gh, gw, W // gw, C)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(-1, gh * gw, C)  # (B * H/gh * W/gw, gh * gw, C)


def grid_reverse(groups: torch.Tensor, grid: tuple[int, int], H: int, W: int) -> torch.Tensor:
    """(B * nW, gh * gw, C) -> (B, H, W, C), inverse of grid_partition."""
    gh, gw = grid
    C = groups.shape[-1]
    x = groups.view(-1, H // gh, W // gw, gh, gw, C)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(-1, H, W, C)


def relative_coords(size: tuple[int, int]) -> torch.Tensor:
    """(N, N, 2) long: (dy, dx) from token j to token i of a window, each shifted to start at 0."""
    wh, ww = size
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")).flatten(
        1
    )  # (2, N)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # (N, N, 2) in [-(w-1), w-1]
    return rel + torch.tensor([wh - 1, ww - 1])


def relative_position_index(size: tuple[int, int]) -> torch.Tensor:
    """(N, N) long index into a ((2wh-1) * (2ww-1), heads) bias table: one entry per relative offset."""
    rel = relative_coords(size)
    return rel[..., 0] * (2 * size[1] - 1) + rel[..., 1]


def shift_window_mask(
    H: int, W: int, size: tuple[int, int], shift: tuple[int, int], device: torch.device | None = None
) -> torch.Tensor:
    """(nW, N, N) additive mask for windows of a map rolled by -shift: tokens that were not neighbours before the
    cyclic shift (they came from different regions) may not attend to each other. H, W: the padded size.
    Built directly on `device` (no host-to-device copy in the forward)."""

    def band(n: int, w: int, s: int) -> torch.Tensor:  # (n,) region along one axis: 0 | last window | wrapped
        i = torch.arange(n, device=device)
        return (i >= n - w).long() + (i >= n - s).long()

    region = band(H, size[0], shift[0])[:, None] * 3 + band(W, size[1], shift[1])[None, :]  # (H, W)
    ids = window_partition(region[None, :, :, None], size).squeeze(-1)  # (nW, N)
    same = ids[:, :, None] == ids[:, None, :]  # (nW, N, N)
    return torch.zeros(same.shape, device=device).masked_fill(~same, MASKED)


def _additive_mask(bias: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor | None:
    """(nW or 1, H or 1, N, N) from a (H, N, N) bias and a (nW, N, N) mask."""
    if bias is None and mask is None:
        return None
    if mask is None:
        return bias[None]
    if bias is None:
        return mask[:, None]
    return bias[None] + mask[:, None]


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention inside windows. q, k, v (B * nW, H, N, hd); bias (H, N, N); mask (nW, N, N) -> (B * nW, H, N, hd)."""
    BW, heads, N, hd = q.shape
    add = _additive_mask(bias, mask)
    if add is None:
        return attention(q, k, v, scale=scale, backend=backend)
    nW = add.shape[0]
    if BW % nW:
        raise ValueError(f"{BW} windows in the batch is not a multiple of the mask's {nW} windows per image")
    add = add.expand(nW, heads, N, N).reshape(1, nW * heads, N, N).to(q.dtype)

    def fold(t: torch.Tensor) -> torch.Tensor:  # (B * nW, H, N, hd) -> (B, nW * H, N, hd)
        return t.reshape(BW // nW, nW * heads, N, hd)

    out = attention(fold(q), fold(k), fold(v), attn_mask=add, scale=scale, backend=backend)
    return out.reshape(BW, heads, N, hd)


def reference_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """The plain definition, one window at a time: softmax(q k^T * scale + bias + mask[window]) v."""
    BW, heads, N, hd = q.shape
    scale = hd**-0.5 if scale is None else scale
    out = torch.empty_like(q)
    for i in range(BW):
        logits = (q[i].float() @ k[i].float().transpose(-2, -1)) * scale  # (H, N, N)
        if bias is not None:
            logits = logits + bias.float()
        if mask is not None:
            logits = logits + mask[i % mask.shape[0]].float()  # windows of one image are consecutive
        out[i] = (logits.softmax(-1) @ v[i].float()).to(q.dtype)
    return out
