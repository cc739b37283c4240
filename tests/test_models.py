"""The backbone contract (models/__init__.py), checked over every registered model at its smoke size."""

import inspect

import pytest
import torch
import yaml

import models.hierarchical
import models.vit
from models import MODELS, create_model, list_models
from pretrain.optim import layer_ids

# image backbones; text and two-tower models have their own (tests/test_text_models.py, test_two_tower.py)
NAMES = [n for n in list_models() if getattr(MODELS.get(n).builds, "modality", "image") == "image"]


def small(name, **kw):
    return create_model(name, **{**MODELS.get(name).smoke, **kw})


def image(model, batch=2):
    return torch.randn(
        batch, model.hparams()["in_chans"], model.hparams()["img_size"], model.hparams()["img_size"]
    )


def test_every_factory_declares_its_class_and_smoke_size():
    for name in NAMES:
        f = MODELS.get(name)
        assert inspect.isclass(f.builds) and isinstance(f.smoke, dict), name
    families = {MODELS.get(n).builds for n in NAMES}
    for cls in families:  # each family has a CI-sized member
        assert any(MODELS.get(n).builds is cls and "_test" in n for n in NAMES), cls.__name__


@pytest.mark.parametrize("name", NAMES)
def test_forward_backward_every_param_gets_grad(name):
    torch.manual_seed(0)
    model = small(name)
    x = image(model)
    feats = model.forward_features(x)
    pooled = model.forward_head(feats, pre_logits=True)
    assert pooled.shape == (2, model.num_features)
    (feats.square().mean() + pooled.mean()).backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
        assert p.grad.abs().sum() > 0, n


@pytest.mark.parametrize("name", NAMES)
def test_bf16_forward_close_to_fp32(name):
    """Every stage, the features and the pooled output, each within bf16 rounding of fp32 (and not all zero)."""
    torch.manual_seed(0)
    model = small(name).eval()
    x = image(model)

    def outputs(m, inp):
        feats = m.forward_features(inp)
        return [*m.forward_intermediates(inp), feats, m.forward_head(feats, pre_logits=True)]

    with torch.no_grad():
        ref = outputs(model, x)
        out = outputs(model.to(torch.bfloat16), x.bfloat16())
    for i, (a, b) in enumerate(zip(out, ref)):
        a = a.float()
        assert torch.isfinite(a).all(), i
        assert b.abs().mean() > 0, i
        assert (a - b).abs().mean() < 0.05 * b.abs().mean() + 1e-3, i
        cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
        assert cos > 0.99, (i, cos)


@pytest.mark.parametrize("name", NAMES)
def test_contract(name):
    torch.manual_seed(0)
    model = small(name, num_classes=5, drop_path_rate=0.1)
    x = image(model)
    model.eval()
    assert model(x).shape == (2, 5)
    # features per stage, as feature_info says, and the last one feeds forward_features
    maps = model.forward_intermediates(x)
    assert len(maps) == len(model.feature_info)
    size = model.hparams()["img_size"]
    for m, info in zip(maps, model.feature_info):
        assert m.shape[:2] == (2, info["num_chs"]), (m.shape, info)
        assert m.shape[-1] == -(-size // info["reduction"]), (m.shape, info)  # ceil: odd maps are padded
    assert [m.shape for m in model.forward_intermediates(x, indices=[0, -1])] == [
        maps[0].shape,
        maps[-1].shape,
    ]
    # parameter names the model exempts from weight decay exist
    params = dict(model.named_parameters())
    assert model.no_weight_decay() <= set(params), model.no_weight_decay() - set(params)
    # layer-wise LR decay: every parameter lands in exactly one group, stem first, head last
    ids = layer_ids(model)
    assert set(ids) == set(params)
    assert min(ids.values()) == 0 and max(ids.values()) >= 2
    head = [n for n in params if n.startswith("head")]
    assert head and all(ids[n] == max(ids.values()) for n in head)
    # rebuild from hparams: same architecture; plain types, so checkpoints' YAML can hold them
    yaml.safe_dump(model.hparams())
    rebuilt = type(model)(**model.hparams())
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }
    model.reset_classifier(0)
    assert model(x).shape == (2, model.num_features)


@pytest.mark.parametrize("name", NAMES)
def test_grad_checkpointing_is_used_and_changes_memory_not_math(name, monkeypatch):
    """Same outputs, gradients and buffers (BatchNorm statistics) with and without, in training with stochastic
    depth on; and the checkpointed path really runs (at least once per stage)."""
    calls = []

    def counting(fn, *args, **kw):
        calls.append(fn)
        return torch.utils.checkpoint.checkpoint(fn, *args, **kw)

    monkeypatch.setattr(models.hierarchical, "checkpoint", counting)
    monkeypatch.setattr(models.vit, "checkpoint", counting)
    runs = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = small(name, drop_path_rate=0.2).train()
        model.set_grad_checkpointing(ckpt)
        x = image(model)
        torch.manual_seed(1)
        out = model.forward_features(x)
        out.square().mean().backward()
        grads = {n: p.grad for n, p in model.named_parameters()}  # None where a dropped branch got none
        runs.append((out.detach(), grads, {k: v.clone() for k, v in model.state_dict().items()}))
    assert len(calls) >= len(model.feature_info) if hasattr(model, "stem_stride") else len(calls) >= 1
    (out0, g0, s0), (out1, g1, s1) = runs
    torch.testing.assert_close(out1, out0)
    assert sum(g is not None for g in g0.values()) > len(g0) // 2  # most of the model trained
    for n in g0:
        assert (g0[n] is None) == (g1[n] is None), n  # the same branches dropped (same RNG)
        if g0[n] is not None:
            torch.testing.assert_close(g1[n], g0[n], msg=lambda m, n=n: f"grad {n}: {m}")
    for k in s0:
        torch.testing.assert_close(s1[k], s0[k], msg=lambda m, k=k: f"state {k}: {m}")
    model.reset_classifier(0)
    assert model(x).shape == (2, model.num_features)


@pytest.mark.parametrize("name", [n for n in NAMES if "_test" in n])
def test_mask_replaces_stem_tokens(name):
    """Hierarchical families take a stem-grid mask (SimMIM/SparK later): all-False changes nothing, all-True hides
    the image entirely. A family whose architecture has no single stem grid says why in `stem_mask` (a string:
    CrossViT's two patch sizes) and takes neither a mask nor MAE's ids_keep."""
    why = getattr(MODELS.get(name).builds, "stem_mask", None)
    if isinstance(why, str):
        params = inspect.signature(small(name).forward_features).parameters
        assert why and "mask" not in params and "ids_keep" not in params, name
        return
    model = (
        small(name, mask_token=True)
        if "mask_token" in inspect.signature(MODELS.get(name).builds).parameters
        else None
    )
    if model is None or "mask" not in inspect.signature(model.forward_features).parameters:
        assert "ids_keep" in inspect.signature(small(name).forward_features).parameters, (
            name
        )  # ViT: MAE's subset
        return
    torch.manual_seed(0)
    model.eval()
    x = image(model)
    s = model.stem_stride
    grid = (x.shape[-2] // s, x.shape[-1] // s)
    with torch.no_grad():
        torch.testing.assert_close(
            model.forward_features(x, mask=torch.zeros(2, *grid, dtype=torch.bool)), model.forward_features(x)
        )
        full = torch.ones(2, *grid, dtype=torch.bool)
        a, b = model.forward_features(x, mask=full), model.forward_features(torch.randn_like(x), mask=full)
        torch.testing.assert_close(a, b)
        half = torch.zeros(2, *grid, dtype=torch.bool)
        half[:, : grid[0] // 2] = True
        assert not torch.allclose(model.forward_features(x, mask=half), model.forward_features(x), atol=1e-4)


def test_vit_intermediates_and_ids_keep():
    torch.manual_seed(0)
    model = create_model("vit_test_patch4", pos_embed="sincos").eval()
    x = torch.randn(2, 3, 32, 32)
    maps = model.forward_intermediates(x, indices=[0, -1])
    assert [m.shape for m in maps] == [(2, 32, 8, 8)] * 2
    torch.testing.assert_close(maps[-1].flatten(2).transpose(1, 2), model.run_blocks(model.embed(x))[:, 1:])
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
        with torch.device("meta"):
            model = create_model(name)
        got = sum(p.numel() for p in model.parameters())
        assert abs(got - n) / n < 0.02, (name, got)
