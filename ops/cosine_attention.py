"""Swin Transformer V2's window attention pieces (Liu et al. 2022, sec. 3.2-3.3).

Scaled cosine attention replaces the dot product q.k / sqrt(d) by the cosine of q and k times a learned per-head
temperature, capped at 100 so a head cannot sharpen without bound:
    logits = cos(q_i, k_j) * exp(min(logit_scale, log 100)) + B_ij (+ shift mask)
`cosine_window_attention` computes it through ops.window.window_attention, i.e. the one attention dispatch:
q and k are L2-normalised, q is pre-multiplied by the temperature, and the softmax runs with scale=1.0. A zero
row stays zero (F.normalize's eps), so its cosine with anything is 0: the keys of zero-padded tokens, which get no
bias in Swin V2, take part in the softmax with logit 0 + bias.

The log-spaced continuous position bias (CPB) feeds each relative offset (dy, dx) of a window, squashed onto
[-1, 1]-ish log coordinates, through a small MLP:
    d_hat = sign(d) * log2(1 + |d| / (w - 1) * 8) / log2(8)   (w: the window, or the pre-training window)
    B = 16 * sigmoid(MLP(d_hat)),  MLP = Linear(2, 512) -> ReLU -> Linear(512, heads, bias=False)
so a model trained with small windows extrapolates to larger ones with a small change of input range.
The plain-torch references these are tested against live in tests/test_ops_cosine_attention.py.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ops.window import relative_position_index, window_attention

LOGIT_SCALE_MAX = math.log(100.0)  # the cap on the learned temperature, as in the paper (1 / 0.01)
CPB_RANGE = 8.0  # offsets are scaled to [-8, 8] before the log
CPB_BIAS_MAX = 16.0  # the bias is 16 * sigmoid(.), in (0, 16)


def cosine_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    logit_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Scaled cosine attention inside windows. q, k, v (B * nW, H, N, hd); logit_scale (H, 1, 1), the log of each
    head's temperature; bias (H, N, N), e.g. `ContinuousPositionBias()`; mask (nW, N, N) -> (B * nW, H, N, hd)."""
    temperature = torch.clamp(logit_scale, max=LOGIT_SCALE_MAX).exp()  # (H, 1, 1), at most 100
    q = F.normalize(q, dim=-1) * temperature.to(q.dtype)  # (B * nW, H, N, hd), rows of norm `temperature`
    k = F.normalize(k, dim=-1)  # (B * nW, H, N, hd), unit rows
    return window_attention(q, k, v, bias, mask, scale=1.0, backend=backend)


def log_spaced_coords(window: tuple[int, int], pretrained_window: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """((2wh - 1) * (2ww - 1), 2) float: the log-spaced (dy, dx) of every relative offset of a window, in the
    row-major order of `ops.window.relative_position_index`. Offsets are normalised by (w - 1) of the pre-training
    window when given (> 0), else of this window (a 1-wide window has only the offset 0 and is left as is)."""
    wh, ww = window
    norm = pretrained_window if pretrained_window[0] > 0 else window
    if pretrained_window[0] > 0 and min(pretrained_window) < 2:
        raise ValueError(f"pretrained_window {pretrained_window} must be 0 (none) or at least 2 per side")
    dy = torch.arange(-(wh - 1), wh, dtype=torch.float32)
    dx = torch.arange(-(ww - 1), ww, dtype=torch.float32)
    table = torch.stack(torch.meshgrid(dy, dx, indexing="ij"), dim=-1)  # (2wh - 1, 2ww - 1, 2)
    for axis, n in enumerate(norm):
        if n > 1:
            table[..., axis] /= n - 1  # in [-1, 1] for the pre-training window
    table = table * CPB_RANGE
    table = torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(CPB_RANGE)
    return table.reshape(-1, 2)


class ContinuousPositionBias(nn.Module):
    """The V2 relative position bias of one attention layer: (H, N, N) = 16 * sigmoid(MLP(log-spaced offsets))."""

    def __init__(
        self,
        window: tuple[int, int],
        num_heads: int,
        pretrained_window: tuple[int, int] = (0, 0),
        hidden: int = 512,
    ):
        super().__init__()
        self.window, self.num_heads = tuple(window), num_heads
        self.mlp = nn.Sequential(
            nn.Linear(2, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_heads, bias=False)
        )
        # fixed tables, rebuilt from the window at construction (not saved)
        self.register_buffer(
            "coords", log_spaced_coords(self.window, tuple(pretrained_window)), persistent=False
        )
        self.register_buffer("index", relative_position_index(self.window), persistent=False)

    def forward(self) -> torch.Tensor:  # -> (H, N, N)
        table = self.mlp(self.coords)  # ((2wh - 1) * (2ww - 1), H): one bias per relative offset and head
        N = self.index.shape[0]
        bias = table[self.index.view(-1)].view(N, N, self.num_heads).permute(2, 0, 1)  # (H, N, N)
        return CPB_BIAS_MAX * torch.sigmoid(bias)
