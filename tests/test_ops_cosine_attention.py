"""Swin V2's scaled cosine attention and log-spaced continuous position bias against plain-torch definitions."""

import math

import pytest
import torch

from ops.cosine_attention import ContinuousPositionBias, cosine_window_attention, log_spaced_coords
from ops.window import pad_to_multiple, shift_window_mask, window_partition


def ref_log_coord(d: int, n: int) -> float:
    """One offset d of a window normalised by n (the window or pre-training window): the paper's eq. (4)."""
    t = d / (n - 1) * 8 if n > 1 else float(d)
    return math.copysign(math.log2(1 + abs(t)), t) / 3.0  # log2(8) = 3


def ref_cpb(cpb: ContinuousPositionBias, window, pretrained=(0, 0)) -> torch.Tensor:
    """(H, N, N): for every token pair of the window, the MLP of its log-spaced offset, written out."""
    wh, ww = window
    norm = pretrained if pretrained[0] > 0 else window
    w1, b1, w2 = cpb.mlp[0].weight, cpb.mlp[0].bias, cpb.mlp[2].weight
    pos = [(r, c) for r in range(wh) for c in range(ww)]
    out = torch.empty(w2.shape[0], len(pos), len(pos))
    for p, (rp, cp) in enumerate(pos):
        for q, (rq, cq) in enumerate(pos):
            coord = torch.tensor([ref_log_coord(rp - rq, norm[0]), ref_log_coord(cp - cq, norm[1])])
            out[:, p, q] = 16 * torch.sigmoid(w2 @ torch.relu(w1 @ coord + b1))
    return out


def ref_cosine_attention(q, k, v, logit_scale, bias=None, mask=None):
    """softmax(cos(q_i, k_j) * min(exp(logit_scale), 100) + bias + mask[window]) v, one window and head at a time."""
    out = torch.empty_like(v)
    temperature = torch.minimum(logit_scale.exp(), torch.tensor(100.0)).view(-1)  # (H,)
    for w in range(q.shape[0]):
        for h in range(q.shape[1]):
            # a zero row (a padded token's key: keys have no bias) stays zero, as F.normalize's eps does
            qn = q[w, h] / q[w, h].norm(dim=-1, keepdim=True).clamp_min(1e-12)
            kn = k[w, h] / k[w, h].norm(dim=-1, keepdim=True).clamp_min(1e-12)
            logits = (qn @ kn.T) * temperature[h]  # (N, N)
            if bias is not None:
                logits = logits + bias[h]
            if mask is not None:
                logits = logits + mask[w % mask.shape[0]]  # the windows of one image are consecutive
            out[w, h] = logits.softmax(-1) @ v[w, h]
    return out


@pytest.mark.parametrize(
    "window, pretrained",
    [((4, 4), (0, 0)), ((3, 5), (0, 0)), ((6, 6), (8, 8)), ((2, 3), (4, 6)), ((1, 1), (0, 0))],
)
def test_log_spaced_coords_follow_the_formula(window, pretrained):
    table = log_spaced_coords(window, pretrained)
    norm = pretrained if pretrained[0] > 0 else window
    offsets = [
        (dy, dx) for dy in range(-(window[0] - 1), window[0]) for dx in range(-(window[1] - 1), window[1])
    ]
    ref = torch.tensor([[ref_log_coord(dy, norm[0]), ref_log_coord(dx, norm[1])] for dy, dx in offsets])
    assert table.shape == ((2 * window[0] - 1) * (2 * window[1] - 1), 2)
    torch.testing.assert_close(table, ref, atol=1e-6, rtol=0)
    assert torch.isfinite(table).all()
    # log spacing: the largest offset of the window sits at log2(9) / 3 when normalised by its own size
    if pretrained[0] == 0 and window[0] > 1:
        torch.testing.assert_close(table[:, 0].max(), torch.tensor(math.log2(9) / 3))


def test_log_spaced_coords_reject_a_one_wide_pretraining_window():
    with pytest.raises(ValueError, match="pretrained_window"):
        log_spaced_coords((4, 4), (1, 1))


@pytest.mark.parametrize("window, pretrained", [((3, 4), (0, 0)), ((4, 4), (6, 6))])
def test_continuous_position_bias_matches_reference(window, pretrained):
    torch.manual_seed(0)
    cpb = ContinuousPositionBias(window, num_heads=3, pretrained_window=pretrained, hidden=32)
    assert [tuple(p.shape) for p in cpb.parameters()] == [
        (32, 2),
        (32,),
        (3, 32),
    ]  # no bias on the last layer
    with torch.no_grad():
        for p in cpb.parameters():
            p.normal_(0, 0.5)
    bias = cpb()
    ref = ref_cpb(cpb, window, pretrained)
    torch.testing.assert_close(bias, ref, atol=1e-5, rtol=0)
    assert bias.min() > 0 and bias.max() < 16  # 16 * sigmoid
    # same relative offset, same bias: token pairs (0, 1) and (N-2, N-1) are both one step to the left
    N = window[0] * window[1]
    torch.testing.assert_close(bias[:, 0, 1], bias[:, N - 2, N - 1])
    g = torch.randn_like(bias)
    grads = torch.autograd.grad(bias, list(cpb.parameters()), g)
    grads_ref = torch.autograd.grad(ref, list(cpb.parameters()), g)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def _windows(H, W, size, heads, hd, B=2, shift=None):
    """q, k, v (B * nW, heads, N, hd) cut from an (H, W) map padded to whole windows, and its shift mask."""
    x = pad_to_multiple(torch.randn(B, H, W, 3 * heads * hd), size)
    Hp, Wp = x.shape[1:3]
    if shift is not None:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    win = window_partition(x, size)  # (B * nW, N, 3 * heads * hd)
    q, k, v = win.view(win.shape[0], win.shape[1], 3, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
    mask = shift_window_mask(Hp, Wp, size, shift) if shift is not None else None
    return [t.contiguous().requires_grad_() for t in (q, k, v)], mask


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
@pytest.mark.parametrize(
    "H, W, size, shift, with_bias",
    [
        (7, 10, (4, 4), (2, 2), True),
        (7, 10, (4, 4), (2, 2), False),
        (5, 9, (3, 5), None, True),
        (4, 4, (4, 4), None, False),
    ],
)
def test_cosine_window_attention_matches_reference(backend, H, W, size, shift, with_bias):
    torch.manual_seed(0)
    heads, hd = 3, 8
    (q, k, v), mask = _windows(H, W, size, heads, hd, shift=shift)
    N = size[0] * size[1]
    # head 2's temperature is past the cap (log 100): it is clamped, and gets no gradient
    logit_scale = (
        torch.tensor([math.log(10.0), math.log(30.0), math.log(500.0)]).view(heads, 1, 1).requires_grad_()
    )
    bias = (16 * torch.rand(heads, N, N)).requires_grad_() if with_bias else None
    out = cosine_window_attention(q, k, v, logit_scale, bias, mask, backend=backend)
    ref = ref_cosine_attention(q, k, v, logit_scale, bias, mask)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    inputs = [t for t in (q, k, v, logit_scale, bias) if t is not None]
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, g)
    grads_ref = torch.autograd.grad(ref, inputs, g)
    for a, b in zip(grads, grads_ref):
        # rtol 1e-3: the gradient at a zero (padded) row is scaled by 1 / eps = 1e12 in both
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)
    assert grads[3][2].abs().max() == 0 and grads[3][:2].abs().min() > 0
    if mask is not None:  # the shift mask matters: without it the answer differs
        assert not torch.allclose(out, ref_cosine_attention(q, k, v, logit_scale, bias, None), atol=1e-3)


def test_cosine_attention_ignores_query_and_key_lengths():
    """Only directions enter the logits: rescaling any query or key row changes nothing; the temperature does."""
    torch.manual_seed(0)
    (q, k, v), _ = _windows(8, 8, (4, 4), heads=2, hd=16)
    scale = torch.full((2, 1, 1), math.log(10.0))
    with torch.no_grad():
        out = cosine_window_attention(q, k, v, scale)
        q2 = q * (0.1 + 5 * torch.rand(*q.shape[:-1], 1))
        k2 = k * (0.1 + 5 * torch.rand(*k.shape[:-1], 1))
        torch.testing.assert_close(cosine_window_attention(q2, k2, v, scale), out, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(cosine_window_attention(q, k, v, scale + 1.0), out, atol=1e-3)
        # past the cap every temperature is 100
        capped = cosine_window_attention(q, k, v, torch.full((2, 1, 1), math.log(100.0)))
        torch.testing.assert_close(cosine_window_attention(q, k, v, torch.full((2, 1, 1), 9.0)), capped)
