"""SparK / FCMAE (models/sparse.py, pretrain/objectives/spark.py): the dense emulation of sparse convolution leaks
nothing from masked pixels and equals a naive per-sample, per-point reference; the loss counts masked patches
only; both objectives train every supported family, run end to end and export a plain HF backbone."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models import create_model
from models.convnext_hf import backbone_to_hf
from models.hf import rgb_from_gray
from models.mae import patchify
from models.masking import upsample_mask
from models.sparse import FCMAEDecoder, masked_patch_loss, sparse_forward
from pretrain.build import load_config
from pretrain.config import ConfigError
from pretrain.objectives.spark import FCMAE, FCMAEConfig, SparK, SparKConfig
from tests.conftest import ROOT, read_metrics, trained_like

SPARK_TINY = str(ROOT / "configs" / "spark_convnext_tiny.yaml")

# family -> (registry name, overrides, image size, mask cell): tiny nets whose final stride fits the image
FAMILIES = {
    "convnext": ("convnext_test", dict(patch_size=1), 32, 8),
    "convnextv2": ("convnextv2_test", dict(patch_size=1), 32, 8),
    "poolformer": ("poolformer_test", dict(depths=(1, 1, 1, 1)), 64, 32),
}


def make(family: str, **kw):
    name, over, size, cell = FAMILIES[family]
    torch.manual_seed(0)
    return create_model(name, img_size=size, in_chans=2, **{**over, **kw}), size, cell


def cell_mask(batch: int, size: int, cell: int, seed: int) -> torch.Tensor:
    """(B, h, w) visible mask with both kinds of cell in every sample (about half visible)."""
    g = torch.Generator().manual_seed(seed)
    n = size // cell
    active = torch.rand(batch, n, n, generator=g) < 0.5
    active[:, 0, 0], active[:, -1, -1] = True, False
    return active


# --- 1. no leak ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("grn_stats", ["sample", "batch"])
def test_masked_pixels_never_reach_visible_outputs(family, grn_stats):
    net, size, cell = make(family, drop_path_rate=0.5)
    net = trained_like(net).train()  # drop path on: the same seed gives the same drops
    if family == "convnext":  # a mask cell of two final-stage cells too
        cell *= 2
    x = torch.randn(3, 2, size, size)
    active = cell_mask(3, size, cell, seed=1)
    pix = upsample_mask(active, cell).unsqueeze(1)  # (B, 1, H, W) True = visible

    def run(images):
        torch.manual_seed(7)
        return sparse_forward(net, images, active, grn_stats)

    ref = run(x)
    for fill in (torch.randn_like(x) * 100, torch.full_like(x, 1e4), torch.full_like(x, -1e4)):
        outs = run(torch.where(pix, x, fill))
        for i, (a, b) in enumerate(zip(ref, outs)):
            assert torch.equal(a, b), f"stage {i} changed with the masked pixels"
    for i, out in enumerate(ref):
        m = upsample_mask(active, out.shape[-1] // active.shape[-1]).unsqueeze(1).expand_as(out)
        assert out[~m].abs().max() == 0, f"stage {i}: masked positions not zero"
        assert out[m].abs().min() < out[m].abs().max() != 0  # visible ones carry values

    images = x.clone().requires_grad_()
    outs = run(images)
    sum((o * torch.randn_like(o)).sum() for o in outs).backward()
    grad = images.grad
    assert torch.equal(grad[~pix.expand_as(grad)], torch.zeros(int((~pix).sum()) * 2))
    assert grad[pix.expand_as(grad)].abs().sum() > 0


# --- 2. a naive per-sample, per-point reference ----------------------------------------------------------------
# A sample's sparse map is (coords (N, 2) row/col, feats (N, C), grid (H, W)): only its visible points exist.
# Convolutions sum kernel taps over the visible neighbours found in an index map; norms and GRN use the points.


def points(active_b: torch.Tensor, reduction: int, cell: int, grid: tuple[int, int]) -> torch.Tensor:
    """Visible coordinates (N, 2) of a grid whose positions are `reduction` pixels: position (r, c) lies in mask
    cell (r * reduction // cell, c * reduction // cell)."""
    return torch.tensor(
        [
            (r, c)
            for r in range(grid[0])
            for c in range(grid[1])
            if active_b[r * reduction // cell, c * reduction // cell]
        ],
        dtype=torch.long,
    ).view(-1, 2)


def naive_conv(src, dst_coords, dst_grid, weight, bias, stride, pad):
    """Sparse conv: every visible output sums kernel taps over the visible inputs it covers (groups 1 or
    depthwise)."""
    coords, feats, (H, W) = src
    index = torch.full((H, W), -1, dtype=torch.long)
    index[coords[:, 0], coords[:, 1]] = torch.arange(len(coords))
    c_out, c_in_g, kh, kw = weight.shape
    out = bias.expand(len(dst_coords), c_out).clone()
    for i in range(kh):
        for j in range(kw):
            r, c = dst_coords[:, 0] * stride - pad + i, dst_coords[:, 1] * stride - pad + j
            inside = (r >= 0) & (r < H) & (c >= 0) & (c < W)
            k = torch.where(inside, index[r.clamp(0, H - 1), c.clamp(0, W - 1)], -1)
            got = k >= 0
            x = torch.where(got[:, None], feats[k.clamp(min=0)], 0.0)  # (N, C_in)
            out = out + (
                x * weight[:, 0, i, j]
                if c_in_g == 1 and c_out == feats.shape[1]
                else x @ weight[:, :, i, j].T
            )
    return dst_coords, out, dst_grid


def naive_ln(feats, w, b, eps):
    mean = feats.mean(-1, keepdim=True)
    var = ((feats - mean) ** 2).mean(-1, keepdim=True)
    return (feats - mean) / torch.sqrt(var + eps) * w + b


def naive_grn(all_feats: list[torch.Tensor], grn, stats: str) -> list[torch.Tensor]:
    if stats == "batch":
        gxs = [torch.sqrt(sum((f**2).sum(0) for f in all_feats))] * len(all_feats)
    else:
        gxs = [torch.sqrt((f**2).sum(0)) for f in all_feats]
    return [grn.gamma * (f * (gx / (gx.mean() + grn.eps))) + grn.beta + f for f, gx in zip(all_feats, gxs)]


def dense(sample_maps: list, channels: int) -> torch.Tensor:
    """Per-sample points -> (B, C, H, W), zero where no point is."""
    H, W = sample_maps[0][2]
    out = torch.zeros(len(sample_maps), channels, H, W, dtype=torch.float64)
    for b, (coords, feats, _) in enumerate(sample_maps):
        out[b, :, coords[:, 0], coords[:, 1]] = feats.T
    return out


def pixel_points(x, active, cell):
    maps = []
    for b in range(len(x)):
        coords = points(active[b], 1, cell, tuple(x.shape[-2:]))
        maps.append((coords, x[b, :, coords[:, 0], coords[:, 1]].T, tuple(x.shape[-2:])))
    return maps


def naive_convnext(net, x, active, cell, stats):
    maps, outs = pixel_points(x, active, cell), []
    H = x.shape[-1]
    for i, stage in enumerate(net.stages):
        red = net.feature_info[i]["reduction"]
        grid = (H // red, H // red)
        new = []
        for b, src in enumerate(maps):
            dst = points(active[b], red, cell, grid)
            if i == 0:
                conv, ln = net.stem[0], net.stem[1]
                _, f, _ = naive_conv(src, dst, grid, conv.weight, conv.bias, conv.stride[0], 0)
                f = naive_ln(f, ln.weight, ln.bias, ln.eps)
            else:
                ln, conv = stage.downsample
                pre = (src[0], naive_ln(src[1], ln.weight, ln.bias, ln.eps), src[2])
                _, f, _ = naive_conv(pre, dst, grid, conv.weight, conv.bias, 2, 0)
            new.append((dst, f, grid))
        maps = new
        for blk in stage.blocks:
            ys = []
            for coords, f, g in maps:
                _, y, _ = naive_conv((coords, f, g), coords, g, blk.dwconv.weight, blk.dwconv.bias, 1, 3)
                y = naive_ln(y, blk.norm.weight, blk.norm.bias, blk.norm.eps)
                ys.append(F.gelu(y @ blk.pwconv1.weight.T + blk.pwconv1.bias))
            if blk.grn is not None:
                ys = naive_grn(ys, blk.grn, stats)
            new = []
            for (coords, f, g), y in zip(maps, ys):
                y = y @ blk.pwconv2.weight.T + blk.pwconv2.bias
                new.append((coords, f + (y * blk.gamma if blk.gamma is not None else y), g))
            maps = new
        outs.append(dense(maps, net.dims[i]))
    return outs


def naive_gn(feats, norm):
    mean = feats.mean()
    var = ((feats - mean) ** 2).mean()
    return (feats - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def naive_pool(coords, feats, grid):
    """Mean over the visible points of each 3x3 neighbourhood (the point included), minus the point."""
    index = {(int(r), int(c)): k for k, (r, c) in enumerate(coords)}
    out = torch.empty_like(feats)
    for k, (r, c) in enumerate(coords.tolist()):
        near = [index[(r + i, c + j)] for i in (-1, 0, 1) for j in (-1, 0, 1) if (r + i, c + j) in index]
        out[k] = feats[near].mean(0) - feats[k]
    return out


def naive_poolformer(net, x, active, cell):
    maps, outs = pixel_points(x, active, cell), []
    H = x.shape[-1]
    for i, stage in enumerate(net.stages):
        red = net.feature_info[i]["reduction"]
        grid = (H // red, H // red)
        conv, stride, pad = (net.stem, 4, 2) if i == 0 else (stage.downsample, 2, 1)
        maps = [
            naive_conv(src, points(active[b], red, cell, grid), grid, conv.weight, conv.bias, stride, pad)
            for b, src in enumerate(maps)
        ]
        for blk in stage.blocks:
            new = []
            for coords, f, g in maps:
                f = f + blk.ls1.scale * naive_pool(coords, naive_gn(f, blk.norm1), g)
                y = naive_gn(f, blk.norm2) @ blk.mlp.fc1.weight[:, :, 0, 0].T + blk.mlp.fc1.bias
                y = F.gelu(y) @ blk.mlp.fc2.weight[:, :, 0, 0].T + blk.mlp.fc2.bias
                new.append((coords, f + blk.ls2.scale * y, g))
            maps = new
        outs.append(dense(maps, net.dims[i]))
    return outs


@pytest.mark.parametrize(
    "family, stats",
    [("convnext", "sample"), ("convnextv2", "sample"), ("convnextv2", "batch"), ("poolformer", "sample")],
)
def test_emulation_equals_naive_reference(family, stats):
    net, size, cell = make(family)
    net = trained_like(net).double()  # eval; weights moved off their init (GRN, layer scale, biases)
    x = torch.randn(2, 2, size, size, dtype=torch.float64)
    active = cell_mask(2, size, cell, seed=3)
    with torch.no_grad():
        got = sparse_forward(net, x, active, stats)
        if family == "poolformer":
            want = naive_poolformer(net, x, active, cell)
        else:
            want = naive_convnext(net, x, active, cell, stats)
    assert len(got) == len(want) == 4
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape, i
        assert (w != 0).any() and torch.allclose(g, w, rtol=0, atol=1e-5), (i, (g - w).abs().max().item())


# --- 3. batch (in)dependence -----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["convnextv2", "poolformer"])
def test_per_sample_statistics_ignore_the_rest_of_the_batch(family):
    net, size, cell = make(family)
    net = trained_like(net)
    x, other = torch.randn(1, 2, size, size), torch.randn(1, 2, size, size) * 3 + 1
    active = cell_mask(2, size, cell, seed=5)
    active[1] = ~active[0]  # the other sample sees what sample 0 does not
    with torch.no_grad():
        alone = sparse_forward(net, x, active[:1])  # batch size 1 runs
        both = sparse_forward(net, torch.cat([x, other]), active)
        for a, b in zip(alone, both):
            assert torch.allclose(a[0], b[0], atol=1e-6)
        if family == "convnextv2":  # whole-batch GRN really is whole-batch
            alone = sparse_forward(net, x, active[:1], "batch")
            both = sparse_forward(net, torch.cat([x, other]), active, "batch")
            assert (alone[-1][0] - both[-1][0]).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["convnextv2", "poolformer"])
def test_activation_checkpointing_changes_nothing(family):
    net, size, cell = make(family, drop_path_rate=0.3)
    x, active = torch.randn(2, 2, size, size), cell_mask(2, size, cell, seed=2)
    results = []
    for on in (False, True):
        net.set_grad_checkpointing(on)
        net.zero_grad()
        torch.manual_seed(1)  # the same drops (checkpointing replays the RNG in the recompute)
        sum(o.square().sum() for o in sparse_forward(net, x, active)).backward()
        results.append({n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None})
    assert results[0].keys() == results[1].keys() and len(results[0]) > 10
    assert all(torch.allclose(results[0][k], results[1][k], atol=1e-6) for k in results[0])


def test_grn_stats_must_be_known():
    net, size, cell = make("convnextv2")
    with pytest.raises(ValueError, match="grn_stats"):
        sparse_forward(net, torch.randn(1, 2, size, size), cell_mask(1, size, cell, 0), "global")


def test_mask_cell_must_cover_whole_final_cells():
    net, size, _ = make("convnext")  # final stride 8 at 32 px
    with pytest.raises(ValueError, match="final stage"):
        sparse_forward(
            net, torch.randn(1, 2, size, size), torch.ones(1, 8, 8, dtype=torch.bool)
        )  # 4 px cells


# --- 4. loss ---------------------------------------------------------------------------------------------------


def test_loss_counts_masked_patches_only():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 16, 16, generator=g)
    mask = torch.tensor([[[True, False], [False, True]], [[False, False], [True, False]]])  # (B, 2, 2) masked
    pred = torch.randn(2, 4, 8 * 8 * 3, generator=g)
    loss = masked_patch_loss(pred, images, mask)
    # by hand: per masked patch, target normalized by its own mean and unbiased variance
    target = patchify(images, 8)
    terms = []
    for b in range(2):
        for cell in range(4):
            if mask[b].flatten()[cell]:
                t = target[b, cell]
                t = (t - t.mean()) / math.sqrt(t.var().item() + 1e-6)
                terms.append(((pred[b, cell] - t) ** 2).mean())
    assert torch.allclose(loss, torch.stack(terms).mean(), atol=1e-6)
    changed = pred.clone()
    changed[~mask.flatten(1)] += 5.0  # visible patches
    assert torch.equal(masked_patch_loss(changed, images, mask), loss)
    changed[mask.flatten(1)] += 5.0  # masked ones
    assert masked_patch_loss(changed, images, mask) > loss + 1
    raw = masked_patch_loss(pred, images, mask, norm_pix=False)
    assert torch.allclose(raw, ((pred - target) ** 2).mean(-1)[mask.flatten(1)].mean())


def test_fcmae_pixels_follow_patchify_order():
    dec = FCMAEDecoder(in_dim=8, reduction=4, in_chans=3, dim=16)
    feats, m = torch.randn(2, 8, 3, 3), torch.rand(2, 3, 3) < 0.5
    with torch.no_grad():
        image = dec(feats, m)  # (2, 3, 12, 12)
        x = dec.proj(feats)
        x = torch.where(m.unsqueeze(1), x, dec.mask_token)
        raw = dec.pred(dec.blocks[0](x))  # (2, 4*4*3, 3, 3): one patch per last-stage cell
    assert image.shape == (2, 3, 12, 12)
    assert torch.equal(patchify(image, 4), raw.flatten(2).transpose(1, 2))


# --- 5. objectives ---------------------------------------------------------------------------------------------


def batch_of(size: int, n: int = 2) -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "image": torch.randn(n, 2, size, size, generator=g),
        "label": torch.zeros(n, dtype=torch.long),
        "index": torch.arange(n) + 10,
        "epoch": torch.zeros(n, dtype=torch.long),
    }


CASES = [
    ("spark", "convnext"),
    ("spark", "convnextv2"),
    ("spark", "poolformer"),
    ("fcmae", "convnext"),
    ("fcmae", "convnextv2"),
]


def objective(kind: str, family: str, **cfg):
    net, size, cell = make(family, drop_path_rate=0.1)
    if family == "poolformer":  # 4x4 cells: a lone visible cell's pooling branch is 0 (mean - itself)
        net, size = create_model(FAMILIES[family][0], img_size=128, in_chans=2, drop_path_rate=0.1), 128
    if kind == "spark":
        return SparK(net, SparKConfig(mask_patch_size=cell, decoder_dim=32, **cfg), seed=3), size
    return FCMAE(net, FCMAEConfig(mask_patch_size=cell, decoder_dim=16, **cfg), seed=3), size


@pytest.mark.parametrize("kind, family", CASES)
def test_one_training_step_reaches_every_part(kind, family):
    obj, size = objective(kind, family, grn_stats="batch" if family == "convnextv2" else "sample")
    opt = torch.optim.AdamW([p for p in obj.parameters() if p.requires_grad], lr=1e-3)
    torch.manual_seed(0)  # drop path
    out = obj(batch_of(size))
    assert torch.isfinite(out["loss"]) and out["pred"].shape[:2] == out["mask"].shape
    out["loss"].backward()
    no_grad = [
        n for n, p in obj.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())
    ]
    assert no_grad == []  # encoder, decoder, every mask token (and nothing left unused for DDP)
    tokens = [n for n, _ in obj.named_parameters() if n.endswith("mask_token")]
    assert len(tokens) == (4 if kind == "spark" else 1) and not any(n.startswith("backbone") for n in tokens)
    assert {n.split(".")[1] for n, p in obj.named_parameters() if not p.requires_grad} <= {"norm", "head"}
    opt.step()
    assert torch.isfinite(obj(batch_of(size))["loss"])
    assert set(obj.visuals(batch_of(size), out)) == {f"{kind}/reconstruction"}


def test_masks_come_from_seed_epoch_and_index():
    obj, size = objective("spark", "convnext")
    b = batch_of(size, 3)
    m1, m2 = obj(b)["mask"], obj(b)["mask"]
    assert torch.equal(m1, m2) and (m1.sum(1) == math.ceil(0.6 * 16)).all()
    b["epoch"] += 1
    assert not torch.equal(obj(b)["mask"], m1)
    explicit = torch.zeros(3, 4, 4, dtype=torch.bool)
    explicit[:, 0] = True
    assert torch.equal(obj(b, mask=explicit)["mask"], explicit.flatten(1).float())


@pytest.mark.parametrize(
    "kind, family", [("spark", "convnextv2"), ("spark", "poolformer"), ("fcmae", "convnext")]
)
def test_export_writes_the_plain_backbone(kind, family, tmp_path, hf_offline):
    from pretrain.export import to_hf

    obj, _ = objective(kind, family)
    hf = to_hf(obj, tmp_path)  # load_strict: a missing or unexpected key raises
    # PoolFormer's adapter always writes the classification model (HF keeps the final norm there), num_labels 0
    expected = {
        "convnext": "ConvNextModel",
        "convnextv2": "ConvNextV2Model",
        "poolformer": "PoolFormerForImageClassification",
    }
    assert type(hf).__name__ == expected[family]
    assert sum(p.numel() for p in hf.parameters()) == sum(p.numel() for p in obj.backbone.parameters())


# --- 6. config -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["swin_test", "vit_test_patch4"])
def test_spark_refuses_transformers_naming_who_can(model):
    with pytest.raises(ConfigError) as e:
        load_config(SPARK_TINY, [f"model.name={model}", "model.kwargs={}"])
    msg = str(e.value)
    assert "spark" in msg and model in msg and "objectives that can" in msg
    assert ("SwinTransformer" if "swin" in model else "VisionTransformer") in msg


@pytest.mark.parametrize(
    "override, key",
    [
        ("objective.mask_patch_size=12", "objective.mask_patch_size"),  # not whole 8 px final cells
        ("objective.mask_patch_size=64", "objective.mask_patch_size"),  # larger than the 32 px image
        ("objective.mask_ratio=0.99", "objective.mask_ratio"),  # 16 of 16 cells: none visible
        ("objective.grn_stats=global", "objective.grn_stats"),
        ("model.kwargs.mask_token=true", "mask_token"),
        ("objective.decoder_dim=4", "objective.decoder_dim"),  # halves 3 times to nothing
    ],
)
def test_bad_settings_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(SPARK_TINY, [override])


# --- 7. end to end ---------------------------------------------------------------------------------------------


def test_spark_run_exports_a_convnext(tmp_path, digits_shards, hf_offline):
    from ops.compat import import_transformers
    from pretrain import export
    from pretrain.train import main

    out = tmp_path / "run"
    args = [SPARK_TINY, "--set", f"run.output_dir={out}", "--set", f"data.local={digits_shards}"]
    for s in ("run.progress=false", "train.max_steps=4", "checkpoint.interval=4", "run.image_interval=4"):
        args += ["--set", s]
    assert main(args) == 0
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in rows)
    assert (out / "images" / "spark_reconstruction_step00000004.png").is_file()
    assert export.main([str(out), str(tmp_path / "hf")]) == 0
    hf = import_transformers().ConvNextModel.from_pretrained(tmp_path / "hf")
    model, _ = export.load_checkpoint_model(out)
    # the trained backbone in ConvNextModel's key layout (digits are gray: exported for RGB pipelines)
    trained = backbone_to_hf(rgb_from_gray(model.backbone))
    written = hf.state_dict()
    assert set(written) == set(trained)  # no missing, no unexpected key
    assert all(torch.equal(written[k], trained[k]) for k in trained)
