"""One attention dispatch for every model: flash-attn on CUDA when installed, PyTorch SDPA otherwise.

`reference_attention` is the plain-torch definition the others are tested against. All take
q (B, H, N, hd), k/v (B, H, M, hd) and return (B, H, N, hd).

Masks: `attn_mask` is either boolean (True = may attend) or additive float (added to the logits, e.g. a
relative position bias or -inf for blocked pairs), broadcastable to (B, H, N, M).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "flash", "sdpa", "reference")


@functools.cache
def _flash_attn_func():
    """flash_attn.flash_attn_func, or None when the optional extra is not installed."""
    try:
        from flash_attn import flash_attn_func  # optional extra: pip install 'tessera[flash]'
    except ImportError:
        return None
    return flash_attn_func


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


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v, computed in fp32 and cast back."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = torch.matmul(q.float(), k.float().transpose(-2, -1)) * scale  # (B, H, N, M)
    if is_causal:
        logits = logits.masked_fill(~causal_keep(*logits.shape[-2:], q.device), float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            logits = logits.masked_fill(~attn_mask, float("-inf"))
        else:
            logits = logits + attn_mask.float()
    probs = logits.softmax(dim=-1)
    return torch.matmul(probs, v.float()).to(q.dtype)  # (B, H, N, hd)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Scaled dot-product attention through the chosen backend. Shapes in the module docstring."""
    chosen = select_backend(q, attn_mask, backend)
    if chosen == "flash":
        # flash-attn wants (B, N, H, hd)
        out = _flash_attn_func()(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            dropout_p=dropout_p,
            softmax_scale=scale,
            causal=is_causal,
        )
        return out.transpose(1, 2)
    if chosen == "reference":
        if dropout_p > 0:
            raise ValueError("the reference attention has no dropout; use backend 'sdpa'")
        return reference_attention(q, k, v, attn_mask, is_causal, scale)
    n, m = q.shape[-2], k.shape[-2]
    if is_causal and (attn_mask is not None or n != m):
        # SDPA takes a mask or is_causal, not both, and aligns causality top-left when n != m; the reference
        # and flash-attn align it bottom-right (the last query sees every key). Fold it into the mask.
        causal = causal_keep(n, m, q.device)
        if attn_mask is None:
            attn_mask = causal
        elif attn_mask.dtype == torch.bool:
            attn_mask = attn_mask & causal
        else:
            attn_mask = attn_mask.masked_fill(~causal, float("-inf"))
        is_causal = False
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale
    )
