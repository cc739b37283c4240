"""Parameter groups: weight-decay exemptions and layer-wise LR decay from the backbone's group_matcher."""

import os
import sys

import pytest
import torch

from models import create_model
from pretrain.build import build_model, load_config
from pretrain.dist import DistContext
from pretrain.engine import build_engine
from pretrain.objectives.mae import MAE, MAEConfig
from pretrain.optim import layer_ids, lr_at, param_groups
from tests.conftest import ROOT, launch


def test_layer_ids_follow_depth():
    vit = create_model("vit_test_patch4")  # 2 blocks: stem 0, blocks 1-2, head 3
    ids = layer_ids(vit)
    assert ids["cls_token"] == ids["patch_embed.proj.weight"] == 0
    assert ids["blocks.0.attn.qkv.weight"] == 1 and ids["blocks.1.mlp.fc2.bias"] == 2
    assert ids["norm.weight"] == 3


def test_layer_decay_scales_lr_by_depth_and_spares_the_objective_heads():
    vit = create_model("vit_test_patch4")
    mae = MAE(vit, MAEConfig(decoder_dim=32, decoder_depth=1, decoder_heads=2))
    groups = param_groups(mae, weight_decay=0.05, layer_decay=0.5)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    wd = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    named = dict(mae.named_parameters())
    assert len(scale) == len(named)  # every parameter once
    assert scale[id(named["backbone.patch_embed.proj.weight"])] == 0.5**3
    assert scale[id(named["backbone.blocks.0.attn.qkv.weight"])] == 0.5**2
    assert scale[id(named["backbone.blocks.1.attn.qkv.weight"])] == 0.5
    assert scale[id(named["backbone.norm.weight"])] == 1.0
    assert scale[id(named["decoder.pred.weight"])] == 1.0  # the objective's own decoder: full LR
    assert wd[id(named["backbone.blocks.0.attn.qkv.weight"])] == 0.05
    assert (
        wd[id(named["backbone.blocks.0.attn.qkv.bias"])] == 0.0 and wd[id(named["backbone.cls_token"])] == 0.0
    )


def test_no_layer_decay_is_two_groups():
    groups = param_groups(create_model("vit_test_patch4"), weight_decay=0.05)
    assert [(g["weight_decay"], g["lr_scale"]) for g in groups] == [(0.05, 1.0), (0.0, 1.0)]


def test_engine_applies_lr_scale():
    cfg = load_config(str(ROOT / "configs" / "mae_tiny.yaml"), ["optim.layer_decay=0.5"])
    engine = build_engine(build_model(cfg), cfg, DistContext())
    batch = {"image": torch.randn(2, 1, 16, 16)}
    engine.train_step([batch], lr=1e-3)
    lrs = sorted({g["lr"] for g in engine.optimizer.param_groups})
    assert lrs[-1] == pytest.approx(1e-3) and lrs[0] == pytest.approx(1e-3 * 0.5**3)


def test_lr_schedule_warmup_then_cosine():
    kw = dict(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110, schedule="cosine")
    assert lr_at(5, **kw) == pytest.approx(0.5)
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.55)
    assert lr_at(110, **kw) == pytest.approx(0.1)


def test_deepspeed_engine_applies_lr_scale():
    """DeepSpeed's ZeRO optimizer keeps the groups' lr_scale (one process, gloo, in a subprocess so its process
    group does not outlive the test)."""
    script = (
        "import torch\n"
        "from pretrain.build import build_model\n"
        "from pretrain.build import load_config\n"
        "from pretrain.dist import init_distributed\n"
        "from pretrain.engine import build_engine\n"
        f"cfg = load_config({str(ROOT / 'configs' / 'mae_tiny.yaml')!r}, ['optim.layer_decay=0.5', "
        "'engine.backend=deepspeed', 'engine.zero_stage=2'])\n"
        "engine = build_engine(build_model(cfg), cfg, init_distributed())\n"
        "engine.train_step([{'image': torch.randn(16, 1, 16, 16)}], lr=1e-3)\n"
        "print('LRS', sorted({g['lr'] for g in engine.optimizer.param_groups}))\n"
    )
    env = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 1000), RANK="0", WORLD_SIZE="1")
    out = launch([sys.executable, "-c", script], env={**env, "LOCAL_RANK": "0"}).stdout
    lrs = [float(v) for v in out.split("LRS [")[1].split("]")[0].split(",")]
    assert lrs == pytest.approx([1e-3 * 0.5**3, 1e-3 * 0.5**2, 1e-3 * 0.5, 1e-3])
