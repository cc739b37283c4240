"""ConvNeXt / ConvNeXt V2: the paper's mechanisms, the backbone contract, and parity with transformers' twins."""

import re

import pytest
import torch
import torch.nn.functional as F

import models.convnext_hf  # noqa: F401  (registers the ConvNeXt sizes and their HF adapters)
from models import create_model, list_models
from models.convnext import GRN, ConvNeXt, ConvNeXtBlock, ConvNeXtV2
from models.hf import adapter_for_arch, adapter_for_model
from models.registry import MODELS
from ops.compat import import_transformers
from pretrain.export import from_hf, to_hf
from tests.conftest import trained_like

tf = import_transformers()
NAMES = list_models("convnext*")


pytestmark = pytest.mark.usefixtures("hf_offline")


def assert_parity(model, hf, x):
    """Every output the adapter reads from HF (last hidden state, every stage, pooled, logits) equals ours."""
    ref = adapter_for_model(model).hf_outputs(hf, x)
    feats = model.forward_features(x)
    torch.testing.assert_close(feats, ref["features"], atol=1e-5, rtol=0)
    ours = model.forward_intermediates(x)
    assert len(ours) == len(ref["stages"]) == len(model.feature_info)
    for i, (a, b) in enumerate(zip(ours, ref["stages"])):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=lambda m, i=i: f"stage {i}: {m}")
    torch.testing.assert_close(model.forward_head(feats, pre_logits=True), ref["pooled"], atol=1e-5, rtol=0)
    if isinstance(model.head, torch.nn.Linear):
        torch.testing.assert_close(model(x), ref["logits"], atol=1e-5, rtol=0)
        torch.testing.assert_close(model(x), hf(pixel_values=x).logits, atol=1e-5, rtol=0)
    else:
        assert "logits" not in ref


# --- paper mechanisms ---------------------------------------------------------------------------------------
def test_grn_matches_the_formula():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 7, 12, dtype=torch.float64, requires_grad=True)  # (B, H, W, C), channels last
    grn = GRN(12).double()
    torch.testing.assert_close(grn(x), x)  # zero gamma and beta: the identity at init
    with torch.no_grad():
        grn.gamma.normal_()
        grn.beta.normal_()
    gx = x.pow(2).sum(dim=(1, 2)).sqrt()  # (B, C): L2 norm of each channel over H, W
    nx = gx / (gx.mean(dim=1, keepdim=True) + 1e-6)  # (B, C): relative to the mean over channels
    ref = grn.gamma * (x * nx[:, None, None, :]) + grn.beta + x
    out = grn(x)
    torch.testing.assert_close(out, ref)
    w = torch.randn_like(out)
    g_out = torch.autograd.grad((out * w).sum(), [x, grn.gamma, grn.beta])
    g_ref = torch.autograd.grad((ref * w).sum(), [x, grn.gamma, grn.beta])
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, b)


def _block_reference(blk: ConvNeXtBlock, x: torch.Tensor) -> torch.Tensor:
    """The paper's block in its all-channels-first form: depthwise 7x7, LN over C, 1x1 convs, layer scale/GRN."""
    C = x.shape[1]
    y = F.conv2d(x, blk.dwconv.weight, blk.dwconv.bias, padding=3, groups=C)  # (B, C, H, W)
    mu, var = y.mean(1, keepdim=True), y.var(1, unbiased=False, keepdim=True)
    y = (y - mu) / (var + 1e-6).sqrt() * blk.norm.weight[:, None, None] + blk.norm.bias[:, None, None]
    y = F.gelu(torch.einsum("oc,bchw->bohw", blk.pwconv1.weight, y) + blk.pwconv1.bias[:, None, None])
    if blk.grn is not None:
        gx = y.pow(2).sum(dim=(2, 3), keepdim=True).sqrt()  # (B, 4C, 1, 1)
        nx = gx / (gx.mean(dim=1, keepdim=True) + 1e-6)
        y = blk.grn.gamma[:, None, None] * y * nx + blk.grn.beta[:, None, None] + y
    y = torch.einsum("oc,bchw->bohw", blk.pwconv2.weight, y) + blk.pwconv2.bias[:, None, None]
    if blk.gamma is not None:
        y = blk.gamma[:, None, None] * y
    return x + y


@pytest.mark.parametrize("ls, grn", [(1e-6, False), (0.0, False), (0.0, True)])
def test_block_matches_the_paper(ls, grn):
    torch.manual_seed(0)
    blk = ConvNeXtBlock(8, layer_scale_init_value=ls, grn=grn)
    assert blk.dwconv.kernel_size == (7, 7) and blk.dwconv.groups == 8
    assert blk.pwconv1.out_features == 32  # inverted bottleneck, 4x
    if ls:
        assert torch.equal(blk.gamma, torch.full((8,), 1e-6))  # layer scale starts at 1e-6
    else:
        assert blk.gamma is None and "gamma" not in dict(blk.named_parameters())
    x = torch.randn(2, 8, 9, 6)
    with torch.no_grad():
        if ls:  # at init the residual branch is scaled down to ~1e-6 of its size
            branch = _block_reference(blk, x) - x
            assert branch.abs().max() < 1e-5 and branch.abs().max() > 0
        trained_like(blk)
        torch.testing.assert_close(blk(x), _block_reference(blk, x), atol=1e-5, rtol=1e-5)


def test_v1_has_layer_scale_v2_has_grn():
    v1, v2 = create_model("convnext_test"), create_model("convnextv2_test")
    for blk in (b for s in v1.stages for b in s.blocks):
        assert blk.grn is None and torch.equal(blk.gamma, torch.full_like(blk.gamma, 1e-6))
    for blk in (b for s in v2.stages for b in s.blocks):
        assert blk.gamma is None
        assert not blk.grn.gamma.any() and not blk.grn.beta.any()


def test_stem_downsampling_and_stage_outputs():
    torch.manual_seed(0)
    model = trained_like(create_model("convnext_test", depths=(1, 2, 1, 1)))
    stem = model.stem[0]
    assert (stem.kernel_size, stem.stride) == ((4, 4), (4, 4)) and model.stem_stride == 4
    assert not list(model.stages[0].downsample.parameters())  # the stem already made stage 0's grid
    for st in model.stages[1:]:
        assert (st.downsample[1].kernel_size, st.downsample[1].stride) == ((2, 2), (2, 2))
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        maps = model.forward_intermediates(x)
        for m, info in zip(maps, model.feature_info):
            assert m.shape == (2, info["num_chs"], 64 // info["reduction"], 96 // info["reduction"])
        for i in range(3):  # each stage output is the next stage's input (downsampling happens in stage i+1)
            torch.testing.assert_close(model.run_stage(i + 1, maps[i]), maps[i + 1])
        torch.testing.assert_close(maps[-1], model.forward_features(x))
        assert [m.shape for m in model.forward_intermediates(x, indices=[-1, 1])] == [
            maps[3].shape,
            maps[1].shape,
        ]  # in the order asked for
        pooled = F.layer_norm(maps[-1].mean((2, 3)), (128,), model.norm.weight, model.norm.bias, 1e-6)
        torch.testing.assert_close(model.forward_head(maps[-1], pre_logits=True), pooled)


def test_stochastic_depth():
    model = create_model("convnext_test", depths=(1, 2, 1, 1), drop_path_rate=0.3)
    rates = [b.drop_path for s in model.stages for b in s.blocks]
    torch.testing.assert_close(torch.tensor(rates), torch.linspace(0, 0.3, 5))  # linear over all blocks
    torch.manual_seed(0)
    blk = trained_like(ConvNeXtBlock(8, drop_path=0.5)).train()
    x = torch.randn(64, 8, 5, 5)
    with torch.no_grad():
        branch = blk.eval()(x) - x
        out = blk.train()(x)
    dropped = (out == x).flatten(1).all(1)  # per sample: the whole branch is dropped, or kept and rescaled
    assert 0 < dropped.sum() < 64
    torch.testing.assert_close(out[~dropped], (x + branch / 0.5)[~dropped])


# --- masked stem --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, token", [("convnext_test", False), ("convnextv2_test", True)])
def test_mask(name, token):
    torch.manual_seed(0)
    model = trained_like(create_model(name, mask_token=token))
    x = torch.randn(2, 3, 64, 48)
    none, every = torch.zeros(2, 16, 12, dtype=torch.bool), torch.ones(2, 16, 12, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x, mask=none), model.forward_features(x))
        a, b = model.forward_features(x, mask=every), model.forward_features(torch.randn_like(x), mask=every)
        torch.testing.assert_close(a, b)
        with pytest.raises(ValueError, match="stem grid"):
            model.forward_features(x, mask=none[:, :8])
    assert ("mask_token" in model.no_weight_decay()) == token
    if token:
        mask = torch.rand(2, 16, 12) < 0.5
        model.forward_features(x, mask=mask).sum().backward()
        assert model.mask_token.grad.abs().sum() > 0


# --- contract -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_every_size_rebuilds_from_hparams(name):
    factory = MODELS.get(name)
    assert factory.builds in (ConvNeXt, ConvNeXtV2)
    with torch.device("meta"):  # full size, no memory
        model = create_model(name)
        rebuilt = type(model)(**model.hparams())
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == shapes
    gm = model.group_matcher()
    for n, _ in model.named_parameters():  # each parameter in exactly one layer-wise-decay group
        block = any(re.match(r, n) for r, _ in gm["blocks"])
        assert [bool(re.match(gm["stem"], n)), block, bool(re.match(gm["head"], n))].count(True) == 1, n


@pytest.mark.parametrize("name", ["convnext_test", "convnextv2_test", "convnextv2_atto"])
def test_forward_backward_at_smoke_size(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=3, **MODELS.get(name).smoke)
    x = torch.randn(2, 3, 64, 64)
    feats = model.forward_features(x)
    logits = model.forward_head(feats)
    assert logits.shape == (2, 3)
    (logits.sum() + feats.square().mean()).backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n


def test_grad_checkpointing_and_reset_classifier():
    torch.manual_seed(0)
    model = trained_like(create_model("convnextv2_test", num_classes=4)).train()
    x = torch.randn(2, 3, 64, 64)
    ref = model(x)
    ref.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    out = model(x)
    out.sum().backward()
    torch.testing.assert_close(out, ref)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], msg=n)
    model.reset_classifier(0)
    assert model(x).shape == (2, 128) and model.hparams()["num_classes"] == 0


# --- Hugging Face twins --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, num_classes, hf_cls",
    [
        ("convnext_test", 0, "ConvNextModel"),
        ("convnext_test", 7, "ConvNextForImageClassification"),
        ("convnextv2_test", 0, "ConvNextV2Model"),
        ("convnextv2_test", 7, "ConvNextV2ForImageClassification"),
    ],
)
def test_export_parity(tmp_path, name, num_classes, hf_cls):
    torch.manual_seed(0)
    model = trained_like(create_model(name, depths=(1, 2, 1, 1), num_classes=num_classes, head_norm_eps=1e-5))
    to_hf(model, tmp_path)
    hf = getattr(tf, hf_cls).from_pretrained(tmp_path).eval()
    assert hf.config.layer_norm_eps == 1e-5
    x = torch.randn(2, 3, 70, 45)  # odd sizes: every conv floors, on both sides
    with torch.no_grad():
        assert_parity(model, hf, x)
        stem = hf(pixel_values=x, output_hidden_states=True).hidden_states[0]  # HF's [0] is the stem output
        torch.testing.assert_close(stem, model.embed(x), atol=1e-5, rtol=0)
        back = from_hf(tmp_path)
    assert type(back) is type(model) and back.hparams() == model.hparams()
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


@pytest.mark.parametrize(
    "arch, extra",
    [
        ("ConvNextForImageClassification", {}),
        ("ConvNextModel", {"layer_scale_init_value": 0.0, "patch_size": 2}),
        ("ConvNextV2ForImageClassification", {}),
        ("ConvNextV2Model", {}),
    ],
)
def test_hf_initialised_model_imports(tmp_path, arch, extra):
    """A folder transformers wrote (its own init, then perturbed so GRN and layer scale matter), config defaults
    included (pooled LayerNorm eps 1e-12)."""
    cfg_cls = tf.ConvNextV2Config if "V2" in arch else tf.ConvNextConfig
    cfg = cfg_cls(hidden_sizes=[16, 24, 32, 40], depths=[1, 2, 1, 1], num_labels=5, image_size=64, **extra)
    torch.manual_seed(0)
    hf = trained_like(getattr(tf, arch)(cfg))
    hf.save_pretrained(tmp_path)
    ours = from_hf(tmp_path)
    assert type(ours) is (ConvNeXtV2 if "V2" in arch else ConvNeXt)
    assert ours.head_norm_eps == 1e-12 and ours.stem_stride == cfg.patch_size
    if extra.get("layer_scale_init_value") == 0.0:
        assert all(b.gamma is None for s in ours.stages for b in s.blocks)
    with torch.no_grad():
        assert_parity(ours, hf, torch.randn(2, 3, 67, 77))


def test_from_hf_rejects_what_it_cannot_represent():
    hf = tf.ConvNextModel(tf.ConvNextConfig(hidden_sizes=[8, 8, 8, 8], depths=[1, 1, 1, 1]))
    sd = hf.state_dict()
    adapter = adapter_for_arch("ConvNextModel")
    with pytest.raises(ValueError, match="hidden_act"):
        adapter.from_hf(
            sd, tf.ConvNextConfig(hidden_sizes=[8, 8, 8, 8], depths=[1, 1, 1, 1], hidden_act="relu")
        )
    with pytest.raises(ValueError, match="num_stages"):
        adapter.from_hf(sd, tf.ConvNextConfig(hidden_sizes=[8, 8, 8, 8], depths=[1, 1, 1, 1], num_stages=5))
    assert type(adapter.from_hf(sd, hf.config)) is ConvNeXt


@pytest.mark.parametrize(
    "name, hf_cls", [("convnext_base", "ConvNextModel"), ("convnextv2_base", "ConvNextV2Model")]
)
def test_base_param_count_equals_hf(name, hf_cls):
    cfg_cls = getattr(tf, hf_cls.replace("Model", "Config"))
    with torch.device("meta"):
        ours = create_model(name)
        theirs = getattr(tf, hf_cls)(cfg_cls(depths=[3, 3, 27, 3], hidden_sizes=[128, 256, 512, 1024]))
    n_ours, n_theirs = (sum(p.numel() for p in m.parameters()) for m in (ours, theirs))
    assert n_ours == n_theirs  # both hold the pooled LayerNorm, neither a classifier


# millions of parameters with a 1000-class head, as printed in the papers (ConvNeXt Table 9/11, V2 Table 1)
PAPER = {
    "convnext_tiny": "28.6",
    "convnext_small": "50",
    "convnext_base": "89",
    "convnext_large": "198",
    "convnextv2_atto": "3.7",
    "convnextv2_femto": "5.2",
    "convnextv2_pico": "9.1",
    "convnextv2_nano": "15.6",
    "convnextv2_tiny": "28.6",
    "convnextv2_base": "89",
    "convnextv2_large": "198",
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_sizes(name):
    with torch.device("meta"):
        n = sum(p.numel() for p in create_model(name, num_classes=1000).parameters())
    digits = len(PAPER[name].partition(".")[2])
    assert f"{n / 1e6:.{digits}f}" == PAPER[name], (name, n)
