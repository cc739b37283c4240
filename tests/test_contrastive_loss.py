"""Distributed contrastive losses against a plain single-process float64 reference of the global batch.

W = 2 and W = 3 gloo ranks (forked, with a deadline so a hang fails) each take a shard of one fixed global batch
(N = 12) through a tiny Linear + L2-normalise front end into the loss. Per case: the mean of the rank losses
equals the reference loss; the Linear weight gradients, averaged over ranks as DDP does, equal the reference's;
the raw feature gradient on every rank is exactly W × the reference's (the sum of all ranks' losses, pinned so a
silent 1/W would fail); the scale and bias gradients, averaged over ranks, equal the reference's. All to 1e-12.
The references below are written out (full matrices, FILIP by loops over pairs), never through the module.
"""

from __future__ import annotations

import functools
import math
import socket
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from pretrain.objectives.contrastive_loss import ClipLoss, FilipLoss, SigLipLoss

TOL = dict(rtol=0.0, atol=1e-12)
N, D, E, N1, N2 = 12, 5, 4, 3, 5  # global batch, input width, embed width, image tokens, text tokens

# name -> (kind, module factory, uses bias, uses an image mask)
CASES = {
    "clip_local": ("clip", lambda: ClipLoss(local_loss=True), False, False),
    "clip_local_bias": ("clip", lambda: ClipLoss(local_loss=True), True, False),
    "clip_global": ("clip", lambda: ClipLoss(local_loss=False), True, False),
    "clip_local_chunked": ("clip", lambda: ClipLoss(local_loss=True, chunk_size=4), True, False),  # b=6: 4+2
    "siglip_ring": ("siglip", lambda: SigLipLoss("ring"), True, False),
    "siglip_gather": ("siglip", lambda: SigLipLoss("gather"), True, False),
    "siglip_ring_chunked": ("siglip", lambda: SigLipLoss("ring", chunk_size=3), True, False),  # b=4: 3+1
    "siglip_gather_chunked": ("siglip", lambda: SigLipLoss("gather", chunk_size=4), True, False),  # b=6: 4+2
    "filip": ("filip", lambda: FilipLoss(), False, False),
    "filip_chunked": ("filip", lambda: FilipLoss(chunk_size=5), False, True),  # N=12: 5+5+2
}


def global_batch(n: int = N, seed: int = 0) -> dict:
    """Raw inputs of the two towers, their Linear weights, scale, bias and masks (varied text lengths, some
    dropped patches). Pad positions hold random values too, so only masking can keep them out."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, N2 + 1, (n,), generator=g)
    lengths[:2] = torch.tensor([1, N2])  # a one-token caption and a full one
    keep = torch.rand(n, N1, generator=g) < 0.7
    keep[torch.arange(n), torch.randint(0, N1, (n,), generator=g)] = True  # at least one patch per image
    return {
        "img": torch.randn(n, D, generator=g, dtype=torch.float64),
        "txt": torch.randn(n, D, generator=g, dtype=torch.float64),
        "img_tok": torch.randn(n, N1, D, generator=g, dtype=torch.float64),
        "txt_tok": torch.randn(n, N2, D, generator=g, dtype=torch.float64),
        "text_mask": torch.arange(N2)[None, :] < lengths[:, None],  # (n, N2)
        "image_mask": keep,  # (n, N1)
        "w_img": torch.randn(E, D, generator=g, dtype=torch.float64),
        "w_txt": torch.randn(E, D, generator=g, dtype=torch.float64),
        "scale": torch.tensor(3.7, dtype=torch.float64),
        "bias": torch.tensor(-2.3, dtype=torch.float64),
    }


def front_end(batch: dict, kind: str, lo: int, hi: int):
    """Fresh leaves (weights, scale, bias) and the L2-normalised features of samples lo:hi (grads retained)."""
    leaves = {k: batch[k].clone().requires_grad_() for k in ("w_img", "w_txt", "scale", "bias")}
    suffix = "_tok" if kind == "filip" else ""
    img = F.normalize(batch["img" + suffix][lo:hi] @ leaves["w_img"].T, dim=-1)  # (b, E) or (b, N1, E)
    txt = F.normalize(batch["txt" + suffix][lo:hi] @ leaves["w_txt"].T, dim=-1)  # (b, E) or (b, N2, E)
    img.retain_grad()
    txt.retain_grad()
    return leaves, img, txt


def grads(loss: torch.Tensor, leaves: dict, img: torch.Tensor, txt: torch.Tensor) -> dict:
    loss.backward()
    out = {k: v.grad.clone() for k, v in leaves.items() if v.grad is not None}
    return {"loss": loss.detach(), "img": img.grad.clone(), "txt": txt.grad.clone(), **out}


# ---------------------------------------------------------------------------------------------- references


def ce_rows(logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows of −log softmax at the diagonal."""
    return (torch.logsumexp(logits, 1) - logits.diagonal()).mean()


def ref_clip(img, txt, scale, bias):
    logits = scale * img @ txt.T + bias  # (N, N)
    return 0.5 * (ce_rows(logits) + ce_rows(logits.T))


def ref_siglip(img, txt, scale, bias):
    logits = scale * img @ txt.T + bias  # (N, N)
    z = 2 * torch.eye(len(img), dtype=logits.dtype) - 1
    return -F.logsigmoid(z * logits).sum() / len(img)


def ref_filip(img_tok, txt_tok, text_mask, scale, image_mask):
    """Pair by pair over the valid tokens only (no masking tricks)."""
    n = len(img_tok)
    xs = [img_tok[i][image_mask[i]] for i in range(n)]  # (n1_i, E)
    ys = [txt_tok[j][text_mask[j]] for j in range(n)]  # (n2_j, E)
    s_i2t = torch.stack(
        [torch.stack([(xs[i] @ ys[j].T).max(1).values.mean() for j in range(n)]) for i in range(n)]
    )
    s_t2i = torch.stack(
        [torch.stack([(ys[i] @ xs[j].T).max(1).values.mean() for j in range(n)]) for i in range(n)]
    )
    return 0.5 * (ce_rows(scale * s_i2t) + ce_rows(scale * s_t2i))


def image_mask_for(batch: dict, uses_mask: bool, lo: int, hi: int) -> torch.Tensor:
    return batch["image_mask"][lo:hi] if uses_mask else torch.ones(hi - lo, N1, dtype=torch.bool)


def reference(case: str, batch: dict) -> dict:
    kind, _, uses_bias, uses_mask = CASES[case]
    n = len(batch["img"])
    leaves, img, txt = front_end(batch, kind, 0, n)
    bias = leaves["bias"] if uses_bias else 0.0
    if kind == "clip":
        loss = ref_clip(img, txt, leaves["scale"], bias)
    elif kind == "siglip":
        loss = ref_siglip(img, txt, leaves["scale"], bias)
    else:
        mask = image_mask_for(batch, uses_mask, 0, n)
        loss = ref_filip(img, txt, batch["text_mask"], leaves["scale"], mask)
    return grads(loss, leaves, img, txt)


def run_case(case: str, batch: dict, rank: int, world: int) -> dict:
    """This rank's shard through the module under test; raw grads of the local features and leaves."""
    kind, make, uses_bias, uses_mask = CASES[case]
    b = len(batch["img"]) // world
    lo, hi = rank * b, (rank + 1) * b
    leaves, img, txt = front_end(batch, kind, lo, hi)
    if kind == "filip":
        mask = image_mask_for(batch, uses_mask, lo, hi) if uses_mask else None
        loss = make()(img, txt, batch["text_mask"][lo:hi], leaves["scale"], image_mask=mask)
    else:
        loss = make()(img, txt, leaves["scale"], leaves["bias"] if uses_bias else None)
    return grads(loss, leaves, img, txt)


# ---------------------------------------------------------------------------------------------- multi-rank


def _worker(rank: int, world: int, port: int, out: str) -> None:
    try:
        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=60),
        )
        batch = global_batch()
        results = {}
        for case in CASES:
            r = run_case(case, batch, rank, world)
            for key in ("w_img", "w_txt", "scale", "bias"):  # what DDP does to replicated parameters
                if key in r:
                    dist.all_reduce(r[key])
                    r[key] /= world
            results[case] = r
        torch.save(results, Path(out) / f"rank{rank}.pt")
        dist.destroy_process_group()
    except BaseException:
        (Path(out) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@functools.cache
def distributed_results(world: int, deadline_s: float = 120.0) -> list[dict]:
    """Every case on `world` forked gloo ranks in one go; per rank the results dict. A hang fails at the deadline."""
    ctx = torch.multiprocessing.get_context("fork")
    with tempfile.TemporaryDirectory() as out:
        port = _free_port()
        procs = [ctx.Process(target=_worker, args=(r, world, port, out)) for r in range(world)]
        for p in procs:
            p.start()
        end = time.monotonic() + deadline_s
        for p in procs:
            p.join(max(0.0, end - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        errors = "\n".join(f.read_text() for f in sorted(Path(out).glob("*.err")))
        assert not hung, f"ranks {hung} of {world} still running after {deadline_s} s (hang)\n{errors}"
        assert all(p.exitcode == 0 for p in procs), f"exit codes {[p.exitcode for p in procs]}\n{errors}"
        return [torch.load(Path(out) / f"rank{r}.pt") for r in range(world)]


def check_against_reference(case: str, ranks: list[dict]) -> None:
    world = len(ranks)
    ref = reference(case, global_batch())
    loss = sum(r["loss"] for r in ranks) / world
    torch.testing.assert_close(loss, ref["loss"], **TOL, msg=f"{case}: mean rank loss vs global reference")
    for key in ("w_img", "w_txt", "scale", "bias"):
        if key in ref:
            torch.testing.assert_close(ranks[0][key], ref[key], **TOL, msg=f"{case}: DDP-mean grad of {key}")
    b = N // world
    for rank, r in enumerate(ranks):
        for key in ("img", "txt"):
            want = ref[key][rank * b : (rank + 1) * b]
            factor = (r[key] * want).sum() / (want * want).sum()
            assert abs(factor.item() - world) < 1e-12, (
                f"{case}: {key} feature-grad factor {factor} != W = {world}"
            )
            torch.testing.assert_close(
                r[key], world * want, **TOL, msg=f"{case}: rank {rank} {key} feature grad"
            )


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("world", [2, 3])
def test_distributed_loss_matches_global_batch_reference(world, case):
    check_against_reference(case, [r[case] for r in distributed_results(world)])


# ---------------------------------------------------------------------------------------------- single process


@pytest.mark.parametrize("case", list(CASES))
def test_single_process_is_the_plain_global_loss(case):
    check_against_reference(case, [run_case(case, global_batch(), 0, 1)])


def _leaves(n: int, seed: int, *shapes):
    g = torch.Generator().manual_seed(seed)
    return [
        F.normalize(torch.randn(n, *s, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
        for s in shapes
    ]


def _loss_and_grads(fn, *tensors):
    tensors = [t.detach().clone().requires_grad_(t.requires_grad) for t in tensors]
    loss = fn(*tensors)
    loss.backward()
    return [loss.detach()] + [t.grad for t in tensors if t.requires_grad]


@pytest.mark.parametrize("impl", ["ring", "gather"])
def test_siglip_chunked_equals_unchunked(impl):
    x, y = _leaves(7, 1, (E,), (E,))
    scale = torch.tensor(11.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-4.0, dtype=torch.float64, requires_grad=True)
    want = _loss_and_grads(SigLipLoss(impl), x, y, scale, bias)
    for chunk in (1, 3, 7, 10):  # 3: uneven last chunk (3 + 3 + 1)
        got = _loss_and_grads(SigLipLoss(impl, chunk_size=chunk), x, y, scale, bias)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, **TOL, msg=f"chunk {chunk}")
    # without a bias as well
    want = _loss_and_grads(lambda *t: SigLipLoss(impl)(*t), x, y, scale)
    torch.testing.assert_close(_loss_and_grads(SigLipLoss(impl, chunk_size=3), x, y, scale), want, **TOL)


def test_siglip_chunked_is_exact_for_large_logits():
    """Logits well above 20, where F.softplus turns linear (2e-9 off), still match the log-sigmoid form."""
    x, y = _leaves(5, 2, (E,), (E,))
    scale = torch.tensor(60.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(5.0, dtype=torch.float64, requires_grad=True)
    want = _loss_and_grads(SigLipLoss(), x, y, scale, bias)
    for a, b in zip(_loss_and_grads(SigLipLoss(chunk_size=2), x, y, scale, bias), want):
        torch.testing.assert_close(a, b, **TOL)
    torch.testing.assert_close(want[0], ref_siglip(x, y, scale, bias), **TOL)


def test_clip_chunked_equals_unchunked():
    x, y = _leaves(7, 1, (E,), (E,))
    scale = torch.tensor(11.0, dtype=torch.float64, requires_grad=True)
    want = _loss_and_grads(ClipLoss(), x, y, scale)
    for chunk in (1, 3, 7, 10):  # 3: uneven last chunk (3 + 3 + 1)
        got = _loss_and_grads(ClipLoss(chunk_size=chunk), x, y, scale)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, **TOL, msg=f"chunk {chunk}")
    with pytest.raises(ValueError, match="local_loss"):
        ClipLoss(local_loss=False, chunk_size=2)


def test_filip_chunked_equals_unchunked():
    batch = global_batch(7, seed=3)
    x, y = _leaves(7, 3, (N1, E), (N2, E))
    scale = torch.tensor(5.0, dtype=torch.float64, requires_grad=True)
    tmask, imask = batch["text_mask"], batch["image_mask"]
    want = _loss_and_grads(lambda a, b, s: FilipLoss()(a, b, tmask, s, image_mask=imask), x, y, scale)
    torch.testing.assert_close(want[0], ref_filip(x, y, tmask, scale, imask), **TOL)
    for chunk in (1, 3, 7, 10):
        fn = functools.partial(FilipLoss(chunk_size=chunk), text_mask=tmask, image_mask=imask)
        got = _loss_and_grads(lambda a, b, s, fn=fn: fn(a, b, scale=s), x, y, scale)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, **TOL, msg=f"chunk {chunk}")


@pytest.mark.parametrize("chunk", [0, 2])
def test_filip_pad_tokens_are_inert(chunk):
    """Pad text tokens and dropped patches replaced by large random values: same loss and real-token gradients,
    and exactly zero gradient on every pad token."""
    batch = global_batch(6, seed=4)
    tmask, imask = batch["text_mask"], batch["image_mask"]
    assert (~tmask).any() and (~imask).any()
    x, y = _leaves(6, 4, (N1, E), (N2, E))
    g = torch.Generator().manual_seed(5)
    x_junk = torch.where(imask[..., None], x.detach(), 1e3 * torch.randn(x.shape, generator=g, dtype=x.dtype))
    y_junk = torch.where(tmask[..., None], y.detach(), 1e3 * torch.randn(y.shape, generator=g, dtype=y.dtype))
    scale = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
    fn = FilipLoss(chunk_size=chunk)

    def run(a, b):
        return _loss_and_grads(lambda p, q, s: fn(p, q, tmask.long(), s, image_mask=imask), a, b, scale)

    clean, junk = run(x, y), run(x_junk.requires_grad_(), y_junk.requires_grad_())
    torch.testing.assert_close(junk[0], clean[0], **TOL)
    torch.testing.assert_close(junk[3], clean[3], **TOL)  # scale
    torch.testing.assert_close(junk[1][imask], clean[1][imask], **TOL)
    torch.testing.assert_close(junk[2][tmask], clean[2][tmask], **TOL)
    assert junk[1][~imask].eq(0).all() and junk[2][~tmask].eq(0).all()
    assert clean[1][imask].abs().sum() > 0 and clean[2][tmask].abs().sum() > 0


def test_all_pairs_sanity():
    """Orthonormal, perfectly aligned pairs with a large scale: every loss near 0; scale 0: the uniform values
    (log N for CLIP, N·log 2 for SigLIP); a shuffled pairing: a large loss."""
    n = 4
    eye = torch.eye(n, dtype=torch.float64)  # n orthonormal features in E = n
    big, zero = torch.tensor(100.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)
    assert ClipLoss()(eye, eye, big) < 1e-30
    assert SigLipLoss()(eye, eye, big, torch.tensor(-50.0, dtype=torch.float64)) < 1e-18
    tok = eye[:, None, :].expand(n, 3, n)  # every token of pair i is e_i
    assert FilipLoss()(tok, tok, torch.ones(n, 3, dtype=torch.bool), big) < 1e-30
    torch.testing.assert_close(ClipLoss()(eye, eye, zero), torch.tensor(math.log(n), dtype=torch.float64))
    torch.testing.assert_close(
        SigLipLoss()(eye, eye, zero, zero), torch.tensor(n * math.log(2), dtype=torch.float64)
    )
    shuffled = eye[[1, 2, 3, 0]]
    assert ClipLoss()(eye, shuffled, big) > 50 and SigLipLoss()(eye, shuffled, big, zero) > 50


def test_bad_inputs_are_named():
    x = torch.randn(4, E)
    with pytest.raises(ValueError, match=r"same batch size b and width E.*\(4, 4\).*\(3, 4\)"):
        ClipLoss()(x, x[:3], 1.0)
    with pytest.raises(ValueError, match=r"must be \(b, E\)"):
        SigLipLoss()(x[None], x[None], 1.0)
    with pytest.raises(ValueError, match="impl"):
        SigLipLoss("bidir")
    with pytest.raises(ValueError, match="chunk_size"):
        SigLipLoss(chunk_size=-1)
    with pytest.raises(ValueError, match="chunk_size"):
        FilipLoss(chunk_size=1.5)
    tok = torch.randn(2, 3, E)
    mask = torch.tensor([[True, False, False], [False, False, False]])
    with pytest.raises(ValueError, match=r"text_mask has no valid token in local rows \[1\]"):
        FilipLoss()(tok, tok, mask, 1.0)
    with pytest.raises(ValueError, match=r"text_mask must be \(b, n\) = \(2, 3\)"):
        FilipLoss()(tok, tok, mask[:, :2], 1.0)
