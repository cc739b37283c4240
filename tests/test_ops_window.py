"""Window/grid partition helpers and window attention against their plain definitions."""

import pytest
import torch

from ops.window import (
    grid_partition,
    grid_reverse,
    pad_to_multiple,
    reference_window_attention,
    relative_position_index,
    shift_window_mask,
    window_attention,
    window_partition,
    window_reverse,
)


@pytest.mark.parametrize("H, W, size", [(8, 12, (4, 3)), (7, 10, (4, 4)), (5, 5, (5, 5)), (9, 6, (2, 3))])
def test_partitions_invert_and_group_the_right_tokens(H, W, size):
    x = pad_to_multiple(torch.randn(2, H, W, 3), size)
    Hp, Wp = x.shape[1:3]
    assert Hp % size[0] == 0 and Wp % size[1] == 0 and Hp - H < size[0] and Wp - W < size[1]
    assert torch.equal(x[:, H:], torch.zeros_like(x[:, H:])) and torch.equal(
        x[:, :, W:], torch.zeros_like(x[:, :, W:])
    )
    win = window_partition(x, size)
    assert torch.equal(window_reverse(win, size, Hp, Wp), x)
    # window (r, c) of image 1 holds the contiguous block of rows r*wh.., cols c*ww..
    nw = Wp // size[1]
    r, c = Hp // size[0] - 1, nw - 1
    block = x[1, r * size[0] : (r + 1) * size[0], c * size[1] : (c + 1) * size[1]].reshape(-1, 3)
    assert torch.equal(win[(Hp // size[0]) * nw + r * nw + c], block)
    # grid: group (a, b) holds tokens spaced Hp/gh, Wp/gw apart, starting at (a, b)
    grid = size
    g = grid_partition(x, grid)
    assert torch.equal(grid_reverse(g, grid, Hp, Wp), x)
    sh, sw = Hp // grid[0], Wp // grid[1]
    a, b = sh - 1, sw - 1
    assert torch.equal(g[sh * sw + a * sw + b], x[1, a::sh, b::sw].reshape(-1, 3))


def test_relative_position_index_is_an_offset_table():
    size = (3, 4)
    idx = relative_position_index(size)
    N = size[0] * size[1]
    assert idx.shape == (N, N) and idx.min() == 0 and idx.max() == (2 * 3 - 1) * (2 * 4 - 1) - 1
    pos = [(i, j) for i in range(3) for j in range(4)]
    for p in range(N):
        for q in range(N):
            dy, dx = pos[p][0] - pos[q][0], pos[p][1] - pos[q][1]
            assert idx[p, q] == (dy + 2) * 7 + (dx + 3)  # same offset <=> same index


def test_shift_mask_blocks_tokens_that_were_not_neighbours():
    H, W, size, shift = 8, 12, (4, 4), (2, 2)
    mask = shift_window_mask(H, W, size, shift)  # (6, 16, 16)
    # from first principles: roll the coordinates as the model rolls the map; a token "wrapped" when the roll
    # brought it from the top/left edge to the bottom/right. Two tokens of a window are neighbours in the image
    # iff they wrapped the same way along both axes.
    coords = torch.stack(torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij"), -1)  # (H, W, 2)
    rolled = torch.roll(coords, shifts=(-shift[0], -shift[1]), dims=(0, 1))
    wrapped = (rolled < torch.tensor(shift)).float()  # (H, W, 2)
    win = window_partition(wrapped[None], size)  # (nW, N, 2)
    same = (win[:, :, None, :] == win[:, None, :, :]).all(-1)  # (nW, N, N)
    assert torch.equal(mask == 0, same)
    assert mask[0].eq(0).all() and not mask[-1].eq(0).all()  # only windows at the far edges mix regions


@pytest.mark.parametrize("with_bias, with_mask", [(True, True), (True, False), (False, True), (False, False)])
def test_window_attention_matches_reference(with_bias, with_mask):
    torch.manual_seed(0)
    B, nW, heads, N, hd = 2, 4, 3, 16, 8
    q, k, v = (torch.randn(B * nW, heads, N, hd, requires_grad=True) for _ in range(3))
    bias = torch.randn(heads, N, N) if with_bias else None
    mask = shift_window_mask(8, 8, (4, 4), (2, 2)) if with_mask else None
    out = window_attention(q, k, v, bias, mask, backend="sdpa")
    ref = reference_window_attention(q, k, v, bias, mask)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    grads_ref = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    if with_mask:  # the mask matters: without it the answer differs
        assert not torch.allclose(out, reference_window_attention(q, k, v, bias, None), atol=1e-3)


def test_window_attention_odd_windows_on_a_padded_map_with_bias_gradients():
    """7x7 windows (N = 49) over a 10x12 map padded to 14x14, shifted by 3, with the bias table's gradient."""
    torch.manual_seed(0)
    heads, hd, size, shift = 2, 8, (7, 7), (3, 3)
    x = pad_to_multiple(torch.randn(2, 10, 12, heads * hd), size)  # (2, 14, 14, C)
    win = window_partition(x, size)  # (2 * 4, 49, C)
    q, k, v = (win.view(8, 49, heads, hd).transpose(1, 2) * s for s in (1.0, 0.5, 2.0))
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    table = torch.randn(13 * 13, heads, requires_grad=True)
    bias = table[relative_position_index(size).view(-1)].view(49, 49, heads).permute(2, 0, 1)  # (H, N, N)
    mask = shift_window_mask(14, 14, size, shift)
    out = window_attention(q, k, v, bias, mask, backend="sdpa")
    ref = reference_window_attention(q, k, v, bias, mask)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, table), g, retain_graph=True)  # `bias` is shared with ref
    want = torch.autograd.grad(ref, (q, k, v, table), g)
    for a, b in zip(got, want):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_window_attention_rejects_mismatched_windows():
    q = torch.randn(6, 2, 4, 8)
    with pytest.raises(ValueError, match="not a multiple"):
        window_attention(q, q, q, mask=torch.zeros(4, 4, 4))
