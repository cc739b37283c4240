"""Parts shared by the text families (models/llama.py decoder, models/modernbert.py encoder).

Text backbone contract (every registered text model; tests/test_text_models.py checks it over the registry):
  modality = "text"; causal = True (decoder: attends to earlier tokens) or False (encoder: bidirectional);
  __init__(..., vocab_size, max_seq_len, ...)
  forward_features(input_ids (B, N), positions=None (B, N), doc_ids=None (B, N)) -> (B, N, D) final hidden
      states after the final norm (the HF twin's last_hidden_state). positions restart at 0 at every document
      of a packed row (default: arange(N)); doc_ids number the documents of a row (-1 = padding), and no token
      attends outside its own document (default: the whole row is one document).
  forward_head(hidden) -> logits (B, N, vocab_size); forward(input_ids, positions, doc_ids) = both
  num_features, no_weight_decay(), group_matcher(), set_grad_checkpointing(), hparams() (rebuilds it),
  max_seq_len (the longest row the position scheme was configured for: a longer row is an error)
  attention_layout() -> one dict per layer, for FLOP accounting (pretrain/mfu.py): {"kind": "softmax" | "linear",
      "heads": query heads, "head_dim", "window": keys a query sees at most (None = the whole document),
      "mode": the linear-attention mode (linear layers only), "dk"/"dv": key/value dims per head (linear only)}
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def default_positions(input_ids: torch.Tensor) -> torch.Tensor:
    """(B, N) positions 0..N-1 for unpacked rows."""
    B, N = input_ids.shape
    return torch.arange(N, device=input_ids.device).expand(B, N)


def check_text_inputs(
    input_ids: torch.Tensor, positions: torch.Tensor | None, doc_ids: torch.Tensor | None, max_seq_len: int
) -> torch.Tensor:
    """Validate a text model's inputs (the contract above); return the positions (default: 0..N-1 per row)."""
    if input_ids.ndim != 2 or input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"input_ids must be (B, N) integer token ids, got {tuple(input_ids.shape)} {input_ids.dtype}"
        )
    if input_ids.shape[1] > max_seq_len:
        raise ValueError(f"a row of {input_ids.shape[1]} tokens is longer than max_seq_len={max_seq_len}")
    for name, t in (("positions", positions), ("doc_ids", doc_ids)):
        if t is not None and t.shape != input_ids.shape:
            raise ValueError(f"{name} is {tuple(t.shape)}, input_ids is {tuple(input_ids.shape)}")
    return default_positions(input_ids) if positions is None else positions


def run_layer(layer: nn.Module, checkpointed: bool, *args: torch.Tensor | None) -> torch.Tensor:
    """layer(*args), under activation checkpointing (recomputed in backward) when asked and training."""
    if checkpointed and layer.training and torch.is_grad_enabled():
        return checkpoint(layer, *args, use_reentrant=False)
    return layer(*args)


def rope_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """(head_dim / 2,) inverse frequencies theta^(-2i/d), fp32 (the rotate-half layout of HF's Llama)."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (B, N) -> cos, sin (B, 1, N, head_dim), computed in fp32: angles repeat over both halves."""
    angles = positions.float().unsqueeze(-1) * inv_freq.to(positions.device)  # (B, N, hd/2)
    emb = torch.cat([angles, angles], dim=-1)  # (B, N, hd)
    return emb.cos().unsqueeze(1), emb.sin().unsqueeze(1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, N, hd) rotated by its positions' angles (rotate-half: dims i and i + hd/2 form a pair)."""
    out = x.float() * cos + rotate_half(x.float()) * sin
    return out.to(x.dtype)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, normalized in fp32 and cast back (HF LlamaRMSNorm's order of operations)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x), no biases (Llama's MLP: gate_proj = w1, up_proj = w3, down_proj = w2)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class GeGLU(nn.Module):
    """wo(gelu(a) * g) with (a, g) = wi(x).chunk(2): the activation on the first half (ModernBERT's MLP)."""

    def __init__(self, dim: int, hidden: int, bias: bool = False):
        super().__init__()
        self.wi = nn.Linear(dim, 2 * hidden, bias=bias)
        self.wo = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, g = self.wi(x).chunk(2, dim=-1)
        return self.wo(F.gelu(a) * g)


def llama_ffn_hidden(dim: int, multiple_of: int = 256, multiplier: float | None = None) -> int:
    """Llama's SwiGLU width: 2/3 of 4*dim, times an optional multiplier, rounded up to `multiple_of`."""
    hidden = int(2 * 4 * dim / 3)
    if multiplier is not None:
        hidden = int(multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)
