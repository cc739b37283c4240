"""NAT / DiNAT (models/nat.py) against transformers' NatModel / DinatModel.

Both twins call natten's `natten2dqkrpb` / `natten2dav`, and natten has no wheel for this torch, so here they run
with those two kernels replaced by `natten_qkrpb` / `natten_av` below: natten's semantics written from its
window-start rule (ops.neighborhood.reference_window_start), independent of the gather tables Tessera uses.
Everything else (stem, norms, q/k/v split, scale, rpb, padding of small maps, layer scale, downsampling, final
norm, pooling, classifier) is transformers' own code. transformers 4.57's DinatModel attention unpacks the
(B, H, W, C) map as (B, L, C) and raises; `patched_hf` flattens the map before it (the kernels restore it).
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models import create_model
from models.nat import NAT, dinat_dilations, from_hf_state_dict, to_hf_state_dict
from ops.neighborhood import reference_window_start

mdinat = pytest.importorskip("transformers.models.dinat.modeling_dinat")
mnat = pytest.importorskip("transformers.models.deprecated.nat.modeling_nat")
from transformers import DinatConfig  # noqa: E402
from transformers.models.deprecated.nat.configuration_nat import NatConfig  # noqa: E402

_HW = {}  # the map size DinatModel's flattened attention input came from


def natten_index(H, W, k, d):
    """(H*W, k*k) flat key index and flat (2k-1)^2 bias index of every query, natten's rule, one query at a time."""
    keys, bias = [], []
    for y in range(H):
        sy = reference_window_start(y, H, k, d)
        for x in range(W):
            sx = reference_window_start(x, W, k, d)
            ys, xs = [sy + a * d for a in range(k)], [sx + b * d for b in range(k)]
            keys.append([ky * W + kx for ky in ys for kx in xs])
            bias.append(
                [((ky - y) // d + k - 1) * (2 * k - 1) + (kx - x) // d + k - 1 for ky in ys for kx in xs]
            )
    return torch.tensor(keys), torch.tensor(bias)


def as_map(t):  # DinatModel hands (B, heads, H*W, hd): back to (B, heads, H, W, hd)
    return t if t.ndim == 5 else t.unflatten(2, _HW["hw"])


def natten_qkrpb(q, k, rpb, kernel_size, dilation):  # (B, h, H, W, hd) -> (B, h, H, W, k*k) logits + bias
    q, k = as_map(q), as_map(k)
    B, h, H, W, hd = q.shape
    keys, bias = natten_index(H, W, kernel_size, dilation)
    logits = torch.einsum("bhnd,bhnmd->bhnm", q.flatten(2, 3), k.flatten(2, 3)[:, :, keys])
    return (logits + rpb.flatten(1)[:, bias]).unflatten(2, (H, W))


def natten_av(attn, v, kernel_size, dilation):  # (B, h, H, W, k*k), (B, h, H, W, hd) -> (B, h, H, W, hd)
    v = as_map(v)
    H, W = v.shape[2:4]
    keys, _ = natten_index(H, W, kernel_size, dilation)
    return torch.einsum("bhnm,bhnmd->bhnd", attn.flatten(2, 3), v.flatten(2, 3)[:, :, keys]).unflatten(
        2, (H, W)
    )


@pytest.fixture
def patched_hf(monkeypatch):
    for mod in (mdinat, mnat):
        monkeypatch.setattr(mod, "requires_backends", lambda *a, **k: None)
        monkeypatch.setattr(mod, "natten2dqkrpb", natten_qkrpb)
        monkeypatch.setattr(mod, "natten2dav", natten_av)
    attend = mdinat.NeighborhoodAttention.forward

    def flat(self, hidden_states, output_attentions=False):
        _HW["hw"] = tuple(hidden_states.shape[1:3])
        return attend(self, hidden_states.flatten(1, 2), output_attentions)

    monkeypatch.setattr(mdinat.NeighborhoodAttention, "forward", flat)


def hf_config(model: NAT, num_labels: int = 0):
    hp = model.hparams()
    kw = dict(
        embed_dim=hp["embed_dim"],
        depths=hp["depths"],
        num_heads=hp["num_heads"],
        kernel_size=hp["kernel_size"],
        mlp_ratio=hp["mlp_ratio"],
        qkv_bias=hp["qkv_bias"],
        drop_path_rate=0.0,
        layer_scale_init_value=hp["layer_scale"],
        layer_norm_eps=hp["norm_eps"],
        num_labels=max(num_labels, 1),
    )
    if hp["dilated"]:
        return DinatConfig(dilations=hp["dilations"], **kw)
    assert all(d == 1 for s in hp["dilations"] for d in s)
    return NatConfig(**kw)


def hf_models(model: NAT, num_labels: int):
    """(base model, classifier) of the twin family, with our weights."""
    dilated = model.hparams()["dilated"]
    base_cls, cls_cls = (
        (mdinat.DinatModel, mdinat.DinatForImageClassification)
        if dilated
        else (mnat.NatModel, mnat.NatForImageClassification)
    )
    cfg = hf_config(model, num_labels)
    sd = model.state_dict()
    base = base_cls(cfg).eval()
    base.load_state_dict(
        to_hf_state_dict({k: v for k, v in sd.items() if not k.startswith("head.")}), strict=True
    )
    if not num_labels:
        return base, None
    clf = cls_cls(cfg).eval()
    clf.load_state_dict(to_hf_state_dict(sd, prefix="dinat." if dilated else "nat."), strict=True)
    return base, clf


def trained_like(module: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter moved away from its init (LayerNorm weights off 1, biases and layer scales off 0, rpb)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return module.eval()


def hf_outputs(base, clf, x):
    emb = base.embeddings(x)
    enc = base.encoder(emb, output_hidden_states=True, output_hidden_states_before_downsampling=True)
    out = base(x)
    return dict(
        features=out.last_hidden_state.flatten(1, 2),  # (B, h, w, C) -> our tokens (B, h*w, C)
        stages=list(enc.reshaped_hidden_states[1:]),
        pooled=out.pooler_output,
        logits=clf(x).logits,
    )


def our_outputs(model, x):
    feats = model.forward_features(x)
    return dict(
        features=feats,
        stages=model.forward_intermediates(x),
        pooled=model.forward_head(feats, pre_logits=True),
        logits=model(x),
    )


def assert_same(ours, theirs, atol):
    assert len(ours["stages"]) == len(theirs["stages"]) == 4
    pairs = [("features", ours["features"], theirs["features"])]
    pairs += [(f"stage {i}", a, b) for i, (a, b) in enumerate(zip(ours["stages"], theirs["stages"]))]
    pairs += [(k, ours[k], theirs[k]) for k in ("pooled", "logits")]
    for what, a, b in pairs:
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a, b, atol=atol * scale, rtol=0, msg=lambda m, w=what: f"{w}: {m}")


# (name, overrides, input size): 64 px: maps 16, 8, 4, 2 (the last padded to k = 3); odd sizes (stem grid 16 x 17);
# 48 px: DiNAT's stage-0 map 12 is smaller than k * d = 15 and is padded; NAT with layer scale
PARITY = [
    ("nat_test", {}, (64, 64)),
    ("nat_test", {"layer_scale": 1e-5}, (61, 67)),
    ("dinat_test", {}, (64, 64)),
    ("dinat_test", {"layer_scale": 1e-5}, (61, 67)),
    ("dinat_test", {}, (48, 48)),
]


@pytest.mark.parametrize("name, overrides, size", PARITY)
def test_parity_with_transformers(patched_hf, name, overrides, size):
    """Features, every stage, pooled and logits: fp32 within 1e-5 (of the scale), float64 within 1e-10."""
    torch.manual_seed(0)
    model = trained_like(create_model(name, num_classes=7, **overrides))
    base, clf = hf_models(model, 7)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        ours, theirs = our_outputs(model, x), hf_outputs(base, clf, x)
        assert ours["features"].shape[1] == -(-size[0] // 32) * -(-size[1] // 32)  # tokens of the last map
        assert_same(ours, theirs, atol=1e-5)
        model, base, clf, x = model.double(), base.double(), clf.double(), x.double()
        assert_same(our_outputs(model, x), hf_outputs(base, clf, x), atol=1e-10)


def test_parity_fails_on_a_wrong_dilation(patched_hf):
    """The check can fail: the twin with NAT's dilations (1 everywhere) differs from our DiNAT."""
    model = trained_like(create_model("dinat_test"))
    base, _ = hf_models(model, 0)
    for layer in base.encoder.levels[0].layers:
        layer.attention.self.dilation = 1
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert not torch.allclose(
            model.forward_features(x), base(x).last_hidden_state.flatten(1, 2), atol=1e-3
        )


@pytest.mark.parametrize("name", ["nat_test", "dinat_test"])
def test_key_map_is_complete_both_ways(name, patched_hf):
    model = trained_like(create_model(name, num_classes=3, mask_token=True, layer_scale=1e-5))
    sd = model.state_dict()
    base, clf = hf_models(model, 3)
    prefix = "dinat." if name.startswith("dinat") else "nat."
    theirs = to_hf_state_dict(sd, prefix=prefix)
    assert set(theirs) == set(
        clf.state_dict()
    )  # no missing, no unexpected keys (the mask token is ours only)
    back = from_hf_state_dict(clf.state_dict())
    assert set(back) == set(sd) - {"mask_token"}
    for k in back:
        assert torch.equal(back[k], sd[k]), k
    with pytest.raises(KeyError, match="no counterpart"):
        to_hf_state_dict({"stem.extra.weight": torch.zeros(1)})


PAPER = {"mini": 20.0e6, "tiny": 28.0e6, "small": 51.0e6, "base": 90.0e6}  # NAT / DiNAT papers' Table 1


@pytest.mark.parametrize("family", ["nat", "dinat"])
@pytest.mark.parametrize("size", list(PAPER))
def test_paper_sizes_equal_transformers(patched_hf, family, size):
    """Every weight of {family}_{size} has the shape of the twin's classifier (1000 classes) and the counts are
    the papers' within 3%."""
    with torch.device("meta"):
        ours = create_model(f"{family}_{size}", num_classes=1000)
        cls = mdinat.DinatForImageClassification if family == "dinat" else mnat.NatForImageClassification
        theirs = cls(hf_config(ours, 1000))
    shapes = {k: v.shape for k, v in to_hf_state_dict(ours.state_dict(), prefix=f"{family}.").items()}
    assert shapes == {k: v.shape for k, v in theirs.state_dict().items()}
    n = sum(p.numel() for p in ours.parameters())
    assert n == sum(p.numel() for p in theirs.parameters())
    assert abs(n - PAPER[size]) / PAPER[size] < 0.03, n


def test_dinat_dilation_schedule():
    """At 224 px the schedule is DinatConfig's default (dinat-mini-in1k-224): 1 and the map size // 7, alternating."""
    with torch.device("meta"):
        mini, tiny = create_model("dinat_mini"), create_model("dinat_tiny")
    assert mini.dilations == DinatConfig().dilations
    assert tiny.dilations[2] == [1, 2] * 9 and tiny.dilations[3] == [1] * 5
    assert dinat_dilations(384, (2, 2, 2, 2), 7) == [[1, 13], [1, 6], [1, 3], [1, 1]]  # maps 96, 48, 24, 12
    blocks = [b.attn.dilation for s in create_model("dinat_test").stages for b in s.blocks]
    assert blocks == [1, 5, 1, 2, 1, 1, 1]  # 64 px, k = 3: maps 16, 8, 4, 2
    assert all(b.attn.dilation == 1 for s in create_model("nat_test").stages for b in s.blocks)
    m = create_model("nat_test", dilations=[[2, 1], [1, 1], [1, 1], [1]])
    assert m.stages[0].blocks[0].attn.dilation == 2 and type(m)(**m.hparams()).dilations == m.dilations
    with pytest.raises(ValueError, match="one positive value per block"):
        create_model("nat_test", dilations=[[1], [1, 1], [1, 1], [1]])


def test_stem_and_mask_at_odd_sizes():
    """Two 3x3 stride-2 convs (no activation) and a LayerNorm; the mask lives on the stem grid ceil(H/4)."""
    torch.manual_seed(0)
    model = trained_like(create_model("nat_test", mask_token=True))
    x = torch.randn(2, 3, 29, 35)
    s = model.stem
    ref = F.conv2d(F.conv2d(x, s.conv1.weight, s.conv1.bias, 2, 1), s.conv2.weight, s.conv2.bias, 2, 1)
    ref = F.layer_norm(ref.permute(0, 2, 3, 1), (16,), s.norm.weight, s.norm.bias, 1e-5)
    assert ref.shape == (2, 8, 9, 16)
    mask = torch.zeros(2, 8, 9, dtype=torch.bool)
    mask[0, :, 4:] = True
    out = model.embed(x, mask)
    torch.testing.assert_close(out[0, :, 4:], model.mask_token[0, 0].expand(8, 5, 16))
    torch.testing.assert_close(out[0, :, :4], ref[0, :, :4])
    torch.testing.assert_close(out[1], ref[1])
    with pytest.raises(ValueError, match="stem grid"):
        model.embed(x, torch.zeros(2, 7, 9, dtype=torch.bool))
    assert model.forward_features(x, mask).shape == (2, 1 * 2, 128)


def test_layer_scale_and_no_weight_decay():
    m = create_model("nat_test", layer_scale=1e-5, mask_token=True)
    blk = m.stages[1].blocks[0]
    assert torch.equal(blk.gamma1, torch.full((32,), 1e-5)) and blk.gamma2.shape == (32,)
    assert create_model("nat_test").stages[0].blocks[0].gamma1 is None
    rpbs = {n for n, _ in m.named_parameters() if n.endswith("attn.rpb")}
    assert len(rpbs) == sum(m.depths) and m.no_weight_decay() == rpbs | {"mask_token"}
