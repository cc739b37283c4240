"""CrossViT: the cross-attention fusion against a plain-torch definition from the paper, and the whole model against
timm's `crossvit_*_240` (transformers has no CrossViT) through the key map in models/crossvit_timm.py."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models import create_model
from models.crossvit import CrossAttentionFusion, CrossViT
from models.crossvit_timm import (
    crossvit_from_timm_state_dict,
    crossvit_to_timm_state_dict,
    from_timm,
    timm_kwargs,
    to_timm,
)
from ops.compat import import_timm

timm = import_timm()  # the test-only reference (installed outside site-packages by scripts/setup.sh)
CrossVit = timm.models.crossvit.CrossVit


def trained_like(module: nn.Module, seed: int = 1) -> nn.Module:
    """Perturb every weight (unit LayerNorms, zero biases, equal init tokens), so parity cannot pass by init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return module.eval()


# --- the cross-attention fusion --------------------------------------------------------------------------------


def reference_fusion(f: CrossAttentionFusion, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Paper eqs. 5-7 with one loop over heads: x'_cls = f(x_cls) (LN, GELU, Linear into the other width);
    z = [x'_cls || patches_o]; per head h: q = x'_cls W_q^h, k = z W_k^h, v = z W_v^h (on LN(z)),
    A = softmax(q k^T / sqrt(C/h)); y = x'_cls + W_o [A_1 v_1, ..., A_H v_H]; the new cls token is g(y)."""

    def ln(t, m):
        return F.layer_norm(t, (t.shape[-1],), m.weight, m.bias, m.eps)

    def lin(t, m):
        return t @ m.weight.T + (m.bias if m.bias is not None else 0)

    a = f.attn
    cls = lin(F.gelu(ln(x[:, :1], f.proj.norm)), f.proj.fc)  # (B, 1, C)
    z = ln(torch.cat([cls, other[:, 1:]], 1), f.norm)  # (B, 1 + M, C)
    hd = z.shape[-1] // a.num_heads
    heads = []
    for h in range(a.num_heads):
        cols = slice(h * hd, (h + 1) * hd)
        q = lin(z[:, :1], a.q)[..., cols]  # (B, 1, hd)
        k, v = lin(z, a.k)[..., cols], lin(z, a.v)[..., cols]  # (B, 1 + M, hd)
        heads.append(torch.softmax(q @ k.transpose(1, 2) / hd**0.5, dim=-1) @ v)  # (B, 1, hd)
    y = cls + lin(torch.cat(heads, -1), a.proj)
    return torch.cat([lin(F.gelu(ln(y, f.revert.norm)), f.revert.fc), x[:, 1:]], 1)


def test_cross_attention_fusion_matches_paper_definition():
    torch.manual_seed(0)
    f = trained_like(CrossAttentionFusion(16, 24, 3, qkv_bias=True, drop_path=0.0, norm_eps=1e-6))
    x, other = torch.randn(2, 1 + 9, 16, requires_grad=True), torch.randn(2, 1 + 4, 24, requires_grad=True)
    out, ref = f(x, other), reference_fusion(f, x, other)
    assert out.shape == x.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    w = torch.randn_like(out)
    for a, b in zip(
        torch.autograd.grad((out * w).sum(), [x, other]), torch.autograd.grad((ref * w).sum(), [x, other])
    ):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_fusion_reads_own_cls_and_the_other_patches_only():
    """The new cls token of branch b depends on its own cls token and the other branch's patch tokens, never on
    the other branch's cls token or its own patches; its own patch tokens pass through unchanged."""
    torch.manual_seed(0)
    f = trained_like(CrossAttentionFusion(16, 24, 3, qkv_bias=True, drop_path=0.0, norm_eps=1e-6))
    x, other = torch.randn(1, 1 + 9, 16, requires_grad=True), torch.randn(1, 1 + 4, 24, requires_grad=True)
    out = f(x, other)
    gx, go = torch.autograd.grad(out[:, 0].sum(), [x, other])
    assert gx[0, 0].abs().sum() > 0 and gx[0, 1:].abs().sum() == 0
    assert go[0, 0].abs().sum() == 0 and (go[0, 1:].abs().sum(-1) > 0).all()
    assert torch.equal(out[:, 1:], x[:, 1:])


def test_large_branch_sees_the_bicubic_resize_and_head_averages_branch_logits():
    torch.manual_seed(0)
    model = trained_like(create_model("crossvit_test", num_classes=5))
    x = torch.randn(2, 3, 32, 32)
    small, large = model.embed(x)  # branch 0 at 32 (no resize), branch 1 at int(0.75 * 32) = 24
    pe = model.patch_embed
    tokens = F.conv2d(
        F.interpolate(x, size=(24, 24), mode="bicubic"), pe[1].proj.weight, pe[1].proj.bias, stride=8
    )
    ref = torch.cat([model.cls_token[1].expand(2, -1, -1), tokens.flatten(2).transpose(1, 2)], 1)
    torch.testing.assert_close(large, ref + model.pos_embed[1], atol=1e-6, rtol=1e-6)
    assert small.shape == (2, 1 + 64, 16) and large.shape == (2, 1 + 9, 32)
    feats = model.forward_features(x)
    assert feats.shape == (2, 65 * 16 + 10 * 32)
    xs = model.split_features(feats)
    logits = (model.head[0](xs[0][:, 0]) + model.head[1](xs[1][:, 0])) / 2
    torch.testing.assert_close(model.forward_head(feats), logits)
    pooled = torch.cat([xs[0][:, 0], xs[1][:, 0]], 1)
    torch.testing.assert_close(model.forward_head(feats, pre_logits=True), pooled)


# --- the whole model against timm ------------------------------------------------------------------------------


def outputs(model, x) -> dict[str, object]:
    """Each branch's final tokens, every intermediate map (branch-major), pooled and logits."""
    if isinstance(model, CrossVit):
        feats = model.forward_features(x)  # [(B, 1 + N_b, D_b)]
        inter = model.forward_intermediates(x, intermediates_only=True)
        return dict(tokens=feats, inter=inter, pooled=model.forward_head(feats, pre_logits=True),
                    logits=model.forward_head(feats))  # fmt: skip
    feats = model.forward_features(x)
    return dict(tokens=model.split_features(feats), inter=model.forward_intermediates(x),
                pooled=model.forward_head(feats, pre_logits=True), logits=model.forward_head(feats))  # fmt: skip


def assert_same(ours: dict, theirs: dict, tol: float) -> float:
    """Token maps within tol times their scale (the residual stream reaches ~20 at base, where fp32 rounding
    alone is a few 1e-6; as tests/test_maxvit.py), pooled and logits within atol = rtol = tol. Returns the
    largest absolute difference and the largest over the scale."""
    worst = rel = 0.0
    assert len(ours["inter"]) == len(theirs["inter"]) and len(ours["tokens"]) == 2
    for key in ("tokens", "inter"):
        for i, (a, b) in enumerate(zip(ours[key], theirs[key])):
            scale = max(1.0, b.abs().max().item())
            torch.testing.assert_close(
                a, b, atol=tol * scale, rtol=0, msg=lambda m, k=key, i=i: f"{k} {i}: {m}"
            )
            worst = max(worst, (a - b).abs().max().item())
            rel = max(rel, (a - b).abs().max().item() / scale)
    for key in ("pooled", "logits"):
        torch.testing.assert_close(
            ours[key], theirs[key], atol=tol, rtol=tol, msg=lambda m, k=key: f"{k}: {m}"
        )
        worst = max(worst, (ours[key] - theirs[key]).abs().max().item())
    return worst, rel


@pytest.mark.parametrize(
    "name",
    [
        "crossvit_tiny_240",
        "crossvit_9_240",
        pytest.param("crossvit_small_240", marks=pytest.mark.slow),  # the wider sizes: the same code, longer
        pytest.param("crossvit_base_240", marks=pytest.mark.slow),
    ],
)
def test_parity_with_timm(name):
    """Both ways at the named sizes: timm's model from its own init, perturbed, imported (from_timm) and matching
    at fp32 to 1e-5; ours exported back (to_timm, timm's constructor from our hparams) gives timm's exact weights.
    Tiny also at 200 px (timm resizes the input for both branches) and in float64 to 1e-10 (the same math)."""
    torch.manual_seed(0)
    theirs = trained_like(timm.create_model(name, num_classes=7))
    ours = from_timm(theirs)
    assert ours.hparams() == create_model(name, num_classes=7).hparams()
    assert ours.feature_info == theirs.feature_info
    exported = to_timm(ours).state_dict()
    assert all(torch.equal(exported[k], v) for k, v in theirs.state_dict().items())
    x = torch.randn(2, 3, 240, 240)
    with torch.no_grad():
        worst, rel = assert_same(outputs(ours, x), outputs(theirs, x), tol=1e-5)
        if name == "crossvit_tiny_240":
            y = torch.randn(2, 3, 200, 200)
            worst, rel = map(
                max, zip((worst, rel), assert_same(outputs(ours, y), outputs(theirs, y), tol=1e-5))
            )
            ours, theirs, y = ours.double(), theirs.double(), y.double()
            assert_same(outputs(ours, y), outputs(theirs, y), tol=1e-10)
    print(f"{name}: max abs diff {worst:.2e}, {rel:.2e} of the map's scale")


@pytest.mark.parametrize("global_pool", ["token", "avg"])
def test_parity_with_timm_fp64_train_mode_from_ours(global_pool):
    """Ours exported to timm (the other direction), in float64: the same math to 1e-10, in eval and in train mode
    (stochastic depth off), with both pools and without a classifier (pooled = both pooled tokens)."""
    torch.manual_seed(0)
    for num_classes in (0, 4):
        ours = trained_like(create_model("crossvit_test", global_pool=global_pool, num_classes=num_classes))
        theirs = to_timm(ours)
        ours, theirs = ours.double(), theirs.double()
        x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
        with torch.no_grad():
            assert_same(outputs(ours, x), outputs(theirs, x), tol=1e-10)
            torch.testing.assert_close(ours.train()(x), theirs.train()(x), atol=1e-10, rtol=0)
        assert ours(x).shape == (2, num_classes or 48)


def test_key_map_complete_both_ways():
    ours = trained_like(create_model("crossvit_test", num_classes=3))
    sd = ours.state_dict()
    timm_sd = crossvit_to_timm_state_dict(sd)
    twin = CrossVit(**timm_kwargs(ours))
    assert set(timm_sd) == set(twin.state_dict())  # nothing missing, nothing unexpected
    back = crossvit_from_timm_state_dict(timm_sd)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    assert set(crossvit_from_timm_state_dict(twin.state_dict())) == set(sd)
    with pytest.raises(KeyError, match="key map"):
        crossvit_from_timm_state_dict({"blocks.0.extra.weight": torch.zeros(1)})


def test_from_timm_refuses_layouts_it_does_not_build():
    with torch.device("meta"):
        dagger = timm.create_model("crossvit_9_dagger_240")
        deep_fusion = CrossVit(img_size=32, patch_size=(4, 8), embed_dim=(16, 32), num_heads=(2, 2),
                               depth=[[1, 1, 1]], mlp_ratio=(2, 2, 1))  # fmt: skip
    with pytest.raises(ValueError, match="multi_conv"):
        from_timm(dagger)
    with pytest.raises(ValueError, match="fusion depth"):
        from_timm(deep_fusion)


@pytest.mark.parametrize(
    "name", ["crossvit_tiny_240", "crossvit_small_240", "crossvit_base_240", "crossvit_9_240", "crossvit_15_240",
             "crossvit_18_240"],
)  # fmt: skip
def test_paper_sizes_equal_timm(name):
    """Every weight of each named size has the shape of timm's (7.0M, 26.9M, 105M, 8.6M, 27.5M, 43.3M)."""
    with torch.device("meta"):
        ours = create_model(name, num_classes=1000)
        theirs = timm.create_model(name)
    shapes = {k: v.shape for k, v in crossvit_to_timm_state_dict(ours.state_dict()).items()}
    assert shapes == {k: v.shape for k, v in theirs.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())


def test_stochastic_depth_schedule_matches_timm():
    """Rates linear over the max(d0, d1) steps of each multi-scale block; block j of either branch takes step j,
    the fusions the block's last step (timm's schedule)."""
    with torch.device("meta"):
        ours = create_model("crossvit_tiny_240", drop_path_rate=0.3)
        theirs = timm.create_model("crossvit_tiny_240", drop_path_rate=0.3)

    def rate(m):
        return getattr(m, "drop_prob", 0.0)  # timm: DropPath, or Identity at rate 0

    for k, (a, b) in enumerate(zip(ours.blocks, theirs.blocks)):
        for br in range(2):
            got = [blk.drop_path for blk in a.branches[br]] + [a.fusion[br].drop_path]
            want = [rate(blk.drop_path1) for blk in b.blocks[br]] + [rate(b.fusion[br].drop_path)]
            assert got == pytest.approx(want, abs=1e-7), (k, br)
    assert ours.blocks[-1].fusion[0].drop_path == pytest.approx(0.3)


def test_no_stem_mask_and_why():
    """Two token grids (12 px of the image, 16 px of its 224 resize): no mask at one stem grid; the class says why."""
    assert isinstance(CrossViT.stem_mask, str) and "grid" in CrossViT.stem_mask
    model = create_model("crossvit_test")
    with pytest.raises(TypeError):
        model.forward_features(torch.randn(1, 3, 32, 32), mask=torch.zeros(1, 8, 8, dtype=torch.bool))
