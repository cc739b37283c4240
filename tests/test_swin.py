"""Swin Transformer: HF parity both ways (every stage, odd sizes, mask token) and the paper's mechanisms."""

import json

import pytest
import torch
import torch.nn.functional as F

import models.swin_hf  # noqa: F401  (registers the Swin sizes and their HF adapter)
from models import create_model
from models.swin import PatchMerging, SwinTransformer, SwinTransformerBlock
from models.swin_hf import swin_from_hf, swin_hf_outputs
from ops.compat import import_transformers
from pretrain.export import from_hf, to_hf
from pretrain.optim import layer_ids
from tests.conftest import trained_like

tf = import_transformers()
# the paper's 4-stage layout at CI width, window 4: HF runs it from 100 px (its last map must be >= the window)
SWIN4 = dict(depths=(2, 2, 2, 1), num_heads=(1, 2, 4, 8), window_size=4)


pytestmark = pytest.mark.usefixtures("hf_offline")


def close(a, b, atol=1e-5):
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


def assert_parity(model: SwinTransformer, hf, x: torch.Tensor) -> None:
    """Every output the adapter promises: last hidden state, each stage, pooled, logits."""
    with torch.no_grad():
        ref = swin_hf_outputs(hf, x)
        feats = model.forward_features(x)
        close(feats, ref["features"])
        close(model.forward_head(feats, pre_logits=True), ref["pooled"])
        stages = model.forward_intermediates(x)
        assert len(stages) == len(ref["stages"]) == len(model.feature_info)
        for ours, theirs, info in zip(stages, ref["stages"], model.feature_info):
            assert ours.shape == theirs.shape and ours.shape[1] == info["num_chs"]
            close(ours, theirs)
        assert ("logits" in ref) == isinstance(model.head, torch.nn.Linear)
        if "logits" in ref:
            close(model(x), ref["logits"])


@pytest.mark.parametrize("num_classes", [0, 7])
def test_export_parity(tmp_path, num_classes):
    """Tessera -> HF folder -> transformers' own class at 100 x 116 px: maps 25x29, 13x15, 7x8 (padded to the
    window, shifted, odd merges) and 4x4 (= M: one unshifted window)."""
    torch.manual_seed(0)
    model = create_model("swin_test", **SWIN4, num_classes=num_classes, mask_token=num_classes == 0)
    model = trained_like(model)
    to_hf(model, tmp_path)
    arch = json.loads((tmp_path / "config.json").read_text())["architectures"][0]
    if num_classes:
        assert arch == "SwinForImageClassification"
        hf = tf.SwinForImageClassification.from_pretrained(tmp_path).eval()
    else:
        assert arch == "SwinModel"
        hf = tf.SwinModel.from_pretrained(tmp_path, use_mask_token=True).eval()
    x = torch.randn(2, 3, 100, 116)
    assert_parity(model, hf, x)
    if not num_classes:  # the mask token replaces the normed patch embedding, as HF's bool_masked_pos
        mask = torch.rand(2, 25, 29) < 0.5
        with torch.no_grad():
            ref = hf(pixel_values=x, bool_masked_pos=mask.flatten(1)).last_hidden_state
            close(model.forward_features(x, mask), ref)
    back = from_hf(tmp_path)
    assert back.hparams() == model.hparams()  # mask_token included: it travels as embeddings.mask_token
    sd = model.state_dict()
    assert back.state_dict().keys() == sd.keys()
    assert all(torch.equal(v, sd[k]) for k, v in back.state_dict().items())


@pytest.mark.parametrize("head, qkv_bias, chans", [(True, True, 3), (False, False, 1)])
def test_hf_initialised_model_imports(tmp_path, head, qkv_bias, chans):
    """HF -> Tessera: a folder transformers wrote; 3 stages, window 3 (shift 1), mlp_ratio 2, eps 1e-6;
    36 x 44 px gives maps 9x11 (pad to 9x12), 5x6 (pad to 6x6) and 3x3 (one unshifted window)."""
    cfg = tf.SwinConfig(
        image_size=48,
        num_channels=chans,
        embed_dim=16,
        depths=[2, 2, 2],
        num_heads=[2, 2, 4],
        window_size=3,
        mlp_ratio=2.0,
        qkv_bias=qkv_bias,
        layer_norm_eps=1e-6,
        drop_path_rate=0.1,
        num_labels=5,
    )
    torch.manual_seed(0)
    hf = tf.SwinForImageClassification(cfg) if head else tf.SwinModel(cfg, use_mask_token=True)
    trained_like(hf).save_pretrained(tmp_path)
    ours = from_hf(tmp_path)
    assert ours.mlp_ratio == 2.0 and ours.norm_eps == 1e-6 and ours.drop_path_rate == pytest.approx(0.1)
    assert (ours.mask_token is not None) == (not head)
    for size in [(36, 44), (48, 48)]:
        assert_parity(ours, hf, torch.randn(2, chans, *size))
    if not head:
        x, mask = torch.randn(2, chans, 36, 44), torch.rand(2, 9, 11) < 0.5
        with torch.no_grad():
            close(ours.forward_features(x, mask), hf(x, bool_masked_pos=mask.flatten(1)).last_hidden_state)


@pytest.mark.parametrize(
    "field, value", [("hidden_act", "relu"), ("use_absolute_embeddings", True), ("patch_size", [4, 2])]
)
def test_from_hf_rejects_what_it_cannot_represent(field, value):
    cfg = tf.SwinConfig(embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4, **{field: value})
    with pytest.raises(ValueError, match=field):
        swin_from_hf(tf.SwinModel(cfg).state_dict(), cfg)


@pytest.mark.parametrize("name", ["swin_tiny_patch4_window7_224", "swin_base_patch4_window7_224"])
def test_param_count_equals_hf(name):
    with torch.device("meta"):  # shapes only: no time spent initialising weights
        model = create_model(name, num_classes=1000)
        hf = tf.SwinForImageClassification(models.swin_hf.swin_config(model))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(model) == count(hf)
    assert (
        abs(count(model) - {"swin_tiny": 28.3e6, "swin_base": 87.8e6}[name[:9]]) < 0.1e6
    )  # the paper's table


def test_window_and_shift_rule():
    """Shift M // 2 in odd blocks; a map no larger than the window is one window of min(H, W), unshifted."""
    plain, shifted = (SwinTransformerBlock(8, 2, window_size=7, shift=s) for s in (False, True))
    assert shifted.window_and_shift(56, 56) == (7, 3) and plain.window_and_shift(56, 56) == (7, 0)
    assert shifted.window_and_shift(8, 30) == (7, 3)  # both sides above M: padded to 14 x 35
    assert shifted.window_and_shift(7, 30) == (7, 0)
    assert shifted.window_and_shift(4, 9) == (4, 0)


def _influence(block: SwinTransformerBlock, H: int, W: int, at: tuple[int, int]) -> set[tuple[int, int]]:
    """Positions whose output changes when the input token `at` changes."""
    torch.manual_seed(0)
    x = torch.randn(1, H, W, 8)
    y = x.clone()
    y[0, at[0], at[1]] += torch.randn(8)  # not a constant: LayerNorm would remove it
    with torch.no_grad():
        diff = (block(y) - block(x)).abs().amax(-1)[0]  # (H, W)
    return {(int(i), int(j)) for i, j in (diff > 1e-6).nonzero()}


def test_shifted_windows_connect_across_the_partition():
    """8 x 8 map, M = 4: a plain block mixes within the 4 x 4 tiles; the shifted block rolls by -2, so its windows
    straddle the tiles, and the shift mask keeps tokens that only the cyclic roll made neighbours apart."""
    plain = trained_like(SwinTransformerBlock(8, 2, window_size=4, shift=False))
    shifted = trained_like(SwinTransformerBlock(8, 2, window_size=4, shift=True))
    block_of = lambda r, c: {(i, j) for i in r for j in c}  # noqa: E731
    assert _influence(plain, 8, 8, (3, 3)) == block_of(range(4), range(4))
    assert _influence(shifted, 8, 8, (3, 3)) == block_of(range(2, 6), range(2, 6))
    # (1, 1) lands in the bottom-right rolled window with rows/cols 6, 7 of the far side: masked from them
    assert _influence(shifted, 8, 8, (1, 1)) == block_of(range(2), range(2))
    assert _influence(shifted, 8, 8, (1, 4)) == block_of(range(2), range(2, 6))


def test_window_larger_than_map_reads_the_centre_of_the_bias_table():
    """A 2 x 3 map under window 4 is attended as 2 x 2 windows with the offsets |d| <= 1 of the 7 x 7 table:
    the same as a window-2 block whose 3 x 3 table is that centre."""
    big = trained_like(SwinTransformerBlock(8, 2, window_size=4, shift=True))
    small = SwinTransformerBlock(8, 2, window_size=2, shift=True).eval()
    sd = dict(big.state_dict())
    table = sd["attn.relative_position_bias_table"].view(7, 7, 2)
    sd["attn.relative_position_bias_table"] = table[2:5, 2:5].reshape(9, 2)
    small.load_state_dict(sd)
    x = torch.randn(2, 2, 3, 8)
    with torch.no_grad():
        close(big(x), small(x), atol=1e-6)
        # and the bias is used: another table centre changes the output
        big.attn.relative_position_bias_table.view(7, 7, 2)[3, 3] += 1.0
        assert not torch.allclose(big(x), small(x), atol=1e-4)


def test_patch_merging_concatenates_2x2_in_the_reference_order():
    torch.manual_seed(0)
    merge = trained_like(PatchMerging(4))
    x = torch.randn(2, 5, 7, 4)  # odd: zero-padded to 6 x 8
    p = F.pad(x, (0, 0, 0, 1, 0, 1))
    cat = torch.cat(
        [p[:, 0::2, 0::2], p[:, 1::2, 0::2], p[:, 0::2, 1::2], p[:, 1::2, 1::2]], -1
    )  # (2, 3, 4, 16)
    with torch.no_grad():
        close(merge(x), merge.reduction(merge.norm(cat)), atol=1e-6)
    assert merge(x).shape == (2, 3, 4, 8) and merge.reduction.bias is None


def test_mask_contract():
    torch.manual_seed(0)
    model = trained_like(create_model("swin_test", mask_token=True))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        close(
            model.forward_features(x, torch.zeros(2, 16, 16, dtype=torch.bool)), model.forward_features(x), 0
        )
        full = torch.ones(2, 16, 16, dtype=torch.bool)
        close(model.forward_features(x, full), model.forward_features(torch.randn_like(x), full), 0)
    with pytest.raises(ValueError, match="patch grid"):
        model.forward_features(x, torch.zeros(2, 8, 8, dtype=torch.bool))
    assert "mask_token" in model.no_weight_decay()


def test_backbone_contract_details():
    torch.manual_seed(0)
    model = create_model("swin_test", num_classes=3, drop_path_rate=0.2)
    names = {n for n, _ in model.named_parameters()}
    assert model.no_weight_decay() <= names and len(model.no_weight_decay()) == sum(model.depths)
    ids = layer_ids(model)  # every parameter in exactly one group, in depth order
    top = sum(model.depths) + 1  # one group per block; a stage's merging joins its first block
    assert ids["patch_embed.proj.weight"] == 0 and ids["head.weight"] == ids["norm.weight"] == top
    assert ids["stages.0.blocks.1.norm1.weight"] == 2
    assert ids["stages.1.downsample.reduction.weight"] == ids["stages.1.blocks.0.attn.qkv.weight"]
    dpr = [b.drop_path for s in model.stages for b in s.blocks]
    assert dpr == pytest.approx(torch.linspace(0, 0.2, sum(model.depths)).tolist())
    rebuilt = SwinTransformer(**model.hparams())
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    maps = model.forward_intermediates(x, indices=[-1, 0])
    assert [m.shape for m in maps] == [(2, 64, 4, 4), (2, 16, 16, 16)]
    close(model.forward_features(x), model.norm(maps[0].flatten(2).transpose(1, 2)), atol=1e-6)
    model.train().set_grad_checkpointing(True)
    torch.manual_seed(1)
    ref = model.forward_features(x)  # drop path draws the same masks under the same seed
    model.set_grad_checkpointing(False)
    torch.manual_seed(1)
    close(model.forward_features(x), ref, atol=1e-6)
