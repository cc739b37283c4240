"""Swin Transformer V2: the paper's mechanisms against direct formulas, and parity with transformers' Swinv2."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import models.swin_v2_hf  # noqa: F401  (registers the Swin V2 sizes and their HF adapter)
from models import create_model
from models.hf import adapter_for_model
from models.swin_v2 import PatchMergingV2, SwinTransformerV2, SwinV2Block
from ops.compat import import_transformers
from ops.window import shift_window_mask
from pretrain.export import from_hf, to_hf
from tests.conftest import trained_like

tf = import_transformers()


pytestmark = pytest.mark.usefixtures("hf_offline")


def model(**kw) -> SwinTransformerV2:
    """swinv2_test with full-strength residual branches (norms at 1, not the paper's 0), perturbed."""
    torch.manual_seed(0)
    return trained_like(create_model("swinv2_test", post_norm_zero_init=False, **kw))


# --- paper mechanisms ---------------------------------------------------------------------------------
def _ref_block(blk: SwinV2Block, x: torch.Tensor) -> torch.Tensor:
    """The V2 block written out: roll, per-window cosine attention with q/v (not k) biases and the CPB, post-norms."""
    B, H, W, C = x.shape
    a, w, s = blk.attn, blk.window, blk.shift
    heads, hd = a.num_heads, C // a.num_heads
    Wq, Wk, Wv = a.qkv.weight.chunk(3)
    rolled = torch.roll(x, (-s, -s), (1, 2))
    region = torch.zeros(
        H, W, dtype=torch.long
    )  # which of the 3 x 3 regions of the rolled map a token came from
    if s:
        for i, rows in enumerate((slice(0, -w), slice(-w, -s), slice(-s, None))):
            for j, cols in enumerate((slice(0, -w), slice(-w, -s), slice(-s, None))):
                region[rows, cols] = 3 * i + j
    temperature = a.logit_scale.exp().clamp(max=100).view(heads, 1, 1)
    bias = a.cpb()  # (heads, N, N), checked against its formula in tests/test_ops_cosine_attention.py
    out = torch.empty_like(x)
    for r in range(0, H, w):
        for c in range(0, W, w):
            t = rolled[:, r : r + w, c : c + w].reshape(B, w * w, C)
            q = (t @ Wq.T + a.q_bias).view(B, -1, heads, hd).transpose(1, 2)
            k = (t @ Wk.T).view(B, -1, heads, hd).transpose(1, 2)  # keys have no bias
            v = (t @ Wv.T + a.v_bias).view(B, -1, heads, hd).transpose(1, 2)
            logits = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1) * temperature + bias
            reg = region[r : r + w, c : c + w].reshape(-1)
            logits = logits - 100.0 * (reg[:, None] != reg[None, :])  # tokens from different regions
            y = (logits.softmax(-1) @ v).transpose(1, 2).reshape(B, w, w, C)
            out[:, r : r + w, c : c + w] = a.proj(y)
    attn = torch.roll(out, (s, s), (1, 2))
    x = x + blk.norm1(attn)  # res-post-norm: the branch is normalised, the trunk is not
    return x + blk.norm2(blk.mlp(x))


@pytest.mark.parametrize("shift", [0, 2])
def test_block_is_res_post_norm_cosine_attention(shift):
    torch.manual_seed(0)
    blk = trained_like(SwinV2Block(16, 2, window=4, shift=shift))
    assert blk.attn.q_bias is not None and blk.attn.v_bias is not None and blk.attn.qkv.bias is None
    x = torch.randn(2, 8, 8, 16)
    mask = shift_window_mask(8, 8, (4, 4), (shift, shift)) if shift else None
    with torch.no_grad():
        torch.testing.assert_close(blk(x, mask), _ref_block(blk, x), atol=1e-5, rtol=0)


def test_shifted_windows_see_only_former_neighbours():
    """Perturb one token and see which outputs of one block move: its window, or in a shifted block only the part
    of the rolled window that was contiguous with it before the roll (8 x 8 map, window 4, shift 2)."""
    torch.manual_seed(0)
    x = torch.randn(1, 8, 8, 16)

    def moved(blk, mask, token):
        y = x.clone()
        y[0, token[0], token[1]] += 1.0
        with torch.no_grad():
            return ((blk(y, mask) - blk(x, mask)).abs().amax(-1)[0] > 1e-6).nonzero().tolist()

    def box(rows, cols):
        return [[r, c] for r in rows for c in cols]

    plain = trained_like(SwinV2Block(16, 2, window=4, shift=0))
    assert moved(plain, None, (0, 0)) == box(range(4), range(4))
    shifted = trained_like(SwinV2Block(16, 2, window=4, shift=2))
    mask = shift_window_mask(8, 8, (4, 4), (2, 2))
    assert moved(shifted, mask, (3, 3)) == box(range(2, 6), range(2, 6))  # an interior shifted window
    # the wrapped corner shares its rolled window with rows/cols 6..7 but, masked, does not mix with them
    assert moved(shifted, mask, (0, 0)) == box(range(2), range(2))
    assert moved(shifted, None, (0, 0)) == box([0, 1, 6, 7], [0, 1, 6, 7])  # what the mask prevents


def test_window_and_shift_follow_transformers_on_small_maps():
    """A stage whose native map is no larger than the window is one unshifted window (Swinv2Layer's rule)."""
    for img, window, depths in [
        (64, 4, (2, 2, 2, 2)),
        (32, 4, (2, 2, 2, 2)),
        (36, 4, (2, 2, 2, 2)),
        (256, 8, (2,) * 4),
    ]:
        ours = SwinTransformerV2(
            img_size=img, embed_dim=8, depths=depths, num_heads=(1, 1, 1, 1), window_size=window
        )
        hf = tf.Swinv2Model(adapter_for_model(ours).hf_config(ours))
        got = [(b.window, b.shift) for layer in ours.layers for b in layer.blocks]
        want = [(b.window_size, b.shift_size) for layer in hf.encoder.layers for b in layer.blocks]
        assert got == want, (img, window)
    got = [(b.window, b.shift) for layer in create_model("swinv2_test").layers for b in layer.blocks]
    assert got == [(4, 0), (4, 2), (4, 0), (4, 2), (4, 0), (4, 0), (2, 0), (2, 0)]  # 64 px: 16, 8, 4, 2 maps


def test_patch_merging_v2_concatenates_then_reduces_then_norms():
    torch.manual_seed(0)
    merge = trained_like(PatchMergingV2(6))
    x = torch.randn(2, 5, 7, 6)  # odd sides: a zero row and column are added
    padded = F.pad(x, (0, 0, 0, 1, 0, 1))
    ref = torch.empty(2, 3, 4, 12)
    for i in range(3):
        for j in range(4):
            r, c = 2 * i, 2 * j
            cat = torch.cat(
                [padded[:, r, c], padded[:, r + 1, c], padded[:, r, c + 1], padded[:, r + 1, c + 1]], -1
            )
            red = cat @ merge.reduction.weight.T  # (2, 12), no bias
            ref[:, i, j] = F.layer_norm(red, (12,), merge.norm.weight, merge.norm.bias, 1e-5)
    with torch.no_grad():
        torch.testing.assert_close(merge(x), ref, atol=1e-5, rtol=0)


def test_paper_init_starts_every_block_as_identity():
    torch.manual_seed(0)
    paper = create_model("swinv2_test")  # post_norm_zero_init=True, as the paper's code and timm
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        stem = paper.embed(x).permute(0, 3, 1, 2)
        torch.testing.assert_close(paper.forward_intermediates(x, indices=[0])[0], stem, atol=0, rtol=0)
        plain = create_model("swinv2_test", post_norm_zero_init=False)
        assert not torch.allclose(
            plain.forward_intermediates(x, indices=[0])[0], plain.embed(x).permute(0, 3, 1, 2)
        )
    blk = paper.layers[2].blocks[0]
    assert torch.equal(blk.attn.logit_scale, torch.full((4, 1, 1), math.log(10.0)))
    assert blk.attn.q_bias.abs().max() == 0 and blk.attn.v_bias.abs().max() == 0
    assert blk.attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.1)
    nwd = paper.no_weight_decay()
    assert len(nwd) == 4 * sum(paper.depths)  # per block: logit_scale + the CPB MLP's 3 tensors
    assert all("logit_scale" in n or ".cpb.mlp." in n for n in nwd)


def test_stochastic_depth_is_linear_over_all_blocks():
    m = create_model("swinv2_test", drop_path_rate=0.3)
    rates = [b.drop_path for layer in m.layers for b in layer.blocks]
    torch.testing.assert_close(torch.tensor(rates), torch.linspace(0, 0.3, sum(m.depths)))


# --- contract specifics -----------------------------------------------------------------------------
def test_odd_sizes_are_padded_and_intermediates_feed_the_features():
    m = model(num_classes=3)
    x = torch.randn(2, 3, 37, 45)  # not even a multiple of the patch: the image is padded to 40 x 48
    with torch.no_grad():
        maps = m.forward_intermediates(x)
        assert [tuple(t.shape[1:]) for t in maps] == [(32, 10, 12), (64, 5, 6), (128, 3, 3), (256, 2, 2)]
        feats = m.forward_features(x)
        torch.testing.assert_close(feats, m.norm(maps[-1].flatten(2).transpose(1, 2)))
        picked = m.forward_intermediates(x, indices=[-1, 1])
        assert torch.equal(picked[0], maps[3]) and torch.equal(picked[1], maps[1])
        torch.testing.assert_close(m(x), m.head(feats.mean(1)))


@pytest.mark.parametrize("learned", [False, True])
def test_mask_replaces_stem_tokens(learned):
    m = model(mask_token=learned)
    x = torch.randn(2, 3, 36, 44)
    grid = (2, 9, 11)
    with torch.no_grad():
        ref = m.forward_features(x)
        torch.testing.assert_close(m.forward_features(x, mask=torch.zeros(grid, dtype=torch.bool)), ref)
        full = torch.ones(grid, dtype=torch.bool)
        a = m.forward_features(x, mask=full)
        torch.testing.assert_close(a, m.forward_features(3 * torch.randn_like(x), mask=full))
        assert not torch.allclose(a, ref)
        half = torch.rand(grid) < 0.5
        stem = m.embed(x, mask=half)
        token = m.mask_token.view(-1) if learned else torch.zeros(32)
        assert torch.equal(stem[half], token.expand(int(half.sum()), -1))
        torch.testing.assert_close(stem[~half], m.embed(x)[~half])
    with pytest.raises(ValueError, match="stem grid"):
        m.forward_features(x, mask=torch.zeros(2, 9, 12, dtype=torch.bool))
    assert ("mask_token" in m.no_weight_decay()) == learned


def test_mask_token_matches_hf_bool_masked_pos(tmp_path):
    m = trained_like(model(mask_token=True))
    to_hf(m, tmp_path)  # the exported folder keeps the token
    hf = tf.Swinv2Model.from_pretrained(tmp_path, use_mask_token=True).eval()
    torch.testing.assert_close(hf.embeddings.mask_token.view(-1), m.mask_token.view(-1))
    x = torch.randn(2, 3, 36, 44)
    mask = torch.rand(2, 9, 11) < 0.4
    with torch.no_grad():
        theirs = adapter_for_model(m).hf_outputs(hf, x, bool_masked_pos=mask.flatten(1))
        ours = m.forward_features(x, mask=mask)
        torch.testing.assert_close(theirs["features"], ours, atol=1e-5, rtol=0)
        assert not torch.allclose(ours, m.forward_features(x), atol=1e-3)


# --- Hugging Face twin ------------------------------------------------------------------------------
def _assert_parity(hf_model, m, x, atol=1e-5):
    with torch.no_grad():
        theirs = adapter_for_model(m).hf_outputs(hf_model, x)
        ours = m.forward_features(x)
        torch.testing.assert_close(theirs["features"], ours, atol=atol, rtol=0)
        stages = m.forward_intermediates(x)
        assert len(theirs["stages"]) == len(stages) == 4
        for i, (t, o) in enumerate(zip(theirs["stages"], stages)):
            torch.testing.assert_close(t, o, atol=atol, rtol=0, msg=lambda s, i=i: f"stage {i}: {s}")
        torch.testing.assert_close(theirs["pooled"], m.forward_head(ours, pre_logits=True), atol=atol, rtol=0)
        if isinstance(m.head, nn.Linear):
            torch.testing.assert_close(theirs["logits"], m(x), atol=atol, rtol=0)
        else:
            assert "logits" not in theirs


@pytest.mark.parametrize(
    "kw",
    [
        dict(num_classes=7),
        dict(
            num_classes=0, pretrained_window_sizes=(6, 3, 8, 0)
        ),  # CPB normalised by the pre-training windows
        dict(num_classes=5, qkv_bias=False, mlp_ratio=3.0, patch_size=2, img_size=32, window_size=3),
    ],
)
def test_export_parity(tmp_path, kw):
    m = model(**kw)
    to_hf(m, tmp_path)
    arch = "Swinv2ForImageClassification" if kw["num_classes"] else "Swinv2Model"
    hf = getattr(tf, arch).from_pretrained(tmp_path).eval()
    keys = hf.state_dict().keys()
    assert any(k.endswith("attention.self.query.weight") for k in keys)
    assert not any(k.endswith("attention.self.key.bias") for k in keys)  # V2: keys have no bias
    assert any(k.endswith("attention.self.value.bias") for k in keys) == m.qkv_bias
    for shape in [
        (2, 64, 64),
        (1, 36, 44),
        (1, 37, 45),
    ]:  # native, odd (padded windows), not a patch multiple
        _assert_parity(hf, m, torch.randn(shape[0], 3, *shape[1:]))
    back = from_hf(tmp_path)
    assert back.hparams() == {**m.hparams(), "post_norm_zero_init": True}  # init flags are not in the config
    for (ka, a), (kb, b) in zip(back.state_dict().items(), m.state_dict().items()):
        assert ka == kb and torch.equal(a, b), ka


def test_parity_is_exact_in_float64():
    """In float64 the rounding of float32 is gone: what is left must be the same math (padding, shifts, masks)."""
    m = model(num_classes=3, pretrained_window_sizes=(6, 3, 8, 0)).double()
    hf = adapter_for_model(m).to_hf(m).double()
    _assert_parity(hf, m, torch.randn(2, 3, 37, 45, dtype=torch.float64), atol=1e-10)


@pytest.mark.parametrize("arch", ["Swinv2Model", "Swinv2ForImageClassification"])
def test_hf_initialised_model_imports(tmp_path, arch):
    """Import the other way: a folder transformers wrote from its own init (perturbed), at an odd size."""
    cfg = tf.Swinv2Config(
        image_size=48,  # maps 12, 6, 3, 1: windows 4, 4, 3, 1, the first two stages shifted
        embed_dim=16,
        depths=[2, 2, 1, 1],
        num_heads=[1, 2, 2, 4],
        window_size=4,
        pretrained_window_sizes=[0, 4, 0, 0],
        num_labels=5,
    )
    torch.manual_seed(0)
    hf = trained_like(getattr(tf, arch)(cfg))
    hf.save_pretrained(tmp_path)
    ours = from_hf(tmp_path)
    assert isinstance(ours, SwinTransformerV2) and ours.depths == [2, 2, 1, 1]
    assert isinstance(ours.head, nn.Linear) == (arch != "Swinv2Model")
    _assert_parity(hf, ours, torch.randn(2, 3, 44, 52))


@pytest.mark.parametrize(
    "field, value",
    [
        ("hidden_act", "relu"),
        ("use_absolute_embeddings", True),
        ("layer_norm_eps", 1e-6),
        ("pretrained_window_sizes", [[4, 6], 0, 0, 0]),
        ("pretrained_window_sizes", [1, 0, 0, 0]),
        ("window_size", [4, 8]),
    ],
)
def test_import_rejects_what_it_cannot_represent(field, value):
    cfg = tf.Swinv2Config(
        image_size=32, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=4
    )
    setattr(cfg, field, value)
    with pytest.raises(ValueError, match=field):
        adapter_for_model(create_model("swinv2_test")).from_hf({}, cfg)


@pytest.mark.parametrize(
    "name, paper",
    [
        ("swinv2_tiny_window8_256", 28.3e6),
        ("swinv2_small_window8_256", 49.7e6),
        ("swinv2_base_window8_256", 87.9e6),
    ],
)
def test_param_count_matches_hf_and_the_paper(name, paper):
    with torch.device("meta"):
        ours = create_model(name, num_classes=1000)
        hf = tf.Swinv2ForImageClassification(adapter_for_model(ours).hf_config(ours))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(ours) == count(hf)
    assert abs(count(ours) - paper) / paper < 0.005  # the paper's Table / the official model zoo
