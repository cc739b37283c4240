"""Hugging Face parity: exported folders load offline with transformers' own classes and match to 1e-5."""

import pytest
import torch

from models import create_model
from ops.compat import import_transformers
from pretrain.export import from_hf, to_hf
from pretrain.objectives.mae import MAE, MAEConfig
from tests.conftest import trained_like

tf = import_transformers()


pytestmark = pytest.mark.usefixtures("hf_offline")


@pytest.mark.parametrize("chans, pos", [(1, "sincos"), (3, "learned")])
def test_mae_export_parity(tmp_path, chans, pos):
    torch.manual_seed(0)
    vit = create_model("vit_test_patch4", img_size=16, in_chans=chans, pos_embed=pos)
    mae = trained_like(MAE(vit, MAEConfig(mask_ratio=0.75, decoder_dim=32, decoder_depth=2, decoder_heads=4)))
    to_hf(mae, tmp_path)
    hf = tf.ViTMAEForPreTraining.from_pretrained(tmp_path).eval()
    x, noise = torch.randn(3, chans, 16, 16), torch.rand(3, 16)
    with torch.no_grad():
        ours, theirs = mae({"image": x}, noise=noise), hf(pixel_values=x, noise=noise)
        torch.testing.assert_close(ours["pred"], theirs.logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours["loss"], theirs.loss, atol=1e-5, rtol=0)
        assert torch.equal(ours["mask"], theirs.mask)
        # the encoder alone, as ViTModel: from the encoder/ folder and from the MAE folder itself
        feats = mae.backbone.forward_features(x)
        for folder in (tmp_path / "encoder", tmp_path):
            enc = tf.ViTModel.from_pretrained(folder, add_pooling_layer=False).eval()
            torch.testing.assert_close(enc(pixel_values=x).last_hidden_state, feats, atol=1e-5, rtol=0)
        # and back: from_hf rebuilds the same Tessera model
        back = from_hf(tmp_path)
        torch.testing.assert_close(back({"image": x}, noise=noise)["pred"], ours["pred"], atol=1e-6, rtol=0)
        enc_back = from_hf(tmp_path / "encoder")
        torch.testing.assert_close(enc_back.forward_features(x), feats, atol=1e-6, rtol=0)
    assert back.backbone.pos_embed_type == pos


def test_classifier_export_parity(tmp_path):
    torch.manual_seed(0)
    vit = trained_like(create_model("vit_test_patch4", num_classes=7))
    to_hf(vit, tmp_path)
    hf = tf.ViTForImageClassification.from_pretrained(tmp_path).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=x).logits, vit(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(from_hf(tmp_path)(x), vit(x), atol=1e-6, rtol=0)


def test_hf_initialised_model_imports(tmp_path):
    """Import the other way: a folder transformers wrote from its own random init."""
    cfg = tf.ViTMAEConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=16,
        patch_size=4,
        num_channels=3,
        decoder_hidden_size=16,
        decoder_num_hidden_layers=1,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=32,
        layer_norm_eps=1e-6,
    )
    torch.manual_seed(0)
    hf = tf.ViTMAEForPreTraining(cfg).eval()
    hf.save_pretrained(tmp_path)
    ours = from_hf(tmp_path)
    x, noise = torch.randn(2, 3, 16, 16), torch.rand(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(
            ours({"image": x}, noise=noise)["pred"], hf(pixel_values=x, noise=noise).logits, atol=1e-5, rtol=0
        )


def test_errors_name_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_hf(tmp_path)
    with pytest.raises(TypeError, match="no Hugging Face export"):
        to_hf(torch.nn.Linear(2, 2), tmp_path)
