"""CSWin Transformer against plain-torch definitions written from the paper. There is no reference twin: timm
(1.0.31) and transformers have no CSWin (the first test checks it), so the cross-shaped attention is checked one
query at a time, gathering its stripe's keys by coordinates (no partition helper), and the whole model is rebuilt
from those references in float64."""

import importlib.util
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import models.cswin  # noqa: F401  (registers the CSWin sizes)
from models import create_model
from models.cswin import CSWinBlock, StripeAttention
from ops.compat import import_timm


def trained_like(module: nn.Module, seed: int = 1) -> nn.Module:
    """Perturb every weight, so parity cannot pass by init symmetry (unit LayerNorms, zero biases)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)
    return module.eval()


def test_no_reference_twin():
    assert import_timm().list_models("*cswin*") == []
    assert importlib.util.find_spec("transformers.models.cswin") is None


# --- cross-shaped attention: one query at a time ----------------------------------------------------------------


def stripe_of(axis: str, sw: int, y: int, x: int) -> int:
    """The paper's stripes: horizontal = rows grouped sw at a time (full width), vertical = columns sw at a time
    (full height), full = the whole map. The last stripe is narrower when sw does not divide the side."""
    return {"horizontal": y // sw, "vertical": x // sw, "full": 0}[axis]


def reference_branch(axis: str, sw: int, heads: int, conv: nn.Conv2d, q, k, v) -> torch.Tensor:
    """q, k, v (B, H, W, c) -> (B, H, W, c): each token attends to the tokens of its stripe (softmax of scaled
    dot products per head), plus LePE: the depthwise 3x3 conv of V over its stripe alone (zero outside it)."""
    B, H, W, c = q.shape
    hd = c // heads
    cells = [(y, x) for y in range(H) for x in range(W)]
    lepe = torch.zeros_like(v)
    for s in {stripe_of(axis, sw, y, x) for y, x in cells}:
        ys = sorted({y for y, x in cells if stripe_of(axis, sw, y, x) == s})
        xs = sorted({x for y, x in cells if stripe_of(axis, sw, y, x) == s})
        sub = v[:, ys[0] : ys[-1] + 1, xs[0] : xs[-1] + 1].permute(0, 3, 1, 2)  # (B, c, rows, cols)
        out = F.conv2d(sub, conv.weight, conv.bias, padding=1, groups=c).permute(0, 2, 3, 1)
        lepe[:, ys[0] : ys[-1] + 1, xs[0] : xs[-1] + 1] = out
    rows = []
    for y, x in cells:
        keys = [t for t in cells if stripe_of(axis, sw, *t) == stripe_of(axis, sw, y, x)]
        kk = torch.stack([k[:, a, b] for a, b in keys], 1).view(B, len(keys), heads, hd)  # (B, M, h, hd)
        vv = torch.stack([v[:, a, b] for a, b in keys], 1).view(B, len(keys), heads, hd)
        logits = torch.einsum("bhd,bmhd->bhm", q[:, y, x].view(B, heads, hd), kk) / math.sqrt(hd)
        rows.append(torch.einsum("bhm,bmhd->bhd", logits.softmax(-1), vv).reshape(B, c) + lepe[:, y, x])
    return torch.stack(rows, 1).view(B, H, W, c)


def reference_block(blk: CSWinBlock, x: torch.Tensor, heads: int, sw: int, full: bool) -> torch.Tensor:
    """x + proj(concat(vertical half, horizontal half)) (or one full branch), then x + mlp(norm2(x)), as the
    release lays the channels out: q, k, v are the thirds of the qkv output; the first half of each feeds the
    vertical stripes (the release's idx 0: full height, sw wide), the second half the horizontal ones."""
    C = x.shape[-1]
    h = F.layer_norm(x, (C,), blk.norm1.weight, blk.norm1.bias, blk.norm1.eps)
    q, k, v = F.linear(h, blk.qkv.weight, blk.qkv.bias).split(C, dim=-1)  # each (B, H, W, C)
    if full:
        attn = reference_branch("full", sw, heads, blk.attns[0].lepe, q, k, v)
    else:
        c = C // 2
        attn = torch.cat(
            [
                reference_branch(
                    axis, sw, heads // 2, blk.attns[i].lepe, *(t[..., i * c : (i + 1) * c] for t in (q, k, v))
                )
                for i, axis in enumerate(("vertical", "horizontal"))
            ],
            dim=-1,
        )
    x = x + F.linear(attn, blk.proj.weight, blk.proj.bias)
    h = F.layer_norm(x, (C,), blk.norm2.weight, blk.norm2.bias, blk.norm2.eps)
    return x + F.linear(
        F.gelu(F.linear(h, blk.mlp.fc1.weight, blk.mlp.fc1.bias)), blk.mlp.fc2.weight, blk.mlp.fc2.bias
    )


# (H, W, sw, full): square, non-square, neither side divisible by sw, a stripe wider than the map, sw = 1, and the
# last stage's full attention
CASES = [
    (6, 6, 2, False),
    (4, 10, 2, False),
    (7, 5, 3, False),
    (3, 5, 7, False),
    (5, 4, 1, False),
    (5, 6, 7, True),
]


@pytest.mark.parametrize("H,W,sw,full", CASES)
def test_block_matches_reference(H, W, sw, full):
    torch.manual_seed(0)
    blk = trained_like(CSWinBlock(16, num_heads=4, stripe=sw, full=full))
    x = torch.randn(2, H, W, 16)
    with torch.no_grad():
        got, want = blk(x), reference_block(blk, x, heads=4, sw=sw, full=full)
    assert (got - want).abs().max() < 1e-5
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("axis", ["vertical", "horizontal"])
def test_branch_reaches_exactly_its_stripe(axis):
    """Independent of the reference: one output token depends on q, k, v of its stripe's tokens and no others
    (a 7 x 5 map, sw = 3: the last stripe is one row / column narrower)."""
    torch.manual_seed(0)
    branch = trained_like(StripeAttention(8, num_heads=2, axis=axis, stripe=3))
    H, W = 7, 5
    q, k, v = (torch.randn(1, H, W, 8, requires_grad=True) for _ in range(3))
    for y, x in [(0, 0), (4, 2), (6, 4)]:
        out = branch(q, k, v)[0, y, x].sum()
        grads = torch.autograd.grad(out, (q, k, v))
        reach = sum(g[0].abs().sum(-1) for g in grads) > 0  # (H, W)
        want = torch.tensor(
            [[stripe_of(axis, 3, a, b) == stripe_of(axis, 3, y, x) for b in range(W)] for a in range(H)]
        )
        assert torch.equal(reach, want), (axis, y, x, reach)


# --- whole model ----------------------------------------------------------------------------------------------


def reference_features(model, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Stage maps and final tokens: stem 7x7 stride 4 (padding 2) + LayerNorm, per stage a 3x3 stride-2 conv
    (padding 1) + LayerNorm (not the first), the reference blocks; final LayerNorm over the tokens."""
    hp = model.hparams()
    ln = lambda x, m: F.layer_norm(x, x.shape[-1:], m.weight, m.bias, m.eps)  # noqa: E731
    x = F.conv2d(images, model.stem.conv.weight, model.stem.conv.bias, stride=4, padding=2)
    x = ln(x.permute(0, 2, 3, 1), model.stem.norm)  # (B, H/4, W/4, C)
    maps = []
    for i, stage in enumerate(model.stages):
        if i > 0:
            conv = stage.downsample.conv
            x = F.conv2d(x.permute(0, 3, 1, 2), conv.weight, conv.bias, stride=2, padding=1)
            x = ln(x.permute(0, 2, 3, 1), stage.downsample.norm)
        full = i == len(model.stages) - 1
        for blk in stage.blocks:
            x = reference_block(blk, x, hp["num_heads"][i], hp["split_sizes"][i], full)
        maps.append(x.permute(0, 3, 1, 2))
    return maps, ln(x.flatten(1, 2), model.norm)


@pytest.mark.parametrize("size", [(64, 64), (60, 44)])
def test_model_matches_reference(size):
    """cswin_test in float64 at 64px (maps 16, 8, 4, 2) and at 60 x 44 (15 x 11, 8 x 6, 4 x 3, 2 x 2: stripes that
    do not divide, a stripe wider than the map)."""
    torch.manual_seed(0)
    model = trained_like(create_model("cswin_test", num_classes=7).double())
    images = torch.randn(2, 3, *size, dtype=torch.float64)
    with torch.no_grad():
        maps, feats = reference_features(model, images)
        torch.testing.assert_close(model.forward_features(images), feats, atol=1e-10, rtol=1e-10)
        for got, want in zip(model.forward_intermediates(images), maps):
            torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
        logits = F.linear(feats.mean(1), model.head.weight, model.head.bias)
        torch.testing.assert_close(model(images), logits, atol=1e-10, rtol=1e-10)


def test_stem_mask_grid_and_errors():
    model = create_model("cswin_test", mask_token=True).eval()
    x = torch.randn(1, 3, 64, 64)
    mask = torch.zeros(1, 16, 16, dtype=torch.bool)
    mask[0, 3, 5] = True
    with torch.no_grad():
        emb = model.embed(x, mask)
    torch.testing.assert_close(emb[0, 3, 5], model.mask_token[0, 0, 0])
    with pytest.raises(ValueError, match="stem grid"):
        model.embed(x, torch.zeros(1, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="halves"):
        CSWinBlock(16, num_heads=3, stripe=2)
    assert set(model.no_weight_decay()) == {"mask_token"}


# --- paper sizes ----------------------------------------------------------------------------------------------


def release_param_count(embed: int, depths, num_classes: int = 1000, in_chans: int = 3) -> int:
    """Parameters of the release's CSWinTransformer, counted by hand: stem conv 7x7 + LayerNorm; per block
    norm1, qkv (bias), LePE depthwise 3x3 (+bias) over all channels (two half-width branches or one), proj,
    norm2, MLP 4x; per merge conv 3x3 + LayerNorm; final norm; head."""
    n = in_chans * 49 * embed + embed + 2 * embed
    for i, depth in enumerate(depths):
        d = embed * 2**i
        if i > 0:
            n += 9 * (d // 2) * d + d + 2 * d
        n += depth * (2 * d + 3 * d * d + 3 * d + 10 * d + d * d + d + 2 * d + 8 * d * d + 5 * d)
    d = embed * 2 ** (len(depths) - 1)
    return n + 2 * d + d * num_classes + num_classes


# the paper's Table 1 (224px, 1000 classes): 23M, 35M, 78M, rounded up to the million
PAPER = {
    "cswin_tiny_224": (64, (1, 2, 21, 1), 23),
    "cswin_small_224": (64, (2, 4, 32, 2), 35),
    "cswin_base_224": (96, (2, 4, 32, 2), 78),
}


@pytest.mark.parametrize("name", list(PAPER))
def test_paper_sizes(name):
    embed, depths, millions = PAPER[name]
    with torch.device("meta"):
        model = create_model(name, num_classes=1000)
    got = sum(p.numel() for p in model.parameters())
    assert got == release_param_count(embed, depths), name
    assert math.ceil(got / 1e6) == millions, (name, got)
