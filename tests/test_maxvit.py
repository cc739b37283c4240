"""MaxViT: each mechanism against a plain-torch definition, and the whole model against timm's `maxvit_*_tf`
(the port of the TF release; transformers has no MaxViT) through the key map in models/maxvit_timm.py."""

from dataclasses import replace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import models.maxvit  # noqa: F401  (registers the MaxViT sizes)
from models import create_model
from models.maxvit import PartitionAttention
from models.maxvit_timm import from_timm, maxvit_from_timm_state_dict, maxvit_to_timm_state_dict, to_timm
from models.mbconv import MBConv
from ops.compat import import_timm

timm = import_timm()  # the test-only reference (installed outside site-packages by scripts/setup.sh)
MaxxVit, model_cfgs = timm.models.maxxvit.MaxxVit, timm.models.maxxvit.model_cfgs


def trained_like(module: nn.Module, seed: int = 1) -> nn.Module:
    """Perturb every weight and every BatchNorm statistic, so parity cannot pass by init symmetry (unit BN,
    zero biases, zero running means)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return module.eval()


def gelu(x):
    return F.gelu(x, approximate="tanh")


# --- block / grid attention ------------------------------------------------------------------------------------


def reference_partition_attention(layer: PartitionAttention, x: torch.Tensor) -> torch.Tensor:
    """The layer by definition, one query token at a time, gathering its keys by coordinates (no partition helper):
    block: the real tokens of its P x P window; grid: the real tokens congruent to it modulo s = ceil(H / G) (the
    G x G grid of tokens spaced s apart). The bias is the table entry of the offset between the two tokens'
    positions inside the window / grid, (dy + p - 1) * (2p - 1) + (dx + p - 1)."""
    B, H, W, C = x.shape
    p = layer.size[0]
    heads, hd = layer.attn.num_heads, layer.attn.head_dim
    sh, sw = -(-H // p), -(-W // p)  # grid spacing: the padded size over G

    def where(y: int, x_: int):  # (group id, position inside the group)
        if layer.partition == "block":
            return (y // p, x_ // p), (y % p, x_ % p)
        return (y % sh, x_ % sw), (y // sh, x_ // sw)

    a = layer.attn
    h = F.layer_norm(x, (C,), layer.norm1.weight, layer.norm1.bias, layer.norm1.eps)
    q, k, v = (
        F.linear(h, a.qkv.weight, a.qkv.bias).view(B, H, W, 3, heads, hd).unbind(3)
    )  # (B, H, W, heads, hd)
    tokens = [(y, x_) for y in range(H) for x_ in range(W)]
    rows = []
    for y, x_ in tokens:
        g, pos = where(y, x_)
        keys = [(t, where(*t)[1]) for t in tokens if where(*t)[0] == g]
        kk = torch.stack([k[:, t[0], t[1]] for t, _ in keys], 1)  # (B, M, heads, hd)
        vv = torch.stack([v[:, t[0], t[1]] for t, _ in keys], 1)
        offs = [(pos[0] - kp[0] + p - 1) * (2 * p - 1) + (pos[1] - kp[1] + p - 1) for _, kp in keys]
        bias = a.relative_position_bias_table[offs].t()  # (heads, M)
        logits = torch.einsum("bhd,bmhd->bhm", q[:, y, x_], kk) * hd**-0.5 + bias
        rows.append(torch.einsum("bhm,bmhd->bhd", logits.softmax(-1), vv).reshape(B, C))
    attn = torch.stack(rows, 1).view(B, H, W, C)
    x = x + F.linear(attn, a.proj.weight, a.proj.bias)
    h = F.layer_norm(x, (C,), layer.norm2.weight, layer.norm2.bias, layer.norm2.eps)
    return x + F.linear(
        gelu(F.linear(h, layer.mlp.fc1.weight, layer.mlp.fc1.bias)), layer.mlp.fc2.weight, layer.mlp.fc2.bias
    )


@pytest.mark.parametrize("partition", ["block", "grid"])
@pytest.mark.parametrize("H, W", [(6, 9), (5, 7), (2, 4)])  # divisible; padded; smaller than one window
def test_partition_attention_matches_per_token_reference(partition, H, W):
    torch.manual_seed(0)
    layer = trained_like(PartitionAttention(16, partition, size=3, head_dim=8))
    x = torch.randn(2, H, W, 16, requires_grad=True)
    out, ref = layer(x), reference_partition_attention(layer, x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    w = torch.randn_like(out)
    (g_out,) = torch.autograd.grad((out * w).sum(), [x])
    g_ref, g_table = torch.autograd.grad((ref * w).sum(), [x, layer.attn.relative_position_bias_table])
    torch.testing.assert_close(g_out, g_ref, atol=1e-5, rtol=1e-5)
    (g_table_out,) = torch.autograd.grad((layer(x) * w).sum(), [layer.attn.relative_position_bias_table])
    torch.testing.assert_close(g_table_out, g_table, atol=1e-5, rtol=1e-5)


def test_block_attention_is_local_and_grid_attention_is_dilated_global():
    """Which inputs reach output token (1, 2) of an 8 x 8 map: its 4 x 4 window (block), or the 4 x 4 grid of
    tokens spaced 2 apart across the whole map (grid)."""
    torch.manual_seed(0)
    reach = {}
    for partition in ("block", "grid"):
        layer = trained_like(PartitionAttention(16, partition, size=4, head_dim=8))
        x = torch.randn(1, 8, 8, 16, requires_grad=True)
        layer(x)[0, 1, 2].sum().backward()
        reach[partition] = x.grad[0].abs().sum(-1) > 0  # (8, 8)
    window = torch.zeros(8, 8, dtype=torch.bool)
    window[:4, :4] = True
    grid = torch.zeros(8, 8, dtype=torch.bool)
    grid[1::2, 0::2] = True
    assert torch.equal(reach["block"], window)
    assert torch.equal(reach["grid"], grid)


# --- MBConv, stem, stochastic depth ----------------------------------------------------------------------------


def bn(x, m: nn.BatchNorm2d):
    return F.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)


def reference_mbconv(blk: MBConv, x: torch.Tensor, stride: int) -> torch.Tensor:
    """The paper's MBConv (eval), with TF "SAME" padding spelled out: stride 2 on an even size pads bottom/right
    only, on an odd size one pixel on every side; the shortcut is avg-pool 2x2 (+ 1x1 conv)."""
    H = x.shape[-1]
    pad = (1, 1, 1, 1) if stride == 1 or H % 2 else (0, 1, 0, 1)
    h = gelu(bn(F.conv2d(bn(x, blk.pre_norm), blk.expand.weight), blk.norm1))
    mid = h.shape[1]
    h = gelu(bn(F.conv2d(F.pad(h, pad), blk.dw.weight, stride=stride, groups=mid), blk.norm2))
    s = F.silu(F.conv2d(h.mean((2, 3), keepdim=True), blk.se.fc1.weight, blk.se.fc1.bias))
    h = h * torch.sigmoid(F.conv2d(s, blk.se.fc2.weight, blk.se.fc2.bias))
    h = F.conv2d(h, blk.project.weight, blk.project.bias)
    if stride == 1:
        return x + h
    short = F.avg_pool2d(F.pad(x, (0, H % 2, 0, H % 2)), 2)  # odd: the padded zero counts in the mean
    if isinstance(blk.shortcut.proj, nn.Conv2d):
        short = F.conv2d(short, blk.shortcut.proj.weight, blk.shortcut.proj.bias)
    return short + h


@pytest.mark.parametrize(
    "in_chs, out_chs, stride, size", [(16, 32, 2, 8), (16, 32, 2, 7), (16, 16, 2, 9), (32, 32, 1, 7)]
)
def test_mbconv_matches_definition(in_chs, out_chs, stride, size):
    torch.manual_seed(0)
    blk = trained_like(MBConv(in_chs, out_chs, stride))
    assert blk.expand.out_channels == 4 * out_chs and blk.dw.groups == 4 * out_chs  # expansion 4, depthwise
    assert blk.se.fc1.out_channels == out_chs // 4  # SE ratio 0.25 of the output width
    x = torch.randn(2, in_chs, size, size)
    out = blk(x)
    assert out.shape == (2, out_chs, -(-size // stride), -(-size // stride))
    torch.testing.assert_close(out, reference_mbconv(blk, x, stride), atol=1e-5, rtol=1e-5)


def test_stem_and_mask_grid_at_odd_sizes():
    torch.manual_seed(0)
    model = trained_like(create_model("maxvit_test", mask_token=True))
    x = torch.randn(2, 3, 13, 14)  # odd rows pad (1, 1), even columns pad (0, 1)
    s = model.stem
    ref = F.conv2d(F.pad(x, (0, 1, 1, 1)), s.conv1.weight, s.conv1.bias, stride=2)
    ref = F.conv2d(gelu(bn(ref, s.norm1)), s.conv2.weight, s.conv2.bias, padding=1)
    torch.testing.assert_close(s(x), ref, atol=1e-5, rtol=1e-5)
    assert ref.shape[-2:] == (7, 7)
    mask = torch.zeros(2, 7, 7, dtype=torch.bool)
    mask[0, 3:] = True
    out = model.embed(x, mask)
    torch.testing.assert_close(out[0, :, 3:], model.mask_token[0].expand(-1, 4, 7))
    torch.testing.assert_close(out[1], ref[1])
    with pytest.raises(ValueError, match="stem grid"):
        model.embed(x, torch.zeros(2, 6, 7, dtype=torch.bool))
    feats = model.forward_features(x, mask)  # maps 7 -> 4 -> 2 -> 1 -> 1: windows of 2 are padded
    assert feats.shape == (2, 128, 1, 1) and torch.isfinite(feats).all()


def test_stochastic_depth_schedule_and_per_sample_drop():
    model = create_model("maxvit_test", drop_path_rate=0.3)
    rates = [
        (b.mbconv.drop_path, b.block_attn.drop_path, b.grid_attn.drop_path)
        for s in model.stages
        for b in s.blocks
    ]
    # linear over all blocks, one rate shared by a block's 3 layers
    expected = torch.linspace(0, 0.3, len(rates)).tolist()
    assert [r[0] for r in rates] == pytest.approx(expected) and all(len(set(r)) == 1 for r in rates)
    # a dropped residual branch is zero for that sample, a kept one is rescaled by 1 / (1 - p)
    torch.manual_seed(0)
    blk = MBConv(16, 16, 1, drop_path=0.5).train()
    x = torch.randn(16, 16, 5, 5)
    branch = MBConv(16, 16, 1).train()
    branch.load_state_dict(blk.state_dict())
    full = branch(x) - x  # same batch statistics (train-mode BN), nothing dropped
    got = blk(x) - x
    kept = got.flatten(1).abs().sum(1) > 0
    assert 0 < kept.sum() < 16
    torch.testing.assert_close(got[kept], 2 * full[kept])
    torch.testing.assert_close(blk.eval()(x), branch.eval()(x))  # no drop in eval (same running stats)


def test_window_size_follows_the_resolution():
    with torch.device("meta"):
        assert create_model("maxvit_tiny_224").window_size == 7  # the paper: P = G = 7 at 224
    m = create_model("maxvit_test", img_size=384, depths=(1, 1, 1, 1))
    assert (m.window_size, m.grid_size) == (12, 12)
    m = create_model("maxvit_test", window_size=4, grid_size=2)
    attn = m.stages[0].blocks[0]
    assert attn.block_attn.attn.relative_position_bias_table.shape == (7 * 7, 1)
    assert attn.grid_attn.attn.relative_position_bias_table.shape == (3 * 3, 1)
    tables = {n for n, _ in m.named_parameters() if "relative_position_bias_table" in n}
    assert len(tables) == 2 * sum(m.depths) and m.no_weight_decay() == tables


# --- the whole model against timm ------------------------------------------------------------------------------

# the Tessera size `maxvit_test`, written as timm's own TF config with the widths and depths replaced
TEST_CFG = replace(
    model_cfgs["maxvit_tiny_tf"],
    embed_dim=(32, 64, 96, 128),
    depths=(1, 1, 2, 1),
    stem_width=32,
    head_hidden_size=128,
)


def outputs(model, x) -> dict[str, object]:
    """features, every stage, pooled and logits, in Tessera's layouts, from one pass through the stages."""
    if isinstance(model, MaxxVit):
        feats, inter = model.forward_intermediates(x)  # feats: after timm's final norm (Identity for *_tf)
        stages = inter[1:]  # inter[0] is the stem
    else:
        feats, stages = model.forward_features(x), model.forward_intermediates(x)
    pooled = model.forward_head(feats, pre_logits=True)
    return dict(features=feats, stages=stages, pooled=pooled, logits=model.forward_head(feats))


def assert_same(ours: dict, theirs: dict, atol: float) -> None:
    """Maps within atol times their scale (the residual stream reaches ~40 in the last stage, where fp32 rounding
    alone is a few 1e-6); pooled (tanh) and logits within atol."""
    maps = [("features", ours["features"], theirs["features"])]
    assert len(ours["stages"]) == len(theirs["stages"]) == 4
    maps += [(f"stage {i}", a, b) for i, (a, b) in enumerate(zip(ours["stages"], theirs["stages"]))]
    for what, a, b in maps:
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a, b, atol=atol * scale, rtol=0, msg=lambda m, w=what: f"{w}: {m}")
    for key in ("pooled", "logits"):
        torch.testing.assert_close(
            ours[key], theirs[key], atol=atol, rtol=0, msg=lambda m, k=key: f"{k}: {m}"
        )


# (61, 64): odd rows into the stem and into stage 0 (31), where TF "SAME" pads differ from even sizes. Later
# stages cannot be odd in timm, which asserts that windows divide the maps.
@pytest.mark.parametrize("size", [(64, 64), (61, 64)])
def test_parity_with_timm(size):
    """Both ways: a timm model from its own init, perturbed, imported (from_timm); our model exported (to_timm,
    which builds timm's config from our hparams). fp32 to 1e-5; fp64 to 1e-10 (the same math, not just close)."""
    torch.manual_seed(0)
    theirs = trained_like(MaxxVit(TEST_CFG, img_size=64, num_classes=7))
    ours = from_timm(theirs)
    assert ours.hparams() == create_model("maxvit_test", num_classes=7).hparams()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        if size == (64, 64):
            exported = to_timm(ours)
            assert_same(outputs(ours, x), outputs(theirs, x), atol=1e-5)
            torch.testing.assert_close(ours(x), exported(x), atol=1e-5, rtol=0)
            torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=0)
            assert_same(
                outputs(exported.double(), x.double()), outputs(ours.double(), x.double()), atol=1e-10
            )
        ours, theirs, x = ours.double(), theirs.double(), x.double()
        assert_same(outputs(ours, x), outputs(theirs, x), atol=1e-10)


def test_parity_with_timm_train_mode_and_pooled_without_classifier():
    """Train mode (BatchNorm batch statistics, the running stats they update) and num_classes=0: timm's pre-logits
    (pool, LayerNorm, Linear, tanh) is exactly our forward_head(pre_logits=True)."""
    torch.manual_seed(0)
    ours = trained_like(create_model("maxvit_test")).double()
    theirs = to_timm(ours).double()
    assert isinstance(theirs.head.fc, nn.Identity)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    ours.train()
    theirs.train()
    a, b = ours.forward_features(x), theirs.forward_features(x)
    torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
    torch.testing.assert_close(ours.forward_head(a, pre_logits=True), theirs.forward_head(b, pre_logits=True))
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-10, rtol=0)  # num_classes=0: forward = pooled
    back = maxvit_from_timm_state_dict(theirs.state_dict())
    for k, v in ours.state_dict().items():
        torch.testing.assert_close(back[k], v, atol=1e-12, rtol=0, msg=k)


def test_key_map_round_trip_and_refusals():
    ours = trained_like(create_model("maxvit_test", num_classes=3, mask_token=True))
    sd = ours.state_dict()
    timm_sd = maxvit_to_timm_state_dict(sd)  # timm has no mask token: it is left out
    assert set(timm_sd) == set(MaxxVit(TEST_CFG, img_size=64, num_classes=3).state_dict())
    back = maxvit_from_timm_state_dict(timm_sd)
    assert set(back) == set(sd) - {"mask_token"} and all(torch.equal(back[k], sd[k]) for k in back)
    # a timm MaxViT with other math than the TF release is refused, naming the field
    gelu_erf = replace(TEST_CFG, transformer_cfg=replace(TEST_CFG.transformer_cfg, act_layer="gelu"))
    with pytest.raises(ValueError, match=r"transformer_cfg\.act_layer"):
        from_timm(MaxxVit(gelu_erf, img_size=64))
    with pytest.raises(ValueError, match="head_hidden_size"):
        from_timm(MaxxVit(replace(TEST_CFG, head_hidden_size=None), img_size=64))


@pytest.mark.parametrize("size", ["tiny", "small", "base", "large"])
def test_paper_sizes_equal_timm(size):
    """Every weight of maxvit_{size}_224 has the shape of timm's maxvit_{size}_tf_224 (31M, 69M, 120M, 212M)."""
    with torch.device("meta"):
        ours = create_model(f"maxvit_{size}_224", num_classes=1000)
        theirs = timm.create_model(f"maxvit_{size}_tf_224")
    shapes = {k: v.shape for k, v in maxvit_to_timm_state_dict(ours.state_dict()).items()}
    assert shapes == {k: v.shape for k, v in theirs.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
