"""Chunked linear attention (none / retention / gla) against the token-by-token recurrence it is defined by."""

import pytest
import torch
import torch.nn.functional as F

from ops.linear_attention import (
    linear_attention,
    linear_attention_flops,
    recurrent_linear_attention,
    retention_gammas,
)

MODES = ("none", "retention", "gla")


def inputs(mode, b=2, h=3, t=65, dk=8, dv=12, dtype=torch.float64, seed=0, gate_scale=1.0):
    """q, k, v, g (gla only: logsigmoid gates times gate_scale, <= 0) and an initial state, all leaves."""
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(b, h, t, dk, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(b, h, t, dv, generator=gen, dtype=torch.float64)
    g = F.logsigmoid(torch.randn(b, h, t, dk, generator=gen, dtype=torch.float64)) * gate_scale
    h0 = torch.randn(b, h, dk, dv, generator=gen, dtype=torch.float64)
    out = {"q": q, "k": k, "v": v, "g": g if mode == "gla" else None, "initial_state": h0}
    return {n: None if x is None else x.to(dtype).requires_grad_() for n, x in out.items()}


def rel(a, b) -> float:
    """Relative RMS error ||a - b|| / ||b|| in fp64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def run(fn, args, mode, seed=1, **kw):
    """Output, final state and the gradients of every input under a random upstream gradient of both."""
    o, s = fn(**args, mode=mode, return_state=True, **kw)
    gen = torch.Generator().manual_seed(seed)
    do = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype)
    ds = torch.randn(s.shape, generator=gen, dtype=torch.float64).to(s.dtype)
    leaves = {n: x for n, x in args.items() if x is not None}
    grads = torch.autograd.grad((o * do).sum() + (s * ds).sum(), list(leaves.values()))
    return {"o": o, "state": s, **{f"d{n}": gr for n, gr in zip(leaves, grads)}}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("t", [1, 63, 64, 65, 257])
@pytest.mark.parametrize("chunk", [16, 64])
def test_chunked_matches_recurrent(mode, t, chunk):
    ref = run(recurrent_linear_attention, inputs(mode, t=t), mode)  # fp64 definition
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        args = inputs(mode, t=t, dtype=dtype)
        got = run(linear_attention, args, mode, chunk_size=chunk)
        assert got["o"].dtype == dtype and got["state"].dtype == dtype
        for name in ref:
            err = rel(got[name], ref[name])
            assert err <= tol, f"{dtype} {name}: relative error {err:.2e}"


def test_recurrence_is_the_definition():
    """The reference against the formula written out for one head, token by token, with numbers small enough
    to follow: S_t = Diag(alpha_t) S_{t-1} + k_t^T v_t, o_t = q_t S_t / sqrt(dk)."""
    args = inputs("gla", b=1, h=1, t=4, dk=2, dv=3)
    out = recurrent_linear_attention(**args, mode="gla")
    q, k, v, g = (args[n][0, 0].detach() for n in "qkvg")
    s = args["initial_state"][0, 0].detach()
    for t in range(4):
        s = torch.exp(g[t])[:, None] * s + torch.outer(k[t], v[t])
        torch.testing.assert_close(out[0, 0, t], (q[t] / 2**0.5) @ s, rtol=1e-12, atol=1e-12)
    gam = retention_gammas(3)
    torch.testing.assert_close(gam, torch.tensor([1 - 1 / 32, 1 - 1 / 64, 1 - 1 / 128]))
    # retention == gla with constant gates log(gamma_h); none == gla with zero gates
    args = inputs("retention", h=3, t=9)
    del args["g"]
    g_ret = torch.log(gam).double()[None, :, None, None].expand(2, 3, 9, 8)
    torch.testing.assert_close(
        recurrent_linear_attention(**args, mode="retention"),
        recurrent_linear_attention(**args, mode="gla", g=g_ret),
    )
    torch.testing.assert_close(
        recurrent_linear_attention(**args, mode="none"),
        recurrent_linear_attention(**args, mode="gla", g=torch.zeros_like(g_ret)),
    )


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck(mode):
    args = inputs(mode, b=1, h=2, t=7, dk=3, dv=2)
    doc = torch.tensor([[0, 0, 0, 1, 1, 1, -1]])
    names = [n for n, x in args.items() if x is not None]

    def fn(*xs):
        kw = dict(zip(names, xs))
        return linear_attention(**kw, mode=mode, chunk_size=4, doc_ids=doc, return_state=True)

    assert torch.autograd.gradcheck(fn, [args[n] for n in names])


def test_gla_sub_chunks_gradcheck():
    """A 32-token chunk cuts into two 16-token sub-chunks: the renormalised off-diagonal matmul is checked too."""
    args = inputs("gla", b=1, h=1, t=36, dk=2, dv=2)
    names = ["q", "k", "v", "g", "initial_state"]

    def fn(*xs):
        return linear_attention(**dict(zip(names, xs)), mode="gla", chunk_size=32, return_state=True)

    assert torch.autograd.gradcheck(fn, [args[n] for n in names], fast_mode=True)


def packed_ids(t=150):
    """Row 0: documents 0 (40), 1 (1), 2 (70), padding; row 1: padding (3), 7 (100), 9 (the rest, with 5
    padding tokens inside it at 120: padding is transparent, so document 9 continues after them)."""
    doc = torch.full((2, t), -1)
    doc[0, :40], doc[0, 40], doc[0, 41:111] = 0, 1, 2
    doc[1, 3:103], doc[1, 103:120], doc[1, 125:] = 7, 9, 9
    return doc


@pytest.mark.parametrize("mode", MODES)
def test_varlen_equals_each_document_alone(mode):
    doc = packed_ids()
    args = inputs(mode, t=doc.shape[1], seed=4)
    got = run(linear_attention, args, mode, chunk_size=32, doc_ids=doc)
    ref = run(recurrent_linear_attention, args, mode, doc_ids=doc)
    for name in ref:
        assert rel(got[name], ref[name]) <= 1e-10, name
    o, state = got["o"], got["state"]
    assert torch.equal(o.transpose(1, 2)[doc < 0], torch.zeros_like(o.transpose(1, 2)[doc < 0]))
    for r in range(2):
        first = True
        for d in dict.fromkeys(doc[r].tolist()):  # documents in row order
            if d < 0:
                continue
            sel = (doc[r] == d).nonzero().squeeze(1)
            part = {
                n: None if x is None else x[r : r + 1, :, sel]
                for n, x in args.items()
                if n != "initial_state"
            }
            h0 = (
                args["initial_state"][r : r + 1] if first else None
            )  # the row's first document gets the state
            alone, s_alone = recurrent_linear_attention(
                **part, mode=mode, initial_state=h0, return_state=True
            )
            assert rel(o[r : r + 1, :, sel], alone) <= 1e-10, (r, d)
            first = False
        assert rel(state[r : r + 1], s_alone) <= 1e-10  # trailing padding leaves the state untouched


@pytest.mark.parametrize("mode", MODES)
def test_padding_leaves_no_trace(mode):
    doc = packed_ids()
    args = inputs(mode, t=doc.shape[1], seed=5)
    base, s_base = linear_attention(**args, mode=mode, doc_ids=doc, return_state=True)
    pert = {n: None if x is None else x.detach().clone() for n, x in args.items()}
    for n in ("q", "k", "v", "g"):
        if pert[n] is not None:
            pert[n].transpose(1, 2)[doc < 0] = -3.0 if n == "g" else 100.0
    out, s_out = linear_attention(**pert, mode=mode, doc_ids=doc, return_state=True)
    real = doc >= 0
    assert torch.equal(out.transpose(1, 2)[real], base.transpose(1, 2)[real])
    assert torch.equal(s_out, s_base)
    grads = torch.autograd.grad(base.square().sum(), [args["q"], args["k"], args["v"]])
    for gr in grads:
        assert gr.transpose(1, 2)[~real].abs().max() == 0


@pytest.mark.parametrize("mode", MODES)
def test_streaming_split_equals_one_call(mode):
    doc = packed_ids(160)
    args = inputs(mode, t=160, seed=6)
    one, s_one = linear_attention(**args, mode=mode, doc_ids=doc, chunk_size=16, return_state=True)
    for split in (50, 64, 130):  # inside documents 2 and 7, and inside row 0's padding / document 9
        first = {n: None if x is None else x[:, :, :split] for n, x in args.items() if n != "initial_state"}
        rest = {n: None if x is None else x[:, :, split:] for n, x in args.items() if n != "initial_state"}
        o1, s1 = linear_attention(
            **first,
            mode=mode,
            initial_state=args["initial_state"],
            doc_ids=doc[:, :split],
            chunk_size=16,
            return_state=True,
        )
        o2, s2 = linear_attention(
            **rest, mode=mode, initial_state=s1, doc_ids=doc[:, split:], chunk_size=16, return_state=True
        )
        assert rel(torch.cat([o1, o2], 2), one) <= 1e-10 and rel(s2, s_one) <= 1e-10, split


@pytest.mark.parametrize(
    "mode, gate_scale", [("retention", 1.0), ("gla", 5.0), ("gla", 1 / 16), ("none", 1.0)]
)
def test_long_sequence_fp32_is_stable(mode, gate_scale):
    """T=4096 in fp32 (gla gates down to about -5 per step): finite, and within 1e-4 of the fp64 chunked result."""
    args = inputs(mode, b=1, h=2, t=4096, dk=16, dv=16, gate_scale=gate_scale, seed=7)
    if gate_scale > 1:
        assert args["g"].min() < -5
    o64, s64 = linear_attention(**args, mode=mode, return_state=True)
    o32, s32 = linear_attention(
        **{n: None if x is None else x.float() for n, x in args.items()}, mode=mode, return_state=True
    )
    assert torch.isfinite(o32).all() and torch.isfinite(s32).all()
    assert rel(o32, o64) <= 1e-4 and rel(s32, s64) <= 1e-4


def test_factorised_form_overflows_where_the_chunk_local_form_does_not():
    """Why every exponent is kept <= 0: (q e^b)(k e^-b)^T with b the cumulative log-gate over a 64-token chunk
    at -5 per step needs e^320, which is inf in fp32, and inf * 0 poisons the scores with NaN."""
    args = inputs("gla", b=1, h=1, t=64, dk=4, dv=4, dtype=torch.float32)
    q, k, v = (args[n].detach() for n in "qkv")
    g = torch.full_like(q, -5.0)
    b = g.cumsum(-2)
    factorised = (q * b.exp()) @ (k * (-b).exp()).transpose(-1, -2)
    assert not torch.isfinite(factorised).all()
    assert torch.isfinite(linear_attention(q, k, v, mode="gla", g=g)).all()


def test_low_precision_inputs_keep_fp32_state():
    args = {n: None if x is None else x.detach().bfloat16() for n, x in inputs("gla", t=70).items()}
    args["initial_state"] = args["initial_state"].float()
    o, s = linear_attention(**args, mode="gla", return_state=True)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    ref = recurrent_linear_attention(
        **{n: None if x is None else x.double() for n, x in args.items()}, mode="gla"
    )
    assert rel(o, ref) <= 2e-2


def test_flops_hand_count():
    # B=1, H=1, N=128, dk=dv=64, C=64: 2 chunks x (QK^T 2*64*64*64 + AV 2*64*64*64 + state read/write 4*64*64*64)
    assert linear_attention_flops(1, 1, 128, 64, 64, 64) == 2 * (524288 + 524288 + 1048576)
    # a 65-token row is two chunks, the second padded; dk != dv; batch and heads multiply
    one = 2 * 16 * 16 * (8 + 4) + 4 * 16 * 8 * 4
    assert linear_attention_flops(3, 2, 17, 8, 4, 16) == 3 * 2 * 2 * one
    # per token: 2 C (dk + dv) + 4 dk dv
    assert linear_attention_flops(1, 1, 640, 32, 48, 64) == 640 * (2 * 64 * (32 + 48) + 4 * 32 * 48)


def test_errors_name_the_argument():
    a = {n: x.detach() for n, x in inputs("gla", b=1, h=2, t=5, dk=4, dv=3).items()}
    q, k, v, g, h0 = a["q"], a["k"], a["v"], a["g"], a["initial_state"]
    cases = [
        ("mode", dict(mode="mamba")),
        ("g", dict(mode="gla")),
        ("g", dict(mode="gla", g=g[..., :2])),
        ("g", dict(mode="gla", g=-g)),
        ("g", dict(mode="none", g=g)),
        ("gamma", dict(mode="retention", gamma=torch.tensor([0.9]))),
        ("gamma", dict(mode="retention", gamma=torch.tensor([0.9, 1.5]))),
        ("gamma", dict(mode="none", gamma=torch.tensor([0.9, 0.9]))),
        ("chunk_size", dict(chunk_size=0)),
        ("initial_state", dict(initial_state=h0[..., :2])),
        ("doc_ids", dict(doc_ids=torch.zeros(1, 4, dtype=torch.long))),
        ("doc_ids", dict(doc_ids=torch.zeros(1, 5))),
    ]
    for fn in (linear_attention, recurrent_linear_attention):
        for name, kw in cases:
            with pytest.raises(ValueError, match=name):
                fn(q, k, v, **kw)
        with pytest.raises(ValueError, match="dk"):
            fn(q, k[..., :2], v)
