"""DeiT: the ViT's distillation token (`distill_token=True`, models/vit.py) and its transformers twin,
DeiTForImageClassificationWithTeacher / DeiTModel (models/vit_hf.py). The generic backbone and HF parity tests
cover `deit_test` too (tests/test_models.py, tests/test_hf_parity.py); here what is DeiT's own."""

import json

import pytest
import torch
from PIL import Image

from models import create_model
from models.hf import HF_ADAPTERS
from ops.compat import import_transformers
from pretrain import export
from pretrain.data.config import DataConfig
from pretrain.init_from import load_backbone
from pretrain.objectives.mae import MAE, MAEConfig
from pretrain.objectives.simmim import SimMIM, SimMIMConfig
from tests.conftest import trained_like
from tests.test_hf_parity import assert_parity

tf = import_transformers()
pytestmark = pytest.mark.usefixtures("hf_offline")


def deit(num_classes: int = 7, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return trained_like(create_model("deit_test", num_classes=num_classes, **kw))


# --- the model ----------------------------------------------------------------------------------------------


def test_tokens_heads_and_state_dict():
    model = create_model("deit_test", num_classes=10)
    sd = model.state_dict()
    assert {"cls_token", "dist_token", "head.weight", "head_dist.weight", "head_dist.bias"} <= set(sd)
    assert model.num_prefix_tokens == 2 and sd["pos_embed"].shape == (1, 2 + 64, 32)
    assert sd["head_dist.weight"].shape == (10, 32)
    assert {"cls_token", "dist_token", "pos_embed"} <= model.no_weight_decay()
    h = model.hparams()
    assert h["distill_token"] is True and h["global_pool"] == "token"
    rebuilt = type(model)(**h)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in sd.items()}
    model.reset_classifier(3)
    assert model.head.out_features == model.head_dist.out_features == 3
    assert not model.head_dist.bias.any()
    model.reset_classifier(0)
    assert "head_dist.weight" not in model.state_dict() and model.hparams()["num_classes"] == 0
    # off by default: the plain ViT is unchanged
    vit = create_model("vit_test_patch4", num_classes=10)
    assert vit.num_prefix_tokens == 1 and vit.dist_token is None and vit.head_dist is None
    assert not any("dist" in k for k in vit.state_dict()) and vit.hparams()["distill_token"] is False


def test_build_forward_backward():
    model = deit(num_classes=5).train()
    x = torch.randn(2, 3, 32, 32)
    feats = model.forward_features(x)
    assert feats.shape == (2, 2 + 64, 32)
    cls_logits, dist_logits = model.forward_head_distilled(feats)
    assert cls_logits.shape == dist_logits.shape == (2, 5)
    (cls_logits.square().mean() + dist_logits.mean() + model(x).mean()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_forward_head_is_the_mean_of_the_two_heads():
    model = deit(num_classes=5)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        feats = model.forward_features(x)
        cls_logits, dist_logits = model.forward_head_distilled(feats)
        torch.testing.assert_close(model(x), (cls_logits + dist_logits) / 2, atol=1e-6, rtol=0)
        torch.testing.assert_close(model.head(feats[:, 0]), cls_logits)
        torch.testing.assert_close(model.head_dist(feats[:, 1]), dist_logits)
        pooled = model.forward_head(feats, pre_logits=True)
        torch.testing.assert_close(pooled, (feats[:, 0] + feats[:, 1]) / 2)
    headless = deit(num_classes=0)
    with torch.no_grad():
        feats = headless.forward_features(x)
        torch.testing.assert_close(headless(x), (feats[:, 0] + feats[:, 1]) / 2)
    with pytest.raises(ValueError, match="distill_token=True"):
        create_model("vit_test_patch4").forward_head_distilled(feats)


def test_options_it_cannot_take():
    with pytest.raises(ValueError, match="needs class_token=True"):
        create_model("deit_test", class_token=False, global_pool="avg")
    with pytest.raises(ValueError, match="global_pool must be 'token'"):
        create_model("deit_test", global_pool="avg")


def test_sincos_gives_both_prefix_rows_zeros():
    model = create_model("deit_test", pos_embed="sincos")
    plain = create_model("vit_test_patch4", pos_embed="sincos")
    assert model.pos_embed.shape == (1, 66, 32) and not model.pos_embed[:, :2].any()
    assert torch.equal(model.pos_embed[:, 2:], plain.pos_embed[:, 1:])


def test_mask_and_ids_keep_keep_both_prefix_tokens():
    model = deit(num_classes=0, mask_token=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        everything = torch.arange(64).expand(2, -1)
        torch.testing.assert_close(model.forward_features(x, ids_keep=everything), model.forward_features(x))
        assert model.forward_features(x, ids_keep=everything[:, :5]).shape == (2, 2 + 5, 32)
        mask = torch.zeros(2, 8, 8, dtype=torch.bool)
        torch.testing.assert_close(model.forward_features(x, mask=mask), model.forward_features(x))
        patches = model.forward_intermediates(x, indices=[-1])[0].flatten(2).transpose(1, 2)  # (B, L, D)
        torch.testing.assert_close(patches, model.run_blocks(model.embed(x))[:, 2:])


def test_paper_sizes():
    # timm's deit_{tiny,small}_distilled_patch16_224 (1000 classes): 5.91M, 22.44M parameters
    for name, n in {"deit_tiny_patch16_224": 5.91e6, "deit_small_patch16_224": 22.44e6}.items():
        with torch.device("meta"):
            model = create_model(name, num_classes=1000)
        got = sum(p.numel() for p in model.parameters())
        assert abs(got - n) / n < 0.005, (name, got)


def test_init_from_resizes_the_table_keeping_both_prefix_rows():
    source = deit(num_classes=0, img_size=16)
    target = create_model("deit_test", num_classes=0)
    lines = load_backbone(target, source, "source")
    assert "pos_embed: interpolated (1, 18, 32) -> (1, 66, 32) (bicubic, 2 prefix rows kept)" in lines
    assert torch.equal(target.pos_embed[:, :2], source.pos_embed[:, :2])
    assert torch.equal(target.dist_token, source.dist_token)


# --- transformers -------------------------------------------------------------------------------------------


def test_classifier_export_parity_and_round_trip(tmp_path):
    model = deit(num_classes=7)
    export.to_hf(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [
        "DeiTForImageClassificationWithTeacher"
    ]
    hf, info = tf.AutoModelForImageClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert type(hf) is tf.DeiTForImageClassificationWithTeacher
    assert not any(info.values()), info
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = hf.eval()(pixel_values=x)
        feats = model.forward_features(x)
        cls_logits, dist_logits = model.forward_head_distilled(feats)
        torch.testing.assert_close(out.logits, model(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(out.cls_logits, cls_logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(out.distillation_logits, dist_logits, atol=1e-5, rtol=0)
    assert_parity(model, hf, HF_ADAPTERS.get("vit"), x, atol=1e-5)
    back = export.from_hf(tmp_path)
    assert back.hparams() == model.hparams()
    theirs, ours = back.state_dict(), model.state_dict()
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)


@pytest.mark.parametrize("pos", ["learned", "sincos"])
def test_headless_export_is_deit_model(tmp_path, pos):
    model = deit(num_classes=0, pos_embed=pos)
    export.to_hf(model, tmp_path)
    hf, info = tf.AutoModel.from_pretrained(tmp_path, output_loading_info=True)
    assert type(hf) is tf.DeiTModel and not any(info.values()), info
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = hf.eval()(pixel_values=x)
        feats = model.forward_features(x)
        torch.testing.assert_close(out.last_hidden_state, feats, atol=1e-5, rtol=0)
        # the identity pooler: the final-norm cls token (Tessera's pooled features are the two tokens' mean)
        torch.testing.assert_close(out.pooler_output, feats[:, 0], atol=1e-5, rtol=0)
    assert_parity(model, hf, HF_ADAPTERS.get("vit"), x, atol=1e-5)
    back = export.from_hf(tmp_path)
    assert back.hparams() == model.hparams() and back.pos_embed_type == pos
    theirs, ours = back.state_dict(), model.state_dict()
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)


def test_export_for_pipelines_has_the_image_processor_and_labels(tmp_path):
    """As `python -m pretrain.export` writes a grayscale run: labels, preprocessor, a model taking RGB."""
    model = deit(num_classes=7, in_chans=1)
    labels = [f"class {i}" for i in range(7)]
    export.to_hf(model, tmp_path, data=DataConfig(dataset="digits", image_size=32), labels=labels)
    proc = tf.AutoImageProcessor.from_pretrained(tmp_path)
    hf = tf.AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert hf.config.id2label == dict(enumerate(labels)) and hf.config.num_channels == 3
    png = tmp_path / "gray.png"
    g = torch.Generator().manual_seed(0)
    Image.fromarray(torch.randint(0, 256, (32, 32), generator=g, dtype=torch.uint8).numpy(), "L").save(png)
    with Image.open(png) as im:
        pixels = proc(images=im, return_tensors="pt")["pixel_values"]  # (1, 3, 32, 32), R = G = B
    with torch.no_grad():
        probs = model(pixels[:, :1]).softmax(-1)[0]
        torch.testing.assert_close(hf(pixel_values=pixels).logits.softmax(-1)[0], probs, atol=1e-5, rtol=0)
    scores = tf.pipeline("image-classification", model=str(tmp_path))(str(png), top_k=7)
    for s in scores:
        assert s["score"] == pytest.approx(probs[labels.index(s["label"])].item(), abs=1e-5)
    assert export.from_hf(tmp_path).hparams()["in_chans"] == 1


def tiny_deit_config(**kw):
    return tf.DeiTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=16,
        patch_size=4,
        layer_norm_eps=1e-6,
        **kw,
    )


def test_folder_written_by_transformers_imports(tmp_path):
    torch.manual_seed(0)
    hf = trained_like(tf.DeiTForImageClassificationWithTeacher(tiny_deit_config(num_labels=3)))
    hf.save_pretrained(tmp_path)
    ours = export.from_hf(tmp_path)
    assert ours.hparams()["distill_token"] and ours.hparams()["num_classes"] == 3
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out = hf(pixel_values=x)
        torch.testing.assert_close(ours(x), out.logits, atol=1e-5, rtol=0)
        cls_logits, dist_logits = ours.forward_head_distilled(ours.forward_features(x))
        torch.testing.assert_close(cls_logits, out.cls_logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(dist_logits, out.distillation_logits, atol=1e-5, rtol=0)


def test_deit_model_with_its_own_pooler_imports_the_encoder(tmp_path):
    torch.manual_seed(0)
    hf = trained_like(tf.DeiTModel(tiny_deit_config()))  # a tanh pooler: not Tessera's, left out (warned)
    hf.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="pooler"):
        ours = export.from_hf(tmp_path)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(
            ours.forward_features(x), hf(pixel_values=x).last_hidden_state, atol=1e-5, rtol=0
        )


@pytest.mark.parametrize("option, value", [("pre_norm", True), ("act", "gelu_tanh")])
def test_unsupported_options_are_refused_by_name(tmp_path, option, value):
    model = create_model("deit_test", num_classes=7, **{option: value})
    with pytest.raises(ValueError, match=f"{option}=.*DeiTModel"):
        export.to_hf(model, tmp_path)


def test_mae_export_refuses_the_distillation_token(tmp_path):
    vit = create_model("deit_test", img_size=16)
    mae = MAE(vit, MAEConfig(mask_ratio=0.75, decoder_dim=32, decoder_depth=1, decoder_heads=4))
    with pytest.raises(ValueError, match="distill_token=True has no ViTModel equivalent"):
        export.to_hf(mae, tmp_path)


def test_simmim_run_exports_its_encoder(tmp_path):
    """DeiTForMaskedImageModeling decodes tokens [1:-1], not the patches: the encoder is exported alone."""
    torch.manual_seed(0)
    obj = trained_like(SimMIM(create_model("deit_test", mask_token=True), SimMIMConfig(0.6, 8), seed=0))
    export.to_hf(obj, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["DeiTModel"]
    assert not (tmp_path / "encoder").exists()
    hf = tf.AutoModel.from_pretrained(tmp_path).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = obj.backbone.forward_features(x)
        torch.testing.assert_close(hf(pixel_values=x).last_hidden_state, feats, atol=1e-5, rtol=0)


def test_mae_on_a_deit_decodes_cls_and_kept_patches_only():
    """MAE's decoder reads [cls, kept patches]: a DeiT's distillation token is dropped before it."""
    import torch

    from models import create_model
    from pretrain.objectives.mae import MAE, MAEConfig

    torch.manual_seed(0)
    mae = MAE(
        create_model("deit_test"),
        MAEConfig(mask_ratio=0.75, decoder_dim=16, decoder_depth=1, decoder_heads=2),
    )
    seen = {}
    real = mae.decoder.forward
    mae.decoder.forward = lambda latent, ids: (
        seen.setdefault("latent", latent) is not None and real(latent, ids)
    )
    x = torch.randn(2, 3, 32, 32)
    mae({"image": x})
    keep = round(mae.backbone.num_patches * 0.25)
    assert seen["latent"].shape[1] == 1 + keep
