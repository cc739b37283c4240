"""Kernels and their plain-torch references. Nothing here imports models or pretrain."""

from ops.attention import (
    BACKENDS,
    attention,
    cu_seqlens,
    document_mask,
    flash_available,
    reference_attention,
    select_backend,
)
from ops.linear_attention import linear_attention, linear_attention_flops, recurrent_linear_attention

__all__ = [
    "BACKENDS",
    "attention",
    "cu_seqlens",
    "document_mask",
    "flash_available",
    "linear_attention",
    "linear_attention_flops",
    "recurrent_linear_attention",
    "reference_attention",
    "select_backend",
]
