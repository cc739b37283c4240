"""Document masking (packed rows), sliding windows and grouped-query attention in ops.attention.

Every path (per-document SDPA, SDPA on the explicit mask, flash varlen on GPU) is checked against
`reference_attention`, and the reference itself against a brute-force loop written from the definition.
"""

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from ops import attention, cu_seqlens, document_mask, reference_attention

A = sys.modules["ops.attention"]  # the module: `ops.attention` itself names the function

LAYOUT = ([7, 100, 1, 33, 5], [33, 5, 1, 100, 7])  # two rows of documents, in different orders
N = 150  # each row: 146 real tokens, 4 padding


def random_layout(seed: int, n: int = N) -> list[list[int]]:
    """Two rows of documents of lengths 1, 7, 33, 100 and one random 2..8, shuffled; padding fills the end."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(2):
        lengths = [1, 7, 33, 100, int(torch.randint(2, 9, (1,), generator=g))]
        rows.append([lengths[i] for i in torch.randperm(5, generator=g).tolist()])
    return rows


def packed(layout=LAYOUT, n=N, device="cpu") -> torch.Tensor:
    """(B, n) doc ids: documents numbered 0.. in row order, then -1 padding."""
    rows = []
    for lengths in layout:
        ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
        rows.append(torch.cat([ids, torch.full((n - len(ids),), -1)]))
    return torch.stack(rows).to(device)


def qkv(b=2, h=4, hkv=4, n=N, d=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, h, n, d, generator=g, dtype=dtype),
        torch.randn(b, hkv, n, d, generator=g, dtype=dtype),
        torch.randn(b, hkv, n, d, generator=g, dtype=dtype),
    )


def brute_keep(doc, is_causal, window):
    """(B, N, N) bool from the definition, one pair at a time."""
    b, n = doc.shape
    left, right = window if window is not None else (-1, -1)
    keep = torch.zeros(b, n, n, dtype=torch.bool)
    for r in range(b):
        d = doc[r].tolist()
        for i in range(n):
            for j in range(n):
                ok = (d[i] == d[j] and d[j] >= 0) or i == j
                ok = ok and (not is_causal or j <= i)
                ok = ok and (left < 0 or j >= i - left) and (right < 0 or j <= i + right)
                keep[r, i, j] = ok
    return keep


@pytest.fixture(params=["per_doc", "mask"])
def path(request, monkeypatch):
    """Force the SDPA dispatch onto one of its two packed-row paths."""
    monkeypatch.setattr(A, "_per_document_cheaper", lambda *a: request.param == "per_doc")
    return request.param


def out_and_grads(fn, q, k, v, upstream):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    grads = torch.autograd.grad((out * upstream).sum(), (q, k, v))
    return (out.detach(), *grads)


def test_document_mask_and_cu_seqlens_follow_the_definition():
    small = packed(([1, 7, 20], [30, 3]), n=40)
    for is_causal in (False, True):
        for window in (None, (3, 5), (4, 0)):
            got = document_mask(small, is_causal, window)
            assert got.shape == (2, 1, 40, 40)
            assert torch.equal(got[:, 0], brute_keep(small, is_causal, window))
    doc = packed(n=152)
    cu, max_len = cu_seqlens(doc)
    expect = torch.tensor([0, 7, 107, 108, 141, 146, 179, 184, 185, 285, 292], dtype=torch.int32)
    assert cu.dtype == torch.int32 and torch.equal(cu, expect) and max_len == 100


def test_reference_matches_brute_force_softmax():
    q, k, v = qkv(hkv=2, n=40)
    doc = packed(([1, 7, 20], [30, 3]), n=40)
    for is_causal, window in ((False, None), (True, (5, 0)), (False, (4, 2))):
        keep = brute_keep(doc, is_causal, window)[:, None]  # (B, 1, N, N)
        kr, vr = k.double().repeat_interleave(2, 1), v.double().repeat_interleave(2, 1)
        logits = (q.double() @ kr.transpose(-1, -2) / 4.0).masked_fill(~keep, float("-inf"))
        expect = logits.softmax(-1) @ vr
        got = reference_attention(q, k, v, is_causal=is_causal, doc_ids=doc, window=window)
        torch.testing.assert_close(got.double(), expect, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("hkv", [4, 2, 1])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("window", [None, (8, 8), (6, 0), (0, 3)])
def test_sdpa_paths_match_reference(path, hkv, is_causal, window):
    q, k, v = qkv(hkv=hkv)
    doc = packed(random_layout(hkv))
    upstream = torch.randn(q.shape, generator=torch.Generator().manual_seed(5))
    got = out_and_grads(
        lambda *t: attention(*t, is_causal=is_causal, doc_ids=doc, window=window, backend="sdpa"),
        q,
        k,
        v,
        upstream,
    )
    ref = out_and_grads(
        lambda *t: reference_attention(*t, is_causal=is_causal, doc_ids=doc, window=window), q, k, v, upstream
    )
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("is_causal", [False, True])
def test_leakage_probe(path, is_causal):
    """Changing document A (row 0, doc 1: 100 tokens) leaves every other token's output untouched."""
    q, k, v = qkv(hkv=2)
    doc = packed()
    a = doc == 1
    a[1] = False
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for t in (q2, k2, v2):
        t.transpose(1, 2)[a] += 3.0 * torch.randn(t.transpose(1, 2)[a].shape)
    out1 = attention(q, k, v, is_causal=is_causal, doc_ids=doc, window=(20, 20))
    out2 = attention(q2, k2, v2, is_causal=is_causal, doc_ids=doc, window=(20, 20))
    others = ~a  # (B, N)
    diff = (out1 - out2).transpose(1, 2)[others].abs().max()
    assert diff <= 1e-7, diff
    assert (out1 - out2).transpose(1, 2)[a].abs().max() > 1e-2  # the probe did change document A


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("window", [None, (5, 5)])
def test_packed_equals_each_document_alone(path, is_causal, window):
    q, k, v = qkv(hkv=2, seed=3)
    doc = packed()
    upstream = torch.randn(q.shape, generator=torch.Generator().manual_seed(7))
    packed_res = out_and_grads(
        lambda *t: attention(*t, is_causal=is_causal, doc_ids=doc, window=window), q, k, v, upstream
    )
    for r in range(2):
        for d in doc[r].unique().tolist():
            if d < 0:
                continue
            sel = (doc[r] == d).nonzero().squeeze(1)
            alone = out_and_grads(
                lambda *t: attention(*t, is_causal=is_causal, window=window),
                *(t[r : r + 1, :, sel] for t in (q, k, v)),
                upstream[r : r + 1, :, sel],
            )
            for name, p, a in zip(("out", "dq", "dk", "dv"), packed_res, alone):
                torch.testing.assert_close(
                    p[r : r + 1, :, sel], a, atol=1e-5, rtol=1e-5, msg=f"{name} doc {d}"
                )


def test_no_real_token_attends_to_padding(path):
    q, k, v = qkv(hkv=2)
    doc = packed()
    pad = doc < 0  # (B, N)
    k2, v2 = k.clone(), v.clone()
    k2.transpose(1, 2)[pad] = 50.0
    v2.transpose(1, 2)[pad] = 1e4
    for is_causal in (False, True):
        out1 = attention(q, k, v, is_causal=is_causal, doc_ids=doc)
        out2 = attention(q, k2, v2, is_causal=is_causal, doc_ids=doc)
        assert torch.equal(out1.transpose(1, 2)[~pad], out2.transpose(1, 2)[~pad])
        # a padding query sees only itself: its output is its own (kv-group) v, finite
        own = v2.repeat_interleave(2, 1).transpose(1, 2)[pad]
        torch.testing.assert_close(out2.transpose(1, 2)[pad], own)


def test_old_calls_unchanged_and_gqa_without_documents():
    q, k, v = qkv(n=33)
    for is_causal in (False, True):
        assert torch.equal(
            attention(q, k, v, is_causal=is_causal),
            F.scaled_dot_product_attention(q, k, v, is_causal=is_causal),
        )
    q, k, v = qkv(h=6, hkv=2, n=20)
    expect = F.scaled_dot_product_attention(
        q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), is_causal=True
    )
    torch.testing.assert_close(attention(q, k, v, is_causal=True), expect, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(reference_attention(q, k, v, is_causal=True), expect, atol=1e-5, rtol=1e-5)
    # a window without documents, bottom-right aligned when there are fewer queries than keys
    q2 = q[:, :, -5:]
    keep = A.window_keep(5, 20, (3, 0), q.device)
    expect = F.scaled_dot_product_attention(q2, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), keep)
    torch.testing.assert_close(attention(q2, k, v, window=(3, 0)), expect, atol=1e-6, rtol=1e-6)
    assert keep[-1].nonzero().squeeze(1).tolist() == [16, 17, 18, 19]


def test_large_row_takes_the_per_document_path_without_a_mask(monkeypatch):
    """At N=16384 the dispatch must not build the (N, N) mask; the output still matches per-document calls."""

    def no_mask(*a, **kw):
        raise AssertionError("document_mask built on a long row")

    monkeypatch.setattr(A, "document_mask", no_mask)
    n, g = 16384, torch.Generator().manual_seed(0)
    lengths = []
    while sum(lengths) < n - 300:
        lengths.append(int(torch.randint(1, 300, (1,), generator=g)))
    doc = packed([lengths], n=n)
    q, k, v = (t.requires_grad_() for t in qkv(b=1, h=2, hkv=1, n=n, d=8))
    out = attention(q, k, v, is_causal=True, doc_ids=doc)
    out.square().sum().backward()
    assert torch.isfinite(k.grad).all()
    s = sum(lengths[:3])
    sl = slice(s, s + lengths[3])
    alone = attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], is_causal=True)
    torch.testing.assert_close(out[:, :, sl], alone, atol=1e-5, rtol=1e-5)


def test_errors_name_the_argument():
    q, k, v = qkv(n=10)
    doc = packed(([4, 6], [10]), n=10)
    with pytest.raises(ValueError, match="doc_ids"):
        attention(q, k, v, doc_ids=doc[:, :5])
    with pytest.raises(ValueError, match="doc_ids"):
        attention(q, k, v, doc_ids=doc.float())
    with pytest.raises(ValueError, match="doc_ids"):
        attention(q, torch.cat([k, k], 2), torch.cat([v, v], 2), doc_ids=doc)
    with pytest.raises(ValueError, match="doc_ids.*contiguous"):
        attention(q, k, v, doc_ids=torch.tensor([[0, 0, 1, 1, 0, 0, 2, 2, 2, 2], [0] * 10]))
    with pytest.raises(ValueError, match="k heads"):
        attention(q, k[:, :3], v[:, :3])
    with pytest.raises(ValueError, match="k heads"):
        reference_attention(q, k[:, :3], v[:, :3])
    with pytest.raises(ValueError, match="window"):
        attention(q, k, v, window=(4,))
    with pytest.raises(ValueError, match="window"):
        attention(q, k, v, window=(-2, 0))


def test_dropout_runs_through_the_per_document_path(path):
    q, k, v = (t.requires_grad_() for t in qkv(hkv=2))
    out = attention(q, k, v, is_causal=True, doc_ids=packed(), dropout_p=0.5)
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(v.grad).all()


@pytest.mark.slow
def test_32k_row_of_short_documents_is_not_quadratic_in_memory():
    """A 32768-token row of short documents, fwd+bwd, in a fresh process: peak RSS stays far below the 1 GiB
    one (N, N) bool mask alone would take (4 GiB per head for fp32 scores). The peak is the process's own
    VmHWM: getrusage's ru_maxrss in a child of a large process reports the parent's peak (Python spawns with
    vfork, and exec keeps the old memory's high-water mark), which failed this test once pytest itself had grown
    past 1 GiB."""
    code = textwrap.dedent(
        """
        import torch
        from ops import attention
        n = 32768
        doc = torch.arange(n) // 500
        q, k, v = (torch.randn(1, 2, n, 32, requires_grad=True) for _ in range(3))
        attention(q, k, v, is_causal=True, doc_ids=doc[None]).sum().backward()
        hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
        print(int(hwm.split()[1]) // 1024)  # kB -> MiB
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    peak_mib = int(res.stdout.strip().splitlines()[-1])
    assert peak_mib < 1024, peak_mib


@pytest.mark.gpu
@pytest.mark.skipif(not A.flash_available(), reason="needs CUDA and flash-attn")
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("window", [None, (16, 16), (31, 0)])
def test_flash_varlen_matches_reference(is_causal, window):
    q, k, v = (t.cuda().bfloat16() for t in qkv(h=4, hkv=2, d=64))
    doc = packed(device="cuda")
    upstream = torch.randn(q.shape, device="cuda").bfloat16()
    got = out_and_grads(
        lambda *t: attention(*t, is_causal=is_causal, doc_ids=doc, window=window, backend="flash"),
        q,
        k,
        v,
        upstream,
    )
    ref = out_and_grads(
        lambda *t: reference_attention(*t, is_causal=is_causal, doc_ids=doc, window=window), q, k, v, upstream
    )
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        torch.testing.assert_close(
            a.float(), b.float(), atol=3e-2, rtol=3e-2, msg=lambda m, name=name: f"{name}: {m}"
        )
