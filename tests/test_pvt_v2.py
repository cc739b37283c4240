"""PVT v2: Hugging Face parity both ways (odd input sizes too), paper sizes, and the paper's mechanisms."""

import re

import pytest
import torch
import torch.nn.functional as F

import models.pvt_v2_hf  # noqa: F401  (registers the PVT v2 sizes and their HF adapter)
from models import create_model
from models.hf import adapter_for_model
from models.pvt_v2 import PyramidVisionTransformerV2
from models.pvt_v2_hf import pvt_v2_config, pvt_v2_from_hf
from ops.compat import import_transformers
from ops.spatial_reduction import reference_reduce_tokens, reference_sr_attention
from pretrain.export import from_hf, to_hf
from tests.conftest import trained_like

tf = import_transformers()
SIZES = [(64, 64), (37, 53)]  # native, and odd sizes: stem grid 10x14, then 5x7, 3x4, 2x2


pytestmark = pytest.mark.usefixtures("hf_offline")


def assert_parity(model, hf, x, atol=1e-5):
    """Every output the adapter reads from `hf` equals Tessera's: features, EVERY stage, pooled, logits."""
    with torch.no_grad():
        theirs = adapter_for_model(model).hf_outputs(hf, x)
        feats = model.forward_features(x)
        torch.testing.assert_close(feats, theirs["features"], atol=atol, rtol=0)
        stages = model.forward_intermediates(x)
        assert len(stages) == len(theirs["stages"]) == len(model.feature_info)
        for ours, ref, info in zip(stages, theirs["stages"], model.feature_info):
            assert ours.shape[1] == info["num_chs"]
            torch.testing.assert_close(ours, ref, atol=atol, rtol=0)
        torch.testing.assert_close(
            model.forward_head(feats, pre_logits=True), theirs["pooled"], atol=atol, rtol=0
        )
        if model.head.__class__ is torch.nn.Linear:
            torch.testing.assert_close(model(x), theirs["logits"], atol=atol, rtol=0)
        else:
            assert "logits" not in theirs


@pytest.mark.parametrize(
    "name, kw, cls",
    [
        ("pvt_v2_test", dict(), "PvtV2Model"),
        ("pvt_v2_b0", dict(img_size=64, depths=(1, 1, 1, 1), num_classes=7), "PvtV2ForImageClassification"),
        (
            "pvt_v2_b2_li",
            dict(img_size=64, depths=(1, 1, 1, 1), num_classes=3),
            "PvtV2ForImageClassification",
        ),
    ],
)
def test_export_parity_and_back(tmp_path, name, kw, cls):
    torch.manual_seed(0)
    model = trained_like(create_model(name, **kw))
    to_hf(model, tmp_path)
    hf = getattr(tf, cls).from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == cls
    back = from_hf(tmp_path)
    assert isinstance(back, PyramidVisionTransformerV2) and back.hparams() == model.hparams()
    for size in SIZES:
        x = torch.randn(2, 3, *size)
        assert_parity(model, hf, x)
        with torch.no_grad():
            torch.testing.assert_close(back(x), model(x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("linear, num_labels", [(False, 0), (True, 5)])
def test_hf_initialised_folder_imports(tmp_path, linear, num_labels):
    """The other way: a folder transformers wrote from its own random init, read by export.from_hf."""
    cfg = tf.PvtV2Config(
        image_size=48,
        num_channels=2,
        depths=[1, 2, 1, 1],
        hidden_sizes=[16, 24, 32, 40],
        num_attention_heads=[1, 2, 2, 4],
        mlp_ratios=[4, 2, 2, 2],
        sr_ratios=[4, 2, 2, 1],
        linear_attention=linear,
        num_labels=num_labels,
    )
    torch.manual_seed(0)
    hf = (tf.PvtV2ForImageClassification if num_labels else tf.PvtV2Model)(cfg).eval()
    hf.save_pretrained(tmp_path)
    ours = from_hf(tmp_path)
    assert ours.in_chans == 2 and ours.sr_ratios == (4, 2, 2, 1) and ours.linear is linear
    for size in [(48, 48), (45, 31)]:
        assert_parity(ours, hf, torch.randn(2, 2, *size))


def test_from_hf_rejects_what_it_cannot_represent():
    def config(**kw):
        return tf.PvtV2Config(
            hidden_sizes=[8, 8, 8, 8], depths=[1, 1, 1, 1], num_attention_heads=[1] * 4, **kw
        )

    sd = tf.PvtV2Model(config()).state_dict()
    assert isinstance(pvt_v2_from_hf(sd, config()), PyramidVisionTransformerV2)  # the valid baseline loads
    for field, value in [
        ("hidden_act", "relu"),
        ("patch_sizes", [[7, 5], 3, 3, 3]),
        ("strides", [[4, 2], 2, 2, 2]),
    ]:
        with pytest.raises(ValueError, match=field):
            pvt_v2_from_hf(sd, config(**{field: value}))
    with pytest.raises(ValueError, match="sr_ratios"):
        pvt_v2_from_hf(sd, config(sr_ratios=[8, 4, 2]))
    with pytest.raises(RuntimeError, match="lacks"):
        pvt_v2_from_hf({k: v for k, v in sd.items() if "attention.key" not in k}, config())
    with pytest.raises(RuntimeError, match="unexpected"):
        pvt_v2_from_hf({**sd, "encoder.extra.weight": torch.zeros(1)}, config())


@pytest.mark.parametrize(
    "name, paper", [("pvt_v2_b0", 3.7e6), ("pvt_v2_b2", 25.4e6), ("pvt_v2_b2_li", 22.6e6)]
)
def test_param_count_equals_hf(name, paper):
    with torch.device("meta"):
        model = create_model(name, num_classes=1000)
        hf = tf.PvtV2ForImageClassification(pvt_v2_config(model))
    ours = sum(p.numel() for p in model.parameters())
    assert ours == sum(p.numel() for p in hf.parameters())
    assert abs(ours - paper) / paper < 0.01, ours  # the paper's Table (ImageNet-1k head)


# --- paper mechanisms ---------------------------------------------------------------------------------------


def test_overlapping_patch_embedding():
    model = create_model("pvt_v2_test").eval()
    convs = [model.patch_embed.proj] + [s.downsample.proj for s in model.stages[1:]]
    assert [(c.kernel_size, c.stride, c.padding) for c in convs] == [((7, 7), (4, 4), (3, 3))] + [
        ((3, 3), (2, 2), (1, 1))
    ] * 3
    assert model.stages[0].downsample is None  # stage 1's embedding is the stem
    x = torch.zeros(1, 3, 32, 32)
    with torch.no_grad():
        base, hw = model.patch_embed(x)
        y = x.clone()
        y[..., 3, 3] = 10.0  # pixel 3 lies in the 7-wide windows of stem tokens 0 (-3..3) and 1 (1..7)
        changed = (model.patch_embed(y)[0] - base).abs().sum(-1).view(*hw) > 1e-6
    expected = torch.zeros(hw, dtype=torch.bool)
    expected[:2, :2] = True
    assert torch.equal(changed, expected)
    # the embedding ends in a LayerNorm (unit weight, zero bias at init): each token is normalised
    torch.testing.assert_close(base.mean(-1), torch.zeros(1, hw[0] * hw[1]), atol=1e-5, rtol=0)


def test_stage_grids_for_any_size():
    model = create_model("pvt_v2_test").eval()
    with torch.no_grad():
        maps = model.forward_intermediates(torch.randn(1, 3, 37, 53))
    # floor((H + 2 (k // 2) - k) / s) + 1 = ceil(H / s) per conv
    assert [m.shape[-2:] for m in maps] == [(10, 14), (5, 7), (3, 4), (2, 2)]
    assert [i["reduction"] for i in model.feature_info] == [4, 8, 16, 32]


@pytest.mark.parametrize("name", ["pvt_v2_test", "pvt_v2_b2_li"])
def test_spatial_reduction_attention_per_stage(name):
    """Each stage's attention = reference SRA with its sr ratio: keys/values from (h // sr) x (w // sr) cells
    (linear: a 7x7 pool); the last stage (sr 1) is plain attention with no reduction."""
    torch.manual_seed(0)
    model = trained_like(create_model(name, depths=(1, 1, 1, 1)))
    assert model.sr_ratios == (8, 4, 2, 1)
    hws = [(13, 19), (7, 10), (4, 5), (2, 3)]
    for stage, sr, hw in zip(model.stages, model.sr_ratios, hws):
        attn = stage.blocks[0].attn
        C = stage.norm.normalized_shape[0]
        x = torch.randn(2, hw[0] * hw[1], C)
        with torch.no_grad():
            if attn.sr is not None:
                w = (attn.sr.weight, attn.sr.bias, attn.norm.weight, attn.norm.bias)
            if model.linear:
                kv = reference_reduce_tokens(x, hw, 1, *w, 1e-6, linear=True)
                assert kv.shape[1] == 49 and attn.sr.kernel_size == (1, 1)
            elif sr > 1:
                kv = reference_reduce_tokens(x, hw, sr, *w, 1e-6)
                assert kv.shape[1] == (hw[0] // sr) * (hw[1] // sr) and attn.sr.stride == (sr, sr)
            else:
                assert attn.sr is None and attn.norm is None
                kv = x
            ref = attn.proj(reference_sr_attention(attn.q(x), attn.kv(kv), attn.num_heads))
            torch.testing.assert_close(attn(x, hw), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("linear", [False, True])
def test_convolutional_feed_forward(linear):
    """fc1 -> [ReLU (li)] -> depthwise 3x3 conv -> GELU -> fc2: a token's output sees its 3x3 neighbours."""
    torch.manual_seed(0)
    mlp = trained_like(create_model("pvt_v2_test", linear=linear)).stages[1].blocks[0].mlp
    assert mlp.dwconv.groups == mlp.dwconv.in_channels == mlp.fc1.out_features == 4 * 32
    H, W = 6, 7
    x = torch.randn(1, H * W, 32)
    with torch.no_grad():
        h = F.relu(mlp.fc1(x)) if linear else mlp.fc1(x)
        m = h.transpose(1, 2).reshape(1, -1, H, W)
        m = F.conv2d(m, mlp.dwconv.weight, mlp.dwconv.bias, padding=1, groups=m.shape[1])
        ref = mlp.fc2(F.gelu(m.flatten(2).transpose(1, 2)))
        torch.testing.assert_close(mlp(x, (H, W)), ref, atol=1e-5, rtol=0)
        y = x.clone()
        y[0, 3 * W + 3] += 5.0  # token (3, 3)
        changed = (mlp(y, (H, W)) - mlp(x, (H, W))).abs().sum(-1).view(H, W) > 1e-6
    expected = torch.zeros(H, W, dtype=torch.bool)
    expected[2:5, 2:5] = True
    assert torch.equal(changed, expected)


def test_stage_outputs_are_layer_normed():
    model = create_model("pvt_v2_test").eval()  # stage norms at init: unit weight, zero bias
    with torch.no_grad():
        maps = model.forward_intermediates(torch.randn(2, 3, 64, 64))
    for m in maps:
        torch.testing.assert_close(m.mean(1), torch.zeros_like(m[:, 0]), atol=1e-5, rtol=0)
        torch.testing.assert_close(m.var(1, unbiased=False), torch.ones_like(m[:, 0]), atol=1e-3, rtol=0)
    assert all(s.norm.eps == 1e-6 for s in model.stages)
    assert all(m.eps == 1e-6 for m in model.modules() if isinstance(m, torch.nn.LayerNorm))  # as HF's config


def test_stochastic_depth_grows_linearly_over_all_blocks():
    with torch.device("meta"):
        model = create_model("pvt_v2_b2", drop_path_rate=0.3)
    rates = [b.drop_path for s in model.stages for b in s.blocks]
    assert len(rates) == 16
    torch.testing.assert_close(torch.tensor(rates), torch.linspace(0, 0.3, 16), atol=1e-7, rtol=0)
    hf = tf.PvtV2Model(pvt_v2_config(create_model("pvt_v2_test", drop_path_rate=0.2)))
    ours = [b.drop_path for s in create_model("pvt_v2_test", drop_path_rate=0.2).stages for b in s.blocks]
    theirs = [getattr(b.drop_path, "drop_prob", 0.0) for layer in hf.encoder.layers for b in layer.blocks]
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), atol=1e-7, rtol=0)
    # active in training only: per-sample residual drops make two training passes differ
    small = create_model("pvt_v2_test", drop_path_rate=0.5)
    x = torch.randn(4, 3, 64, 64)
    small.train()
    assert not torch.allclose(small.forward_features(x), small.forward_features(x))
    small.eval()
    torch.testing.assert_close(small.forward_features(x), small.forward_features(x), atol=0, rtol=0)


@pytest.mark.parametrize("mask_token", [False, True])
def test_mask_replaces_stem_tokens(mask_token):
    torch.manual_seed(0)
    model = trained_like(create_model("pvt_v2_test", mask_token=mask_token))
    assert model.stem_stride == 4
    x = torch.randn(2, 3, 37, 53)
    grid = (2, 10, 14)  # the stem grid of a 37x53 input
    with torch.no_grad():
        ref = model.forward_features(x)
        torch.testing.assert_close(model.forward_features(x, torch.zeros(grid, dtype=torch.bool)), ref)
        full = torch.ones(grid, dtype=torch.bool)
        torch.testing.assert_close(
            model.forward_features(x, full), model.forward_features(torch.randn_like(x), full)
        )
        mask = torch.rand(grid) < 0.5
        tokens, hw = model.embed(x, mask)
        fill = model.mask_token[0, 0] if mask_token else torch.zeros(16)
        torch.testing.assert_close(tokens[mask.flatten(1)], fill.expand(int(mask.sum()), -1))
        torch.testing.assert_close(tokens[~mask.flatten(1)], model.embed(x)[0][~mask.flatten(1)])
        assert not torch.allclose(model.forward_features(x, mask), ref)
    with pytest.raises(ValueError, match="stem grid"):
        model.forward_features(x, torch.zeros(2, 9, 13, dtype=torch.bool))
    if mask_token:
        assert model.no_weight_decay() == {"mask_token"}
        model.forward_features(x, mask).square().mean().backward()
        assert model.mask_token.grad.abs().sum() > 0
    else:
        assert model.no_weight_decay() == set() and model.mask_token is None


def test_contract_details():
    torch.manual_seed(0)
    model = create_model("pvt_v2_test", num_classes=4, mask_token=True)
    rebuilt = PyramidVisionTransformerV2(**model.hparams())
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, 4)
        last, first = model.forward_intermediates(x, indices=[-1]), model.forward_intermediates(x, [0])
        torch.testing.assert_close(last[0], model.forward_features(x))
        assert first[0].shape == (2, 16, 16, 16)
    # layer-wise LR decay groups: every parameter in exactly one of stem / blocks / head
    for coarse in (False, True):
        gm = model.group_matcher(coarse)
        blocks = [gm["blocks"]] if isinstance(gm["blocks"], str) else [r for r, _ in gm["blocks"]]
        for n, _ in model.named_parameters():
            hits = [re.match(gm["stem"], n), any(re.match(r, n) for r in blocks), re.match(gm["head"], n)]
            assert sum(bool(h) for h in hits) == 1, n
    # activation checkpointing changes memory, not math (training mode, no stochastic depth)
    model.train()
    ref = model.forward_features(x)
    ref.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    out = model.forward_features(x)
    torch.testing.assert_close(out, ref)
    out.sum().backward()
    for n, g in grads.items():
        torch.testing.assert_close(model.get_parameter(n).grad, g, atol=1e-5, rtol=1e-4)
