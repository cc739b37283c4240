"""One attention dispatch for every model: flash-attn on CUDA when installed, PyTorch SDPA otherwise.

`reference_attention` is the plain-torch definition the others are tested against. All take
q (B, H, N, hd), k/v (B, Hkv, M, hd) with H % Hkv == 0 (grouped-query attention: callers never repeat kv
heads, the dispatch does what each backend needs) and return (B, H, N, hd).

Masks: `attn_mask` is either boolean (True = may attend) or additive float (added to the logits, e.g. a
relative position bias or -inf for blocked pairs), broadcastable to (B, H, N, M).

Packed rows: `doc_ids` (B, N) int gives the document of each token of a row holding several documents
(self-attention only, M == N), -1 = padding. A token attends only to tokens of its own document; a padding
query attends to itself only (a finite output nothing reads); no real token attends to padding. A document
must be one contiguous run of its row. `window=(left, right)` (flash-attn's window_size convention, -1 =
unlimited) lets query i see key j iff i - left <= j <= i + right (bottom-right aligned like causality when
N != M); with `is_causal` right is effectively 0. With doc_ids and no user mask, SDPA runs per document
(documents grouped by length, see `_per_document_attention`) instead of on an (N, N) mask, and flash-attn
runs its varlen kernel on the padding-free tokens, so memory stays O(N) rather than O(N^2).
"""

from __future__ import annotations

import functools
import math
import weakref

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "flash", "sdpa", "reference")
Window = tuple[int, int]


@functools.cache
def _flash_attn_func():
    """flash_attn.flash_attn_func, or None when the optional extra is not installed."""
    try:
        from flash_attn import flash_attn_func  # optional extra: pip install 'tessera[flash]'
    except ImportError:
        return None
    return flash_attn_func


@functools.cache
def _flash_attn_varlen_func():
    """flash_attn.flash_attn_varlen_func (packed rows), or None when the optional extra is not installed."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


@functools.cache
def _sdpa_has_gqa() -> bool:
    """SDPA's enable_gqa exists from torch 2.5 on (Tessera allows 2.4, where kv heads are repeated instead)."""
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    return (major, minor) >= (2, 5)


def flash_available() -> bool:
    return _flash_attn_func() is not None and torch.cuda.is_available()


def _flash_ok(q: torch.Tensor, attn_mask: torch.Tensor | None) -> bool:
    return (
        attn_mask is None
        and q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and q.shape[-1] <= 256
        and q.shape[-1] % 8 == 0
        and _flash_attn_func() is not None
    )


def select_backend(q: torch.Tensor, attn_mask: torch.Tensor | None = None, backend: str = "auto") -> str:
    """The backend `attention` will use for these inputs."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not one of {BACKENDS}")
    if backend == "flash":
        if _flash_attn_func() is None:
            raise RuntimeError("attention backend 'flash' needs flash-attn: pip install 'tessera[flash]'")
        if not _flash_ok(q, attn_mask):
            raise RuntimeError(
                "attention backend 'flash' needs CUDA fp16/bf16 inputs, head dim <= 256 (multiple of 8) and no mask"
            )
        return "flash"
    if backend == "auto":
        return "flash" if _flash_ok(q, attn_mask) else "sdpa"
    return backend


def causal_keep(n: int, m: int, device: torch.device) -> torch.Tensor:
    """(n, m) bool, True where query i may see key j: bottom-right aligned, so the last query sees every key."""
    return torch.ones(n, m, dtype=torch.bool, device=device).tril(diagonal=m - n)


def window_keep(n: int, m: int, window: Window, device: torch.device) -> torch.Tensor:
    """(n, m) bool, True where key j lies in query i's window: i' - left <= j <= i' + right with i' = i + m - n
    (bottom-right aligned like `causal_keep`); -1 = unlimited on that side."""
    left, right = check_window(window)
    i = torch.arange(n, device=device)[:, None] + (m - n)  # (n, 1) query position on the key axis
    j = torch.arange(m, device=device)[None, :]  # (1, m)
    keep = torch.ones(n, m, dtype=torch.bool, device=device)
    if left >= 0:
        keep &= j >= i - left
    if right >= 0:
        keep &= j <= i + right
    return keep


def check_window(window) -> Window | None:
    """window as (left, right) ints, or None; a clear error naming `window` otherwise."""
    if window is None:
        return None
    ok = isinstance(window, (tuple, list)) and len(window) == 2
    ok = ok and all(isinstance(w, int) and not isinstance(w, bool) and w >= -1 for w in window)
    if not ok:
        raise ValueError(f"window must be None or (left, right) ints >= -1 (-1 = unlimited), got {window!r}")
    return int(window[0]), int(window[1])


def _check_doc_ids(doc_ids: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> None:
    b, _, n, _ = q.shape
    if (
        not isinstance(doc_ids, torch.Tensor)
        or doc_ids.dtype.is_floating_point
        or doc_ids.dtype == torch.bool
    ):
        raise ValueError(
            f"doc_ids must be an integer tensor (B, N), got {type(doc_ids).__name__}"
            + (f" of {doc_ids.dtype}" if isinstance(doc_ids, torch.Tensor) else "")
        )
    if tuple(doc_ids.shape) != (b, n):
        raise ValueError(f"doc_ids must have shape (B, N) = {(b, n)} like q, got {tuple(doc_ids.shape)}")
    if k.shape[-2] != n:
        raise ValueError(
            f"doc_ids needs self-attention (as many keys as queries), got N={n} queries, M={k.shape[-2]} keys"
        )
    if doc_ids.device != q.device:
        raise ValueError(f"doc_ids is on {doc_ids.device}, q on {q.device}")


def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be (B, H, N, hd), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must share batch, heads and length")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(
            f"k heads ({k.shape[1]}) must divide q heads ({q.shape[1]}) for grouped-query attention"
        )


def document_mask(
    doc_ids: torch.Tensor, is_causal: bool = False, window: Window | None = None
) -> torch.Tensor:
    """(B, 1, N, N) bool, True = query i may attend key j: same document (doc id >= 0), or i == j (so a padding
    query sees itself only), ANDed with causality and the window."""
    if doc_ids.dim() != 2 or doc_ids.dtype.is_floating_point:
        raise ValueError(
            f"doc_ids must be an integer tensor (B, N), got {tuple(doc_ids.shape)} {doc_ids.dtype}"
        )
    n = doc_ids.shape[1]
    keep = (doc_ids[:, :, None] == doc_ids[:, None, :]) & (doc_ids >= 0)[:, None, :]  # (B, N, N)
    keep |= torch.eye(n, dtype=torch.bool, device=doc_ids.device)
    if is_causal:
        keep &= causal_keep(n, n, doc_ids.device)
    if window is not None:
        keep &= window_keep(n, n, window, doc_ids.device)
    return keep[:, None]  # (B, 1, N, N)


def _documents(doc_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Documents of a packed batch as (starts, lengths, real): start index of each document in the flattened
    (B*N) tokens, its length, and the (B*N) bool mask of real tokens. Raises if a document is not contiguous."""
    b, n = doc_ids.shape
    flat = doc_ids.reshape(-1)  # (B*N,)
    real = flat >= 0
    new = torch.ones_like(real)
    new[1:] = flat[1:] != flat[:-1]
    new[::n] = True  # a row starts a new document
    start_mask = real & new
    starts = start_mask.nonzero().squeeze(1)  # (D,)
    compact = torch.cumsum(real, 0) - 1  # index of each real token among the real tokens
    total = int(real.sum())
    edges = torch.cat([compact[starts], starts.new_tensor([total])])
    lengths = edges[1:] - edges[:-1]  # (D,) real tokens up to the next start
    if starts.numel():
        row = torch.arange(b * n, device=flat.device) // n
        key = row[real] * (int(flat.max()) + 1) + flat[real]
        if torch.unique(key).numel() != starts.numel():
            raise ValueError(
                "doc_ids: each document must be one contiguous run of its row (padding -1 anywhere)"
            )
    return starts, lengths, real


_PLAN: tuple[weakref.ref, int, tuple] | None = (
    None  # the last doc_ids' plan: every layer of a forward shares it
)


def _document_plan(doc_ids: torch.Tensor) -> tuple:
    """(starts, lengths, real, length groups) of a packed batch, computed once per doc_ids tensor: a model passes
    the same tensor to every layer (and to checkpointed recomputes), which would otherwise redo the layout, its
    contiguity check and a host sync in each."""
    global _PLAN
    if _PLAN is not None and _PLAN[0]() is doc_ids and _PLAN[1] == doc_ids._version:
        return _PLAN[2]
    starts, lengths, real = _documents(doc_ids)
    plan = (starts, lengths, real, _group_by_length(lengths.tolist()))
    _PLAN = (weakref.ref(doc_ids), doc_ids._version, plan)
    return plan


def cu_seqlens(doc_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(int32 cu_seqlens (D + 1,), max_seqlen) of the documents of a packed batch, over its flattened real tokens
    (padding removed: `doc_ids.reshape(-1) >= 0` selects them), as flash-attn's varlen kernels take them."""
    if doc_ids.dim() != 2 or doc_ids.dtype.is_floating_point:
        raise ValueError(
            f"doc_ids must be an integer tensor (B, N), got {tuple(doc_ids.shape)} {doc_ids.dtype}"
        )
    _, lengths, _ = _documents(doc_ids)
    cu = torch.zeros(lengths.numel() + 1, dtype=torch.int32, device=doc_ids.device)
    cu[1:] = torch.cumsum(lengths, 0)
    return cu, int(lengths.max()) if lengths.numel() else 0


def _repeat_kv(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, Hkv, M, d) -> (B, heads, M, d): query head h reads kv head h // (heads // Hkv)."""
    return t if t.shape[1] == heads else t.repeat_interleave(heads // t.shape[1], dim=1)


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    doc_ids: torch.Tensor | None = None,
    window: Window | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v, computed in fp32 and cast back; kv heads repeated for GQA, documents
    and window as one explicit (B, 1, N, M) bool mask."""
    _check_shapes(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    k, v = _repeat_kv(k, q.shape[1]), _repeat_kv(v, q.shape[1])
    logits = torch.matmul(q.float(), k.float().transpose(-2, -1)) * scale  # (B, H, N, M)
    n, m = logits.shape[-2:]
    if is_causal:
        logits = logits.masked_fill(~causal_keep(n, m, q.device), float("-inf"))
    if window is not None:
        logits = logits.masked_fill(~window_keep(n, m, window, q.device), float("-inf"))
    if doc_ids is not None:
        _check_doc_ids(doc_ids, q, k)
        logits = logits.masked_fill(~document_mask(doc_ids), float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            logits = logits.masked_fill(~attn_mask, float("-inf"))
        else:
            logits = logits + attn_mask.float()
    probs = logits.softmax(dim=-1)
    return torch.matmul(probs, v.float()).to(q.dtype)  # (B, H, N, hd)


def _sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None) -> torch.Tensor:
    """torch SDPA with grouped-query kv heads (enable_gqa, or repeated kv heads on torch < 2.5)."""
    if k.shape[1] == q.shape[1]:
        return F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale=scale)
    if _sdpa_has_gqa():
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=True
        )
    h = q.shape[1]
    return F.scaled_dot_product_attention(
        q, _repeat_kv(k, h), _repeat_kv(v, h), attn_mask, dropout_p, is_causal, scale=scale
    )


def _group_by_length(lengths: list[int], ratio: float = 1.25, floor: int = 32) -> list[tuple[list[int], int]]:
    """Documents grouped for one padded SDPA call each: sorted longest first, a group takes documents while
    they are at least its longest / ratio (all documents up to `floor` tokens share one group), bounding the
    padding waste at ratio^2 of the attention work and the number of calls at log_ratio(N / floor)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[tuple[list[int], int]] = []
    for i in order:
        if groups and (lengths[i] * ratio >= groups[-1][1] or groups[-1][1] <= floor):
            groups[-1][0].append(i)
        else:
            groups.append(([i], lengths[i]))
    return groups


def _per_document_cheaper(groups: list[tuple[list[int], int]], b: int, n: int, is_causal: bool) -> bool:
    """Whether the per-document path beats one SDPA call on the (B, 1, N, N) mask on CPU. Cost model fitted to
    fwd+bwd timings (H=4, hd=64, 2 cores): the masked call costs ~B N^2 score elements; the per-document path
    costs its padded groups' G L^2 (half when causal: the fast kernel skips the upper triangle) plus ~12k
    elements of overhead per SDPA call. Rows past 2^13 tokens always go per document: the mask is O(N^2)."""
    if b * n * n > 2**26:
        return True
    work = sum(len(members) * lmax * lmax for members, lmax in groups) * (0.5 if is_causal else 1.0)
    return work + 12_000 * len(groups) <= 1.1 * b * n * n


def _per_document_attention(q, k, v, is_causal, dropout_p, scale, window, plan) -> torch.Tensor:
    """Packed-row attention without an (N, N) mask: gather the documents of each length group into a padded
    (G, H, L, hd) batch, run SDPA on it (is_causal on the unmasked fast path; a key-padding or window mask
    of (G, 1, L, L) otherwise), scatter the real rows back. A padding token's output is its own v."""
    b, h, n, _ = q.shape
    hkv, dv = k.shape[1], v.shape[-1]
    starts, lengths, real, groups = plan
    qt = q.transpose(1, 2).reshape(b * n, h, -1)  # (B*N, H, hd) tokens of the flattened batch
    kt = k.transpose(1, 2).reshape(b * n, hkv, -1)  # (B*N, Hkv, hd)
    vt = v.transpose(1, 2).reshape(b * n, hkv, dv)  # (B*N, Hkv, dv)
    # a document's real tokens are contiguous in the flattened batch: token t of it sits at start + t
    outs, where = [], []
    for members, lmax in groups:
        sel = torch.tensor(members, device=q.device)
        s, ln = starts[sel], lengths[sel]  # (G,)
        offs = torch.arange(lmax, device=q.device)
        valid = offs[None, :] < ln[:, None]  # (G, L) real positions of the padded group
        idx = torch.where(valid, s[:, None] + offs[None, :], s[:, None])  # (G, L) pad slots re-read the start
        qg, kg, vg = (t[idx].transpose(1, 2) for t in (qt, kt, vt))  # (G, H or Hkv, L, d)
        mask, causal = None, is_causal
        padded = bool((ln < lmax).any())
        if window is not None or (padded and not is_causal):
            # causal hides right padding from real queries by itself; otherwise mask padded keys. Padded query
            # rows see everything, so no row is empty (an all -inf row would give NaN gradients).
            mask = valid[:, None, None, :].expand(-1, 1, lmax, -1)  # (G, 1, L, L) real keys
            if window is not None:
                mask = mask & window_keep(lmax, lmax, window, q.device)
            if is_causal:
                mask = mask & causal_keep(lmax, lmax, q.device)
                causal = False
            mask = mask | ~valid[:, None, :, None]  # (G, 1, L, L)
        og = _sdpa(qg, kg, vg, mask, dropout_p, causal, scale)  # (G, H, L, dv)
        outs.append(og.transpose(1, 2)[valid])  # (sum ln, H, dv)
        where.append(idx[valid])
    pad = (~real).nonzero().squeeze(1)
    if pad.numel():
        outs.append(_repeat_kv(vt[pad].unsqueeze(0).transpose(1, 2), h).transpose(1, 2)[0])  # (P, H, dv)
        where.append(pad)
    order = torch.cat(where)  # every token exactly once
    out = torch.cat(outs).to(q.dtype)  # (B*N, H, dv) in `order`
    out = out[torch.argsort(order)]
    return out.reshape(b, n, h, dv).transpose(1, 2)  # (B, H, N, dv)


def _flash_varlen_attention(q, k, v, doc_ids, is_causal, dropout_p, scale, window) -> torch.Tensor:
    """flash-attn's varlen kernel on the padding-free tokens of a packed batch; padding outputs its own v."""
    b, h, n, _ = q.shape
    hkv, dv = k.shape[1], v.shape[-1]
    cu, max_len = cu_seqlens(doc_ids)
    real = (doc_ids.reshape(-1) >= 0).nonzero().squeeze(1)  # (T,) real tokens of the flattened batch
    qt = q.transpose(1, 2).reshape(b * n, h, -1)  # (B*N, H, hd)
    kt = k.transpose(1, 2).reshape(b * n, hkv, -1)
    vt = v.transpose(1, 2).reshape(b * n, hkv, dv)
    out_real = _flash_attn_varlen_func()(
        qt[real],
        kt[real],
        vt[real],
        cu,
        cu,
        max_len,
        max_len,
        dropout_p=dropout_p,
        softmax_scale=scale,
        causal=is_causal,
        window_size=window if window is not None else (-1, -1),
    )  # (T, H, dv)
    out = _repeat_kv(vt.unsqueeze(0).transpose(1, 2), h).transpose(1, 2)[0]  # (B*N, H, dv): padding = own v
    out = out.index_copy(0, real, out_real.to(out.dtype))
    return out.reshape(b, n, h, dv).transpose(1, 2)  # (B, H, N, dv)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
    backend: str = "auto",
    doc_ids: torch.Tensor | None = None,
    window: Window | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention through the chosen backend. Shapes, doc_ids and window in the module
    docstring."""
    _check_shapes(q, k, v)
    window = check_window(window)
    if doc_ids is not None:
        _check_doc_ids(doc_ids, q, k)
    chosen = select_backend(q, attn_mask, backend)
    if chosen == "reference":
        if dropout_p > 0:
            raise ValueError("the reference attention has no dropout; use backend 'sdpa'")
        return reference_attention(q, k, v, attn_mask, is_causal, scale, doc_ids=doc_ids, window=window)
    if chosen == "flash":
        if doc_ids is not None:
            return _flash_varlen_attention(q, k, v, doc_ids, is_causal, dropout_p, scale, window)
        # flash-attn wants (B, N, H, hd); fewer kv heads are its native GQA
        extra = {} if window is None else {"window_size": window}
        out = _flash_attn_func()(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            dropout_p=dropout_p,
            softmax_scale=scale,
            causal=is_causal,
            **extra,
        )
        return out.transpose(1, 2)
    if doc_ids is not None and attn_mask is None:
        plan = _document_plan(doc_ids)
        if _per_document_cheaper(plan[3], q.shape[0], q.shape[2], is_causal):
            return _per_document_attention(q, k, v, is_causal, dropout_p, scale, window, plan)
    n, m = q.shape[-2], k.shape[-2]
    keep = None  # bool (.., N, M) structural mask: documents, window, causality folded in
    if doc_ids is not None:
        keep = document_mask(doc_ids)
    if window is not None:
        keep = (
            window_keep(n, m, window, q.device)
            if keep is None
            else keep & window_keep(n, m, window, q.device)
        )
    if is_causal and (attn_mask is not None or n != m or keep is not None):
        # SDPA takes a mask or is_causal, not both, and aligns causality top-left when n != m; the reference
        # and flash-attn align it bottom-right (the last query sees every key). Fold it into the mask.
        causal = causal_keep(n, m, q.device)
        keep = causal if keep is None else keep & causal
        is_causal = False
    if keep is not None:
        if attn_mask is None:
            attn_mask = keep
        elif attn_mask.dtype == torch.bool:
            attn_mask = attn_mask & keep
        else:
            attn_mask = attn_mask.masked_fill(~keep, float("-inf"))
    return _sdpa(q, k, v, attn_mask, dropout_p, is_causal, scale)
