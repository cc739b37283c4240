"""PoolFormer: the paper's mechanisms against direct formulas, and parity with transformers' PoolFormer."""

import pytest
import torch
import torch.nn as nn

import models.poolformer_hf  # noqa: F401  (registers the PoolFormer sizes and their HF adapter)
from models import create_model
from models.hf import adapter_for_model
from models.poolformer import LayerScale, MetaFormerBlock, PoolFormer, Pooling
from ops.compat import import_transformers
from pretrain.export import from_hf, to_hf
from tests.conftest import trained_like

tf = import_transformers()


pytestmark = pytest.mark.usefixtures("hf_offline")


# --- paper mechanisms ---------------------------------------------------------------------------------
@pytest.mark.parametrize("pool_size", [3, 5])
def test_pooling_mixer_is_the_neighbourhood_mean_minus_the_token(pool_size):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 7)
    r = pool_size // 2
    ref = torch.empty_like(x)
    for i in range(5):
        for j in range(7):
            # only pixels inside the map count: the border means are over 4 or 6 pixels, not 9
            win = x[:, :, max(i - r, 0) : i + r + 1, max(j - r, 0) : j + r + 1]
            ref[:, :, i, j] = win.sum(dim=(-2, -1)) / (win.shape[-2] * win.shape[-1]) - x[:, :, i, j]
    torch.testing.assert_close(Pooling(pool_size)(x), ref, atol=1e-6, rtol=0)
    # a constant map is a fixed point of the mean, borders included: the mixer outputs exactly zero
    assert Pooling(pool_size)(torch.full((1, 2, 4, 4), 3.0)).abs().max() == 0
    with pytest.raises(ValueError, match="odd"):
        Pooling(4)


def _group_norm(x, norm):  # GroupNorm(1, C): statistics over (C, H, W) per sample, then per-channel affine
    mu = x.mean(dim=(1, 2, 3), keepdim=True)
    var = x.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
    return (x - mu) / (var + norm.eps).sqrt() * norm.weight.view(-1, 1, 1) + norm.bias.view(-1, 1, 1)


def test_metaformer_block_formula_and_layer_scale():
    torch.manual_seed(0)
    blk = MetaFormerBlock(8, Pooling(3), mlp_ratio=4.0, layer_scale_init=1e-5)
    assert torch.equal(blk.ls1.scale, torch.full((8,), 1e-5)) and torch.equal(blk.ls2.scale, blk.ls1.scale)
    trained_like(blk)
    x = torch.randn(2, 8, 6, 5)
    ls1, ls2 = blk.ls1.scale.view(-1, 1, 1), blk.ls2.scale.view(-1, 1, 1)
    h = _group_norm(x, blk.norm1)
    y = x + ls1 * (nn.functional.avg_pool2d(h, 3, 1, 1, count_include_pad=False) - h)
    h = _group_norm(y, blk.norm2)
    fc1, fc2 = blk.mlp.fc1, blk.mlp.fc2
    mlp = torch.einsum("oc,bchw->bohw", fc1.weight[:, :, 0, 0], h) + fc1.bias.view(-1, 1, 1)
    mlp = nn.functional.gelu(mlp)
    mlp = torch.einsum("oc,bchw->bohw", fc2.weight[:, :, 0, 0], mlp) + fc2.bias.view(-1, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(blk(x), y + ls2 * mlp, atol=1e-5, rtol=0)
        # layer scale scales each channel's residual branch: halving it halves the (first) update
        blk2 = MetaFormerBlock(8, Pooling(3), layer_scale_init=None)
        assert not any("ls" in n for n, _ in blk2.named_parameters())
        blk.ls2.scale.zero_()
        delta = blk(x) - x
        blk.ls1.scale.mul_(0.5)
        torch.testing.assert_close(blk(x) - x, 0.5 * delta, atol=1e-6, rtol=1e-5)


def test_sizes_layer_scale_and_layout():
    for name, ls in [("poolformer_s12", 1e-5), ("poolformer_s36", 1e-6), ("poolformer_m48", 1e-6)]:
        with torch.device("meta"):
            model = create_model(name)
        scales = [m for m in model.modules() if isinstance(m, LayerScale)]
        assert len(scales) == 2 * sum(model.depths) and model.layer_scale_init == ls, name
    model = create_model("poolformer_test")
    assert (model.stem.kernel_size, model.stem.stride, model.stem.padding) == ((7, 7), (4, 4), (2, 2))
    assert isinstance(model.stages[0].downsample, nn.Identity)
    for s in model.stages[1:]:
        assert (s.downsample.kernel_size, s.downsample.stride, s.downsample.padding) == (
            (3, 3),
            (2, 2),
            (1, 1),
        )
    scales = [m.scale for m in model.modules() if isinstance(m, LayerScale)]
    assert scales and all(torch.equal(s, torch.full_like(s, 1e-5)) for s in scales)
    # odd sizes: each conv rounds its grid the convolution way, the mixer keeps it
    maps = model.forward_intermediates(torch.randn(1, 3, 67, 61))
    h, w = (67 + 2 * 2 - 7) // 4 + 1, (61 + 2 * 2 - 7) // 4 + 1  # stem k7 s4 p2: 17 x 15
    for m, c in zip(maps, model.dims):
        assert tuple(m.shape[1:]) == (c, h, w)
        h, w = (h + 2 - 3) // 2 + 1, (w + 2 - 3) // 2 + 1  # downsampling k3 s2 p1
    assert [f["reduction"] for f in model.feature_info] == [4, 8, 16, 32]


def test_stochastic_depth_linear_and_per_sample():
    model = create_model("poolformer_test", drop_path_rate=0.3)
    rates = [b.drop_path for s in model.stages for b in s.blocks]
    torch.testing.assert_close(torch.tensor(rates), torch.linspace(0, 0.3, sum(model.depths)))
    # a block in training mode keeps or drops each sample's residual branch, rescaling the kept ones
    torch.manual_seed(0)
    blk = trained_like(MetaFormerBlock(4, Pooling(3), drop_path=0.5, layer_scale_init=0.5))
    nn.init.zeros_(blk.ls2.scale)  # leave only the mixer branch
    x = torch.randn(64, 4, 5, 5)
    with torch.no_grad():
        branch = blk(x) - x  # eval: the plain branch
        out = blk.train()(x) - x
    kept = (out - 2 * branch).flatten(1).abs().amax(1) < 1e-5
    dropped = out.flatten(1).abs().amax(1) == 0
    assert torch.all(kept ^ dropped) and 10 < kept.sum() < 54


# --- contract specifics -----------------------------------------------------------------------------
@pytest.mark.parametrize("learned", [False, True])
def test_mask_replaces_stem_output(learned):
    torch.manual_seed(0)
    model = trained_like(create_model("poolformer_test", mask_token=learned))
    x = torch.randn(2, 3, 64, 64)
    grid = (2, 16, 16)
    with torch.no_grad():
        ref = model.forward_features(x)
        torch.testing.assert_close(model.forward_features(x, mask=torch.zeros(grid, dtype=torch.bool)), ref)
        full = torch.ones(grid, dtype=torch.bool)
        a, b = (
            model.forward_features(x, mask=full),
            model.forward_features(torch.randn_like(x) * 3, mask=full),
        )
        torch.testing.assert_close(a, b)
        assert not torch.allclose(a, ref)
        partial = torch.rand(grid) < 0.5
        stem = model.embed(x, mask=partial)  # (B, C, 16, 16)
        token = model.mask_token.view(-1) if learned else torch.zeros(16)
        assert torch.equal(
            (stem == token.view(1, -1, 1, 1)).all(1), partial
        )  # the token exactly where masked
        keep = (~partial).unsqueeze(1).expand_as(stem)
        assert torch.equal(stem[keep], model.embed(x)[keep])
    with pytest.raises(ValueError, match="stem grid"):
        model.forward_features(x, mask=torch.zeros(2, 8, 8, dtype=torch.bool))
    assert model.no_weight_decay() == ({"mask_token"} if learned else set())


def test_intermediates_and_checkpointing():
    torch.manual_seed(0)
    model = trained_like(create_model("poolformer_test", num_classes=3))
    x = torch.randn(2, 3, 64, 64)
    maps = model.forward_intermediates(x)
    torch.testing.assert_close(maps[-1], model.forward_features(x))
    picked = model.forward_intermediates(x, indices=[-1, 1])
    assert torch.equal(picked[0], maps[3]) and torch.equal(picked[1], maps[1])
    model.train()
    ref = model(x)
    model.set_grad_checkpointing(True)
    torch.testing.assert_close(model(x), ref)
    assert PoolFormer(**model.hparams()).state_dict().keys() == model.state_dict().keys()


# --- Hugging Face twin ------------------------------------------------------------------------------
def _assert_parity(hf_model, model, x, atol=1e-5):
    ours = model.forward_features(x)
    theirs = adapter_for_model(model).hf_outputs(hf_model, x)
    torch.testing.assert_close(theirs["features"], ours, atol=atol, rtol=0)
    stages = model.forward_intermediates(x)
    assert len(theirs["stages"]) == len(stages)
    for t, o in zip(theirs["stages"], stages):
        torch.testing.assert_close(t, o, atol=atol, rtol=0)
    torch.testing.assert_close(theirs["pooled"], model.forward_head(ours, pre_logits=True), atol=atol, rtol=0)
    if isinstance(model.head, nn.Linear):
        torch.testing.assert_close(theirs["logits"], model(x), atol=atol, rtol=0)
    else:
        assert "logits" not in theirs


@pytest.mark.parametrize("num_classes, layer_scale", [(7, True), (0, True), (0, False)])
def test_export_parity(tmp_path, num_classes, layer_scale):
    torch.manual_seed(0)
    model = trained_like(
        create_model("poolformer_test", num_classes=num_classes, use_layer_scale=layer_scale, mlp_ratio=3.0)
    )
    to_hf(model, tmp_path)
    hf = tf.PoolFormerForImageClassification.from_pretrained(tmp_path).eval()
    base = tf.PoolFormerModel.from_pretrained(tmp_path).eval()
    x = torch.randn(2, 3, 67, 61)  # odd size: every conv rounds its grid down
    with torch.no_grad():
        _assert_parity(hf, model, x)
        out = base(pixel_values=x, output_hidden_states=True)
        torch.testing.assert_close(out.last_hidden_state, model.forward_features(x), atol=1e-5, rtol=0)
        back = from_hf(tmp_path)
        assert back.hparams() == {**model.hparams(), "img_size": 64}
        for a, b in zip(back.state_dict().values(), model.state_dict().values()):
            assert torch.equal(a, b)


@pytest.mark.parametrize("arch", ["PoolFormerModel", "PoolFormerForImageClassification"])
def test_hf_initialised_model_imports(tmp_path, arch):
    """Import the other way: a folder transformers wrote (its own init, then perturbed)."""
    cfg = tf.PoolFormerConfig(
        depths=[1, 2, 1, 1], hidden_sizes=[16, 24, 32, 40], num_labels=5, layer_scale_init_value=0.1
    )
    torch.manual_seed(0)
    hf = trained_like(getattr(tf, arch)(cfg))
    hf.save_pretrained(tmp_path)
    ours = from_hf(tmp_path)
    assert isinstance(ours, PoolFormer) and ours.depths == [1, 2, 1, 1] and ours.layer_scale_init == 0.1
    assert isinstance(ours.head, nn.Linear) == (arch != "PoolFormerModel")
    with torch.no_grad():
        _assert_parity(hf, ours, torch.randn(2, 3, 45, 50))


@pytest.mark.parametrize(
    "field, value",
    [
        ("hidden_act", "relu"),
        ("strides", [4, 2, 2, 1]),
        ("patch_sizes", [4, 2, 2, 2]),
        ("padding", [3, 1, 1, 1]),
    ],
)
def test_import_rejects_what_it_cannot_represent(tmp_path, field, value):
    cfg = tf.PoolFormerConfig(depths=[1, 1, 1, 1], hidden_sizes=[8, 8, 8, 8], **{field: value})
    tf.PoolFormerModel(cfg).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=field):
        from_hf(tmp_path)


@pytest.mark.parametrize("name", ["poolformer_s36", "poolformer_m36"])
def test_param_count_matches_hf(name):
    with torch.device("meta"):
        ours = create_model(name, num_classes=1000)
        hf = tf.PoolFormerForImageClassification(adapter_for_model(ours).hf_config(ours))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(ours) == count(hf)
    paper = {"poolformer_s36": 31e6, "poolformer_m36": 56e6}[name]  # Table 1 of the paper
    assert abs(count(ours) - paper) / paper < 0.01
