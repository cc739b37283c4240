"""Neighborhood attention (NAT, Hassani et al. 2023) and its dilated form (DiNAT, Hassani & Shi 2022), 2-D.

Each query (y, x) of an H x W map attends to k x k keys: along each axis, the k positions congruent to the query
modulo the dilation d, centred on it, and shifted inward at the borders (not zero-padded) so every query has
exactly k * k keys. Along one axis of length L, with n = k // 2, the positions r, r + d, r + 2d, ... (r = i % d)
form a sub-grid of L_r = ceil((L - r) / d) positions; the query sits at j = i // d in it, and its keys are the
sub-grid positions start, ..., start + k - 1 with start = clamp(j - n, 0, L_r - k). This needs L_r >= k for
every r, i.e. H, W >= k * d, which natten also requires: smaller maps raise a ValueError naming the size (NAT and
DiNAT pad such maps themselves before attending; models/nat.py does that).

The relative position bias `rpb` (heads, 2k - 1, 2k - 1) is indexed by the key-query offset in dilated steps,
rpb[h, (ky - qy) / d + k - 1, (kx - qx) / d + k - 1], which is natten's table lookup (its `get_pb_start`).

`neighborhood_attention` gathers the k * k key indices of every query once per (H, W, k, d) and runs one batched
matmul over the gathered keys and values: memory O(B * heads * H * W * k^2 * head_dim), never (HW)^2.
`reference_neighborhood_attention` is the definition written out: a loop over queries with natten 0.14's literal
window-start rule (`reference_window_start`), the one NAT/DiNAT were trained with.
"""

from __future__ import annotations

import functools

import torch


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel_size: int, dilation: int, rpb) -> None:
    if q.ndim != 5 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            f"q, k, v must share one (B, heads, H, W, head_dim) shape, got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
    if dilation < 1:
        raise ValueError(f"dilation must be >= 1, got {dilation}")
    H, W = q.shape[2:4]
    span = kernel_size * dilation
    if H < span or W < span:
        raise ValueError(
            f"neighborhood attention needs H, W >= kernel_size * dilation = {kernel_size} * {dilation} = {span},"
            f" got a {H}x{W} map (pad it first, as NAT/DiNAT do)"
        )
    table = (q.shape[1], 2 * kernel_size - 1, 2 * kernel_size - 1)
    if rpb is not None and tuple(rpb.shape) != table:
        raise ValueError(f"rpb must be (heads, 2k-1, 2k-1) = {table}, got {tuple(rpb.shape)}")


def neighbourhood_indices(
    length: int, kernel_size: int, dilation: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Along one axis: (L, k) long key positions of every query, and (L, k) their rpb rows (key-query offset in
    dilated steps, shifted by k - 1 to start at 0). Needs length >= kernel_size * dilation."""
    i = torch.arange(length)
    r, j = i % dilation, i // dilation  # residue class and place in its sub-grid
    sub_len = (length - r + dilation - 1) // dilation  # (L,) size of each query's sub-grid
    start = torch.minimum((j - kernel_size // 2).clamp(min=0), sub_len - kernel_size)  # shifted inward
    idx = (start[:, None] + torch.arange(kernel_size)) * dilation + r[:, None]  # (L, k)
    rel = (idx - i[:, None]) // dilation + kernel_size - 1  # (L, k) in [0, 2k - 2], an exact division
    return idx, rel


@functools.lru_cache(maxsize=64)
def _gather_indices(
    H: int, W: int, kernel_size: int, dilation: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(H*W, k*k) flat key index of every query's neighbours, and (H*W, k*k) flat index into a (2k-1)^2 table.
    Cached per (H, W, k, d, device): built once on the CPU, copied once to the device."""
    iy, ry = neighbourhood_indices(H, kernel_size, dilation)  # (H, k)
    ix, rx = neighbourhood_indices(W, kernel_size, dilation)  # (W, k)
    keys = iy[:, None, :, None] * W + ix[None, :, None, :]  # (H, W, k, k)
    bias = ry[:, None, :, None] * (2 * kernel_size - 1) + rx[None, :, None, :]  # (H, W, k, k)
    kk = kernel_size * kernel_size
    return keys.reshape(H * W, kk).to(device), bias.reshape(H * W, kk).to(device)


def neighborhood_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: int,
    dilation: int = 1,
    rpb: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """q, k, v (B, heads, H, W, hd) -> (B, heads, H, W, hd): softmax(q k^T * scale + rpb) v over each query's
    k x k (dilated) neighbourhood; scale defaults to hd^-0.5. The softmax runs in fp32 at least."""
    _check(q, k, v, kernel_size, dilation, rpb)
    B, heads, H, W, hd = q.shape
    scale = hd**-0.5 if scale is None else scale
    keys, bias_idx = _gather_indices(H, W, kernel_size, dilation, q.device)  # (HW, kk) each
    kg = k.reshape(B, heads, H * W, hd)[:, :, keys]  # (B, heads, HW, kk, hd)
    vg = v.reshape(B, heads, H * W, hd)[:, :, keys]  # (B, heads, HW, kk, hd)
    qf = q.reshape(B, heads, H * W, 1, hd) * scale  # (B, heads, HW, 1, hd)
    logits = (qf @ kg.transpose(-1, -2)).squeeze(-2)  # (B, heads, HW, kk)
    if rpb is not None:
        logits = logits + rpb.flatten(1)[:, bias_idx].to(logits.dtype)  # (heads, HW, kk) broadcast over B
    softmax_dtype = torch.promote_types(logits.dtype, torch.float32)  # fp32 for bf16/fp16, float64 stays
    attn = logits.softmax(-1, dtype=softmax_dtype).to(v.dtype)  # (B, heads, HW, kk)
    out = (attn.unsqueeze(-2) @ vg).squeeze(-2)  # (B, heads, HW, hd)
    return out.view(B, heads, H, W, hd)


# --- plain-torch reference ------------------------------------------------------------------------------------


def reference_window_start(i: int, length: int, kernel_size: int, dilation: int) -> int:
    """natten 0.14's `get_window_start` (the NAT/DiNAT kernels), literally: the first key position of query i."""
    n = kernel_size // 2
    if dilation <= 1:
        return max(i - n, 0) + (i + n >= length) * (length - i - n - 1)
    if i - n * dilation < 0:
        return i % dilation
    if i + n * dilation >= length:
        imodd = i % dilation
        a = (length // dilation) * dilation
        b = length - a
        if imodd < b:
            return length - b + imodd - 2 * n * dilation
        return a + imodd - kernel_size * dilation
    return i - n * dilation


def reference_neighborhood_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: int,
    dilation: int = 1,
    rpb: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """The definition, one query at a time: keys at sy + a*d, sx + b*d (a, b < k) from the window start rule,
    bias rpb[:, (key - query) / d + k - 1] per axis, softmax, weighted sum of the values."""
    _check(q, k, v, kernel_size, dilation, rpb)
    B, heads, H, W, hd = q.shape
    scale = hd**-0.5 if scale is None else scale
    steps = [a * dilation for a in range(kernel_size)]
    rows = []
    for y in range(H):
        sy = reference_window_start(y, H, kernel_size, dilation)
        ys = [sy + s for s in steps]
        for x in range(W):
            sx = reference_window_start(x, W, kernel_size, dilation)
            xs = [sx + s for s in steps]
            kk = k[:, :, ys][:, :, :, xs].flatten(2, 3)  # (B, heads, k*k, hd)
            vv = v[:, :, ys][:, :, :, xs].flatten(2, 3)
            logits = torch.einsum("bhd,bhmd->bhm", q[:, :, y, x], kk) * scale  # (B, heads, k*k)
            if rpb is not None:
                by = [(t - y) // dilation + kernel_size - 1 for t in ys]
                bx = [(t - x) // dilation + kernel_size - 1 for t in xs]
                logits = logits + rpb[:, by][:, :, bx].flatten(1)  # (heads, k*k)
            rows.append(torch.einsum("bhm,bhmd->bhd", logits.softmax(-1), vv))
    return torch.stack(rows, 2).view(B, heads, H, W, hd)
