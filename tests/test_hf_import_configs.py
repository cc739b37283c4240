"""`pretrain.export.from_hf` imports every config that transformers' twin class accepts, reading exactly what that
class reads, and refuses (ValueError naming the config field and its value) only what Tessera's architecture
cannot represent.

Accepted: a folder transformers wrote from its own init (perturbed, so parity cannot pass by init luck), configs
varied where transformers reads them loosely: lists longer than the stages it builds, int / pair sizes,
rectangular image_size where only a nominal size (or only its height) is read, dropouts and stochastic depth
(training only), backbone and masked-modelling fields, label names, exact-GELU spellings, odd MLP widths. The
import matches the HF model to 1e-5 (fp32) in every output the adapter reads (`hf_outputs`, see models/hf.py).
Refused: what Tessera cannot be (another activation, absolute position embeddings, non-square kernels,
another layout), or what transformers itself cannot run sensibly (NaN bias, mismatched final norm)."""

import re

import pytest
import torch
import torch.nn as nn

from models.hf import adapter_for_arch
from ops.compat import import_transformers
from pretrain.export import from_hf, to_hf
from tests.conftest import trained_like
from tests.test_hf_parity import assert_parity

tf = import_transformers()
pytestmark = pytest.mark.usefixtures("hf_offline")

LABELS = {"id2label": {0: "cat", 1: "dog", 2: "eel"}, "label2id": {"cat": 0, "dog": 1, "eel": 2}}
DROPOUTS = dict(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
PVT = dict(num_attention_heads=[1, 2, 4, 8], sr_ratios=[4, 2, 1, 1])

# id: (HF class, config kwargs, model constructor kwargs, input sizes (H, W))
ACCEPTED = {
    # --- ViT ---------------------------------------------------------------------------------------------------
    "vit-pair-sizes-no-qkv-bias-odd-mlp-mask-token": (
        "ViTModel",
        dict(
            hidden_size=24,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=50,  # not a multiple of hidden_size
            image_size=[16, 16],
            patch_size=[4, 4],
            num_channels=2,
            qkv_bias=False,
            encoder_stride=4,
            **DROPOUTS,
        ),
        dict(add_pooling_layer=False, use_mask_token=True),
        [(16, 16)],
    ),
    "vit-classifier-gelu_python-labels-default-eps": (
        "ViTForImageClassification",
        dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            image_size=24,
            patch_size=8,
            hidden_act="gelu_python",
            **LABELS,
        ),
        {},
        [(24, 24)],
    ),
    "vit-classifier-no-labels": (
        "ViTForImageClassification",
        dict(
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=40,
            image_size=16,
            patch_size=8,
            num_labels=0,
        ),
        {},
        [(16, 16)],
    ),
    # --- Swin --------------------------------------------------------------------------------------------------
    "swin-long-num_heads-rect-image-pair-patch-mask-token": (
        "SwinModel",
        dict(
            image_size=[32, 48],  # only sizes absolute embeddings: any (height, width)
            patch_size=[4, 4],
            num_channels=1,
            embed_dim=16,
            depths=[2, 2],
            num_heads=[1, 2, 4, 8],  # SwinModel reads the first len(depths)
            window_size=4,
            mlp_ratio=2.5,
            qkv_bias=False,
            layer_norm_eps=1e-6,
            drop_path_rate=0.2,
            encoder_stride=8,
            out_features=["stage2"],
            hidden_act="gelu_python",
            **DROPOUTS,
        ),
        dict(use_mask_token=True),
        [(32, 48), (36, 44)],
    ),
    "swin-classifier-empty-stage-labels": (
        "SwinForImageClassification",
        dict(image_size=32, embed_dim=8, depths=[1, 0, 2], num_heads=[1, 2, 2], window_size=2, **LABELS),
        {},
        [(32, 32), (28, 36)],
    ),
    # --- Swin V2 -----------------------------------------------------------------------------------------------
    "swinv2-two-stages-default-pretrained_window_sizes": (  # the reported case: 4 default entries, 2 stages
        "Swinv2Model",
        dict(image_size=32, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4),
        {},
        [(32, 32), (36, 28)],
    ),
    "swinv2-classifier-nested-negative-long-windows-rect-image": (
        "Swinv2ForImageClassification",
        dict(
            image_size=[32, 64],
            patch_size=[4, 4],
            embed_dim=8,
            depths=[2, 1, 1],
            num_heads=[1, 2, 4, 8],
            window_size=4,
            pretrained_window_sizes=[[4, 4], -1, 3, 8],  # a pair, "none" spelled -1, one entry too many
            mlp_ratio=3.0,
            qkv_bias=False,
            hidden_act="gelu_python",
            encoder_stride=16,
            out_indices=[1, 3],
            **DROPOUTS,
            **LABELS,
        ),
        {},
        [(32, 64), (40, 28)],
    ),
    "swinv2-no-pretrained_window_sizes-windows-from-height": (
        "Swinv2Model",
        # grid 8 x 4: transformers sizes each stage's window and shift by the height (8, 4, 2 -> windows 4, 4,
        # 2, stage 0 shifted); by the width (4, 2, 1) stage 0 would not be shifted
        dict(
            image_size=[32, 16],
            embed_dim=8,
            depths=[2, 2, 1],
            num_heads=[1, 2, 2],
            window_size=4,
            pretrained_window_sizes=None,
        ),
        dict(use_mask_token=True),
        [(32, 16), (44, 20)],
    ),
    # --- ConvNeXt / V2 ----------------------------------------------------------------------------------------
    "convnext-3-of-4-stages-pair-patch-rect-image-layer-scale": (
        "ConvNextModel",
        dict(
            num_stages=3,
            depths=[1, 1, 1, 2],
            hidden_sizes=[8, 16, 24, 24],  # the final LayerNorm takes hidden_sizes[-1] = hidden_sizes[2]
            patch_size=[2, 2],
            image_size=[48, 64],
            num_channels=2,
            layer_scale_init_value=0.5,
            layer_norm_eps=1e-6,
            drop_path_rate=0.2,
            out_features=["stage1", "stage3"],
        ),
        {},
        [(32, 32), (37, 45)],
    ),
    "convnext-classifier-2-stages-no-layer-scale-gelu_python": (
        "ConvNextForImageClassification",
        dict(
            num_stages=2,
            depths=[1, 2, 9, 9],
            hidden_sizes=[8, 16, 99, 16],
            layer_scale_init_value=-1.0,  # <= 0: none
            hidden_act="gelu_python",
            **LABELS,
        ),
        {},
        [(32, 32), (29, 35)],
    ),
    "convnextv2-3-of-4-stages-empty-stage": (
        "ConvNextV2Model",
        dict(num_stages=3, depths=[1, 0, 1, 1], hidden_sizes=[8, 16, 16, 16], image_size=32),
        {},
        [(32, 32), (35, 41)],
    ),
    "convnextv2-classifier-labels": (
        "ConvNextV2ForImageClassification",
        dict(depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 24, 32], drop_path_rate=0.3, **LABELS),
        {},
        [(32, 32)],
    ),
    # --- PVT v2 ------------------------------------------------------------------------------------------------
    "pvt_v2-3-of-4-stages-pair-kernels-rect-image-no-qkv-bias": (
        "PvtV2Model",
        dict(
            num_encoder_blocks=3,
            depths=[1, 2, 1, 7],
            hidden_sizes=[8, 16, 32, 64],
            mlp_ratios=[2, 1.5, 4, 4],
            patch_sizes=[[7, 7], 3, [3, 3], 3],
            strides=[4, [2, 2], 2, 2],
            image_size=(32, 48),
            num_channels=2,
            qkv_bias=False,
            layer_norm_eps=1e-5,
            drop_path_rate=0.2,
            out_features=["stage2"],
            **PVT,
            **DROPOUTS,
        ),
        {},
        [(32, 48), (45, 31)],
    ),
    "pvt_v2-classifier-2-of-4-stages-linear-gelu_python": (
        "PvtV2ForImageClassification",
        dict(
            num_encoder_blocks=2,
            depths=[1, 1, 1, 1],
            hidden_sizes=[8, 16, 32, 16],  # the classifier takes hidden_sizes[-1] = hidden_sizes[1]
            linear_attention=True,
            hidden_act="gelu_python",
            **PVT,
            **LABELS,
        ),
        {},
        [(32, 32), (29, 37)],
    ),
    # --- PoolFormer --------------------------------------------------------------------------------------------
    "poolformer-3-of-4-stages-pair-convs-no-layer-scale-pool5": (
        "PoolFormerModel",
        dict(
            num_encoder_blocks=3,
            depths=[1, 1, 1, 5],
            hidden_sizes=[8, 16, 24, 99],
            patch_sizes=[[7, 7], 3, 3, 1],
            strides=[4, [2, 2], 2, 9],
            padding=[2, 1, [1, 1], 0],
            mlp_ratio=1.5,
            pool_size=5,
            use_layer_scale=False,
            drop_path_rate=0.2,
            num_channels=1,
        ),
        {},
        [(32, 32), (37, 45)],
    ),
    "poolformer-classifier-2-of-4-stages-layer-scale-gelu_python": (
        "PoolFormerForImageClassification",
        dict(
            num_encoder_blocks=2,
            depths=[1, 2, 3, 4],
            hidden_sizes=[8, 16, 32, 16],  # the final norm takes hidden_sizes[-1] = hidden_sizes[1]
            layer_scale_init_value=0.3,
            mlp_ratio=2.5,
            hidden_act="gelu_python",
            image_size=[40, 48],
            **LABELS,
        ),
        {},
        [(40, 48), (33, 29)],
    ),
}


def hf_model(arch: str, cfg_kwargs: dict, model_kwargs: dict, seed: int = 0) -> nn.Module:
    """transformers' own model of `arch` from its own random init, weights perturbed; eval()."""
    cls = getattr(tf, arch)
    torch.manual_seed(seed)
    return trained_like(cls(cls.config_class(**cfg_kwargs), **model_kwargs))


@pytest.mark.parametrize("case", list(ACCEPTED))
def test_import_matches_transformers(tmp_path, case):
    arch, cfg_kwargs, model_kwargs, sizes = ACCEPTED[case]
    hf = hf_model(arch, cfg_kwargs, model_kwargs)
    hf.save_pretrained(tmp_path)
    ours = from_hf(tmp_path)
    adapter = adapter_for_arch(arch)
    assert type(ours) is adapter.model_cls
    assert isinstance(ours.head, nn.Linear) == any(k == "classifier.weight" for k in hf.state_dict())
    for h, w in sizes:
        x = torch.randn(2, hf.config.num_channels, h, w)
        assert_parity(ours, hf, adapter, x, atol=1e-5)


@pytest.mark.parametrize("pooler_act", ["tanh", "linear"])
def test_a_vit_pooler_is_left_out_with_a_warning(tmp_path, pooler_act):
    """A ViTModel's own pooler (dense + activation) is a head Tessera's ViT lacks: the encoder imports whole, the
    pooler does not, and the warning names it."""
    hf = hf_model("ViTModel", {**VIT, "pooler_act": pooler_act}, {})
    hf.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match=r"ViTConfig\.pooler_act=.*not imported"):
        ours = from_hf(tmp_path)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out = hf(pixel_values=x)
        torch.testing.assert_close(ours.forward_features(x), out.last_hidden_state, atol=1e-5, rtol=0)
        assert not torch.allclose(
            ours.forward_head(out.last_hidden_state, pre_logits=True), out.pooler_output
        )


def test_the_reported_swinv2_case_keeps_its_stages(tmp_path):
    """Swinv2Config(depths=[2, 2]) keeps the default four pretrained_window_sizes: two stages, no pretrained
    window (0) in either."""
    arch, cfg_kwargs, model_kwargs, _ = ACCEPTED["swinv2-two-stages-default-pretrained_window_sizes"]
    hf = hf_model(arch, cfg_kwargs, model_kwargs)
    assert hf.config.pretrained_window_sizes == [0, 0, 0, 0]
    hf.save_pretrained(tmp_path)
    ours = from_hf(tmp_path)
    assert ours.depths == [2, 2] and ours.num_heads == [2, 4] and ours.pretrained_window_sizes == [0, 0]


# id: (HF class, config kwargs, model kwargs, config attributes set after building (what transformers' own
# constructor would not build), the field the error must name)
VIT = dict(
    hidden_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=32,
    image_size=16,
    patch_size=4,
)
SWIN = dict(image_size=32, embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=4)
CNX = dict(depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 24, 32])
PVT_SMALL = dict(depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 24, 32], **PVT)
POOL = dict(depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 24, 32])
NO_POOLER = dict(add_pooling_layer=False)
REFUSED = {
    "vit-hidden_act": ("ViTModel", {**VIT, "hidden_act": "gelu_new"}, NO_POOLER, {}, "hidden_act"),
    "vit-rect-image": ("ViTModel", {**VIT, "image_size": [16, 24]}, NO_POOLER, {}, "image_size"),
    "vit-image-not-whole-patches": ("ViTModel", {**VIT, "image_size": 18}, NO_POOLER, {}, "image_size"),
    "vit-rect-patch": ("ViTModel", {**VIT, "patch_size": [4, 2]}, NO_POOLER, {}, "patch_size"),
    "swin-hidden_act": ("SwinModel", {**SWIN, "hidden_act": "relu"}, {}, {}, "hidden_act"),
    "swin-absolute-embeddings": (
        "SwinModel",
        {**SWIN, "use_absolute_embeddings": True},
        {},
        {},
        "use_absolute_embeddings",
    ),
    "swin-rect-patch": ("SwinModel", {**SWIN, "patch_size": [4, 2]}, {}, {}, "patch_size"),
    "swin-drop-path-1": ("SwinModel", {**SWIN, "drop_path_rate": 1.0}, {}, {}, "drop_path_rate"),
    "swin-short-num_heads": ("SwinModel", SWIN, {}, {"num_heads": [1]}, "num_heads"),
    "swinv2-hidden_act": ("Swinv2Model", {**SWIN, "hidden_act": "gelu_new"}, {}, {}, "hidden_act"),
    "swinv2-absolute-embeddings": (
        "Swinv2Model",
        {**SWIN, "use_absolute_embeddings": True},
        {},
        {},
        "use_absolute_embeddings",
    ),
    "swinv2-layer_norm_eps": ("Swinv2Model", {**SWIN, "layer_norm_eps": 1e-6}, {}, {}, "layer_norm_eps"),
    "swinv2-pretrained-window-1-nan": (
        "Swinv2Model",
        {**SWIN, "pretrained_window_sizes": [1, 0]},
        {},
        {},
        "pretrained_window_sizes",
    ),
    "swinv2-rect-pretrained-window": (
        "Swinv2Model",
        {**SWIN, "pretrained_window_sizes": [[4, 6], 0]},
        {},
        {},
        "pretrained_window_sizes",
    ),
    "swinv2-rect-window": ("Swinv2Model", SWIN, {}, {"window_size": [4, 8]}, "window_size"),
    "swinv2-rect-patch": ("Swinv2Model", {**SWIN, "patch_size": [4, 2]}, {}, {}, "patch_size"),
    "swinv2-drop-path-1": ("Swinv2Model", {**SWIN, "drop_path_rate": 1.0}, {}, {}, "drop_path_rate"),
    "convnext-hidden_act": ("ConvNextModel", {**CNX, "hidden_act": "relu"}, {}, {}, "hidden_act"),
    "convnext-final-norm-mismatch": ("ConvNextModel", {**CNX, "num_stages": 3}, {}, {}, "hidden_sizes"),
    "convnext-too-many-stages": ("ConvNextModel", CNX, {}, {"num_stages": 5}, "num_stages"),
    "convnext-rect-patch": ("ConvNextModel", {**CNX, "patch_size": [4, 2]}, {}, {}, "patch_size"),
    "convnextv2-hidden_act": ("ConvNextV2Model", {**CNX, "hidden_act": "silu"}, {}, {}, "hidden_act"),
    "convnextv2-drop-path-negative": (
        "ConvNextV2Model",
        {**CNX, "drop_path_rate": -0.1},
        {},
        {},
        "drop_path_rate",
    ),
    "pvt_v2-hidden_act": ("PvtV2Model", {**PVT_SMALL, "hidden_act": "relu"}, {}, {}, "hidden_act"),
    "pvt_v2-rect-patch": (
        "PvtV2Model",
        {**PVT_SMALL, "patch_sizes": [[7, 5], 3, 3, 3]},
        {},
        {},
        "patch_sizes",
    ),
    "pvt_v2-rect-stride": ("PvtV2Model", {**PVT_SMALL, "strides": [[4, 2], 2, 2, 2]}, {}, {}, "strides"),
    "pvt_v2-classifier-mismatch": (  # transformers runs it, reading the 24-channel map as 32 channels
        "PvtV2ForImageClassification",
        {**PVT_SMALL, "num_encoder_blocks": 3, "num_labels": 0},
        {},
        {},
        "hidden_sizes",
    ),
    "pvt_v2-short-sr_ratios": ("PvtV2Model", PVT_SMALL, {}, {"sr_ratios": [8, 4, 2]}, "sr_ratios"),
    "pvt_v2-drop-path-1": ("PvtV2Model", {**PVT_SMALL, "drop_path_rate": 1.0}, {}, {}, "drop_path_rate"),
    "poolformer-hidden_act": ("PoolFormerModel", {**POOL, "hidden_act": "relu"}, {}, {}, "hidden_act"),
    "poolformer-rect-stride": ("PoolFormerModel", {**POOL, "strides": [[4, 2], 2, 2, 2]}, {}, {}, "strides"),
    "poolformer-stem-layout": (
        "PoolFormerModel",
        {**POOL, "patch_sizes": [4, 3, 3, 3]},
        {},
        {},
        "patch_sizes",
    ),
    "poolformer-drop-path-1": ("PoolFormerModel", {**POOL, "drop_path_rate": 1.0}, {}, {}, "drop_path_rate"),
    "poolformer-even-pool": ("PoolFormerModel", {**POOL, "pool_size": 4}, {}, {}, "pool_size"),
    "poolformer-classifier-mismatch": (
        "PoolFormerForImageClassification",
        {**POOL, "num_encoder_blocks": 3},
        {},
        {},
        "hidden_sizes",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_import_refuses_what_tessera_cannot_represent(tmp_path, case):
    arch, cfg_kwargs, model_kwargs, after, field = REFUSED[case]
    hf = hf_model(arch, cfg_kwargs, model_kwargs)
    for k, v in after.items():
        setattr(hf.config, k, v)
    hf.save_pretrained(tmp_path)
    # the message names the field with its value: "<Config class>.<field>=<value>: <why>"
    with pytest.raises(ValueError, match=rf"{hf.config_class.__name__}\.{re.escape(field)}="):
        from_hf(tmp_path)


def test_a_vit_without_qkv_biases_goes_both_ways(tmp_path):
    hf = hf_model("ViTModel", {**VIT, "qkv_bias": False}, {"add_pooling_layer": False})
    hf.save_pretrained(tmp_path / "hf")
    ours = from_hf(tmp_path / "hf")
    assert not ours.qkv_bias
    to_hf(ours, tmp_path / "back")
    again = tf.ViTModel.from_pretrained(tmp_path / "back").eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(
            again(pixel_values=x).last_hidden_state, ours.forward_features(x), atol=1e-5, rtol=0
        )


def test_a_vit_mae_without_qkv_biases_is_refused(tmp_path):
    cfg = tf.ViTMAEConfig(
        **VIT,
        qkv_bias=False,
        decoder_hidden_size=8,
        decoder_num_hidden_layers=1,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=16,
    )
    tf.ViTMAEForPreTraining(cfg).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"ViTMAEConfig\.qkv_bias=False"):
        from_hf(tmp_path)
