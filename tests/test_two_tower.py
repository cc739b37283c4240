"""The two-tower model (models/two_tower.py), checked over every registered model with modality "image_text" at its
smoke size; the ViT options CLIP / SigLIP need (models/vit.py); the CLIP / SigLIP text tower (models/clip_text.py)."""

import math

import pytest
import torch
import torch.nn.functional as F
import yaml

import models.text_layers
import models.vit
from models import MODELS, create_model, list_models
from models.pvt_v2 import PyramidVisionTransformerV2
from models.swin import SwinTransformer
from models.two_tower import TwoTower
from models.vit import VisionTransformer
from models.vit_hf import encoder_to_hf
from pretrain.optim import layer_ids, param_groups

NAMES = [n for n in list_models() if getattr(MODELS.get(n).builds, "modality", None) == "image_text"]
# the CI-sized members run their numerics by default; the ViT-B/16 sizes (20-40M parameters even at smoke size:
# widths stay) with the slow tests, and their structure by default on the meta device
SIZED = [n if "vit_b16" not in n else pytest.param(n, marks=pytest.mark.slow) for n in NAMES]
B = 3


def small(name, **kw):
    return create_model(name, **{**MODELS.get(name).smoke, **kw})


def batch(model, seed=0):
    """Images (B, C, S, S) and token rows (B, L): random ids (never eos), one eos per row at varied positions."""
    g = torch.Generator().manual_seed(seed)
    h = model.hparams()
    images = torch.randn(B, h["in_chans"], h["img_size"], h["img_size"], generator=g)
    ids = torch.randint(0, h["vocab_size"] - 1, (B, h["context_length"]), generator=g)
    if h["eos_token_id"] is not None:
        ids[ids == h["eos_token_id"]] = 0
        for row, pos in enumerate((4, 9, h["context_length"] - 1)):
            ids[row, pos] = h["eos_token_id"]
    return images, ids


def features(model, images, ids):
    return {
        "image": model.encode_image(images),
        "text": model.encode_text(ids),
        "image_tokens": model.encode_image_tokens(images),
        "text_tokens": model.encode_text_tokens(ids),
    }


def toy_loss(model, f) -> torch.Tensor:
    """A CLIP-style loss over both towers' pooled and token features, the scale and the bias."""
    scale, bias = model.scale_and_bias()
    logits = scale * f["image"] @ f["text"].T + (0.0 if bias is None else bias)  # (B, B)
    target = torch.arange(logits.shape[0])
    tokens = (f["image_tokens"].mean(1) * f["text_tokens"].mean(1)).sum()
    return F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target) + tokens


def test_there_are_two_tower_models():
    assert {"clip_test", "clip_mini", "clip_vit_b16", "siglip_test", "siglip_vit_b16"} <= set(NAMES)
    for name in NAMES:
        assert MODELS.get(name).builds is TwoTower and isinstance(MODELS.get(name).smoke, dict)


@pytest.mark.parametrize("name", SIZED)
def test_shapes_and_unit_norm(name):
    torch.manual_seed(0)
    model = small(name).eval()
    images, ids = batch(model)
    E, L = model.embed_dim, model.hparams()["context_length"]
    with torch.no_grad():
        f = features(model, images, ids)
        raw = model.encode_image(images, normalize=False), model.encode_text(ids, normalize=False)
        pair = model(images, ids)
    n_patches = model.visual.num_patches
    assert f["image"].shape == f["text"].shape == (B, E)
    assert f["image_tokens"].shape == (B, n_patches, E)
    assert f["text_tokens"].shape == (B, L, E)
    for key, t in f.items():
        torch.testing.assert_close(t.norm(dim=-1), torch.ones(t.shape[:-1]), msg=key)
    for r, n in zip(raw, (f["image"], f["text"])):
        assert (r.norm(dim=-1) - 1).abs().max() > 1e-3  # normalize=False really is raw
        torch.testing.assert_close(F.normalize(r, dim=-1), n)
    torch.testing.assert_close(pair[0], f["image"])
    torch.testing.assert_close(pair[1], f["text"])


@pytest.mark.parametrize("name", SIZED)
def test_every_param_gets_grad(name):
    torch.manual_seed(0)
    model = small(name).train()
    images, ids = batch(model)
    toy_loss(model, features(model, images, ids)).backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
        assert p.grad.abs().sum() > 0, n


@pytest.mark.parametrize("name", SIZED)
def test_bf16_autocast_close_to_fp32(name):
    torch.manual_seed(0)
    model = small(name).eval()
    images, ids = batch(model)
    with torch.no_grad():
        ref = features(model, images, ids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = features(model, images, ids)
    for key in ref:
        a, b = out[key].float(), ref[key]
        assert torch.isfinite(a).all(), key
        assert (a - b).abs().mean() < 0.05 * b.abs().mean() + 1e-3, key
        cos = F.cosine_similarity(a.flatten(), b.flatten(), dim=0)
        assert cos > 0.99, (key, cos)


@pytest.mark.parametrize("name", SIZED)
def test_grad_checkpointing_changes_memory_not_math(name, monkeypatch):
    """Same outputs and gradients with and without, in training with stochastic depth in the image tower; the
    checkpointed path runs in both towers."""
    calls = {"image": 0, "text": 0}

    def counting(kind):
        def ckpt(fn, *args, **kw):
            calls[kind] += 1
            return torch.utils.checkpoint.checkpoint(fn, *args, **kw)

        return ckpt

    monkeypatch.setattr(models.vit, "checkpoint", counting("image"))
    monkeypatch.setattr(models.text_layers, "checkpoint", counting("text"))
    image_kwargs = {**MODELS.get(name).smoke["image_kwargs"], "drop_path_rate": 0.2}
    runs = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = small(name, image_kwargs=image_kwargs).train()
        model.set_grad_checkpointing(ckpt)
        images, ids = batch(model)
        torch.manual_seed(1)
        f = features(model, images, ids)
        toy_loss(model, f).backward()
        runs.append(({k: v.detach() for k, v in f.items()}, {n: p.grad for n, p in model.named_parameters()}))
    assert calls["image"] >= 2 and calls["text"] >= 2, calls
    (f0, g0), (f1, g1) = runs
    for k in f0:
        torch.testing.assert_close(f1[k], f0[k], msg=k)
    for n in g0:
        assert (g0[n] is None) == (g1[n] is None), n
        if g0[n] is not None:
            torch.testing.assert_close(g1[n], g0[n], msg=lambda m, n=n: f"grad {n}: {m}")


@pytest.mark.parametrize("name", SIZED)
def test_hparams_rebuild_identical(name):
    torch.manual_seed(0)
    model = small(name).eval()
    yaml.safe_dump(model.hparams())  # plain types: checkpoints' YAML holds them
    rebuilt = TwoTower(**model.hparams()).eval()
    assert rebuilt.hparams() == model.hparams()
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    images, ids = batch(model)
    with torch.no_grad():
        for a, b in zip(features(rebuilt, images, ids).values(), features(model, images, ids).values()):
            torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("name", SIZED)
def test_init_is_deterministic(name):
    states = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        states.append(small(name).state_dict())
    for k in states[0]:
        torch.testing.assert_close(states[1][k], states[0][k], atol=0, rtol=0, msg=k)
    assert any(not torch.equal(states[2][k], states[0][k]) for k in states[0])


@pytest.mark.parametrize("name", SIZED)
def test_logit_scale_and_bias(name):
    model = small(name)
    h = model.hparams()
    # (1,): DeepSpeed cannot broadcast 0-d parameters; scale_and_bias() gives 0-d values
    assert model.logit_scale.shape == (1,) and model.logit_scale.item() == pytest.approx(
        h["init_logit_scale"]
    )
    if name.startswith("siglip"):
        assert h["init_logit_scale"] == pytest.approx(math.log(10)) and model.logit_bias.item() == -10.0
    else:
        assert h["init_logit_scale"] == pytest.approx(math.log(1 / 0.07)) and model.logit_bias is None
    scale, bias = model.scale_and_bias()
    torch.testing.assert_close(scale, model.logit_scale.detach().exp()[0])
    assert scale.shape == () and (bias is None) == (model.logit_bias is None)
    if bias is not None:
        assert bias.shape == () and bias.item() == model.logit_bias.item()
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert model.scale_and_bias()[0].item() == 100.0  # exactly: the cap at ln 100
    with torch.no_grad():
        model.logit_scale.fill_(-1.0)
    assert model.scale_and_bias()[0].item() == 1.0
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100.0))  # at the bound the gradient still flows (it can come down)
    model.scale_and_bias()[0].backward()
    assert model.logit_scale.grad.item() == pytest.approx(100.0)


@pytest.mark.parametrize("name", NAMES)
def test_weight_decay_depth_groups_and_rebuild(name):
    """On the meta device (every size, no cost): no_weight_decay, layer-wise groups, hparams() rebuilds the
    same architecture and the scale/bias init of the family."""
    with torch.device("meta"):
        model = small(name)
        rebuilt = TwoTower(**model.hparams())
    yaml.safe_dump(model.hparams())
    assert rebuilt.hparams() == model.hparams()
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }
    siglip = name.startswith("siglip")
    assert model.init_logit_scale == pytest.approx(math.log(10) if siglip else math.log(1 / 0.07))
    assert model.init_logit_bias == (-10.0 if siglip else None)
    params = dict(model.named_parameters())
    nwd = model.no_weight_decay()
    assert "logit_scale" in nwd and (model.logit_bias is None) == ("logit_bias" not in nwd)
    assert nwd <= set(params), nwd - set(params)
    assert {"visual.pos_embed", "text.pos_embed"} <= nwd
    groups = param_groups(model, weight_decay=0.1)
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(model.logit_scale) not in decayed and id(model.text_proj.weight) in decayed
    ids = layer_ids(model)  # every parameter in exactly one group
    assert set(ids) == set(params)
    top = max(ids.values())
    assert all(ids[n] == 0 for n in ("visual.patch_embed.proj.weight", "text.token_embed.weight"))
    assert all(
        ids[n] == top for n in params if n.startswith(("logit_", "image_proj", "text_proj", "text.norm"))
    )
    image_blocks = {ids[n] for n in params if n.startswith("visual.blocks.")}
    text_blocks = {ids[n] for n in params if n.startswith("text.blocks.")}
    assert len(image_blocks) == len(model.visual.blocks) and len(text_blocks) == len(model.text.blocks)
    assert not image_blocks & text_blocks and 0 not in image_blocks | text_blocks and top not in image_blocks


# --- text pooling and the text tower ---------------------------------------------------------------------------


def test_clip_text_pools_the_first_eos_and_ignores_padding_after_it():
    torch.manual_seed(0)
    model = small("clip_test").eval()
    eos = model.eos_token_id
    ids = torch.randint(0, eos, (2, 16))
    ids[0, 5], ids[0, 9], ids[1, 15] = eos, eos, eos  # row 0: two eos tokens, the first at 5
    with torch.no_grad():
        hidden = model.text.forward_features(ids)
        got = model.encode_text(ids, normalize=False)
        torch.testing.assert_close(got, model.text_proj(hidden[[0, 1], [5, 15]]))
        padded = ids.clone()
        padded[0, 6:] = torch.randint(0, 1000, (10,))  # anything after the first eos: other tokens, padding
        padded[0, 10:] = 0
        torch.testing.assert_close(model.encode_text(padded, normalize=False)[0], got[0], atol=1e-6, rtol=0)
        moved = ids.clone()
        moved[0, 3] = (moved[0, 3] + 1) % eos  # a token before the eos does change it
        assert (model.encode_text(moved, normalize=False)[0] - got[0]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="eos_token_id"):
        model.encode_text(torch.zeros(2, 16, dtype=torch.long))


def test_siglip_text_pools_the_last_position_and_attends_everywhere():
    torch.manual_seed(0)
    model = small("siglip_test").eval()
    assert model.text_pool == "last" and not model.text.causal
    ids = torch.randint(0, 1000, (2, 16))
    with torch.no_grad():
        got = model.encode_text(ids, normalize=False)
        torch.testing.assert_close(got, model.text_proj(model.text.forward_features(ids)[:, -1]))
        changed = ids.clone()
        changed[:, 0] = (changed[:, 0] + 1) % 1000  # bidirectional: the first token reaches the last position
        assert (model.encode_text(changed, normalize=False) - got).abs().max() > 1e-4


@pytest.mark.parametrize("name", ["clip_text_test", "siglip_text_test"])
def test_text_tower_causality(name):
    """Causal (CLIP): the output at position t does not depend on tokens after t; bidirectional (SigLIP) it does."""
    torch.manual_seed(0)
    text = small(name).eval()
    ids = torch.randint(0, 1000, (2, 20))
    later = ids.clone()
    later[:, 12:] = torch.randint(0, 1000, (2, 8))
    with torch.no_grad():
        a, b = text.forward_features(ids), text.forward_features(later)
    assert (a[:, 12:] - b[:, 12:]).abs().max() > 1e-3
    if text.causal:
        torch.testing.assert_close(b[:, :12], a[:, :12], atol=1e-6, rtol=0)
    else:
        assert (a[:, :12] - b[:, :12]).abs().max() > 1e-4


def test_mean_pooling_reads_the_attention_mask():
    torch.manual_seed(0)
    model = small("clip_test", text_pool="mean").eval()
    ids = torch.randint(0, 1000, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[0, 7:] = 0
    with torch.no_grad():
        hidden = model.text.forward_features(ids)
        got = model.encode_text(ids, mask, normalize=False)
    torch.testing.assert_close(got[0], model.text_proj(hidden[0, :7].mean(0)))
    torch.testing.assert_close(got[1], model.text_proj(hidden[1].mean(0)))


# --- other towers ------------------------------------------------------------------------------------------


def tower_smoke(name):
    """A tower's smoke overrides less what the two-tower model sets itself (sizes of the data)."""
    data = ("img_size", "in_chans", "vocab_size", "max_seq_len")
    return {k: v for k, v in MODELS.get(name).smoke.items() if k not in data}


IMAGE_TESTS = [
    n for n in list_models("*_test*") if getattr(MODELS.get(n).builds, "modality", "image") == "image"
]


@pytest.mark.parametrize("image", IMAGE_TESTS)
def test_any_image_tower_gives_tokens_and_embeddings(image):
    """Every image family as the image tower (with the other text families as the text tower): the pooled
    embedding is the tower's pooled features projected; tokens are the last map after the final norm."""
    torch.manual_seed(0)
    text = "llama_test" if "conv" in image else "modernbert_test"
    size = MODELS.get(image).smoke.get("img_size", 32)
    model = TwoTower(
        image_tower=image,
        image_kwargs=tower_smoke(image),
        text_tower=text,
        text_kwargs=tower_smoke(text),
        embed_dim=16,
        img_size=size,
        vocab_size=1000,
        context_length=16,
        eos_token_id=999,
    ).eval()
    assert model.text_pool == ("eos" if model.text.causal else "first")
    images, ids = torch.randn(2, 3, size, size), torch.randint(0, 999, (2, 16))
    ids[:, -1] = 999
    with torch.no_grad():
        pooled = model.visual.forward_head(model.visual.forward_features(images), pre_logits=True)
        torch.testing.assert_close(model.encode_image(images, normalize=False), model.image_proj(pooled))
        assert model.encode_text(ids).shape == (2, 16)
        # CrossViT: its features are two branches' tokens, no one token set
        if model.visual.forward_features(images).ndim == 2:
            with pytest.raises(ValueError, match=f"{type(model.visual).__name__}: .* cannot use this family"):
                model.encode_image_tokens(images)
            return
        tokens = model.encode_image_tokens(images, normalize=False)
    n = model.visual.num_patches if hasattr(model.visual, "num_patches") else None
    reduction = model.visual.feature_info[-1]["reduction"]
    assert tokens.shape[0] == 2 and tokens.shape[2] == 16
    assert tokens.shape[1] == (n or math.ceil(size / reduction) ** 2)
    if isinstance(model.visual, (SwinTransformer, PyramidVisionTransformerV2)):
        # these pool by the plain mean of their final-normed tokens: the tokens must be exactly those
        raw = model.visual.forward_features(images)
        unproj = model.image_tokens(raw)
        torch.testing.assert_close(unproj.mean(1), pooled)
    if not hasattr(model.visual, "num_prefix_tokens"):
        with pytest.raises(ValueError, match="image_tower"):
            model.encode_image(images, ids_keep=torch.zeros(2, 3, dtype=torch.long))


def test_image_tokens_are_normed_per_position():
    """ConvNeXt norms its pooled features in forward_head: its tokens get that LayerNorm per position."""
    torch.manual_seed(0)
    model = TwoTower(
        image_tower="convnext_test",
        image_kwargs=tower_smoke("convnext_test"),
        text_tower="clip_text_test",
        embed_dim=16,
        img_size=32,
        vocab_size=1000,
        context_length=16,
        eos_token_id=999,
        image_proj="linear",
    ).eval()
    with torch.no_grad():
        feats = model.visual.forward_features(torch.randn(2, 3, 32, 32))  # (B, C, h, w) un-normed
        tokens = model.image_tokens(feats)
    torch.testing.assert_close(tokens, model.visual.norm(feats.flatten(2).transpose(1, 2)))
    assert tokens.mean(-1).abs().max() < 1e-4  # LayerNorm at init: zero mean per token


@pytest.mark.parametrize(
    "overrides, key",
    [
        (dict(image_proj="none", embed_dim=48), "image_proj"),
        (dict(text_pool="cls"), "text_pool"),
        (dict(image_pool="gem"), "image_pool"),
        (dict(image_proj="mlp"), "image_proj"),
        (dict(eos_token_id=None), "eos_token_id"),  # a causal tower pools at eos by default
        (dict(image_tower="clip_text_test"), "image_tower"),
        (dict(text_tower="vit_test_patch4"), "text_tower"),
        (dict(image_tower="vit_nope"), "image_tower"),
        (dict(image_kwargs={"img_size": 64}), "image_kwargs.img_size"),
        (dict(text_kwargs={"max_seq_len": 32}), "text_kwargs.max_seq_len"),
    ],
)
def test_bad_combinations_name_the_key(overrides, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        small("clip_test", **overrides)


def test_ids_keep_encodes_a_patch_subset():
    """FLIP patch dropout on both ViT kinds (with and without cls token): kept patches only."""
    for name in ("clip_test", "siglip_test"):
        torch.manual_seed(0)
        model = small(name).eval()
        images, _ = batch(model)
        keep = torch.tensor([[0, 3, 5], [1, 2, 15], [4, 8, 12]])
        everything = torch.arange(model.visual.num_patches).expand(B, -1)
        with torch.no_grad():
            torch.testing.assert_close(
                model.encode_image(images, ids_keep=everything), model.encode_image(images)
            )
            out = model.encode_image(images, ids_keep=keep)
            assert model.encode_image_tokens(images, ids_keep=keep).shape == (B, 3, model.embed_dim)
            other = images.clone()
            other[:, :, 24:, 24:] = 5.0  # the last patch (15) of the 4x4 grid: kept only by row 1
            changed = model.encode_image(other, ids_keep=keep)
        torch.testing.assert_close(changed[[0, 2]], out[[0, 2]])
        assert (changed[1] - out[1]).abs().max() > 1e-4


# --- the ViT options -------------------------------------------------------------------------------------------

OLD_HPARAMS = (  # VisionTransformer's constructor before the CLIP / SigLIP options
    "img_size patch_size in_chans embed_dim depth num_heads mlp_ratio qkv_bias pos_embed global_pool num_classes "
    "norm_eps mask_token"
).split()


def old_layout_keys(depth: int) -> set[str]:
    keys = {
        "cls_token",
        "pos_embed",
        "patch_embed.proj.weight",
        "patch_embed.proj.bias",
        "norm.weight",
        "norm.bias",
    }
    for i in range(depth):
        for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            keys |= {f"blocks.{i}.{m}.weight", f"blocks.{i}.{m}.bias"}
    return keys


def vit_reference(sd: dict, x: torch.Tensor, heads: int, patch: int, eps: float) -> torch.Tensor:
    """The plain ViT (before the options) written out from its state dict: patch conv + bias, position table,
    cls token first, pre-norm blocks with erf GELU, final norm. -> (B, 1 + L, D)"""
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    t = t.flatten(2).transpose(1, 2) + sd["pos_embed"][:, 1:]  # (B, L, D)
    cls = (sd["cls_token"] + sd["pos_embed"][:, :1]).expand(x.shape[0], -1, -1)
    t = torch.cat([cls, t], 1)  # (B, 1 + L, D)
    D = t.shape[-1]
    i = 0
    while f"blocks.{i}.norm1.weight" in sd:

        def p(name, i=i):
            return sd[f"blocks.{i}.{name}"]

        h = F.layer_norm(t, (D,), p("norm1.weight"), p("norm1.bias"), eps)
        q, k, v = F.linear(h, p("attn.qkv.weight"), p("attn.qkv.bias")).chunk(3, dim=-1)
        q, k, v = (z.unflatten(-1, (heads, D // heads)).transpose(1, 2) for z in (q, k, v))  # (B, H, N, hd)
        a = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(D // heads), dim=-1) @ v
        t = t + F.linear(a.transpose(1, 2).flatten(2), p("attn.proj.weight"), p("attn.proj.bias"))
        h = F.layer_norm(t, (D,), p("norm2.weight"), p("norm2.bias"), eps)
        t = t + F.linear(
            F.gelu(F.linear(h, p("mlp.fc1.weight"), p("mlp.fc1.bias"))),
            p("mlp.fc2.weight"),
            p("mlp.fc2.bias"),
        )
        i += 1
    return F.layer_norm(t, (D,), sd["norm.weight"], sd["norm.bias"], eps)


def test_vit_defaults_are_the_old_vit():
    """Defaults: the old state dict layout and hparams, the old constructor arguments build the same model bit for
    bit, and the forward is the plain ViT's, written out from the state dict."""
    torch.manual_seed(0)
    vit = create_model("vit_test_patch4").eval()
    sd = vit.state_dict()
    assert set(sd) == old_layout_keys(len(vit.blocks))
    h = vit.hparams()
    assert (
        h["pre_norm"] is False and h["class_token"] is True and h["patch_bias"] is True and h["act"] == "gelu"
    )
    torch.manual_seed(0)
    old = VisionTransformer(**{k: h[k] for k in OLD_HPARAMS}).eval()  # the old configuration
    for k, v in old.state_dict().items():
        assert torch.equal(v, sd[k]), k  # the same init, consuming the same random numbers
    torch.manual_seed(1)
    other = VisionTransformer(**{k: h[k] for k in OLD_HPARAMS}).eval()
    other.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = vit.forward_features(x)
        assert torch.equal(other.forward_features(x), feats)
        torch.testing.assert_close(
            feats, vit_reference(sd, x, vit.num_heads, 4, vit.norm_eps), atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(vit.forward_head(feats, pre_logits=True), feats[:, 0])


def test_vit_without_class_token():
    torch.manual_seed(0)
    vit = create_model("vit_test_patch4", class_token=False, global_pool="avg", mask_token=True).eval()
    assert vit.cls_token is None and vit.num_prefix_tokens == 0
    assert vit.pos_embed.shape == (1, vit.num_patches, 32) and "cls_token" not in vit.no_weight_decay()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = vit.forward_features(x)
        assert feats.shape == (2, 64, 32)
        torch.testing.assert_close(vit.forward_head(feats, pre_logits=True), feats.mean(1))
        everything = torch.arange(64).expand(2, -1)
        torch.testing.assert_close(vit.forward_features(x, ids_keep=everything), feats)
        keep = torch.tensor([[0, 5, 9], [63, 1, 2]])
        assert vit.forward_features(x, ids_keep=keep).shape == (2, 3, 32)
        maps = vit.forward_intermediates(x)
        assert [m.shape for m in maps] == [(2, 32, 8, 8)] * 2
        torch.testing.assert_close(maps[-1].flatten(2).transpose(1, 2), vit.run_blocks(vit.embed(x)))
        mask = torch.zeros(2, 8, 8, dtype=torch.bool)
        mask[:, :4] = True
        assert not torch.allclose(vit.forward_features(x, mask=mask), feats, atol=1e-4)
    sincos = create_model("vit_test_patch4", class_token=False, global_pool="map", pos_embed="sincos")
    assert sincos.pos_embed.shape == (1, 64, 32)
    with pytest.raises(ValueError, match="class_token"):
        create_model("vit_test_patch4", class_token=False)  # global_pool "token" has nothing to pool


def test_vit_map_head_is_multihead_attention_pooling():
    """global_pool="map": SigLIP's head, written out: the probe attends over all final tokens (per head), the
    output projection, then a residual MLP on its LayerNorm. -> (B, D)"""
    torch.manual_seed(0)
    vit = create_model("vit_test_patch4", class_token=False, global_pool="map", num_classes=5).eval()
    pool = vit.attn_pool
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = vit.forward_features(x)  # (B, L, D)
        got = vit.forward_head(feats, pre_logits=True)
        D, H = 32, vit.num_heads
        wq, wk, wv = pool.attention.in_proj_weight.chunk(3)
        bq, bk, bv = pool.attention.in_proj_bias.chunk(3)
        q = F.linear(pool.probe.expand(2, -1, -1), wq, bq).unflatten(-1, (H, D // H)).transpose(1, 2)
        k = F.linear(feats, wk, bk).unflatten(-1, (H, D // H)).transpose(1, 2)
        v = F.linear(feats, wv, bv).unflatten(-1, (H, D // H)).transpose(1, 2)
        a = (torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(D // H), -1) @ v).transpose(1, 2).flatten(2)
        h = pool.attention.out_proj(a)  # (B, 1, D)
        want = (h + pool.mlp(pool.layernorm(h)))[:, 0]
        assert vit(x).shape == (2, 5)
    assert got.shape == (2, D)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    ids = layer_ids(vit)
    assert all(ids[n] == max(ids.values()) for n in ids if n.startswith("attn_pool"))
    assert "attn_pool.probe" in vit.no_weight_decay()


def test_vit_pre_norm_patch_bias_and_act():
    torch.manual_seed(0)
    vit = create_model("vit_test_patch4", pre_norm=True, patch_bias=False, act="quick_gelu").eval()
    assert vit.patch_embed.proj.bias is None and "patch_embed.proj.bias" not in vit.state_dict()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        t = vit.embed(x)  # after the pre-norm (unit LayerNorm at init): zero mean, unit variance per token
        torch.testing.assert_close(t.mean(-1), torch.zeros(2, 65), atol=1e-5, rtol=0)
        torch.testing.assert_close(t.var(-1, unbiased=False), torch.ones(2, 65), atol=1e-2, rtol=0)
        mlp = vit.blocks[0].mlp
        h = torch.randn(4, 32)
        torch.testing.assert_close(
            mlp(h), mlp.fc2(F.linear(h, mlp.fc1.weight, mlp.fc1.bias).mul(1.702).sigmoid() * mlp.fc1(h))
        )
    ids = layer_ids(vit)
    assert ids["norm_pre.weight"] == 0 and ids["norm.weight"] == max(ids.values())
    rebuilt = VisionTransformer(**vit.hparams()).eval()
    rebuilt.load_state_dict(vit.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(rebuilt.forward_features(x), vit.forward_features(x))
    gelu = VisionTransformer(**{**vit.hparams(), "act": "gelu"}).eval()
    gelu.load_state_dict(vit.state_dict(), strict=True)
    with torch.no_grad():
        assert (gelu.forward_features(x) - vit.forward_features(x)).abs().max() > 1e-4
    with pytest.raises(ValueError, match="act"):
        create_model("vit_test_patch4", act="relu")


@pytest.mark.parametrize(
    "option",
    [
        dict(pre_norm=True),
        dict(class_token=False, global_pool="avg"),
        dict(global_pool="map"),
        dict(act="quick_gelu"),
    ],
)
def test_vit_export_refuses_what_vitmodel_cannot_express(option):
    vit = create_model("vit_test_patch4", **option)
    with pytest.raises(ValueError, match=next(iter(option))):
        encoder_to_hf(vit)


def test_vit_export_without_patch_bias_writes_a_zero_bias():
    vit = create_model("vit_test_patch4", patch_bias=False)
    sd = encoder_to_hf(vit)
    assert torch.equal(sd["embeddings.patch_embeddings.projection.bias"], torch.zeros(32))
