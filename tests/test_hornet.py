"""HorNet: g^n Conv and the block against plain-torch definitions written from the paper's equations (no timm or
transformers twin exists), the paper's sizes, and the family-specific parts of the backbone contract."""

import re

import pytest
import torch
import torch.nn.functional as F

import models.hornet  # noqa: F401  (registers the HorNet sizes)
from models import create_model, list_models
from models.hornet import GnConv, HorNet, HorNetBlock
from models.registry import MODELS
from tests.conftest import trained_like

NAMES = list_models("hornet*")
ALPHA = 1.0 / 3.0  # the official code's scale on the depthwise conv's output


# --- plain-torch references ---------------------------------------------------------------------------------
def pointwise(w: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A 1x1 conv as a per-pixel matrix product: w (O, I, 1, 1) or (O, I), x (B, I, H, W) -> (B, O, H, W)."""
    return torch.einsum("oi,bihw->bohw", w.reshape(w.shape[0], -1), x) + b[:, None, None]


def depthwise(w: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A same-size depthwise k x k conv as a sum of k*k shifted copies: w (C, 1, k, k), x (B, C, H, W)."""
    k, (H, W) = w.shape[-1], x.shape[-2:]
    xp = F.pad(x, (k // 2,) * 4)  # zero padding (k-1)/2 on every side
    out = b[None, :, None, None].expand_as(x).clone()
    for u in range(k):
        for v in range(k):
            out = out + w[None, :, 0, u, v, None, None] * xp[:, :, u : u + H, v : v + W]
    return out


def layer_norm_channels(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6):
    """LayerNorm over the channels of (B, C, H, W), biased variance."""
    mu, var = x.mean(1, keepdim=True), x.var(1, unbiased=False, keepdim=True)
    return (x - mu) / (var + eps).sqrt() * weight[:, None, None] + bias[:, None, None]


def reference_gnconv(m: GnConv, x: torch.Tensor, order: int, alpha: float = ALPHA) -> torch.Tensor:
    """Paper eq. (3)-(4), literally: with C_k = C / 2**(n-1-k),
    [p_0 (C_0), q_0 (C_0), ..., q_{n-1} (C_{n-1})] = phi_in(x);  q_k <- alpha * f(q_k) (depthwise 7x7, one filter
    per channel);  p_{k+1} = g_k(p_k) * q_k with g_0 = identity, g_k a linear map C_{k-1} -> C_k;  y = phi_out(p_n).
    Every slice is cut at an offset computed here, every q_k filtered on its own."""
    C = x.shape[1]
    widths = [C // 2 ** (order - 1 - k) for k in range(order)]
    assert widths[-1] == C and sum(widths) + widths[0] == 2 * C
    fused = pointwise(m.proj_in.weight, m.proj_in.bias, x)  # (B, 2C, H, W)
    p = fused[:, 0 : widths[0]]  # p_0
    qs, start = [], widths[0]
    for k in range(order):
        stop = start + widths[k]
        # q_k and its filters: channels start..stop of phi_in's output, filters start - C_0 .. stop - C_0
        f = slice(start - widths[0], stop - widths[0])
        qs.append(alpha * depthwise(m.dwconv.weight[f], m.dwconv.bias[f], fused[:, start:stop]))
        start = stop
    assert start == 2 * C
    for k in range(order):
        g = p if k == 0 else pointwise(m.pws[k - 1].weight, m.pws[k - 1].bias, p)  # g_k(p_k): (B, C_k, H, W)
        p = g * qs[k]  # p_{k+1}
    assert p.shape[1] == C
    return pointwise(m.proj_out.weight, m.proj_out.bias, p)


def reference_block(blk: HorNetBlock, x: torch.Tensor, order: int) -> torch.Tensor:
    """x + gamma1 * gnconv(LN(x)), then x + gamma2 * W2 gelu(W1 LN(x)), all channels-first."""
    y = reference_gnconv(blk.gnconv, layer_norm_channels(x, blk.norm1.weight, blk.norm1.bias), order)
    x = x + blk.gamma1[:, None, None] * y
    h = layer_norm_channels(x, blk.norm2.weight, blk.norm2.bias)
    h = F.gelu(pointwise(blk.pwconv1.weight, blk.pwconv1.bias, h))  # (B, 4C, H, W), exact GELU
    h = pointwise(blk.pwconv2.weight, blk.pwconv2.bias, h)  # (B, C, H, W)
    return x + blk.gamma2[:, None, None] * h


# --- paper mechanisms ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("order", [1, 2, 3, 4, 5])
def test_gnconv_matches_the_paper(order):
    torch.manual_seed(0)
    C = 32
    m = GnConv(C, order)
    # the paper's shapes: phi_in C -> 2C, one 7x7 filter per q channel, g_k: C_{k-1} -> C_k, phi_out C -> C
    widths = [C // 2 ** (order - 1 - k) for k in range(order)]
    assert m.proj_in.weight.shape == (2 * C, C, 1, 1) and m.proj_out.weight.shape == (C, C, 1, 1)
    assert m.dwconv.weight.shape == (sum(widths), 1, 7, 7) and m.dwconv.groups == sum(widths)
    assert [tuple(g.weight.shape[:2]) for g in m.pws] == [(widths[k], widths[k - 1]) for k in range(1, order)]
    assert m.scale == ALPHA
    trained_like(m)
    x = torch.randn(2, C, 9, 11, requires_grad=True)  # odd, non-square: the padding keeps the size
    out, ref = m(x), reference_gnconv(m, x, order)
    assert out.shape == x.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    w = torch.randn_like(out)
    g_out = torch.autograd.grad((out * w).sum(), [x, *m.parameters()])
    g_ref = torch.autograd.grad((ref * w).sum(), [x, *m.parameters()])
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the reference can fail: a wrong alpha is far off
        wrong = reference_gnconv(m, x, order, alpha=1.0)
        assert (wrong - ref).abs().max() > 1e-3


def test_gnconv_is_of_order_n_in_its_input():
    """p_n is a product of n + 1 factors each linear in x (p_0 and q_0..q_{n-1}), so without biases
    gnconv(t x) = t**(n+1) gnconv(x): the n-th order spatial interaction of the paper's title."""
    torch.manual_seed(0)
    for order in (1, 2, 3, 4, 5):
        m = GnConv(16, order).double()
        with torch.no_grad():
            for mod in m.modules():
                if isinstance(mod, torch.nn.Conv2d):
                    mod.weight.normal_(0, 0.3)
                    mod.bias.zero_()
            x = torch.randn(1, 16, 6, 5, dtype=torch.float64)
            torch.testing.assert_close(m(2 * x), 2 ** (order + 1) * m(x))


@pytest.mark.parametrize("order", [2, 5])
def test_block_matches_the_paper(order):
    torch.manual_seed(0)
    blk = HorNetBlock(32, order)
    for gamma in (blk.gamma1, blk.gamma2):
        assert torch.equal(gamma, torch.full((32,), 1e-6))
    assert blk.pwconv1.out_features == 128  # inverted bottleneck, 4x
    x = torch.randn(2, 32, 7, 10)
    with torch.no_grad():
        branch = reference_block(blk, x, order) - x  # at init layer scale shrinks both branches to ~1e-6
        assert 0 < branch.abs().max() < 1e-4
        trained_like(blk)
        torch.testing.assert_close(blk(x), reference_block(blk, x, order), atol=1e-5, rtol=1e-5)


def test_stage_orders_and_widths():
    """Orders 2, 3, 4, 5 for the four stages; widths C, 2C, 4C, 8C; the official code's 7x7 depths (2, 3, 18, 2)."""
    for name, c in [("hornet_tiny_7x7", 64), ("hornet_small_7x7", 96), ("hornet_base_7x7", 128)]:
        with torch.device("meta"):
            model = create_model(name)
        assert model.depths == (2, 3, 18, 2) and model.dims == (c, 2 * c, 4 * c, 8 * c)
        for i, stage in enumerate(model.stages):
            for blk in stage.blocks:
                g = blk.gnconv
                assert g.order == i + 2 and g.scale == ALPHA
                assert g.dims == [model.dims[i] // 2 ** (i + 1 - k) for k in range(i + 2)]
                assert g.dwconv.kernel_size == (7, 7) and g.dwconv.groups == sum(g.dims)


def test_rejects_widths_the_order_cannot_halve():
    with pytest.raises(ValueError, match="divisible by 16"):
        GnConv(24, 5)
    with pytest.raises(ValueError, match="divisible by 8"):
        create_model("hornet_test", dims=(16, 32, 60, 128))
    with pytest.raises(ValueError, match="one non-empty length"):
        create_model("hornet_test", orders=(2, 3, 4))


def test_stem_downsampling_and_stage_outputs():
    torch.manual_seed(0)
    model = trained_like(create_model("hornet_test", depths=(1, 2, 1, 1)))
    stem = model.stem[0]
    assert (stem.kernel_size, stem.stride) == ((4, 4), (4, 4)) and model.stem_stride == 4
    assert not list(model.stages[0].downsample.parameters())
    for st in model.stages[1:]:
        assert (st.downsample[1].kernel_size, st.downsample[1].stride) == ((2, 2), (2, 2))
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        maps = model.forward_intermediates(x)
        for m, info in zip(maps, model.feature_info):
            assert m.shape == (2, info["num_chs"], 64 // info["reduction"], 96 // info["reduction"])
        for i in range(3):  # each stage output is the next stage's input
            torch.testing.assert_close(model.run_stage(i + 1, maps[i]), maps[i + 1])
        torch.testing.assert_close(maps[-1], model.forward_features(x))  # un-normed
        pooled = F.layer_norm(maps[-1].mean((2, 3)), (128,), model.norm.weight, model.norm.bias, 1e-6)
        torch.testing.assert_close(model.forward_head(maps[-1], pre_logits=True), pooled)


def test_stochastic_depth():
    model = create_model("hornet_test", depths=(1, 2, 1, 1), drop_path_rate=0.3)
    rates = [b.drop_path for s in model.stages for b in s.blocks]
    torch.testing.assert_close(torch.tensor(rates), torch.linspace(0, 0.3, 5))  # linear over all blocks
    torch.manual_seed(0)
    blk = trained_like(HorNetBlock(8, 2, drop_path=0.5))
    x = torch.randn(256, 8, 5, 5)
    with torch.no_grad():
        out = blk.train()(x)
    # each branch is dropped per sample with p = 0.5, independently: both dropped (out == x) for ~1/4 of the
    # samples (a mask shared by the two branches would drop ~1/2)
    dropped_all = (out == x).flatten(1).all(1).sum().item()
    assert 32 < dropped_all < 100, dropped_all


# --- masked stem --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("token", [False, True])
def test_mask(token):
    torch.manual_seed(0)
    model = trained_like(create_model("hornet_test", mask_token=token))
    x = torch.randn(2, 3, 64, 48)
    none, every = torch.zeros(2, 16, 12, dtype=torch.bool), torch.ones(2, 16, 12, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x, mask=none), model.forward_features(x))
        a, b = model.forward_features(x, mask=every), model.forward_features(torch.randn_like(x), mask=every)
        torch.testing.assert_close(a, b)
        with pytest.raises(ValueError, match="stem grid"):
            model.forward_features(x, mask=none[:, :8])
    assert ("mask_token" in model.no_weight_decay()) == token
    if token:
        mask = torch.rand(2, 16, 12) < 0.5
        model.forward_features(x, mask=mask).sum().backward()
        assert model.mask_token.grad.abs().sum() > 0


# --- contract -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_every_size_rebuilds_from_hparams(name):
    assert MODELS.get(name).builds is HorNet
    with torch.device("meta"):  # full size, no memory
        model = create_model(name)
        rebuilt = HorNet(**model.hparams())
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == shapes
    gm = model.group_matcher()
    for n, _ in model.named_parameters():  # each parameter in exactly one layer-wise-decay group
        block = any(re.match(r, n) for r, _ in gm["blocks"])
        assert [bool(re.match(gm["stem"], n)), block, bool(re.match(gm["head"], n))].count(True) == 1, n


def test_grad_checkpointing_and_reset_classifier():
    torch.manual_seed(0)
    model = trained_like(create_model("hornet_test", num_classes=4)).train()
    x = torch.randn(2, 3, 64, 64)
    ref = model(x)
    ref.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    out = model(x)
    out.sum().backward()
    torch.testing.assert_close(out, ref)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], msg=n)
    model.reset_classifier(0)
    assert model(x).shape == (2, 128) and model.hparams()["num_classes"] == 0


# --- the paper's sizes --------------------------------------------------------------------------------------
def official_param_count(depths, c, orders=(2, 3, 4, 5), num_classes=1000) -> int:
    """Parameters of the official hornet_*_7x7 at base width c, counted layer by layer from its definition:
    stem conv 4x4 + LN, per stage (after the first) LN + 2x2 conv, per block LN, gnconv (proj_in C->2C,
    dw 7x7 over sum C_k, pws C_{k-1}->C_k, proj_out C->C), LN, MLP C->4C->C, two layer scales; final LN, head."""
    dims = [c * 2**i for i in range(4)]
    n = 3 * 16 * dims[0] + dims[0] + 2 * dims[0]  # stem
    for i, (d, C, order) in enumerate(zip(depths, dims, orders)):
        if i:
            n += 2 * dims[i - 1] + dims[i - 1] * 4 * C + C  # downsample
        w = [C // 2 ** (order - 1 - k) for k in range(order)]
        gn = (C * 2 * C + 2 * C) + sum(w) * 49 + sum(w) + sum(w[k - 1] * w[k] + w[k] for k in range(1, order))
        gn += C * C + C
        mlp = C * 4 * C + 4 * C + 4 * C * C + C
        n += d * (2 * C + gn + 2 * C + mlp + 2 * C)
    return n + 2 * dims[-1] + dims[-1] * num_classes + num_classes


# millions of parameters at 1000 classes, as printed in the paper's Table 1 (HorNet-T/S/B 7x7)
PAPER = {"hornet_tiny_7x7": (64, 22), "hornet_small_7x7": (96, 50), "hornet_base_7x7": (128, 87)}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_sizes(name):
    c, millions = PAPER[name]
    with torch.device("meta"):
        n = sum(p.numel() for p in create_model(name, num_classes=1000).parameters())
    assert n == official_param_count((2, 3, 18, 2), c)
    assert round(n / 1e6) == millions, (name, n)
