"""Linear attention with decay, in chunkwise-parallel form, and its token-by-token reference.

Per head, with row vectors q_t, k_t (dk) and v_t (dv), the state S_t (dk, dv) follows

    S_t = Diag(alpha_t) S_{t-1} + k_t^T v_t,        o_t = (scale * q_t) S_t,        scale = dk^-0.5 by default

mode "none": alpha = 1 (kernelized linear attention; feature maps are the caller's business);
"retention": alpha = gamma_h per head, default 1 - 2^(-5-h) (RetNet), or a (H,) `gamma` in (0, 1];
"gla": data-dependent per-key-dim gates, `g` (B, H, N, dk) = log alpha <= 0 (gated linear attention).

`linear_attention` runs the chunked form of the GLA paper (arXiv 2312.06635, sec. 4): inside a chunk of C
tokens a causal (C, C) score matrix, between chunks a sequential scan of the (dk, dv) state. Only chunk-local
cumulative log-decays b are used and every exponent is <= 0 (b_i - b_j for j <= i, b_C - b_j, b_i), never the
factorised (q e^b)(k e^-b)^T form whose e^-b overflows (e^64 at a log-gate of -1 over 64 tokens). GLA's
per-dim decays cannot go through one plain matmul: the chunk is cut into sub-chunks of <= 16 tokens, pairs of
different sub-chunks use a matmul renormalised at the query sub-chunk's start (both factors <= 1), the
diagonal sub-chunks an elementwise fp32 sum. Scores and the state are fp32 (fp64 for fp64 inputs) whatever
the input dtype; the output is cast back to q.dtype.

Packed rows: `doc_ids` (B, N) int, -1 = padding. Padding tokens are transparent: they output 0 and leave the
state untouched. A real token starts a document (the state resets to 0 before it) when its id differs from the
previous real token's id in the row. `initial_state` (B, H, dk, dv) feeds the row's first document (its first
real token never resets); the returned state is the state after the row's last token. So calling on [0, T1)
and then [T1, T) with the carried state equals one call, as long as T1 does not fall on a document start (if
it does, pass zeros for that row: the one-call run resets there).
"""

from __future__ import annotations

import math

import torch

MODES = ("none", "retention", "gla")


def retention_gammas(h: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """RetNet's per-head decays gamma_h = 1 - 2^(-5-h), h = 0..H-1, shape (H,)."""
    return 1 - 2.0 ** (-5 - torch.arange(h, device=device, dtype=dtype))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check(q, k, v, mode, g, gamma, chunk_size, initial_state, doc_ids) -> None:
    """Clear errors naming the offending argument."""
    if mode not in MODES:
        raise ValueError(f"linear attention mode {mode!r} is not one of {MODES}")
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"q, k must be (B, H, N, dk) and v (B, H, N, dv), got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    b, h, n, dk = q.shape
    if mode == "gla":
        if g is None or g.shape != q.shape:
            raise ValueError(f"mode 'gla' needs g (B, H, N, dk) = {tuple(q.shape)}, got {_shape(g)}")
        if bool((g > 0).any()) or not bool(torch.isfinite(g).all()):
            raise ValueError("g holds log decays: it must be finite and <= 0")
    elif g is not None:
        raise ValueError(f"g is only for mode 'gla', not {mode!r}")
    if gamma is not None:
        if mode != "retention":
            raise ValueError(f"gamma is only for mode 'retention', not {mode!r}")
        if gamma.shape != (h,) or not bool(((gamma > 0) & (gamma <= 1)).all()):
            raise ValueError(f"gamma must be (H,) = ({h},) with values in (0, 1], got {_shape(gamma)}")
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if initial_state is not None and initial_state.shape != (b, h, dk, v.shape[-1]):
        raise ValueError(
            f"initial_state must be (B, H, dk, dv) = {(b, h, dk, v.shape[-1])}, got {_shape(initial_state)}"
        )
    if doc_ids is not None and (
        doc_ids.shape != (b, n) or doc_ids.dtype.is_floating_point or doc_ids.dtype == torch.bool
    ):
        raise ValueError(f"doc_ids must be an integer tensor (B, N) = {(b, n)}, got {_shape(doc_ids)}")


def _shape(t) -> str:
    return "None" if t is None else f"{tuple(t.shape)} {t.dtype}"


def _log_decay(mode, g, gamma, q, cdt) -> torch.Tensor:
    """Log decay per token: (B, H, N, dk) for gla, (B, H, N, 1) for the scalar modes, in dtype cdt."""
    b, h, n, _ = q.shape
    if mode == "gla":
        return g.to(cdt)
    if mode == "none":
        return torch.zeros(b, h, n, 1, device=q.device, dtype=cdt)
    gamma = retention_gammas(h, q.device, cdt) if gamma is None else gamma.to(cdt)
    return torch.log(gamma)[None, :, None, None].expand(b, h, n, 1)


def _packing(doc_ids: torch.Tensor | None, b: int, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(real, reset), both (B, N) bool: real tokens, and real tokens whose id differs from the previous real one."""
    if doc_ids is None:
        return torch.ones(b, n, dtype=torch.bool, device=device), torch.zeros(
            b, n, dtype=torch.bool, device=device
        )
    real = doc_ids >= 0
    pos = torch.arange(n, device=device).expand(b, n)
    last_real = torch.cummax(torch.where(real, pos, -1), dim=1).values  # (B, N) last real index <= t
    prev = torch.cat([last_real.new_full((b, 1), -1), last_real[:, :-1]], 1)  # last real index < t
    prev_id = torch.gather(doc_ids, 1, prev.clamp(min=0))
    return real, real & (prev >= 0) & (doc_ids != prev_id)


def _intra_scores(q, k, b_cum, scalar: bool) -> torch.Tensor:
    """A_ij = sum_d q_id k_jd exp(b_id - b_jd) for every pair of a chunk, (..., C, C); only j <= i is meaningful.
    q, k (..., C, dk); b_cum (..., C, 1 or dk) chunk-local cumulative log decay (non-increasing)."""
    c = q.shape[-2]
    if scalar:
        expo = (b_cum[..., :, None, 0] - b_cum[..., None, :, 0]).clamp(max=0)  # (..., C, C), <= 0
        return (q @ k.transpose(-1, -2)) * torch.exp(expo)
    sub = max(d for d in range(1, 17) if c % d == 0)  # sub-chunk length
    ns = c // sub
    lead = q.shape[:-2]
    dk = q.shape[-1]
    # reference point of sub-chunk I: the last position of sub-chunk I-1 (position 0 for I = 0, unused there)
    ref = b_cum[..., (torch.arange(ns, device=q.device) * sub - 1).clamp(min=0), :]  # (..., ns, dk)
    qs = q.reshape(*lead, ns, sub, dk)
    bs = b_cum.reshape(*lead, ns, sub, dk)
    q_ren = qs * torch.exp((bs - ref[..., :, None, :]).clamp(max=0))  # (..., ns, sub, dk) factors <= 1
    k_ren = k[..., None, :, :] * torch.exp((ref[..., :, None, :] - b_cum[..., None, :, :]).clamp(max=0))
    off = q_ren @ k_ren.transpose(-1, -2)  # (..., ns, sub, C): query sub-chunk I against every key
    off = off.reshape(*lead, c, c)
    ks = k.reshape(*lead, ns, sub, dk)
    expo = (bs[..., :, None, :] - bs[..., None, :, :]).clamp(max=0)  # (..., ns, sub, sub, dk)
    diag = (qs[..., :, None, :] * ks[..., None, :, :] * torch.exp(expo)).sum(-1)  # (..., ns, sub, sub)
    blk = torch.arange(c, device=q.device) // sub
    eye = torch.eye(ns, dtype=diag.dtype, device=q.device)
    diag = (diag[..., :, :, None, :] * eye[:, None, :, None]).reshape(*lead, c, c)  # block-diagonal (C, C)
    return torch.where(blk[:, None] > blk[None, :], off, diag)


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mode: str = "none",
    g: torch.Tensor | None = None,
    gamma: torch.Tensor | None = None,
    chunk_size: int = 64,
    initial_state: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    return_state: bool = False,
    scale: float | None = None,
):
    """Chunkwise-parallel linear attention (module docstring): o (B, H, N, dv) [, state (B, H, dk, dv)]."""
    _check(q, k, v, mode, g, gamma, chunk_size, initial_state, doc_ids)
    bsz, h, n, dk = q.shape
    dv = v.shape[-1]
    cdt = _compute_dtype(q.dtype)
    scale = dk**-0.5 if scale is None else scale
    real, reset = _packing(doc_ids, bsz, n, q.device)  # (B, N)
    keep = real[:, None, :, None]  # (B, 1, N, 1)
    lg = _log_decay(mode, g, gamma, q, cdt).masked_fill(~keep, 0.0)  # padding: identity decay
    qc = (q.to(cdt) * scale).masked_fill(~keep, 0.0)
    kc = k.to(cdt).masked_fill(~keep, 0.0)  # padding adds nothing to the state
    vc = v.to(cdt)
    c = min(chunk_size, n)
    nc = math.ceil(n / c)
    pad = nc * c - n  # zero tokens with identity decay at the tail: no effect on outputs or state

    def chunks(t: torch.Tensor) -> torch.Tensor:
        t = torch.nn.functional.pad(t, (0, 0, 0, pad))
        return t.reshape(*t.shape[:2], nc, c, t.shape[-1])  # (B, H, nc, C, d)

    qc, kc, vc, lg = chunks(qc), chunks(kc), chunks(vc), chunks(lg)
    rs = torch.nn.functional.pad(reset, (0, pad)).reshape(bsz, 1, nc, c)
    seg = torch.cumsum(rs.to(torch.int64), -1)  # (B, 1, nc, C) resets so far inside the chunk
    b_cum = torch.cumsum(lg, -2)  # (B, H, nc, C, 1 or dk) chunk-local, <= 0, non-increasing
    b_last = b_cum[..., -1:, :]  # (B, H, nc, 1, 1 or dk)

    # intra-chunk: causal scores within one document
    pos = torch.arange(c, device=q.device)
    same = (seg[..., :, None] == seg[..., None, :]) & (pos[:, None] >= pos[None, :])  # (B, 1, nc, C, C)
    scores = torch.where(same, _intra_scores(qc, kc, b_cum, lg.shape[-1] == 1), 0.0)
    out = scores @ vc  # (B, H, nc, C, dv)

    # inter-chunk: q reads the entering state while no reset happened yet in its chunk; keys after the chunk's
    # last reset write into the leaving state; the entering state survives a chunk without resets
    q_in = qc * torch.exp(b_cum) * (seg == 0)[..., None]  # (B, H, nc, C, dk)
    k_out = kc * torch.exp(b_last - b_cum) * (seg == seg[..., -1:])[..., None]  # (B, H, nc, C, dk)
    update = k_out.transpose(-1, -2) @ vc  # (B, H, nc, dk, dv)
    carry = torch.exp(b_last[..., 0, :]) * (seg[..., -1] == 0)[..., None]  # (B, H, nc, 1 or dk)
    state = q.new_zeros(bsz, h, dk, dv, dtype=cdt) if initial_state is None else initial_state.to(cdt)
    entering = []
    # sequential scan over chunks, O(N / C) steps of (dk, dv) work. unbind, not carry[:, :, i]: the backward of
    # each indexing writes a full-size zero gradient, which made the backward quadratic in the number of chunks
    for carry_i, update_i in zip(carry.unbind(2), update.unbind(2)):
        entering.append(state)
        state = carry_i[..., None] * state + update_i
    out = out + q_in @ torch.stack(entering, 2)  # (B, H, nc, C, dv)
    out = out.reshape(bsz, h, nc * c, dv)[:, :, :n].masked_fill(~keep, 0.0).to(q.dtype)
    return (out, state) if return_state else out


def recurrent_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mode: str = "none",
    g: torch.Tensor | None = None,
    gamma: torch.Tensor | None = None,
    chunk_size: int = 64,
    initial_state: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    return_state: bool = False,
    scale: float | None = None,
):
    """The definition, one token at a time (chunk_size is ignored): the reference `linear_attention` is tested
    against."""
    _check(q, k, v, mode, g, gamma, chunk_size, initial_state, doc_ids)
    bsz, h, n, dk = q.shape
    cdt = _compute_dtype(q.dtype)
    scale = dk**-0.5 if scale is None else scale
    if mode == "gla":
        alpha = torch.exp(g.to(cdt))  # (B, H, N, dk)
    elif mode == "retention":
        gam = retention_gammas(h, q.device, cdt) if gamma is None else gamma.to(cdt)
        alpha = gam[None, :, None, None].expand(bsz, h, n, dk)
    else:
        alpha = torch.ones(bsz, h, n, dk, dtype=cdt, device=q.device)
    ids = torch.zeros(bsz, n, dtype=torch.int64, device=q.device) if doc_ids is None else doc_ids
    state = (
        q.new_zeros(bsz, h, dk, v.shape[-1], dtype=cdt) if initial_state is None else initial_state.to(cdt)
    )
    seen = torch.zeros(bsz, dtype=torch.bool, device=q.device)  # a real token came before in this row
    prev_id = torch.zeros_like(ids[:, 0])
    outs = []
    for t in range(n):
        real = (ids[:, t] >= 0)[:, None, None, None]  # (B, 1, 1, 1)
        reset = (ids[:, t] >= 0) & seen & (ids[:, t] != prev_id)
        state = torch.where(reset[:, None, None, None], 0.0, state)
        new = alpha[:, :, t, :, None] * state + k[:, :, t, :, None].to(cdt) * v[:, :, t, None, :].to(cdt)
        state = torch.where(real, new, state)  # (B, H, dk, dv)
        o = (scale * q[:, :, t, None, :].to(cdt)) @ state  # (B, H, 1, dv)
        outs.append(torch.where(real, o, 0.0))
        prev_id = torch.where(ids[:, t] >= 0, ids[:, t], prev_id)
        seen = seen | (ids[:, t] >= 0)
    out = torch.cat(outs, 2).to(q.dtype)  # (B, H, N, dv)
    return (out, state) if return_state else out


def linear_attention_flops(B: int, H: int, N: int, dk: int, dv: int, chunk_size: int) -> int:
    """Forward matmul FLOPs of the chunked form (2 per multiply-add), for MFU logging. Per chunk of C tokens and
    head: scores Q K^T 2 C^2 dk, scores @ V 2 C^2 dv, reading the state 2 C dk dv, writing it 2 C dk dv; the
    last chunk is padded to C. Elementwise decay work (O(C dk) per token, O(C^2 dk) for gla's diagonal
    sub-chunks at sub-chunk size, not C) is left out, like softmax in attention FLOPs. Per token this is
    2 C (dk + dv) + 4 dk dv."""
    c = min(chunk_size, N)
    chunks = -(-N // c)
    return B * H * chunks * (2 * c * c * (dk + dv) + 4 * c * dk * dv)
