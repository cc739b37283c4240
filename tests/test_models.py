"""Generic tests over every registered model (small instances of each size family)."""

import pytest
import torch

from models import create_model, list_models

SMALL = dict(img_size=32, patch_size=8, depth=2)  # every size, shrunk in depth/resolution to run on CPU


def small(name):
    return create_model(name, **SMALL)


@pytest.mark.parametrize("name", list_models())
def test_forward_backward_every_param_gets_grad(name):
    torch.manual_seed(0)
    model = small(name)
    x = torch.randn(2, 3, 32, 32)
    feats = model.forward_features(x)
    assert feats.shape == (2, 1 + model.num_patches, model.num_features)
    pooled = model.forward_head(feats, pre_logits=True)
    assert pooled.shape == (2, model.num_features)
    (feats.square().mean() + pooled.mean()).backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
        assert p.grad.abs().sum() > 0, n


@pytest.mark.parametrize("name", list_models())
def test_bf16_forward_close_to_fp32(name):
    torch.manual_seed(0)
    model = small(name).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model.forward_features(x)
        out = model.to(torch.bfloat16).forward_features(x.bfloat16()).float()
    assert torch.isfinite(out).all()
    assert (out - ref).abs().mean() < 0.05 * ref.abs().mean() + 1e-3


def test_contract_methods():
    model = create_model("vit_test_patch4", num_classes=5)
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 5)
    assert model.no_weight_decay() == {"pos_embed", "cls_token"}
    assert set(model.group_matcher()) >= {"stem", "blocks"}
    maps = model.forward_intermediates(x, indices=[0, -1])
    assert [m.shape for m in maps] == [(2, 32, 8, 8)] * 2
    torch.testing.assert_close(maps[-1].flatten(2).transpose(1, 2), model.run_blocks(model.embed(x))[:, 1:])
    # activation checkpointing changes memory, not math
    model.train()
    ref = model.forward_features(x)
    model.set_grad_checkpointing(True)
    torch.testing.assert_close(model.forward_features(x), ref)


def test_ids_keep_encodes_only_the_kept_tokens():
    torch.manual_seed(0)
    model = create_model("vit_test_patch4", pos_embed="sincos").eval()
    x = torch.randn(2, 3, 32, 32)
    everything = torch.arange(model.num_patches).expand(2, -1)
    torch.testing.assert_close(model.forward_features(x, ids_keep=everything), model.forward_features(x))
    keep = torch.tensor([[0, 5, 9], [63, 1, 2]])
    out = model.forward_features(x, ids_keep=keep)
    assert out.shape == (2, 4, 32)
    # pixels of patches not kept cannot influence the output
    y = x.clone()
    y[:, :, 16:, 16:] = 100.0  # patch (row 4.., col 4..) region, not in `keep` for sample 0 (ids < 10)
    torch.testing.assert_close(model.forward_features(y, ids_keep=keep)[0], out[0])


def test_paper_sizes():
    expected = {"vit_tiny_patch16": 5.5e6, "vit_small_patch16": 21.7e6, "vit_base_patch16": 85.8e6}
    for name, n in expected.items():
        model = create_model(name)
        got = sum(p.numel() for p in model.parameters())
        assert abs(got - n) / n < 0.02, (name, got)
