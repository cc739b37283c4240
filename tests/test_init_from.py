"""model.init_from (pretrain/init_from.py): a fine-tune starts from a pretrained run's backbone (run dir, checkpoint
folder, DeepSpeed ZeRO run, HF folder exported by Tessera or written by transformers), its head fresh; ViT position
tables follow the image size; a mismatch names keys and shapes and loads nothing; a resume never re-applies it."""

import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import pretrain.engine
from models import create_model
from models.hf import HF_ADAPTERS
from ops.compat import import_transformers
from pretrain import export
from pretrain.build import build_model, load_config
from pretrain.config import ConfigError
from pretrain.init_from import init_from, interpolate_pos_embed
from pretrain.train import main
from tests.conftest import ROOT, read_metrics, tiny_args, torchrun, trained_like

pytestmark = pytest.mark.usefixtures("hf_offline")
FINETUNE = str(ROOT / "configs" / "classify_init_tiny.yaml")


def finetune_args(out, shards, source, *extra: str) -> list[str]:
    args = [FINETUNE]
    for e in (
        f"run.output_dir={out}",
        f"data.local={shards}",
        f"model.init_from={source}",
        "run.progress=false",
    ):
        args += ["--set", e]
    for e in extra:
        args += ["--set", e]
    return args


def finetune_cfg(source, *extra: str):
    """The fine-tune config (no data read), init_from `source`, its output dir a fresh one (a run dir holding a
    checkpoint would resume, and not need the source)."""
    fresh = f"run.output_dir={Path(source).parent / 'no_run_here'}"
    return load_config(FINETUNE, [f"model.init_from={source}", fresh, *extra])


def backbone_state(model) -> dict:
    """A backbone's weights without its classifier, plus its position table (a buffer when sin-cos)."""
    b = getattr(model, "backbone", model)
    sd = {k: v.clone() for k, v in b.state_dict().items() if not k.startswith("head.")}
    if "pos_embed" not in sd and isinstance(getattr(b, "pos_embed", None), torch.Tensor):
        sd["pos_embed"] = b.pos_embed.clone()
    return sd


def assert_same(a: dict, b: dict, atol: float = 0.0) -> None:
    """Same keys; tensors equal (to `atol`: 0 = bit for bit)."""
    assert sorted(a) == sorted(b)
    for k in a:
        if atol:
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=lambda m, k=k: f"{k}: {m}")
        else:
            assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def mae_run(tmp_path_factory, digits_shards):
    """configs/mae_tiny.yaml, 4 steps, checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("init_from") / "mae"
    assert main(tiny_args(out, digits_shards, "train.max_steps=4", "checkpoint.interval=2")) == 0
    return out


def capture_step0(monkeypatch) -> dict:
    """The trained model's backbone as the engine receives it (after init_from, before any step)."""
    seen, real = {}, pretrain.engine.build_engine

    def spy(model, cfg, ctx):
        seen.update(backbone_state(model))
        return real(model, cfg, ctx)

    monkeypatch.setattr(pretrain.engine, "build_engine", spy)
    return seen


@pytest.mark.parametrize("where", ["run_dir", "checkpoint"])
def test_finetune_starts_at_the_pretrained_backbone(
    tmp_path, digits_shards, mae_run, monkeypatch, capsys, where
):
    source = mae_run if where == "run_dir" else mae_run / "checkpoints" / "step_00000002"
    step0 = capture_step0(monkeypatch)
    assert main(finetune_args(tmp_path / "ft", digits_shards, source, "train.max_steps=2")) == 0
    pretrained, meta = export.load_checkpoint_model(source)
    assert meta["step"] == (4 if where == "run_dir" else 2)
    assert_same(step0, backbone_state(pretrained))  # the sin-cos table started the learned one, exactly
    other, _ = export.load_checkpoint_model(mae_run / "checkpoints" / "step_00000002")
    if where == "run_dir":  # the run dir's latest checkpoint, not another
        assert not torch.equal(step0["blocks.0.attn.qkv.weight"], other.backbone.blocks[0].attn.qkv.weight)
    log = capsys.readouterr().out
    assert f"model.init_from: source: Tessera checkpoint {meta['checkpoint']} (step {meta['step']}" in log
    assert "model.init_from: loaded 30 backbone tensors" in log
    assert "model.init_from: starts fresh: the head (head.bias, head.weight)" in log
    assert "pos_embed: the source's fixed sin-cos table starts the learned one" in log
    rows = read_metrics(tmp_path / "ft")
    assert [r["step"] for r in rows] == [1, 2] and all(0 <= r["acc"] <= 1 for r in rows)


@pytest.mark.parametrize("switch", ["tome_r=2", "evit_keep_rate=0.5"])
def test_finetune_with_token_reduction_from_a_plain_run(
    tmp_path, digits_shards, mae_run, monkeypatch, capsys, switch
):
    """ToMe's MAE recipe: fine-tune with merging (or EViT pruning) from weights pretrained without. The weights
    mean the same thing; the switch is a note in the log, not a mismatch."""
    key, value = switch.split("=")
    step0 = capture_step0(monkeypatch)
    kwargs = f'model.kwargs={{"pos_embed": "learned", "{key}": {value}}}'
    assert main(finetune_args(tmp_path / "ft", digits_shards, mae_run, "train.max_steps=2", kwargs)) == 0
    pretrained, _ = export.load_checkpoint_model(mae_run)
    assert_same(step0, backbone_state(pretrained))
    log = capsys.readouterr().out
    default = {"tome_r": "0", "evit_keep_rate": "1.0"}[key]
    assert f"settings that differ from the source (the weights fit): {key} {default} -> {value}" in log
    tuned, _ = export.load_checkpoint_model(tmp_path / "ft")
    assert str(getattr(tuned.backbone, key)) == value


def test_continued_pretraining_keeps_the_objective_fresh(mae_run):
    """MAE from an MAE run: the encoder is loaded, the decoder (outside the backbone) keeps its own init."""
    cfg = load_config(ROOT / "configs" / "mae_tiny.yaml", [f"model.init_from={mae_run}"])
    model = build_model(cfg)
    decoder = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    lines = init_from(model, cfg)
    pretrained, _ = export.load_checkpoint_model(mae_run)
    assert_same(backbone_state(model), backbone_state(pretrained))
    assert_same(decoder, model.decoder.state_dict())
    assert not torch.equal(decoder["pred.weight"], pretrained.decoder.pred.weight)
    assert "objective modules outside the backbone start fresh: decoder" in lines


@pytest.mark.slow
def test_from_deepspeed_zero2_run_into_zero3_finetune(tmp_path, digits_shards):
    """A ZeRO-2 run (2 ranks) is consolidated as the source; the fine-tune runs under ZeRO-3 (init_from before the
    engine partitions the model). With lr 0 its first checkpoint holds exactly what init_from loaded."""
    ds = ("engine.backend=deepspeed", "train.max_steps=4", "checkpoint.interval=4")
    torchrun(2, tiny_args(tmp_path / "zero2", digits_shards, *ds, "engine.zero_stage=2"))
    proc = torchrun(
        2,
        finetune_args(
            tmp_path / "ft",
            digits_shards,
            tmp_path / "zero2",
            *(
                "engine.backend=deepspeed",
                "engine.zero_stage=3",
                "train.max_steps=1",
                "checkpoint.interval=1",
            ),
            *("optim.lr=0", "optim.warmup_steps=0"),
        ),
    )
    assert "engine=deepspeed (ZeRO-3, fp32)" in proc.stdout
    assert (
        "model.init_from: source: Tessera checkpoint" in proc.stdout and "deepspeed, ZeRO-2)" in proc.stdout
    )
    assert proc.stdout.count("model.init_from: loaded 30 backbone tensors") == 1  # logged on rank 0
    source, _ = export.load_checkpoint_model(tmp_path / "zero2")
    tuned, meta = export.load_checkpoint_model(tmp_path / "ft")
    assert meta["zero_stage"] == 3
    assert_same(backbone_state(tuned), backbone_state(source))


# --- Hugging Face folders -------------------------------------------------------------------------------------


@pytest.mark.parametrize("folder", ["", "encoder"])
def test_from_a_folder_exported_by_pretrain_export(tmp_path, mae_run, folder):
    """`python -m pretrain.export` writes ViTMAEForPreTraining (1 channel, as trained) and encoder/ (ViTModel taking
    RGB, marked gray_from_rgb: imported back as the 1-channel encoder)."""
    assert export.main([str(mae_run), str(tmp_path / "hf")]) == 0
    cfg = finetune_cfg(tmp_path / "hf" / folder)
    model = build_model(cfg)
    lines = init_from(model, cfg)
    pretrained, _ = export.load_checkpoint_model(mae_run)
    # encoder/'s input conv went through rgb_from_gray and back (w * 0.299 + w * 0.587 + w * 0.114): rounding
    assert_same(backbone_state(model), backbone_state(pretrained), atol=1e-6 if folder else 0.0)
    assert lines[0] == f"source: Hugging Face folder {tmp_path / 'hf' / folder}"


HF_CASES = [("vit", "vit_test_patch4", "ViTModel"), ("swin", "swin_test", "SwinModel")]
HF_CASES += [("convnext", "convnext_test", "ConvNextModel")]


@pytest.mark.parametrize("family, name, arch", HF_CASES)
def test_from_a_folder_written_by_transformers(tmp_path, family, name, arch):
    """transformers' own model (RGB, its own init, perturbed), saved by save_pretrained; the digits run takes one
    channel, so the input convolution is folded: on a gray image Tessera computes what HF computes on it as RGB."""
    tf = import_transformers()
    adapter = HF_ADAPTERS.get(family)
    config = adapter.hf_config(create_model(name, in_chans=3, img_size=32))  # a Tessera size, as HF spells it
    kwargs = {"add_pooling_layer": False} if arch == "ViTModel" else {}  # ViT's pooler is not imported
    torch.manual_seed(0)
    hf = trained_like(getattr(tf, arch)(config, **kwargs))
    hf.save_pretrained(tmp_path / "hf")
    cfg = finetune_cfg(tmp_path / "hf", f"model.name={name}", "model.kwargs={}", "data.image_size=32")
    model = build_model(cfg)
    lines = init_from(model, cfg)
    assert any("folded" in line and "(RGB weights summed" in line for line in lines), lines
    x = torch.randn(2, 1, 32, 32)
    backbone = model.backbone.eval()
    with torch.no_grad():
        theirs = adapter.hf_outputs(hf, x.expand(-1, 3, -1, -1))
        feats = backbone.forward_features(x)
        torch.testing.assert_close(feats, theirs["features"], atol=1e-5, rtol=0)
        torch.testing.assert_close(
            backbone.forward_head(feats, pre_logits=True), theirs["pooled"], atol=1e-5, rtol=0
        )


# --- ViT position tables ------------------------------------------------------------------------------------


@pytest.fixture
def vit16_hf(tmp_path):
    """A 16 px ViT with a learned (perturbed) position table, as an HF folder."""
    torch.manual_seed(0)
    vit = trained_like(create_model("vit_test_patch4", img_size=16, in_chans=1))
    export.to_hf(vit, tmp_path / "vit16")
    return vit, tmp_path / "vit16"


def test_vit_position_table_follows_the_image_size(vit16_hf):
    vit, folder = vit16_hf
    src = vit.pos_embed.detach()  # (1, 1 + 4*4, 32)
    same_cfg = finetune_cfg(folder)
    same = build_model(same_cfg)
    assert not any("interpolated" in line for line in init_from(same, same_cfg))
    assert_same(backbone_state(same), backbone_state(vit))  # a same-size load is exact
    cfg = finetune_cfg(folder, "data.image_size=32")
    model = build_model(cfg)
    lines = init_from(model, cfg)
    assert "pos_embed: interpolated (1, 17, 32) -> (1, 65, 32) (bicubic, cls row kept)" in lines
    table = model.backbone.pos_embed.detach()
    assert table.shape == (1, 1 + 8 * 8, 32)
    assert torch.equal(table[:, 0], src[:, 0])  # the cls row is kept
    grid = src[0, 1:].reshape(4, 4, 32).permute(2, 0, 1)  # (D, 4, 4): row-major patches
    want = F.interpolate(grid[None], size=(8, 8), mode="bicubic", align_corners=False)[0]  # (D, 8, 8)
    torch.testing.assert_close(table[0, 1:], want.permute(1, 2, 0).reshape(64, 32), atol=1e-6, rtol=0)
    rest = {k: v for k, v in backbone_state(model).items() if k != "pos_embed"}
    assert_same(rest, {k: v for k, v in backbone_state(vit).items() if k != "pos_embed"})


def test_interpolate_pos_embed_keeps_prefix_and_a_constant_grid():
    table = torch.cat([torch.randn(1, 1, 8), torch.full((1, 9, 8), 0.5)], dim=1)  # (1, 1 + 3*3, 8)
    out = interpolate_pos_embed(table, 5)
    assert out.shape == (1, 26, 8) and torch.equal(out[:, :1], table[:, :1])
    torch.testing.assert_close(out[:, 1:], torch.full((1, 25, 8), 0.5))
    with pytest.raises(ValueError, match="not a square grid"):
        interpolate_pos_embed(torch.zeros(1, 1 + 8, 4), 3)


def test_learned_source_into_sincos_target_is_refused(vit16_hf):
    _, folder = vit16_hf
    cfg = finetune_cfg(folder, "model.kwargs.pos_embed=sincos")
    with pytest.raises(ConfigError, match=r"fixed sin-cos table \(model.kwargs.pos_embed=learned"):
        init_from(build_model(cfg), cfg)


# --- errors ---------------------------------------------------------------------------------------------------


def refused(cfg, *patterns: str) -> str:
    """init_from fails with a ConfigError whose message holds every pattern, and leaves the model as it was."""
    model = build_model(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError) as info:
        init_from(model, cfg)
    msg = str(info.value)
    for p in ("model.init_from", "nothing was loaded", *patterns):
        assert p in msg, (p, msg)
    assert_same(before, model.state_dict())
    return msg


def test_another_family_is_refused(tmp_path):
    swin = create_model("swin_test", in_chans=1)
    export.to_hf(swin, tmp_path / "swin")
    cfg = finetune_cfg(tmp_path / "swin", "model.name=convnext_test", "model.kwargs={}", "data.image_size=32")
    msg = refused(
        cfg,
        "another family: SwinTransformer (source) vs ConvNeXt (target)",
        f"Hugging Face folder {tmp_path / 'swin'} (SwinTransformer) does not fit model.name 'convnext_test' (ConvNeXt)",
        "missing in the source (",
        "stages.0.blocks.0.dwconv.weight (16, 1, 7, 7)",
    )
    assert "stages.0.blocks.0.attn.relative_position_bias_table (9, 1)" in msg
    ours = {k for k in create_model("convnext_test", in_chans=1).state_dict() if not k.startswith("head.")}
    theirs = set(swin.state_dict())
    missing, extra = len(ours - theirs), len(theirs - ours)
    assert missing > 10 and extra > 10  # listed: the first 10 and the count
    assert f"missing in the source ({missing}): " in msg and f"(and {missing - 10} more)" in msg
    assert f"not in the target ({extra}): " in msg and f"(and {extra - 10} more)" in msg


def test_another_width_or_head_count_is_refused(vit16_hf):
    _, folder = vit16_hf
    msg = refused(
        finetune_cfg(folder, "model.kwargs.embed_dim=64"),
        "shape differs (",
        "cls_token (1, 1, 32) (source) vs (1, 1, 64) (target)",
        "patch_embed.proj.weight (32, 1, 4, 4) (source) vs (64, 1, 4, 4) (target)",
    )
    assert "(and " in msg  # 30 tensors differ: the first 10 and the count
    refused(
        finetune_cfg(folder, "model.kwargs.num_heads=4"),
        "architecture differs (1): num_heads 2 (source) vs 4",
    )


def test_other_channel_counts_are_refused(tmp_path):
    export.to_hf(create_model("convnext_test", in_chans=1), tmp_path / "gray")
    cfg = finetune_cfg(
        tmp_path / "gray", "model.name=convnext_test", "model.kwargs={in_chans: 3}", "data.image_size=32"
    )
    refused(cfg, "in_chans: 1 (source) vs 3 (target); only 3 -> 1 folds")


def test_the_shipped_config_reads_what_mae_tiny_writes(tmp_path, mae_run, monkeypatch):
    """configs/classify_init_tiny.yaml as shipped: init_from runs/mae_tiny, relative to where it is launched."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="model.init_from: 'runs/mae_tiny' does not exist"):
        load_config(FINETUNE)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "mae_tiny").symlink_to(mae_run)
    cfg = load_config(FINETUNE)
    assert cfg.model.init_from == "runs/mae_tiny"
    assert "loaded 30 backbone tensors" in init_from(build_model(cfg), cfg)[1]


def test_missing_or_unreadable_path_is_a_config_error(tmp_path, mae_run):
    with pytest.raises(ConfigError, match=r"model.init_from: '.*nowhere' does not exist"):
        finetune_cfg(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="model.init_from: .* is not a Tessera run directory"):
        finetune_cfg(tmp_path / "empty")
    with pytest.raises(ConfigError, match="is a file"):
        finetune_cfg(mae_run / "config.yaml")
    assert finetune_cfg(mae_run).model.init_from == str(mae_run)
    assert main(finetune_args(tmp_path / "ft", "unused", tmp_path / "nowhere")) == 2  # the CLI: exit 2


# --- resume and export ----------------------------------------------------------------------------------------


def test_resume_does_not_reapply_init_from(tmp_path, digits_shards, mae_run, capsys):
    """A fine-tune stopped and resumed matches an uninterrupted one step for step; the resume reads only its own
    checkpoint, even with the source gone; and its export never needs the source."""
    source = tmp_path / "source"
    shutil.copytree(mae_run, source)
    steps = ("train.max_steps=4", "checkpoint.interval=2")
    assert main(finetune_args(tmp_path / "ref", digits_shards, source, *steps)) == 0
    assert main(finetune_args(tmp_path / "cut", digits_shards, source, *steps, "train.stop_at_step=2")) == 0
    shutil.rmtree(source)
    capsys.readouterr()
    assert main(finetune_args(tmp_path / "cut", digits_shards, source, *steps)) == 0
    log = capsys.readouterr().out
    assert "resumed from" in log and "model.init_from" not in log
    assert [r["loss"] for r in read_metrics(tmp_path / "cut")] == [
        r["loss"] for r in read_metrics(tmp_path / "ref")
    ]
    with pytest.raises(ConfigError, match="does not exist"):  # a fresh run does need it
        finetune_cfg(source, f"run.output_dir={tmp_path / 'fresh'}")
    assert export.main([str(tmp_path / "cut"), str(tmp_path / "hf")]) == 0
    tuned, _ = export.load_checkpoint_model(tmp_path / "cut")
    back = export.from_hf(tmp_path / "hf")  # a grayscale run's export imports back as the 1-channel model
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(back(x), tuned.backbone(x), atol=1e-5, rtol=0)
