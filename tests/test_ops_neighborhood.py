"""Neighborhood attention (ops/neighborhood.py) against its per-query definition and hand-written neighbourhoods."""

import pytest
import torch

from ops.attention import reference_attention
from ops.neighborhood import (
    neighborhood_attention,
    neighbourhood_indices,
    reference_neighborhood_attention,
    reference_window_start,
)

# key positions per query along one axis, worked out by hand from the papers' rule: centred on the query, over
# the positions congruent to it modulo d, shifted inward at the borders so there are always k of them
HAND = {
    (5, 3, 1): [[0, 1, 2], [0, 1, 2], [1, 2, 3], [2, 3, 4], [2, 3, 4]],
    (7, 3, 2): [[0, 2, 4], [1, 3, 5], [0, 2, 4], [1, 3, 5], [2, 4, 6], [1, 3, 5], [2, 4, 6]],
    (6, 1, 3): [[0], [1], [2], [3], [4], [5]],
    (9, 3, 3): [[0, 3, 6], [1, 4, 7], [2, 5, 8]] * 3,  # L = k * d: one sub-grid of k per residue, all of it
}


@pytest.mark.parametrize("L, k, d", list(HAND))
def test_neighbourhoods_match_hand_tables(L, k, d):
    idx, rel = neighbourhood_indices(L, k, d)
    assert idx.tolist() == HAND[(L, k, d)]
    assert [[reference_window_start(i, L, k, d) + a * d for a in range(k)] for i in range(L)] == HAND[
        (L, k, d)
    ]
    for i in range(L):  # the rpb row is the key-query offset in dilated steps, shifted by k - 1
        assert rel[i].tolist() == [(t - i) // d + k - 1 for t in HAND[(L, k, d)][i]]


@pytest.mark.parametrize("k", [1, 3, 5, 7])
@pytest.mark.parametrize("d", [1, 2, 3])
def test_fast_neighbourhoods_equal_natten_rule_and_properties(k, d):
    """The sub-grid clamp equals natten's piecewise window start for every length k * d <= L < 30; each
    neighbourhood holds the query, k distinct in-range positions congruent to it, centred whenever the map
    allows."""
    for L in range(k * d, 30):
        check_axis(L, k, d)


def check_axis(L, k, d):
    idx, rel = neighbourhood_indices(L, k, d)
    n = k // 2
    for i in range(L):
        keys = idx[i].tolist()
        assert keys[0] == reference_window_start(i, L, k, d)
        assert i in keys and len(set(keys)) == k and 0 <= min(keys) and max(keys) < L
        assert all(t % d == i % d for t in keys) and all(b - a == d for a, b in zip(keys, keys[1:]))
        if i - n * d >= 0 and i + n * d < L:
            assert keys[n] == i
    assert rel.min() >= 0 and rel.max() <= 2 * k - 2


# (H, W, k, d): square, odd and non-square, k * d == H (all of a sub-grid), dilation 2 and 3
CASES = [
    (7, 7, 3, 1),
    (9, 13, 5, 1),
    (12, 10, 3, 2),
    (13, 11, 3, 3),
    (7, 9, 7, 1),
    (6, 15, 3, 2),
    (10, 11, 5, 2),
]


@pytest.mark.parametrize("H, W, k, d", CASES)
@pytest.mark.parametrize("with_rpb", [True, False])
def test_matches_reference_fp32_forward(H, W, k, d, with_rpb):
    torch.manual_seed(0)
    q, kk, v = (torch.randn(2, 3, H, W, 8) for _ in range(3))
    rpb = torch.randn(3, 2 * k - 1, 2 * k - 1) if with_rpb else None
    out = neighborhood_attention(q, kk, v, k, d, rpb)
    torch.testing.assert_close(
        out, reference_neighborhood_attention(q, kk, v, k, d, rpb), atol=1e-5, rtol=1e-5
    )
    if with_rpb:  # the bias matters
        assert not torch.allclose(out, neighborhood_attention(q, kk, v, k, d), atol=1e-3)


@pytest.mark.parametrize("tile", [1, 2, 4, 9, 20])
@pytest.mark.parametrize("H, W, k, d", [(13, 11, 3, 3), (10, 11, 5, 2), (7, 9, 7, 1)])
def test_any_tile_size_is_the_same_attention(H, W, k, d, tile):
    """Tiles smaller or larger than the kernel, or than a residue class's sub-grid (queries past its end,
    halos padded with masked keys): the same outputs and gradients."""
    torch.manual_seed(0)
    q, kk, v = (torch.randn(1, 2, H, W, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    rpb = torch.randn(2, 2 * k - 1, 2 * k - 1, dtype=torch.float64, requires_grad=True)
    out = neighborhood_attention(q, kk, v, k, d, rpb, tile=tile)
    ref = reference_neighborhood_attention(q, kk, v, k, d, rpb)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    g = torch.randn_like(out)
    for a, b in zip(
        torch.autograd.grad(out, (q, kk, v, rpb), g), torch.autograd.grad(ref, (q, kk, v, rpb), g)
    ):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("H, W, k, d", CASES)
def test_gradients_match_reference_float64(H, W, k, d):
    """d/d(q, k, v, rpb) in float64, so that summation order cannot hide a wrong gradient."""
    torch.manual_seed(0)
    f64 = torch.float64
    leaves = [torch.randn(2, 2, H, W, 4, dtype=f64, requires_grad=True) for _ in range(3)]
    rpb = torch.randn(2, 2 * k - 1, 2 * k - 1, dtype=f64, requires_grad=True)
    scale = 0.7  # a non-default scale is honoured
    out = neighborhood_attention(*leaves, k, d, rpb, scale=scale)
    ref = reference_neighborhood_attention(*leaves, k, d, rpb, scale=scale)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [*leaves, rpb], g)
    want = torch.autograd.grad(ref, [*leaves, rpb], g)
    for a, b in zip(got, want):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


def test_rpb_entries_unused_only_where_no_offset_reaches():
    """On a map exactly k wide every offset in [-(k-1), k-1] occurs (border queries see the far side), so every
    table entry gets a gradient; on a large map only interior queries exist too and the table is still covered."""
    k = 3
    for H in (3, 8):
        q, kk, v = (torch.randn(1, 1, H, H, 4) for _ in range(3))
        rpb = torch.zeros(1, 2 * k - 1, 2 * k - 1, requires_grad=True)
        neighborhood_attention(q, kk, v, k, 1, rpb).square().sum().backward()
        assert (rpb.grad.abs() > 0).all()


def test_full_kernel_is_global_attention():
    """k = H = W, d = 1: every query sees the whole map, so without a bias this is plain attention."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 5, 8) for _ in range(3))
    out = neighborhood_attention(q, k, v, 5)

    def flat(t):
        return t.flatten(2, 3)  # (B, heads, 25, hd)

    ref = reference_attention(flat(q), flat(k), flat(v)).view_as(out)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("d", [1, 2])
def test_each_output_reads_only_its_neighbourhood(d):
    """Which keys reach query (1, 6) of an 8 x 8 map, k = 3: rows {0, 1, 2} (d = 1, shifted in from the top edge)
    or {1, 3, 5} (d = 2), columns {5, 6, 7} or {2, 4, 6} (d = 2: the last column of its class)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, 8, 8, 4, requires_grad=True) for _ in range(3))
    neighborhood_attention(q, k, v, 3, d)[0, 0, 1, 6].sum().backward()
    rows, cols = ([0, 1, 2], [5, 6, 7]) if d == 1 else ([1, 3, 5], [2, 4, 6])
    want = torch.zeros(8, 8, dtype=torch.bool)
    want[torch.tensor(rows)[:, None], torch.tensor(cols)] = True
    for t in (k, v):
        assert torch.equal(t.grad[0, 0].abs().sum(-1) > 0, want)


def test_bf16_close_to_fp32():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 10, 12, 16) for _ in range(3))
    rpb = torch.randn(2, 5, 5)
    ref = neighborhood_attention(q, k, v, 3, 2, rpb)
    out = neighborhood_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), 3, 2, rpb.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=5e-2, rtol=5e-2)


def test_refusals_name_the_problem():
    q = torch.randn(1, 2, 5, 30, 4)
    with pytest.raises(ValueError, match=r"3 \* 2 = 6, got a 5x30 map"):  # H < k * d, as natten refuses
        neighborhood_attention(q, q, q, 3, 2)
    with pytest.raises(ValueError, match=r"got a 5x30 map"):
        reference_neighborhood_attention(q, q, q, 7)
    q = torch.randn(1, 2, 8, 8, 4)
    with pytest.raises(ValueError, match="odd"):
        neighborhood_attention(q, q, q, 4)
    with pytest.raises(ValueError, match="dilation"):
        neighborhood_attention(q, q, q, 3, 0)
    with pytest.raises(ValueError, match=r"\(2, 5, 5\)"):
        neighborhood_attention(q, q, q, 3, 1, torch.zeros(2, 3, 3))
    with pytest.raises(ValueError, match="share one"):
        neighborhood_attention(q, q, q[..., :2], 3)
