"""DaViT: each attention mechanism against a plain-torch definition, and the whole model against timm's `davit_*`
(the port of the official release; transformers has no DaViT) through the key map in models/davit_timm.py."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models import create_model
from models.davit import ChannelBlock, DaViTStage, SpatialBlock
from models.davit_timm import davit_from_timm_state_dict, davit_to_timm_state_dict, from_timm, to_timm
from ops.compat import import_timm
from tests.conftest import trained_like  # every weight + N(0, 0.05^2); there is no BatchNorm in DaViT

timm = import_timm()  # the test-only reference (installed outside site-packages by scripts/setup.sh)
DaVit = timm.models.davit.DaVit


def ln(x, m: nn.LayerNorm):
    return F.layer_norm(x, m.normalized_shape, m.weight, m.bias, m.eps)


def block_by_definition(blk, x: torch.Tensor, attend) -> torch.Tensor:
    """x + dwconv3x3(x); + attend(norm1(.)) (channels-last); + dwconv3x3; + mlp(norm2(.)); (B, C, H, W) in/out."""
    C = x.shape[1]

    def cpe(t, conv):
        return t + F.conv2d(t, conv.weight, conv.bias, padding=1, groups=C)

    x = cpe(x, blk.cpe1.proj).permute(0, 2, 3, 1)  # (B, H, W, C)
    a = blk.attn
    x = x + F.linear(attend(ln(x, blk.norm1)), a.proj.weight, a.proj.bias)
    x = cpe(x.permute(0, 3, 1, 2), blk.cpe2.proj).permute(0, 2, 3, 1)
    h = F.gelu(F.linear(ln(x, blk.norm2), blk.mlp.fc1.weight, blk.mlp.fc1.bias))
    return (x + F.linear(h, blk.mlp.fc2.weight, blk.mlp.fc2.bias)).permute(0, 3, 1, 2)


# --- spatial window attention ----------------------------------------------------------------------------------


def window_attention_by_definition(blk: SpatialBlock, h: torch.Tensor) -> torch.Tensor:
    """One query token at a time, its keys gathered by coordinates: every position of its P x P window on the map
    padded at the bottom/right, where a padded position is a zero vector after the norm (so its key and value are
    the projection's biases). softmax(q . k / sqrt(hd)) v per head; no position bias. h: (B, H, W, C) normed."""
    B, H, W, C = h.shape
    a, p = blk.attn, blk.window_size[0]
    heads, hd = a.num_heads, a.head_dim
    qkv = F.linear(h, a.qkv.weight, a.qkv.bias).view(B, H, W, 3, heads, hd)
    pad = a.qkv.bias.view(3, heads, hd)  # the projection of a zero token

    def at(y: int, x: int, i: int) -> torch.Tensor:  # (B, heads, hd): slice i (0 q, 1 k, 2 v) of token (y, x)
        return qkv[:, y, x, i] if y < H and x < W else pad[i].expand(B, -1, -1)

    out = torch.zeros(B, H, W, heads, hd)
    for y in range(H):
        for x in range(W):
            window = [
                (y0, x0)
                for y0 in range(y // p * p, y // p * p + p)
                for x0 in range(x // p * p, x // p * p + p)
            ]
            k = torch.stack([at(*t, 1) for t in window], 2)  # (B, heads, P*P, hd)
            v = torch.stack([at(*t, 2) for t in window], 2)
            logits = torch.einsum("bhd,bhmd->bhm", at(y, x, 0), k) * hd**-0.5
            out[:, y, x] = torch.einsum("bhm,bhmd->bhd", logits.softmax(-1), v)
    return out.view(B, H, W, C)


@pytest.mark.parametrize("H, W", [(8, 8), (7, 10), (3, 2)])  # divisible; padded; smaller than one window
def test_spatial_block_matches_per_token_definition(H, W):
    torch.manual_seed(0)
    blk = trained_like(
        SpatialBlock(16, num_heads=2, window_size=4, mlp_ratio=4.0, drop_path=0.0, backend="auto")
    )
    x = torch.randn(2, 16, H, W, requires_grad=True)
    out, ref = blk(x), block_by_definition(blk, x, lambda h: window_attention_by_definition(blk, h))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    w = torch.randn_like(out)
    (g_out,) = torch.autograd.grad((out * w).sum(), [x])
    (g_ref,) = torch.autograd.grad((ref * w).sum(), [x])
    torch.testing.assert_close(g_out, g_ref, atol=1e-5, rtol=1e-5)


# --- channel group attention -----------------------------------------------------------------------------------


def channel_attention_by_definition(blk: ChannelBlock, h: torch.Tensor) -> torch.Tensor:
    """The paper's eq. 3, one output channel at a time: channel c of group g attends to the Cg channels c' of its
    group with logits sum_n Q[n, c] K[n, c'] / sqrt(Cg) over all H * W positions, and takes
    sum_c' softmax(.)[c'] V[:, c']. The release's fused projection emits V, Q, K in that order. h: (B, H, W, C)."""
    B, H, W, C = h.shape
    a = blk.attn
    cg = C // a.num_groups
    v, q, k = F.linear(h.reshape(B, H * W, C), a.qkv.weight, a.qkv.bias).split(C, dim=-1)  # each (B, N, C)
    out = torch.zeros(B, H * W, C)
    for c in range(C):
        group = range(c // cg * cg, c // cg * cg + cg)
        logits = torch.stack([(q[:, :, c] * k[:, :, c2]).sum(1) for c2 in group], 1) * cg**-0.5  # (B, Cg)
        weights = logits.softmax(-1)
        out[:, :, c] = sum(weights[:, i, None] * v[:, :, c2] for i, c2 in enumerate(group))
    return out.view(B, H, W, C)


@pytest.mark.parametrize("H, W, groups", [(4, 5, 2), (3, 3, 4), (1, 2, 1)])
def test_channel_block_matches_per_channel_definition(H, W, groups):
    torch.manual_seed(0)
    blk = trained_like(ChannelBlock(16, num_heads=groups, mlp_ratio=4.0, drop_path=0.0))
    x = torch.randn(2, 16, H, W, requires_grad=True)
    out, ref = blk(x), block_by_definition(blk, x, lambda h: channel_attention_by_definition(blk, h))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    w = torch.randn_like(out)
    (g_out,) = torch.autograd.grad((out * w).sum(), [x])
    (g_ref,) = torch.autograd.grad((ref * w).sum(), [x])
    torch.testing.assert_close(g_out, g_ref, atol=1e-5, rtol=1e-5)


def test_window_attention_is_local_and_channel_attention_is_global():
    """Which input tokens reach output token (1, 2) of the attention alone (`mix`) on an 8 x 8 map: its 4 x 4
    window (spatial); every token (channel attention: its (Cg, Cg) weights sum over the whole map). And channel
    attention commutes with permuting the tokens (no position enters it). Its grouping is checked channel by
    channel above."""
    torch.manual_seed(0)
    spatial = trained_like(SpatialBlock(16, 2, 4, 4.0, 0.0, "auto"))
    channel = trained_like(ChannelBlock(16, 4, 4.0, 0.0))
    reach = {}
    for name, blk in (("spatial", spatial), ("channel", channel)):
        x = torch.randn(1, 8, 8, 16, requires_grad=True)
        blk.mix(x)[0, 1, 2].sum().backward()
        reach[name] = x.grad[0].abs().sum(-1) > 0  # (8, 8)
    window = torch.zeros(8, 8, dtype=torch.bool)
    window[:4, :4] = True
    assert torch.equal(reach["spatial"], window)
    assert reach["channel"].all()
    x, perm = torch.randn(2, 8, 8, 16), torch.randperm(64)
    with torch.no_grad():
        a = channel.mix(x).view(2, 64, 16)[:, perm]
        b = channel.mix(x.view(2, 64, 16)[:, perm].view(2, 8, 8, 16)).view(2, 64, 16)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# --- stem, downsampling, mask, stochastic depth ----------------------------------------------------------------


def test_stem_downsample_and_mask_grid_at_odd_sizes():
    torch.manual_seed(0)
    model = trained_like(create_model("davit_test", mask_token=True))
    x = torch.randn(2, 3, 13, 18)  # padded to 16 x 20 first, then 7x7 stride 4 (padding 3) -> 4 x 5
    s = model.stem
    ref = F.conv2d(F.pad(x, (0, 2, 0, 3)), s.conv.weight, s.conv.bias, stride=4, padding=3)
    ref = ln(ref.permute(0, 2, 3, 1), s.norm).permute(0, 3, 1, 2)
    torch.testing.assert_close(s(x), ref, atol=1e-5, rtol=1e-5)
    assert ref.shape[-2:] == (4, 5)
    d = model.stages[1].downsample  # LayerNorm, pad to even, 2x2 stride 2: 5 x 7 -> 3 x 4
    y = torch.randn(2, 32, 5, 7)
    normed = ln(y.permute(0, 2, 3, 1), d.norm).permute(0, 3, 1, 2)
    ref_down = F.conv2d(F.pad(normed, (0, 1, 0, 1)), d.conv.weight, d.conv.bias, stride=2)
    torch.testing.assert_close(d(y), ref_down, atol=1e-5, rtol=1e-5)
    assert isinstance(model.stages[0].downsample, nn.Identity)
    mask = torch.zeros(2, 4, 5, dtype=torch.bool)
    mask[0, 2:] = True
    out = model.embed(x, mask)
    torch.testing.assert_close(out[0, :, 2:], model.mask_token[0].expand(-1, 2, 5))
    torch.testing.assert_close(out[1], ref[1])
    with pytest.raises(ValueError, match="stem grid"):
        model.embed(x, torch.zeros(2, 3, 5, dtype=torch.bool))
    feats = model.forward_features(x, mask)  # maps 4 x 5 -> 2 x 3 -> 1 x 2 -> 1 x 1
    assert feats.shape == (2, 128, 1, 1) and torch.isfinite(feats).all()


def test_stochastic_depth_schedule_matches_timm():
    """Linear over all dual blocks, one rate shared by a dual block's spatial and channel halves (as timm)."""
    model = create_model("davit_test", depths=(1, 2, 3, 1), drop_path_rate=0.3)
    ours = [(b.spatial.drop_path, b.channel.drop_path) for s in model.stages for b in s.blocks]
    twin = DaVit(depths=(1, 2, 3, 1), embed_dims=model.dims, num_heads=model.num_heads, drop_path_rate=0.3)
    theirs = [
        getattr(blk.drop_path1, "drop_prob", 0.0) for s in twin.stages for pair in s.blocks for blk in pair
    ]
    assert [r for pair in ours for r in pair] == pytest.approx(theirs)
    assert ours[0] == (0.0, 0.0) and ours[-1] == pytest.approx((0.3, 0.3))
    with pytest.raises(ValueError, match="divisible"):
        create_model("davit_test", num_heads=(3, 2, 3, 4))
    assert isinstance(
        DaViTStage(None, 8, 1, [0.0], num_heads=2, window_size=2, mlp_ratio=1.0, backend="auto").downsample,
        nn.Identity,
    )


# --- the whole model against timm ------------------------------------------------------------------------------

TEST_ARGS = dict(depths=(1, 1, 2, 1), embed_dims=(32, 64, 96, 128), num_heads=(1, 2, 3, 4), window_size=4)


def outputs(model, x) -> dict[str, object]:
    """features, every stage, pooled and logits, from one pass through the stages."""
    if isinstance(model, DaVit):
        feats, stages = model.forward_intermediates(x)
    else:
        feats, stages = model.forward_features(x), model.forward_intermediates(x)
    pooled = model.forward_head(feats, pre_logits=True)
    return dict(features=feats, stages=stages, pooled=pooled, logits=model.forward_head(feats))


def max_diff(ours: dict, theirs: dict) -> tuple[float, float]:
    """(max abs difference, max of it over the output's scale max(1, max |x|)) over every output."""
    pairs = [(ours[k], theirs[k]) for k in ("features", "pooled", "logits")]
    pairs += list(zip(ours["stages"], theirs["stages"]))
    diffs = [((a - b).abs().max().item(), max(1.0, b.abs().max().item())) for a, b in pairs]
    return max(d for d, _ in diffs), max(d / s for d, s in diffs)


def assert_same(ours: dict, theirs: dict, atol: float) -> None:
    """Each output within atol times its scale (max(1, max |x|)): the residual stream reaches ~20 in the last
    stage, where fp32 rounding alone is a few 1e-6."""
    assert len(ours["stages"]) == len(theirs["stages"]) == 4
    pairs = [(k, ours[k], theirs[k]) for k in ("features", "pooled", "logits")]
    pairs += [(f"stage {i}", a, b) for i, (a, b) in enumerate(zip(ours["stages"], theirs["stages"]))]
    for what, a, b in pairs:
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a, b, atol=atol * scale, rtol=0, msg=lambda m, w=what: f"{w}: {m}")


# (64, 64): maps 16, 8, 4, 2 (the last padded to a 4 x 4 window); (61, 50): the stem pads the input, the
# downsamplings pad odd maps, and windows are padded in every stage
@pytest.mark.parametrize("size", [(64, 64), (61, 50)])
def test_parity_with_timm(size):
    """Both ways: a timm model from its own init, perturbed, imported (from_timm); our model exported (to_timm,
    which builds timm's model from our hparams). fp32 to 1e-5; fp64 to 1e-10 (the same math, not just close)."""
    torch.manual_seed(0)
    theirs = trained_like(DaVit(**TEST_ARGS, num_classes=7))
    ours = from_timm(theirs, img_size=64)
    assert ours.hparams() == create_model("davit_test", num_classes=7).hparams()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        a, b = outputs(ours, x), outputs(theirs, x)
        assert_same(a, b, atol=1e-5)
        d, r = max_diff(a, b)
        print(f"davit_test {size} fp32: max abs diff {d:.2e}, relative to scale {r:.2e}")
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
        exported = to_timm(trained_like(create_model("davit_test", num_classes=5), seed=2))
        mine = from_timm(exported, img_size=64)
        assert_same(outputs(mine, x), outputs(exported, x), atol=1e-5)
        ours, theirs, x = ours.double(), theirs.double(), x.double()
        assert_same(outputs(ours, x), outputs(theirs, x), atol=1e-10)


@pytest.mark.parametrize(
    "size",  # small and base: the same code as tiny at other depths and widths, and slow on CPU
    ["tiny", pytest.param("small", marks=pytest.mark.slow), pytest.param("base", marks=pytest.mark.slow)],
)
def test_paper_sizes_match_timm(size):
    """davit_{size} against timm's davit_{size} (perturbed, all 1000 classes) on a 1 x 3 x 72 x 60 image: maps
    18 x 15 -> 3 x 2 with 7 x 7 windows, padded in every stage. fp32 to 1e-5 of each output's scale (the perturbed
    weights grow stage 2's residual stream to ~1e3 in small/base); tiny also in fp64 to 1e-10 of it; both
    directions of the key map."""
    torch.manual_seed(0)
    theirs = trained_like(timm.create_model(f"davit_{size}"))
    ours = from_timm(theirs)
    with torch.device("meta"):
        assert ours.hparams() == create_model(f"davit_{size}", num_classes=1000).hparams()
    x = torch.randn(1, 3, 72, 60)
    with torch.no_grad():
        a, b = outputs(ours, x), outputs(theirs, x)
        assert_same(a, b, atol=1e-5)
        d, r = max_diff(a, b)
        print(f"davit_{size} fp32: max abs diff {d:.2e}, relative to scale {r:.2e}")
        back = davit_to_timm_state_dict(ours.state_dict())
        assert set(back) == set(theirs.state_dict())
        assert all(torch.equal(back[k], v) for k, v in theirs.state_dict().items())
        if (
            size != "tiny"
        ):  # the same code at other depths and widths: fp64 once is enough (it is slow on CPU)
            return
        ours, theirs, x = ours.double(), theirs.double(), x.double()
        a, b = outputs(ours, x), outputs(theirs, x)
        assert_same(a, b, atol=1e-10)
        d, r = max_diff(a, b)
        print(f"davit_{size} fp64: max abs diff {d:.2e}, relative to scale {r:.2e}")


def test_key_map_round_trip_and_refusals():
    ours = trained_like(create_model("davit_test", num_classes=3, mask_token=True))
    sd = ours.state_dict()
    timm_sd = davit_to_timm_state_dict(sd)  # timm has no mask token: it is left out
    assert set(timm_sd) == set(DaVit(**TEST_ARGS, num_classes=3).state_dict())
    back = davit_from_timm_state_dict(timm_sd)
    assert set(back) == set(sd) - {"mask_token"} and all(torch.equal(back[k], sd[k]) for k in back)
    with pytest.raises(KeyError, match="no DaViT key map entry"):
        davit_from_timm_state_dict({"stages.0.blocks.0.2.norm1.weight": torch.zeros(1)})
    # timm DaViTs with other math than the release are refused, naming the argument
    for arg, value in [
        ("channel_attn_v2", True),
        ("down_kernel_size", 3),
        ("cpe_act", True),
        ("head_norm_first", True),
    ]:
        with pytest.raises(ValueError, match=arg):
            from_timm(DaVit(**TEST_ARGS, **{arg: value}))


@pytest.mark.parametrize("size", ["tiny", "small", "base"])
def test_paper_sizes_equal_timm(size):
    """Every weight of davit_{size} has the shape of timm's davit_{size} (28.4M, 49.7M, 88.0M with the 1000-way
    head)."""
    with torch.device("meta"):
        ours = create_model(f"davit_{size}", num_classes=1000)
        theirs = timm.create_model(f"davit_{size}")
    shapes = {k: v.shape for k, v in davit_to_timm_state_dict(ours.state_dict()).items()}
    assert shapes == {k: v.shape for k, v in theirs.state_dict().items()}
    n_ours, n_theirs = (sum(p.numel() for p in m.parameters()) for m in (ours, theirs))
    assert n_ours == n_theirs, (n_ours, n_theirs)
