"""TinyViT: its mechanisms against plain definitions, the whole model against timm's `tiny_vit_*` (the port of the
official release; transformers has no TinyViT) through the key map in models/tiny_vit_timm.py, and a CPU-sized
distillation run with the TinyViT student (configs/distill_tinyvit_tiny.yaml)."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models import create_model
from models.tiny_vit import MBConv, TinyViT, abs_offset_index
from models.tiny_vit_timm import (
    from_timm,
    tiny_vit_from_timm_state_dict,
    tiny_vit_to_timm_state_dict,
    to_timm,
)
from ops.compat import import_timm
from tests.conftest import ROOT, read_metrics

timm = import_timm()  # the test-only reference (installed outside site-packages by scripts/setup.sh)
TimmTinyVit = timm.models.tiny_vit.TinyVit

# the Tessera size `tiny_vit_test`, as timm's constructor arguments (the first heads / window entry is unused)
TEST_KWARGS = dict(
    embed_dims=(32, 64, 96, 128), depths=(1, 1, 2, 1), num_heads=(1, 2, 3, 4), window_sizes=(1, 2, 4, 2)
)
PAPER = ["tiny_vit_5m_224", "tiny_vit_11m_224", "tiny_vit_21m_224"]


def trained_like(module: nn.Module, seed: int = 1) -> nn.Module:
    """Perturb every weight and every BatchNorm statistic, so parity cannot pass by init symmetry (unit BN,
    zero biases and bias tables, zero running means, the MBConvs' near-zero last BN)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return module.eval()


def bn(x, m):  # eval-mode BatchNorm2d, spelled out
    return (x - m.running_mean[:, None, None]) / torch.sqrt(m.running_var[:, None, None] + m.eps) * m.weight[
        :, None, None
    ] + m.bias[:, None, None]


# --- mechanisms ------------------------------------------------------------------------------------------------


def test_attention_bias_is_indexed_by_absolute_offset():
    ws = 3
    idx = abs_offset_index(ws)
    for i in range(ws * ws):
        for j in range(ws * ws):
            (yi, xi), (yj, xj) = divmod(i, ws), divmod(j, ws)
            assert idx[i, j] == abs(yi - yj) * ws + abs(xi - xj)
    model = create_model("tiny_vit_test")
    attn = model.stages[2].blocks[0].attn  # window 4, 3 heads: one bias per head and |offset| (4 x 4 of them)
    assert attn.attention_biases.shape == (3, 16)
    with torch.no_grad():
        attn.attention_biases.copy_(torch.randn(3, 16))
    b = attn.bias()
    assert b.shape == (3, 16, 16)
    torch.testing.assert_close(b[:, 1, 4], attn.attention_biases[:, 1 * 4 + 1])  # (0, 1) vs (1, 0): |1|, |1|
    torch.testing.assert_close(b, b.transpose(1, 2))  # symmetric: |i - j| = |j - i|


def test_mbconv_matches_definition():
    torch.manual_seed(0)
    blk = trained_like(MBConv(16, 4.0))
    assert blk.expand.conv.out_channels == 64 and blk.dw.conv.groups == 64  # expansion 4, depthwise 3x3
    x = torch.randn(2, 16, 7, 7)
    h = F.gelu(bn(F.conv2d(x, blk.expand.conv.weight), blk.expand.bn))
    h = F.gelu(bn(F.conv2d(h, blk.dw.conv.weight, padding=1, groups=64), blk.dw.bn))
    ref = F.gelu(x + bn(F.conv2d(h, blk.project.conv.weight), blk.project.bn))  # residual, then GELU
    torch.testing.assert_close(blk(x), ref, atol=1e-5, rtol=1e-5)


def test_stem_and_mask_at_stride_4():
    torch.manual_seed(0)
    model = trained_like(create_model("tiny_vit_test", mask_token=True))
    x = torch.randn(2, 3, 30, 32)  # 30 -> 15 -> 8 rows (ceil), 32 -> 8 columns
    s = model.stem
    ref = bn(F.conv2d(x, s.conv1.conv.weight, stride=2, padding=1), s.conv1.bn)
    ref = bn(F.conv2d(F.gelu(ref), s.conv2.conv.weight, stride=2, padding=1), s.conv2.bn)
    torch.testing.assert_close(s(x), ref, atol=1e-5, rtol=1e-5)
    assert ref.shape == (2, 32, 8, 8)
    mask = torch.zeros(2, 8, 8, dtype=torch.bool)
    mask[0, 3:] = True
    out = model.embed(x, mask)
    torch.testing.assert_close(out[0, :, 3:], model.mask_token[0].expand(-1, 5, 8))
    torch.testing.assert_close(out[1], ref[1])
    with pytest.raises(ValueError, match="stem grid"):
        model.embed(x, torch.zeros(2, 7, 8, dtype=torch.bool))


def test_windows_follow_the_resolution_and_bad_lists_are_refused():
    with torch.device("meta"):
        assert create_model("tiny_vit_21m_224").window_sizes == [7, 14, 7]  # the paper's, at 224
        assert create_model("tiny_vit_21m_224", img_size=384).window_sizes == [12, 24, 12]  # timm's 384 model
        assert create_model("tiny_vit_21m_224", img_size=512).window_sizes == [16, 32, 16]  # and 512
    with pytest.raises(ValueError, match="one entry per attention stage"):
        create_model("tiny_vit_test", num_heads=(1, 2, 3, 4))
    with pytest.raises(ValueError, match="window_sizes has no default"):
        TinyViT(dims=(16, 32), depths=(1, 1), num_heads=(2,))


def test_stochastic_depth_schedule():
    model = create_model("tiny_vit_test", drop_path_rate=0.3)
    rates = [b.drop_path for s in model.stages for b in s.blocks]
    assert rates == pytest.approx(torch.linspace(0, 0.3, 5).tolist())  # linear over all blocks, as timm


# --- the whole model against timm ------------------------------------------------------------------------------


def outputs(model, x) -> dict[str, object]:
    """features, every stage, pooled and logits, from one model (timm's and Tessera's share the layouts)."""
    if isinstance(model, TimmTinyVit):
        feats, stages = model.forward_intermediates(x)
    else:
        feats, stages = model.forward_features(x), model.forward_intermediates(x)
    return dict(
        features=feats,
        stages=stages,
        pooled=model.forward_head(feats, pre_logits=True),
        logits=model.forward_head(feats),
    )


def assert_same(ours: dict, theirs: dict, atol: float) -> float:
    """Maps within atol times their scale (max(1, max |x|)); pooled and logits likewise. Returns the max abs diff."""
    assert len(ours["stages"]) == len(theirs["stages"]) == 4
    pairs = [("features", ours["features"], theirs["features"])]
    pairs += [(f"stage {i}", a, b) for i, (a, b) in enumerate(zip(ours["stages"], theirs["stages"]))]
    pairs += [(k, ours[k], theirs[k]) for k in ("pooled", "logits")]
    worst = 0.0
    for what, a, b in pairs:
        assert a.shape == b.shape, what
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a, b, atol=atol * scale, rtol=0, msg=lambda m, w=what: f"{w}: {m}")
        worst = max(worst, (a - b).abs().max().item())
    return worst


# (64, 64): every window divides its map; (75, 80): odd rows in the stem and padded windows in stages 2 and 3
@pytest.mark.parametrize("size", [(64, 64), (75, 80)])
def test_parity_with_timm_both_ways(size):
    """A timm model from its own init, perturbed, imported (from_timm); our model exported (to_timm). fp32 to 1e-5;
    fp64 to 1e-10 (the same math, not just close)."""
    torch.manual_seed(0)
    theirs = trained_like(TimmTinyVit(**TEST_KWARGS, num_classes=7, drop_path_rate=0.0))
    ours = from_timm(theirs, img_size=64)
    assert ours.hparams() == create_model("tiny_vit_test", num_classes=7).hparams()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        assert_same(outputs(ours, x), outputs(theirs, x), atol=1e-5)
        mine = trained_like(create_model("tiny_vit_test", num_classes=7), seed=2)
        assert_same(outputs(mine, x), outputs(to_timm(mine), x), atol=1e-5)
        ours, theirs, x = ours.double(), theirs.double(), x.double()
        assert_same(outputs(ours, x), outputs(theirs, x), atol=1e-10)


@pytest.mark.parametrize(
    "name",  # 11M and 21M: the same code as 5M at other depths and widths, and slow on CPU
    [PAPER[0], *(pytest.param(n, marks=pytest.mark.slow) for n in PAPER[1:])],
)
def test_paper_sizes_match_timm_at_224(name):
    """The paper's architectures at full depth and 224 px (windows 7, 14 = the whole map, 7): timm's model,
    perturbed, against ours built from it (and ours exported back), fp32 to 1e-5 of the activations' scale."""
    torch.manual_seed(0)
    theirs = trained_like(timm.create_model(name, num_classes=1000))
    ours = from_timm(theirs)
    assert ours.hparams() == create_model(name, num_classes=1000).hparams()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        diff = assert_same(outputs(ours, x), outputs(theirs, x), atol=1e-5)
        back = to_timm(ours)
        torch.testing.assert_close(back(x), theirs(x), atol=0, rtol=0)  # the same weights, the same model
    print(f"{name}: max abs diff {diff:.2e}")


def test_parity_in_train_mode_without_classifier():
    """Train mode (BatchNorm batch statistics and the running stats they update) and num_classes=0, in fp64."""
    torch.manual_seed(0)
    ours = trained_like(create_model("tiny_vit_test")).double()
    theirs = to_timm(ours).double()
    assert isinstance(theirs.head.fc, nn.Identity)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    ours.train()
    theirs.train()
    a, b = ours.forward_features(x), theirs.forward_features(x)
    torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-10, rtol=0)  # num_classes=0: forward = pooled
    back = tiny_vit_from_timm_state_dict(theirs.state_dict())  # the running stats moved the same way
    for k, v in ours.state_dict().items():
        torch.testing.assert_close(back[k], v, atol=1e-12, rtol=0, msg=k)


def test_key_map_is_complete_both_ways():
    ours = trained_like(create_model("tiny_vit_test", num_classes=3, mask_token=True))
    sd = ours.state_dict()
    timm_sd = tiny_vit_to_timm_state_dict(sd)  # timm has no mask token: it is left out
    assert set(timm_sd) == set(TimmTinyVit(**TEST_KWARGS, num_classes=3).state_dict())
    back = tiny_vit_from_timm_state_dict(timm_sd)
    assert set(back) == set(sd) - {"mask_token"} and all(torch.equal(back[k], sd[k]) for k in back)
    theirs = TimmTinyVit(**TEST_KWARGS, num_classes=3).state_dict()
    assert set(tiny_vit_to_timm_state_dict(tiny_vit_from_timm_state_dict(theirs))) == set(theirs)
    with pytest.raises(KeyError, match="no TinyViT key map entry"):
        tiny_vit_from_timm_state_dict({"stages.1.blocks.0.unknown.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="act_layer"):
        from_timm(TimmTinyVit(**TEST_KWARGS, act_layer=nn.SiLU))


@pytest.mark.parametrize("name", PAPER)
def test_paper_sizes_equal_timm(name):
    """Every weight of tiny_vit_{5m,11m,21m}_224 has the shape of timm's (5.4M, 11.0M, 21.2M parameters)."""
    with torch.device("meta"):
        ours = create_model(name, num_classes=1000)
        theirs = timm.create_model(name, num_classes=1000)
    shapes = {k: v.shape for k, v in tiny_vit_to_timm_state_dict(ours.state_dict()).items()}
    assert shapes == {k: v.shape for k, v in theirs.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())


# --- distillation: TinyViT as the student ----------------------------------------------------------------------


def test_distill_tinyvit_tiny_config_trains(tmp_path, digits_shards):
    """configs/distill_tinyvit_tiny.yaml (the ImageNet MobileNetV2 teacher online, KD + feature loss) for 12 steps
    through pretrain.train.main: every loss finite, the last steps' mean below the first steps'."""
    from pretrain.train import main

    args = [str(ROOT / "configs" / "distill_tinyvit_tiny.yaml")]
    for s in (
        f"run.output_dir={tmp_path / 'run'}",
        f"data.local={digits_shards}",
        "run.progress=false",
        "run.log_interval=1",
        "train.max_steps=12",
        "checkpoint.interval=12",
    ):
        args += ["--set", s]
    assert main(args) == 0
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(1, 13))
    losses = [r["loss"] for r in rows]
    assert all(math.isfinite(v) for v in losses), losses
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
