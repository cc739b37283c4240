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

`neighborhood_attention` cuts each residue class's sub-grid into tiles of t x t queries (t = k by default); a
tile's keys are the (t + k - 1)^2 positions its queries' windows cover, and each query's logits outside its own
window are masked to -inf (the rpb entries gathered into the same additive mask). All tiles go through one call of
the fused attention dispatch (ops.attention): dense matmuls, (1 + (t - 1) / k)^2 times the exact logits (3.4x at
t = k = 7), memory O(B * heads * H * W * (t + k - 1)^2 / t^2 * head_dim), never (HW)^2. The layout's indices are
built once per (H, W, k, d, t, device).
`reference_neighborhood_attention` is the definition written out: a loop over queries with natten 0.14's literal
window-start rule (`reference_window_start`), the one NAT/DiNAT were trained with.
"""

from __future__ import annotations

import functools

import torch

from ops.attention import attention


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


def _window_start(j: torch.Tensor, sub_len, kernel_size: int) -> torch.Tensor:
    """First key (sub-grid index) of the windows of queries j on sub-grids of length sub_len: centred, shifted
    inward at the borders."""
    return torch.minimum((j - kernel_size // 2).clamp(min=0), torch.as_tensor(sub_len) - kernel_size)


def neighbourhood_indices(
    length: int, kernel_size: int, dilation: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Along one axis: (L, k) long key positions of every query, and (L, k) their rpb rows (key-query offset in
    dilated steps, shifted by k - 1 to start at 0). Needs length >= kernel_size * dilation."""
    i = torch.arange(length)
    r, j = i % dilation, i // dilation  # residue class and place in its sub-grid
    sub_len = (length - r + dilation - 1) // dilation  # (L,) size of each query's sub-grid
    start = _window_start(j, sub_len, kernel_size)
    idx = (start[:, None] + torch.arange(kernel_size)) * dilation + r[:, None]  # (L, k)
    rel = (idx - i[:, None]) // dilation + kernel_size - 1  # (L, k) in [0, 2k - 2], an exact division
    return idx, rel


def _axis_tiles(length: int, kernel_size: int, dilation: int, tile: int) -> list[tuple]:
    """Along one axis, the query tiles of every residue class: (query positions (t,), query real (t,), key
    positions (t + k - 1,), key real (t + k - 1,), in-window (t, t + k - 1), rpb row (t, t + k - 1)) per tile.
    A tile's keys (its halo) are the union of its queries' windows, padded to t + k - 1 with unreal keys; queries
    past the end of a sub-grid repeat its last one (unreal: computed, then dropped)."""
    span = tile + kernel_size - 1
    tiles = []
    for r in range(dilation):
        sub = (length - r + dilation - 1) // dilation  # positions r, r + d, ... of this residue class
        for j0 in range(0, sub, tile):
            j = torch.arange(j0, j0 + tile)
            q_real = j < sub
            j = j.clamp(max=sub - 1)
            start = _window_start(j, sub, kernel_size)  # (t,) each query's window start
            halo = min(sub, span)
            h0 = min(int(start[0]), sub - halo)
            kj = torch.arange(h0, h0 + span)  # (span,) sub-grid index of each halo slot
            k_real = kj < h0 + halo
            kj = kj.clamp(max=sub - 1)
            inside = (kj[None] >= start[:, None]) & (kj[None] < start[:, None] + kernel_size) & k_real[None]
            rel = (kj[None] - j[:, None] + kernel_size - 1).clamp(0, 2 * kernel_size - 2)  # (t, span)
            tiles.append((j * dilation + r, q_real, kj * dilation + r, k_real, inside, rel))
    return tiles


@functools.lru_cache(maxsize=64)
def _tile_indices(H: int, W: int, kernel_size: int, dilation: int, tile: int, device: torch.device):
    """The tiled layout of an H x W map, cached per (H, W, k, d, tile, device):
    queries (T, t*t) and keys (T, s*s) flat positions (s = t + k - 1), allowed (T, t*t, s*s) bool (the key is in
    the query's window), bias (T, t*t, s*s) flat index into a (2k-1)^2 table, and pick (H*W,): where each
    position's output sits in the flattened (T * t*t) tile outputs."""
    with torch.device("cpu"):  # real index values, also when the model runs under a meta device context (MFU)
        return tuple(t.to(device) for t in _build_tile_indices(H, W, kernel_size, dilation, tile))


def _build_tile_indices(
    H: int, W: int, kernel_size: int, dilation: int, tile: int
) -> tuple[torch.Tensor, ...]:
    ty, tx = _axis_tiles(H, kernel_size, dilation, tile), _axis_tiles(W, kernel_size, dilation, tile)
    queries, keys, allowed, bias, real = [], [], [], [], []
    size = 2 * kernel_size - 1
    for qy, qry, ky, _, iny, rely in ty:
        for qx, qrx, kx, _, inx, relx in tx:
            queries.append((qy[:, None] * W + qx[None]).flatten())  # (t*t,)
            keys.append((ky[:, None] * W + kx[None]).flatten())  # (s*s,)
            allowed.append((iny[:, None, :, None] & inx[None, :, None, :]).flatten(2).flatten(0, 1))
            bias.append((rely[:, None, :, None] * size + relx[None, :, None, :]).flatten(2).flatten(0, 1))
            real.append((qry[:, None] & qrx[None]).flatten())
    queries, real = torch.stack(queries), torch.stack(real)  # (T, t*t)
    pick = torch.empty(H * W, dtype=torch.long)
    pick[queries[real]] = torch.arange(queries.numel()).view_as(queries)[real]
    return queries, torch.stack(keys), torch.stack(allowed), torch.stack(bias), pick


def neighborhood_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: int,
    dilation: int = 1,
    rpb: torch.Tensor | None = None,
    scale: float | None = None,
    tile: int | None = None,
) -> torch.Tensor:
    """q, k, v (B, heads, H, W, hd) -> (B, heads, H, W, hd): softmax(q k^T * scale + rpb) v over each query's
    k x k (dilated) neighbourhood; scale defaults to hd^-0.5.

    Tiled: the map's queries in tiles of `tile` x `tile` (default k) of one residue class each; a tile attends to
    the (tile + k - 1)^2 keys its queries' windows cover, every key outside a query's own window masked out, in
    one fused attention call (ops.attention) over all tiles: dense matmuls instead of a gather and a one-row
    matmul per query (3.9x faster at NAT-B on a CPU than that gather, docs/benchmarks.md), for
    (1 + (tile - 1) / k)^2 times the logits of the exact neighbourhoods."""
    _check(q, k, v, kernel_size, dilation, rpb)
    B, heads, H, W, hd = q.shape
    tile = kernel_size if tile is None else tile
    queries, keys, allowed, bias_idx, pick = _tile_indices(H, W, kernel_size, dilation, tile, q.device)
    T, tq, tk = allowed.shape
    flat = [t.reshape(B, heads, H * W, hd) for t in (q, k, v)]
    qt = flat[0][:, :, queries].reshape(B, heads * T, tq, hd)  # (B, heads * T, t*t, hd)
    kt = flat[1][:, :, keys].reshape(B, heads * T, tk, hd)  # (B, heads * T, s*s, hd)
    vt = flat[2][:, :, keys].reshape(B, heads * T, tk, hd)
    if rpb is None:
        mask = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).expand(heads, -1, -1, -1)
    else:
        mask = rpb.flatten(1)[:, bias_idx].to(q.dtype)  # (heads, T, t*t, s*s)
    mask = mask.masked_fill(~allowed, float("-inf")).reshape(1, -1, tq, tk)  # (1, heads * T, t*t, s*s)
    out = attention(qt, kt, vt, attn_mask=mask, scale=hd**-0.5 if scale is None else scale)
    out = out.reshape(B, heads, T * tq, hd)[:, :, pick]  # (B, heads, H*W, hd)
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
