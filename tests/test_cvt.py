"""CvT: Hugging Face parity both ways (odd input sizes too), paper sizes, and the paper's mechanisms."""

import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import models.cvt_hf  # noqa: F401  (registers the CvT sizes and their HF adapter)
from models import create_model
from models.cvt import CvT
from models.cvt_hf import cvt_config, cvt_from_hf, hf_name
from models.hf import adapter_for_model
from ops.compat import import_transformers
from pretrain.export import from_hf, to_hf

tf = import_transformers()
SIZES = [(64, 64), (37, 53)]  # native, and odd sizes: stem grid 9x13, then 5x7, 3x4


pytestmark = pytest.mark.usefixtures("hf_offline")


def trained_like(module: nn.Module, seed: int = 1) -> nn.Module:
    """Perturb every weight and every BatchNorm statistic, so parity cannot pass by init symmetry (unit norms,
    zero biases, zero running means, unit running variances); eval()."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return module.eval()


def assert_parity(model, hf, x, atol=1e-5):
    """Every output the adapter reads from `hf` equals Tessera's: features, EVERY stage, pooled, logits; and
    the features are CvtModel's own two outputs, cls_token_value and last_hidden_state, side by side."""
    with torch.no_grad():
        theirs = adapter_for_model(model).hf_outputs(hf, x)
        feats = model.forward_features(x)
        torch.testing.assert_close(feats, theirs["features"], atol=atol, rtol=0)
        raw = getattr(hf, "cvt", hf)(pixel_values=x)
        P = model.num_prefix_tokens
        torch.testing.assert_close(
            feats[:, P:], raw.last_hidden_state.flatten(2).transpose(1, 2), atol=atol, rtol=0
        )
        if P:
            torch.testing.assert_close(feats[:, :1], raw.cls_token_value, atol=atol, rtol=0)
        else:
            assert raw.cls_token_value is None
        stages = model.forward_intermediates(x)
        assert len(stages) == len(theirs["stages"]) == len(model.feature_info)
        for ours, ref, info in zip(stages, theirs["stages"], model.feature_info):
            assert ours.shape[1] == info["num_chs"]
            torch.testing.assert_close(ours, ref, atol=atol, rtol=0)
        torch.testing.assert_close(
            model.forward_head(feats, pre_logits=True), theirs["pooled"], atol=atol, rtol=0
        )
        if isinstance(model.head, nn.Linear):
            torch.testing.assert_close(model(x), theirs["logits"], atol=atol, rtol=0)
        else:
            assert "logits" not in theirs


@pytest.mark.parametrize(
    "name, kw, dtype, atol",
    [
        ("cvt_test", dict(), torch.float32, 1e-5),
        ("cvt_test", dict(num_classes=7, in_chans=1), torch.float32, 1e-5),
        ("cvt_test", dict(num_classes=3, cls_token=False, qkv_bias=False), torch.float32, 1e-5),
        # CvT-13's widths: features reach ~10, where fp32 rounding alone differs by ~1e-5: compared in fp64
        ("cvt_13", dict(img_size=64, depths=(1, 2, 3), num_classes=5), torch.float64, 1e-10),
    ],
)
def test_export_parity_and_back(tmp_path, name, kw, dtype, atol):
    """Tessera -> HF: the exported folder loads in CvtForImageClassification with every key, CvtModel loads
    its base from it, both match; from_hf gives the same model back."""
    torch.manual_seed(0)
    model = trained_like(create_model(name, **kw))
    to_hf(model, tmp_path)
    hf, info = tf.CvtForImageClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    base, info = tf.CvtModel.from_pretrained(tmp_path, output_loading_info=True)
    heads = ["layernorm."] + (["classifier."] if kw.get("num_classes") else [])
    assert sorted(info["unexpected_keys"]) == sorted(f"{h}{w}" for h in heads for w in ("weight", "bias"))
    assert not info["missing_keys"] and not info["mismatched_keys"]
    back = from_hf(tmp_path)
    assert isinstance(back, CvT) and back.hparams() == model.hparams()
    model, hf, base, back = (m.to(dtype).eval() for m in (model, hf, base, back))
    batch, sizes = (2, SIZES) if dtype == torch.float32 else (1, SIZES[1:])  # fp64 convs are slow on CPU
    for size in sizes:
        x = torch.randn(batch, model.in_chans, *size, dtype=dtype)
        assert_parity(model, hf, x, atol)
        with torch.no_grad():
            # the bare model: features and stages too (its pooled reads a unit-affine norm, not Tessera's)
            theirs = adapter_for_model(model).hf_outputs(base, x)
            torch.testing.assert_close(theirs["features"], model.forward_features(x), atol=atol, rtol=0)
            torch.testing.assert_close(back(x), model(x), atol=0, rtol=0)


def _hf_model(cls, seed=0, **cfg):
    torch.manual_seed(seed)
    return trained_like(getattr(tf, cls)(tf.CvtConfig(**cfg)))


# HF -> Tessera: configs as transformers reads them (lists longer than the stages it builds, pair kernels,
# dropouts and stochastic depth, another eps it never reads)
IMPORTS = {
    "base-3-stages": (
        "CvtModel",
        dict(embed_dim=[16, 24, 32], num_heads=[1, 2, 4], depth=[1, 2, 3], num_channels=2),
    ),
    "classifier-2-stages-long-lists-pairs-dropouts": (
        "CvtForImageClassification",
        dict(
            embed_dim=[16, 32, 32],  # the final norm and classifier take embed_dim[-1] = embed_dim[1]
            num_heads=[2, 4, 8],
            depth=[1, 2],
            mlp_ratio=[2.0, 3.0, 4.0],
            patch_sizes=[[7, 7], 3, 3],
            kernel_qkv=[[3, 3], 3, 3],
            cls_token=[False, True, True],
            drop_rate=[0.1, 0.1, 0.1],
            attention_drop_rate=[0.1, 0.1, 0.1],
            drop_path_rate=[0.0, 0.2, 0.3],
            layer_norm_eps=1e-6,
            num_labels=3,
        ),
    ),
    "classifier-no-cls-token-no-qkv-bias-kv-stride-1": (
        "CvtForImageClassification",
        dict(
            embed_dim=[8, 16, 24],
            num_heads=[1, 2, 3],
            depth=[1, 2, 3],
            cls_token=[False, False, False],
            qkv_bias=[False] * 3,
            stride_kv=[1, 1, 1],
            num_labels=4,
        ),
    ),
}


@pytest.mark.parametrize("case", list(IMPORTS))
def test_hf_initialised_folder_imports(tmp_path, case):
    """The other way: a folder transformers wrote from its own (perturbed) init, read by export.from_hf."""
    cls, cfg = IMPORTS[case]
    hf = _hf_model(cls, **cfg)
    hf.save_pretrained(tmp_path)
    ours = from_hf(tmp_path)
    assert isinstance(ours, CvT) and ours.in_chans == hf.config.num_channels
    assert isinstance(ours.head, nn.Linear) == (cls == "CvtForImageClassification")
    for size in [(48, 48), (45, 31)]:
        assert_parity(ours, hf, torch.randn(2, hf.config.num_channels, *size))


def test_from_hf_rejects_what_it_cannot_represent():
    small = dict(embed_dim=[8, 8, 8], num_heads=[1, 1, 1], depth=[1, 2, 3])
    sd = tf.CvtModel(tf.CvtConfig(**small)).state_dict()
    assert isinstance(cvt_from_hf(sd, tf.CvtConfig(**small)), CvT)  # the valid baseline loads
    for field, value in [
        ("qkv_projection_method", ["dw_bn", "avg", "dw_bn"]),
        ("cls_token", [False, True, True]),
        ("kernel_qkv", [3, 5, 3]),
        ("padding_q", [1, 1, 0]),
        ("stride_kv", [2, [2, 1], 2]),
        ("qkv_bias", [True, False, True]),
        ("patch_sizes", [[7, 5], 3, 3]),
        ("drop_path_rate", [0.0, 0.0, 1.0]),
        ("embed_dim", [8, 8]),
    ]:
        cfg = tf.CvtConfig(**{**small, field: value})
        with pytest.raises(ValueError, match=rf"CvtConfig\.{field}="):
            cvt_from_hf(sd, cfg)
    with pytest.raises(RuntimeError, match="lacks"):
        cvt_from_hf({k: v for k, v in sd.items() if "projection_key" not in k}, tf.CvtConfig(**small))
    with pytest.raises(RuntimeError, match="unexpected"):
        cvt_from_hf({**sd, "encoder.extra.weight": torch.zeros(1)}, tf.CvtConfig(**small))
    with pytest.raises(ValueError, match="depth"):  # transformers' CvtStage cannot build depth[i] <= i
        cvt_config(create_model("cvt_test", depths=(1, 1, 1)))


def test_key_map_is_complete_both_ways():
    """Every Tessera key maps to a distinct CvtForImageClassification key and every HF key is reached."""
    model = create_model("cvt_test", num_classes=4, mask_token=True)
    hf = tf.CvtForImageClassification(cvt_config(model))
    top = {"norm.weight": "layernorm.weight", "norm.bias": "layernorm.bias"}
    top |= {"head.weight": "classifier.weight", "head.bias": "classifier.bias"}
    names = [top.get(k) or "cvt." + hf_name(k) for k in model.state_dict() if k != "mask_token"]
    assert len(set(names)) == len(names) and set(names) == set(hf.state_dict())
    assert any("running_var" in n for n in names) and "cvt.encoder.stages.2.cls_token" in names


@pytest.mark.parametrize("name, paper", [("cvt_13", 20e6), ("cvt_21", 32e6), ("cvt_w24", 277e6)])
def test_param_count_equals_hf(name, paper):
    with torch.device("meta"):
        model = create_model(name, num_classes=1000)
        hf = tf.CvtForImageClassification(cvt_config(model))
    ours = sum(p.numel() for p in model.parameters())
    assert ours == sum(p.numel() for p in hf.parameters())
    assert abs(ours - paper) / paper < 0.02, ours  # the paper's Table 2 (ImageNet-1k head)


# --- paper mechanisms ---------------------------------------------------------------------------------------


def test_convolutional_token_embedding():
    model = create_model("cvt_test").eval()
    convs = [model.patch_embed.proj] + [s.downsample.proj for s in model.stages[1:]]
    assert [(c.kernel_size, c.stride, c.padding) for c in convs] == [((7, 7), (4, 4), (2, 2))] + [
        ((3, 3), (2, 2), (1, 1))
    ] * 2
    assert model.stages[0].downsample is None  # stage 1's embedding is the stem
    x = torch.zeros(1, 3, 32, 32)
    with torch.no_grad():
        base, hw = model.patch_embed(x)
        y = x.clone()
        y[..., 5, 5] = 10.0  # token t sees pixels 4t - 2 .. 4t + 4: pixel 5 only token 1's window
        changed = (model.patch_embed(y)[0] - base).abs().sum(-1).view(*hw) > 1e-6
    expected = torch.zeros(hw, dtype=torch.bool)
    expected[1, 1] = True
    y[..., 5, 5], y[..., 2, 2] = 0.0, 10.0  # pixel 2: tokens 0 (-2..4) and 1 (2..8) overlap on it
    with torch.no_grad():
        overlap = (model.patch_embed(y)[0] - base).abs().sum(-1).view(*hw) > 1e-6
    assert torch.equal(changed, expected)
    assert overlap[:2, :2].all() and overlap.sum() == 4
    torch.testing.assert_close(base.mean(-1), torch.zeros(1, hw[0] * hw[1]), atol=1e-5, rtol=0)  # LayerNorm
    # no position embedding: no parameter beyond convs, norms, linears and the CLS token
    assert not [n for n, _ in model.named_parameters() if "pos" in n]


def reference_attention(attn, x, hw, cls):
    """The convolutional projection by definition: tokens -> map, depthwise conv + BatchNorm (running stats),
    CLS token prepended, linear, softmax(q k^T / sqrt(dim)) v (per head), output projection."""
    B, N, C = x.shape
    m = x[:, cls:].transpose(1, 2).reshape(B, C, *hw)

    def proj(p, lin):
        y = F.conv2d(m, p.conv.weight, None, p.conv.stride, p.conv.padding, groups=C)
        y = F.batch_norm(y, p.bn.running_mean, p.bn.running_var, p.bn.weight, p.bn.bias, eps=1e-5)
        return lin(torch.cat([x[:, :cls], y.flatten(2).transpose(1, 2)], 1)).unflatten(
            -1, (attn.num_heads, -1)
        )

    q, k, v = proj(attn.conv_q, attn.q), proj(attn.conv_k, attn.k), proj(attn.conv_v, attn.v)
    w = torch.einsum("blhd,bmhd->bhlm", q, k) * C**-0.5
    return attn.proj(torch.einsum("bhlm,bmhd->blhd", w.softmax(-1), v).reshape(B, -1, C))


@pytest.mark.parametrize("stage, hw", [(0, (9, 13)), (2, (3, 4))])
def test_convolutional_projection_attention(stage, hw):
    """Depthwise conv + BN per q / k / v, q at stride 1 (every token asks), k / v at stride 2 (ceil(h / 2) x
    ceil(w / 2) keys); the CLS token (last stage only) skips the convolutions."""
    torch.manual_seed(0)
    model = trained_like(create_model("cvt_test"))
    attn = model.stages[stage].blocks[0].attn
    assert [p.conv.stride for p in (attn.conv_q, attn.conv_k, attn.conv_v)] == [(1, 1), (2, 2), (2, 2)]
    assert all(
        p.conv.groups == p.conv.in_channels and p.conv.bias is None for p in (attn.conv_k, attn.conv_q)
    )
    cls = int(stage == 2)
    assert [s.cls_token is not None for s in model.stages] == [False, False, True]
    x = torch.randn(2, cls + hw[0] * hw[1], attn.q.in_features)
    with torch.no_grad():
        q, k, v = attn.project(x, hw, cls)
        assert q.shape[1] == x.shape[1] and k.shape[1] == v.shape[1] == cls + -(-hw[0] // 2) * -(-hw[1] // 2)
        torch.testing.assert_close(
            attn.attend(q, k, v), reference_attention(attn, x, hw, cls), atol=1e-5, rtol=0
        )


def test_stochastic_depth_in_the_last_stage():
    with torch.device("meta"):
        model = create_model("cvt_13", drop_path_rate=0.1)
    rates = [[b.drop_path for b in s.blocks] for s in model.stages]
    assert rates[:2] == [[0.0], [0.0, 0.0]]
    torch.testing.assert_close(torch.tensor(rates[2]), torch.linspace(0, 0.1, 10), atol=1e-7, rtol=0)
    assert cvt_config(model).drop_path_rate == [0.0, 0.0, 0.1]


@pytest.mark.parametrize("mask_token", [False, True])
def test_mask_replaces_stem_tokens(mask_token):
    torch.manual_seed(0)
    model = trained_like(create_model("cvt_test", mask_token=mask_token))
    assert model.stem_stride == 4
    x = torch.randn(2, 3, 37, 53)
    grid = (2, 9, 13)  # the stem grid of a 37x53 input: floor((H + 4 - 7) / 4) + 1
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
        model.forward_features(x, torch.zeros(2, 10, 14, dtype=torch.bool))
    wd = {"stages.2.cls_token"} | ({"mask_token"} if mask_token else set())
    assert model.no_weight_decay() == wd
    if mask_token:
        model.forward_features(x, mask).square().mean().backward()
        assert model.mask_token.grad.abs().sum() > 0


def test_contract_details():
    torch.manual_seed(0)
    model = create_model("cvt_test", num_classes=4, mask_token=True)
    rebuilt = CvT(**model.hparams())
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 1 + 4 * 4, 48) and model(x).shape == (2, 4)
        torch.testing.assert_close(model.forward_head(feats, pre_logits=True), model.norm(feats[:, 0]))
        last, first = model.forward_intermediates(x, indices=[-1]), model.forward_intermediates(x, [0])
        torch.testing.assert_close(last[0].flatten(2).transpose(1, 2), feats[:, 1:])
        assert first[0].shape == (2, 16, 16, 16)
    for coarse in (False, True):  # layer-wise LR decay groups: every parameter in exactly one group
        gm = model.group_matcher(coarse)
        blocks = [gm["blocks"]] if isinstance(gm["blocks"], str) else [r for r, _ in gm["blocks"]]
        for n, _ in model.named_parameters():
            hits = [re.match(gm["stem"], n), any(re.match(r, n) for r in blocks), re.match(gm["head"], n)]
            assert sum(bool(h) for h in hits) == 1, n
    # activation checkpointing: same outputs, gradients and BatchNorm statistics (updated once, not twice)
    runs = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        m = create_model("cvt_test").train()
        m.set_grad_checkpointing(ckpt)
        m.forward_features(x).square().mean().backward()
        runs.append((m.stages[1].blocks[0].attn.conv_k.bn.num_batches_tracked.item(), m))
    assert runs[0][0] == runs[1][0] == 1
    for (n, p), (_, q) in zip(runs[0][1].named_parameters(), runs[1][1].named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=lambda s, n=n: f"{n}: {s}")
