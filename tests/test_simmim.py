"""SimMIM: per-sample masks, the masked L1 loss, one training step on every image family, ViT's mask-token path,
parity with transformers' *ForMaskedImageModeling, and a short run that resumes bit-identically and exports."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from models import MODELS, create_model, list_models
from models.masking import num_masked
from models.simmim import final_feature_map, simmim_loss
from ops.compat import import_transformers
from pretrain.build import load_config
from pretrain.errors import ConfigError
from pretrain.objectives import objectives_for
from pretrain.objectives.simmim import SimMIM, SimMIMConfig
from tests.conftest import ROOT, read_metrics, trained_like

TINY = str(ROOT / "configs" / "simmim_swin_tiny.yaml")


def make(name="swin_test", mask_patch_size=8, ratio=0.6, seed=0, **kw) -> SimMIM:
    torch.manual_seed(0)
    kw = {"img_size": 32, **kw}
    return SimMIM(create_model(name, mask_token=True, **kw), SimMIMConfig(ratio, mask_patch_size), seed=seed)


def batch(n=8, epoch=0, size=32, chans=3, index=None):
    index = torch.arange(n) if index is None else index
    x = torch.randn(len(index), chans, size, size, generator=torch.Generator().manual_seed(1))
    return {"image": x, "index": index, "epoch": torch.full((len(index),), epoch)}


# ---- masks ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.55, 0.6, 0.75])
def test_mask_count_follows_the_ceil_rule_on_whole_cells(ratio):
    obj = make(ratio=ratio)  # 32 px, stem 4: 8x8 stem grid; 8 px cells: 4x4 = 16 cells of 2x2 stem cells
    mask = obj.draw_mask(batch())
    assert mask.shape == (8, 8, 8) and mask.dtype == torch.bool
    n = math.ceil(16 * ratio)
    assert n == num_masked(16, ratio)
    assert (mask.sum(dim=(1, 2)) == n * 4).all()
    cells = mask.view(8, 4, 2, 4, 2)  # every 2x2 block of the stem grid is one mask cell: all equal
    assert (cells == cells[:, :, :1, :, :1]).all()


def test_mask_is_a_pure_function_of_seed_epoch_and_sample():
    a = make(seed=5)
    m0 = a.draw_mask(batch())
    assert torch.equal(m0, make(seed=5).draw_mask(batch()))  # a new process (resume) draws the same
    perm = torch.tensor([3, 0, 7, 1, 6, 2, 5, 4])
    assert torch.equal(a.draw_mask(batch(index=perm)), m0[perm])  # batch position plays no part
    assert len({tuple(m.flatten().tolist()) for m in m0}) == 8  # samples differ
    m1 = a.draw_mask(batch(epoch=1))
    assert sum(not torch.equal(x, y) for x, y in zip(m0, m1)) >= 7  # a new epoch, new masks
    assert not torch.equal(make(seed=6).draw_mask(batch()), m0)


def test_mask_grid_errors_name_both_grids():
    with pytest.raises(
        ConfigError, match=r"objective\.mask_patch_size.*not a multiple of the stem stride.*8x8 stem"
    ):
        make(mask_patch_size=6)
    with pytest.raises(
        ConfigError, match=r"objective\.mask_patch_size.*mask grid \(2\.66667x2\.66667.*8x8 stem"
    ):
        make(mask_patch_size=12)
    with pytest.raises(ConfigError, match=r"objective\.mask_patch_size"):
        load_config(TINY, ["objective.mask_patch_size=6"])


def test_a_stem_grid_other_than_image_over_stem_stride_is_named():
    """The stem grid is checked against H / stem_stride by a meta-device forward at construction (PoolFormer's
    k7 s4 p2 stem gives floor((H - 3) / 4) + 1 rows: H/4 for every allowed size; a stride that lies is caught)."""
    from models.poolformer import PoolFormer

    class LyingStem(PoolFormer):
        stem_stride = 2  # the real stem reduces by 4

    torch.manual_seed(0)
    ok = SimMIM(create_model("poolformer_test", img_size=64, mask_token=True), SimMIMConfig(0.6, 16))
    assert ok.draw_mask(batch(2, size=64)).shape == (2, 16, 16)
    liar = LyingStem(**{**ok.backbone.hparams()})
    with pytest.raises(ConfigError, match=r"objective\.mask_patch_size: .* no 32x32 stem grid.*16, 16"):
        SimMIM(liar, SimMIMConfig(0.6, 16))


def test_a_ratio_leaving_no_visible_or_no_masked_cell_is_a_config_error():
    with pytest.raises(ConfigError, match=r"objective\.mask_ratio: 0\.97 masks 16 of 16"):
        make(ratio=0.97)
    for bad in ("0.97", "0.0", "1.0"):
        with pytest.raises(ConfigError, match=r"objective\.mask_ratio"):
            load_config(TINY, [f"objective.mask_ratio={bad}"])
    assert make(ratio=0.01).draw_mask(batch()).sum(dim=(1, 2)).tolist() == [4] * 8  # one cell still masked


# ---- loss ----------------------------------------------------------------------------------------------------


def naive_loss(x, rec, mask):
    """Per pixel: mean |x - rec| over masked pixels and channels (a mask cell = size / grid pixels)."""
    B, C, H, W = x.shape
    f = H // mask.shape[1]
    total, count = 0.0, 0
    for b in range(B):
        for i in range(H):
            for j in range(W):
                if mask[b, i // f, j // f]:
                    total += sum(abs(float(x[b, c, i, j]) - float(rec[b, c, i, j])) for c in range(C))
                    count += 1
    return total / (count + 1e-5) / C


def test_loss_hand_computed_and_naive_reference():
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 0.0]]]])  # (1, 2, 2, 2)
    rec = torch.tensor([[[[0.0, 2.0], [3.0, 0.0]], [[1.0, 0.0], [0.0, -2.0]]]])
    mask = torch.tensor([[[True, False], [False, True]]])  # pixels (0, 0) and (1, 1)
    want = ((1 + 1) + (4 + 2)) / (2 + 1e-5) / 2  # |1-0| + |0-1| at (0, 0); |4-0| + |0+2| at (1, 1)
    assert simmim_loss(x, rec, mask).item() == pytest.approx(want, rel=1e-7)
    g = torch.Generator().manual_seed(0)
    x, rec = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    mask = torch.rand(2, 4, 4, generator=g) < 0.5
    assert simmim_loss(x, rec, mask).item() == pytest.approx(naive_loss(x, rec, mask), rel=1e-6)


def test_visible_pixels_do_not_change_the_loss_and_all_visible_is_zero():
    g = torch.Generator().manual_seed(0)
    x, rec = torch.randn(2, 3, 16, 16, generator=g), torch.randn(2, 3, 16, 16, generator=g)
    mask = torch.rand(2, 4, 4, generator=g) < 0.5
    base = simmim_loss(x, rec, mask)
    visible = ~mask.repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1).expand_as(rec)
    for junk in (1e4, float("nan"), float("inf")):
        assert torch.equal(simmim_loss(x, rec.masked_fill(visible, junk), mask), base)
    zero = simmim_loss(x, rec, torch.zeros_like(mask))
    assert zero.item() == 0.0 and torch.isfinite(zero)
    bf16 = simmim_loss(x.bfloat16(), rec.bfloat16(), mask)
    assert bf16.dtype == torch.float32


def test_bf16_autocast_step_and_visuals():
    obj = make()
    b = batch(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = obj(b)
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert obj.backbone.mask_token.grad is not None
    (grid,) = obj.visuals(b, out, n=2).values()
    assert list(obj.visuals(b, out, n=2)) == ["simmim/reconstruction"]
    assert grid.shape == (3, 2 * 32, 3 * 32) and 0 <= grid.min() and grid.max() <= 1
    m = out["mask"][0].repeat_interleave(4, 0).repeat_interleave(4, 1)  # (32, 32) pixels
    masked_panel = grid[:, :32, 32:64]
    assert torch.equal(masked_panel[:, m], masked_panel[:, m][:, :1].expand(-1, int(m.sum())))  # one fill


# ---- every image family trains one step ----------------------------------------------------------------------


def image_test_models() -> list[str]:
    """The `_test` image models of the families that take a stem mask (CrossViT says why it does not in
    `stem_mask`, and SimMIM refuses it: tests/test_objective_table.py)."""
    return [
        n
        for n in list_models("*_test*")
        if getattr(MODELS.get(n).builds, "modality", "image") == "image"
        and not isinstance(getattr(MODELS.get(n).builds, "stem_mask", None), str)
    ]


@pytest.mark.parametrize("name", image_test_models())
def test_every_image_family_trains_one_simmim_step(name):
    """Loss finite; every parameter forward_features reads gets a gradient, the mask token and decoder included;
    only what the classifier path alone reads (forward_head's norm, MaxViT's pre_logits) gets none."""
    torch.manual_seed(0)
    backbone = create_model(name, **{**MODELS.get(name).smoke, "mask_token": True})
    assert SimMIM.supports(backbone) and "simmim" in objectives_for(backbone)
    h = backbone.hparams()
    size, stem = h["img_size"], backbone.stem_stride
    obj = SimMIM(backbone, SimMIMConfig(mask_patch_size=16), seed=0)
    b = batch(2, size=size, chans=h["in_chans"])
    out = obj(b)
    assert torch.isfinite(out["loss"]) and out["loss"].item() > 0
    assert out["mask"].shape == (2, size // stem, size // stem) and out["pred"].shape == b["image"].shape
    out["loss"].backward()
    # the head-only parameters: those reached from forward_head on detached features
    probe = create_model(name, **{**MODELS.get(name).smoke, "mask_token": True})
    feats = probe.forward_features(b["image"]).detach()
    pooled = probe.forward_head(feats, pre_logits=True)
    if pooled.requires_grad:  # (PVT v2's pooling has no parameters)
        pooled.sum().backward()
    head_only = {f"backbone.{k}" for k, p in probe.named_parameters() if p.grad is not None}
    got = {k for k, p in obj.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert {"backbone.mask_token", "decoder.0.weight", "decoder.0.bias"} <= got
    assert {k for k, _ in obj.named_parameters()} - got == head_only
    assert "mask_token" in backbone.no_weight_decay()


def test_text_models_are_not_supported():
    for name in ("llama_test", "modernbert_test"):
        with torch.device("meta"):
            model = create_model(name)
        assert not SimMIM.supports(model) and "simmim" not in objectives_for(model)


def test_final_feature_map_from_tokens_and_maps():
    vit = create_model("vit_test_patch4")  # 32 px, patch 4: cls + 64 tokens
    tokens = torch.randn(2, 65, 32)
    fmap = final_feature_map(vit, tokens, (32, 32))
    assert fmap.shape == (2, 32, 8, 8)
    assert torch.equal(fmap[:, :, 2, 5], tokens[:, 1 + 2 * 8 + 5])  # row-major, cls dropped
    conv = create_model("convnext_test", img_size=64)
    x = torch.randn(2, conv.feature_info[-1]["num_chs"], 2, 2)
    assert final_feature_map(conv, x, (64, 64)) is x
    with pytest.raises(ValueError, match="not the 4x4 grid"):
        final_feature_map(create_model("swin_test"), torch.randn(2, 9, 64), (64, 64))


# ---- ViT's mask-token path -----------------------------------------------------------------------------------


def first_block_input(vit, x, **kw) -> torch.Tensor:
    seen = []
    handle = vit.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    with torch.no_grad():
        vit.forward_features(x, **kw)
    handle.remove()
    return seen[0]  # (B, 1 + L, D)


@pytest.mark.parametrize("token", [True, False])
def test_vit_masked_patches_are_the_mask_token_plus_position(token):
    torch.manual_seed(0)
    vit = trained_like(create_model("vit_test_patch4", mask_token=token))  # 8x8 patches of 4 px
    x = torch.randn(2, 3, 32, 32)
    mask = torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(0)) < 0.5
    got = first_block_input(vit, x, mask=mask)
    plain = first_block_input(vit, x)
    pos = vit.pos_embed[:, 1:]  # (1, L, D)
    fill = vit.mask_token if token else torch.zeros(1, 1, vit.embed_dim)
    m = mask.flatten(1)  # (B, L)
    want = torch.where(m.unsqueeze(-1), (fill + pos).expand(2, -1, -1), plain[:, 1:])
    torch.testing.assert_close(got[:, 1:], want, rtol=0, atol=0)
    assert torch.equal(got[:, 0], plain[:, 0])  # the cls token is never masked
    assert torch.equal(first_block_input(vit, x, mask=torch.zeros_like(mask)), plain)
    with pytest.raises(ValueError, match="not both"):
        vit.forward_features(x, ids_keep=torch.zeros(2, 4, dtype=torch.long), mask=mask)
    with pytest.raises(ValueError, match="patch grid"):
        vit.forward_features(x, mask=mask[:, :4])


def test_vit_without_a_mask_is_unchanged_by_the_token():
    torch.manual_seed(0)
    plain = create_model("vit_test_patch4")
    torch.manual_seed(0)
    tok = create_model("vit_test_patch4", mask_token=True)
    assert set(tok.state_dict()) - set(plain.state_dict()) == {"mask_token"}
    assert all(torch.equal(v, tok.state_dict()[k]) for k, v in plain.state_dict().items())  # same init draws
    assert tok.mask_token.shape == (1, 1, 32) and tok.stem_stride == 4
    assert tok.hparams()["mask_token"] and not plain.hparams()["mask_token"]
    assert "mask_token" in tok.no_weight_decay() and "mask_token" not in plain.no_weight_decay()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(tok.forward_features(x), plain.forward_features(x))
        assert torch.equal(tok.forward_features(x, mask=None), plain.forward_features(x))


# ---- transformers' *ForMaskedImageModeling -------------------------------------------------------------------

MIM = {  # model, mask cell, HF class, its encoder class
    "swin": ("swin_test", 16, "SwinForMaskedImageModeling", "SwinModel"),
    "swinv2": ("swinv2_test", 16, "Swinv2ForMaskedImageModeling", "Swinv2Model"),
    "vit": ("vit_test_patch4", 8, "ViTForMaskedImageModeling", "ViTModel"),
}


@pytest.mark.usefixtures("hf_offline")
@pytest.mark.parametrize("family", sorted(MIM))
def test_hf_mim_parity_and_round_trip(tmp_path, family):
    from pretrain.export import from_hf, to_hf

    tf = import_transformers()
    name, cell, arch, base = MIM[family]
    torch.manual_seed(0)
    obj = trained_like(SimMIM(create_model(name, mask_token=True), SimMIMConfig(0.6, cell), seed=3))
    size = obj.image_size  # the training size (the registered one here)
    b = batch(2, size=size)
    with torch.no_grad():
        ours = obj(b)
    to_hf(obj, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert (
        cfg["architectures"] == [arch] and cfg["image_size"] == size and cfg["encoder_stride"] == obj.stride
    )
    hf, info = getattr(tf, arch).from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    with torch.no_grad():
        theirs = hf(pixel_values=b["image"], bool_masked_pos=ours["mask"].flatten(1))
    torch.testing.assert_close(theirs.reconstruction, ours["pred"], rtol=0, atol=1e-5)
    assert theirs.loss.item() == pytest.approx(ours["loss"].item(), rel=1e-6)
    back = from_hf(tmp_path)
    assert isinstance(back, SimMIM) and back.cfg == obj.cfg
    sa, sb = obj.state_dict(), back.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    del cfg["tessera_simmim"]  # a folder from elsewhere: SimMIMConfig's defaults where they fit the image
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    other = from_hf(tmp_path)
    assert other.cfg.mask_ratio == 0.6 and other.cfg.mask_patch_size in (32, obj.stem_stride)
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in sa.items())
    enc, info = getattr(tf, base).from_pretrained(tmp_path / "encoder", output_loading_info=True)
    assert not any(info.values()), info
    assert getattr(enc.embeddings, "mask_token", None) is None
    with torch.no_grad():
        want = obj.backbone.forward_features(b["image"])
        torch.testing.assert_close(enc(pixel_values=b["image"]).last_hidden_state, want, rtol=0, atol=1e-5)


@pytest.mark.usefixtures("hf_offline")
def test_family_without_a_hf_mim_class_exports_its_encoder(tmp_path):
    from pretrain.export import from_hf, to_hf

    tf = import_transformers()
    torch.manual_seed(0)
    obj = trained_like(SimMIM(create_model("convnext_test", mask_token=True), SimMIMConfig(0.6, 16)))
    to_hf(obj, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["ConvNextModel"]
    assert not (tmp_path / "encoder").exists()
    _, info = tf.ConvNextModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    back = from_hf(tmp_path)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(back.forward_features(x), obj.backbone.forward_features(x))


# ---- a run: resume and export --------------------------------------------------------------------------------


def run_args(out, shards, *extra) -> list[str]:
    args = [
        TINY,
        "--set",
        f"run.output_dir={out}",
        "--set",
        f"data.local={shards}",
        "--set",
        "run.progress=false",
    ]
    for e in ("train.max_steps=5", "checkpoint.interval=10", *extra):
        args += ["--set", e]
    return args


@pytest.mark.usefixtures("hf_offline")
def test_tiny_run_resumes_bit_identically_and_exports(tmp_path, digits_shards):
    from pretrain import export
    from pretrain.train import main

    assert main(run_args(tmp_path / "a", digits_shards)) == 0
    assert main(run_args(tmp_path / "b", digits_shards, "train.stop_at_step=3")) == 0
    assert [r["step"] for r in read_metrics(tmp_path / "b")] == [1, 2, 3]
    assert main(run_args(tmp_path / "b", digits_shards)) == 0  # same output dir: resumes at step 3
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert all(math.isfinite(r["loss"]) for r in a)
    assert (tmp_path / "a" / "images" / "simmim_reconstruction_step00000001.png").is_file()

    out = tmp_path / "hf"
    assert export.main([str(tmp_path / "a"), str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["SwinForMaskedImageModeling"] and cfg["num_channels"] == 1
    assert (cfg["image_size"], cfg["encoder_stride"]) == (32, 16)
    assert cfg["tessera_simmim"] == {"mask_ratio": 0.6, "mask_patch_size": 8}
    enc = json.loads((out / "encoder" / "config.json").read_text())  # for pipelines: RGB in, gray folded
    assert enc["architectures"] == ["SwinModel"] and enc["num_channels"] == 3 and enc["tessera_gray_from_rgb"]
    assert (out / "preprocessor_config.json").is_file() and (
        out / "encoder" / "preprocessor_config.json"
    ).is_file()
    model, _ = export.load_checkpoint_model(tmp_path / "a")
    back = export.from_hf(out)
    x = batch(2, size=32, chans=1)
    with torch.no_grad():
        torch.testing.assert_close(back(x)["loss"], model(x)["loss"], rtol=0, atol=0)
        enc_back = export.from_hf(out / "encoder")  # the 1-channel encoder back, without a mask token
        torch.testing.assert_close(
            enc_back.forward_features(x["image"]),
            model.backbone.forward_features(x["image"]),
            rtol=0,
            atol=1e-6,
        )
    assert Path(out / "README.md").is_file()


@pytest.mark.parametrize("name", ["convnext_test", "maxvit_test"])
def test_two_rank_ddp_run_of_a_family_whose_head_norm_sits_outside_the_encoder(tmp_path, name):
    """DDP refuses parameters that take no part in the loss: SimMIM freezes the pooled head's norm (and MaxViT's
    pre-logits) that its encoder never reads, so a 2-rank run of those families trains."""
    from tests.conftest import torchrun

    out = tmp_path / name
    args = ["configs/simmim_swin_tiny.yaml", "--set", f"model.name={name}", "--set", f"run.output_dir={out}"]
    for s in ("train.max_steps=3", "run.progress=false", "run.image_interval=0"):
        args += ["--set", s]
    torchrun(2, args)
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in rows)
