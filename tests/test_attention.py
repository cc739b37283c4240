import pytest
import torch

from ops import attention, flash_available, reference_attention, select_backend


def qkv(b=2, h=3, n=7, m=None, d=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = n if m is None else m
    return (
        torch.randn(b, h, n, d, generator=g, dtype=dtype),
        torch.randn(b, h, m, d, generator=g, dtype=dtype),
        torch.randn(b, h, m, d, generator=g, dtype=dtype),
    )


def test_sdpa_matches_reference_plain_and_scaled():
    q, k, v = qkv()
    ref = reference_attention(q, k, v)
    torch.testing.assert_close(attention(q, k, v, backend="sdpa"), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attention(q, k, v), ref, atol=1e-5, rtol=1e-5)  # auto -> sdpa on CPU
    torch.testing.assert_close(
        attention(q, k, v, scale=0.3), reference_attention(q, k, v, scale=0.3), atol=1e-5, rtol=1e-5
    )
    # the reference itself is softmax(qk^T/sqrt(d))v, written out
    manual = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1) @ v
    torch.testing.assert_close(ref, manual, atol=1e-5, rtol=1e-5)


def test_masks_bool_additive_causal():
    q, k, v = qkv(n=5, m=9)
    keep = torch.rand(2, 1, 5, 9, generator=torch.Generator().manual_seed(1)) > 0.3
    keep[..., 0] = True  # every query attends somewhere
    bias = torch.randn(1, 3, 5, 9)
    for mask in (keep, bias):
        torch.testing.assert_close(
            attention(q, k, v, attn_mask=mask), reference_attention(q, k, v, mask), atol=1e-5, rtol=1e-5
        )
    q, k, v = qkv(n=6)
    ref = reference_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(attention(q, k, v, is_causal=True), ref, atol=1e-5, rtol=1e-5)
    # first query sees only the first key
    torch.testing.assert_close(ref[:, :, 0], v[:, :, 0], atol=1e-6, rtol=1e-6)
    # fewer queries than keys (decoding with a cache): bottom-right alignment, the last query sees every key
    q2, k2, v2 = qkv(n=2, m=5)
    ref2 = reference_attention(q2, k2, v2, is_causal=True)
    torch.testing.assert_close(attention(q2, k2, v2, is_causal=True), ref2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        ref2[:, :, -1], reference_attention(q2, k2, v2)[:, :, -1], atol=1e-5, rtol=1e-5
    )
    # causal and a mask together: SDPA takes one, the dispatch folds them
    bias = torch.randn(1, 1, 6, 6)
    torch.testing.assert_close(
        attention(q, k, v, attn_mask=bias, is_causal=True),
        reference_attention(q, k, v, bias, is_causal=True),
        atol=1e-5,
        rtol=1e-5,
    )


def test_bf16_close_to_fp32_reference():
    q, k, v = qkv(n=33, d=32)
    out = attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference_attention(q, k, v), atol=3e-2, rtol=3e-2)


def test_dispatch_choice_and_errors():
    q, _, _ = qkv()
    assert select_backend(q) == "sdpa"  # CPU tensors never take flash
    assert select_backend(q, backend="reference") == "reference"
    with pytest.raises(ValueError, match="not one of"):
        select_backend(q, backend="xformers")
    if not flash_available():
        with pytest.raises(RuntimeError, match="flash"):
            attention(*qkv(), backend="flash")


def test_gradients_match_reference():
    q, k, v = (t.requires_grad_() for t in qkv(n=5))
    attention(q, k, v).square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    reference_attention(q, k, v).square().sum().backward()
    for a, t in zip(grads, (q, k, v)):
        torch.testing.assert_close(a, t.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not flash_available(), reason="needs CUDA and flash-attn")
def test_flash_matches_reference_on_gpu():
    q, k, v = (t.cuda().bfloat16() for t in qkv(n=128, d=64))
    assert select_backend(q) == "flash"
    out = attention(q, k, v, is_causal=True)
    torch.testing.assert_close(
        out.float(), reference_attention(q, k, v, is_causal=True).float(), atol=2e-2, rtol=2e-2
    )
