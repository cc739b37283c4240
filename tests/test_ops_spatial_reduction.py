"""Spatial-reduction attention (ops/spatial_reduction.py) against its plain-torch references."""

import pytest
import torch
import torch.nn as nn

from ops.spatial_reduction import (
    reduce_tokens,
    reference_reduce_tokens,
    reference_sr_attention,
    sr_attention,
)


def params(C, k, seed=0):
    """Reduction conv (C, C, k, k) + bias and a LayerNorm affine, all away from their init."""
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(C, C, k, k, generator=g) / (k * C**0.5),
        torch.randn(C, generator=g) * 0.1,
        1 + 0.2 * torch.randn(C, generator=g),
        0.1 * torch.randn(C, generator=g),
    )


# (H, W, sr): divisible, odd sizes whose last rows/columns the stride-sr conv drops, non-square
CONV_CASES = [(16, 16, 8), (16, 16, 4), (13, 11, 4), (9, 17, 2), (15, 9, 8), (5, 5, 2)]
# (H, W): larger than the 7x7 pool, odd and not divisible by 7, smaller than the pool (bins overlap)
LINEAR_CASES = [(14, 14), (13, 11), (5, 6), (7, 20)]


@pytest.mark.parametrize("H, W, sr", CONV_CASES)
def test_conv_reduction_matches_reference(H, W, sr):
    C = 12
    x = torch.randn(2, H * W, C)
    w, b, nw, nb = params(C, sr)
    out = reduce_tokens(x, (H, W), sr, w, b, nw, nb, eps=1e-6)
    assert out.shape == (2, (H // sr) * (W // sr), C)
    torch.testing.assert_close(
        out, reference_reduce_tokens(x, (H, W), sr, w, b, nw, nb, 1e-6), atol=1e-5, rtol=0
    )
    # ... and what nn.Conv2d + nn.LayerNorm modules compute on the map
    conv, ln = nn.Conv2d(C, C, sr, sr), nn.LayerNorm(C, eps=1e-6)
    with torch.no_grad():
        conv.weight.copy_(w), conv.bias.copy_(b), ln.weight.copy_(nw), ln.bias.copy_(nb)
        mods = ln(conv(x.transpose(1, 2).reshape(2, C, H, W)).flatten(2).transpose(1, 2))
    torch.testing.assert_close(out, mods, atol=1e-5, rtol=0)


def test_conv_reduction_drops_the_remainder_rows_and_columns():
    H, W, sr, C = 13, 11, 4, 8
    x = torch.randn(1, H * W, C)
    w, b, nw, nb = params(C, sr)
    y = x.clone().view(1, H, W, C)
    y[:, 12:], y[:, :, 8:] = 50.0, -50.0  # row 12 and columns 8..10 lie past the last full 4x4 cell
    a = reduce_tokens(x, (H, W), sr, w, b, nw, nb)
    torch.testing.assert_close(reduce_tokens(y.view(1, H * W, C), (H, W), sr, w, b, nw, nb), a)
    y[:, 11, 0] = 50.0  # inside the last full cell: must change the result
    assert not torch.allclose(reduce_tokens(y.view(1, H * W, C), (H, W), sr, w, b, nw, nb), a)


@pytest.mark.parametrize("H, W", LINEAR_CASES)
def test_linear_reduction_matches_reference(H, W):
    C = 10
    x = torch.randn(2, H * W, C)
    w, b, nw, nb = params(C, 1, seed=3)
    out = reduce_tokens(x, (H, W), 1, w, b, nw, nb, eps=1e-6, linear=True)
    assert out.shape == (2, 49, C)  # always the 7x7 pool, whatever the input
    ref = reference_reduce_tokens(x, (H, W), 1, w, b, nw, nb, 1e-6, linear=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("N, M, heads", [(20, 20, 2), (143, 6, 3), (9, 49, 1)])
def test_sr_attention_matches_reference(N, M, heads):
    C = 24
    q, kv = torch.randn(2, N, C), torch.randn(2, M, 2 * C)
    ref = reference_sr_attention(q, kv, heads)
    for backend in ("auto", "sdpa", "reference"):
        torch.testing.assert_close(sr_attention(q, kv, heads, backend=backend), ref, atol=1e-5, rtol=0)
    # one key: every query returns that key's value
    one = torch.randn(2, 1, 2 * C)
    torch.testing.assert_close(sr_attention(q, one, heads), one[:, :, C:].expand(2, N, C), atol=1e-6, rtol=0)


@pytest.mark.parametrize("linear, H, W, sr", [(False, 13, 11, 4), (False, 16, 12, 8), (True, 9, 13, 1)])
def test_gradients_match_reference(linear, H, W, sr):
    """d/d(x, q, conv, norm) of reduce -> kv projection -> attention, fast path vs reference, in float64 so
    that summation order cannot hide a wrong gradient."""
    C, heads, f64 = 12, 3, torch.float64
    torch.manual_seed(0)
    x = torch.randn(2, H * W, C, dtype=f64, requires_grad=True)
    q = torch.randn(2, H * W, C, dtype=f64, requires_grad=True)
    kv_proj = torch.randn(2 * C, C, dtype=f64) / C**0.5
    leaves = [p.to(f64).requires_grad_() for p in params(C, 1 if linear else sr)]

    def run(reduce, attend):
        r = reduce(x, (H, W), sr, *leaves, 1e-6, linear=linear)  # (B, M, C)
        out = attend(q, r @ kv_proj.T, heads)
        loss = (out * torch.linspace(-1, 1, out.numel(), dtype=f64).view_as(out)).sum()
        return torch.autograd.grad(loss, [x, q, *leaves])

    fast = run(reduce_tokens, sr_attention)
    ref = run(reference_reduce_tokens, reference_sr_attention)
    for a, b in zip(fast, ref):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


def test_token_count_must_match_the_map():
    w, b, nw, nb = params(4, 2)
    with pytest.raises(ValueError, match="5x5"):
        reduce_tokens(torch.randn(1, 24, 4), (5, 5), 2, w, b, nw, nb)
