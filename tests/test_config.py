import dataclasses

import pytest
import yaml

from models import MODELS, create_model, list_models
from models.registry import Registry
from pretrain.build import load_config
from pretrain.config import Config, ConfigError, to_yaml
from pretrain.objectives import OBJECTIVES
from tests.conftest import ROOT, TINY

REQUIRED_KEYS = [
    "run.output_dir",
    "seed",
    "train.max_steps",
    "train.micro_batch_size",
    "train.grad_accum_steps",
    "checkpoint.interval",
    "checkpoint.keep_last",
    "engine.backend",
    "engine.zero_stage",
    "engine.precision",
]


def get(cfg, dotted):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def test_required_keys_exist_and_override():
    cfg = load_config(TINY)
    for key in REQUIRED_KEYS:
        get(cfg, key)  # AttributeError if a key users script against disappears
    cfg = load_config(
        TINY,
        [
            "train.max_steps=7",
            "engine.backend=deepspeed",
            "engine.zero_stage=3",
            "engine.precision=bf16",
            "optim.lr=1e-4",
            "checkpoint.keep_last=5",
        ],
    )
    assert (cfg.train.max_steps, cfg.engine.zero_stage, cfg.engine.precision) == (7, 3, "bf16")
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.max_step=3", "'train.max_steps'"),
        ("trian.max_steps=3", "train"),
        ("objective.mask_ration=0.5", "objective.mask_ratio"),
        ("engine.zero_stag=2", "engine.zero_stage"),
    ],
)
def test_unknown_key_names_it_and_nearest(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, [override])
    msg = str(e.value)
    assert override.split("=")[0] in msg and fragment.strip("'") in msg


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.max_steps=abc", "train.max_steps"),
        ("train.max_steps=0", "train.max_steps"),
        ("engine.zero_stage=4", "engine.zero_stage"),
        ("engine.precision=fp16", "engine.precision"),
        ("engine.backend=fsdp", "engine.backend"),
        ("run.tensorboard=maybe", "run.tensorboard"),
        ("objective.mask_ratio=1.5", "objective.mask_ratio"),
        ("model.name=vit_tinyy", "model.name"),
        ("model.kwargs.embed_dimm=8", "embed_dimm"),
        ("objective.name=nope", "objective.name"),
        ("data.dataset=imagenet", "data.dataset"),
        ("seed=-1", "seed"),
        ("train.stop_at_step=0", "train.stop_at_step"),
        ("model.kwargs.depth='3'", "model.kwargs.depth"),
        ("data.image_size=18", "data.image_size"),
        ("model.kwargs.num_heads=3", "model.kwargs.num_heads"),
        ("engine.offload_optimizer=true", "engine.offload_optimizer"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(TINY, [override])


def test_deepspeed_bf16_needs_zero():
    with pytest.raises(ConfigError, match="engine.zero_stage"):
        load_config(TINY, ["engine.backend=deepspeed", "engine.zero_stage=0", "engine.precision=bf16"])
    load_config(TINY, ["engine.backend=deepspeed", "engine.zero_stage=1", "engine.precision=bf16"])


def test_zero_needs_deepspeed_and_missing_file():
    with pytest.raises(ConfigError, match="engine.zero_stage"):
        load_config(TINY, ["engine.zero_stage=2"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(ROOT / "configs" / "nope.yaml")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(TINY, ["train.max_steps=9", "optim.betas=[0.8, 0.9]"])
    path = tmp_path / "c.yaml"
    path.write_text(to_yaml(cfg))
    again = load_config(path)
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg)
    assert isinstance(again, Config)


def test_every_shipped_config_validates():
    configs = sorted((ROOT / "configs").glob("*.yaml"))
    assert any("mae" in p.name and "tiny" in p.name for p in configs)
    for path in configs:
        extra = ["model.init_from=null"]  # its source is another run's output (test_init_from.py)
        objective = yaml.safe_load(path.read_text()).get("objective", {})
        if objective.get("name") == "distill":
            extra.append("objective.teacher_outputs=null")  # written by save-teacher (tests/test_distill.py)
            teacher = objective.get("teacher")
            if teacher not in MODELS and not (ROOT / teacher).exists():  # a GPU recipe's placeholder folder
                extra += ["objective.teacher=convnext_test", 'objective.teacher_kwargs={"num_classes": 1000}']
        load_config(path, extra)


def test_registries():
    reg = Registry("thing")
    reg.register("a")(lambda: 1)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a")(lambda: 2)
    with pytest.raises(KeyError, match="Registered: a"):
        reg.get("b")
    with pytest.raises(KeyError, match="vit_tiny_patch16"):
        create_model("vit_tiny")
    assert {"vit_tiny_patch16", "vit_base_patch16", "vit_large_patch16"} <= set(list_models("vit_*"))
    assert list_models("vit_b*") == ["vit_base_patch16"]
    assert "mae" in OBJECTIVES and "vit_test_patch4" in MODELS
    with pytest.raises(TypeError, match="embed_dim"):
        create_model("vit_test_patch4", embed_dimm=3)


def test_the_config_is_a_leaf():
    """pretrain.config builds nothing: in a fresh interpreter it imports no model, objective, builder or torch."""
    import subprocess
    import sys

    code = (
        "import sys, pretrain.config\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pretrain', 'models', 'ops', 'torch')))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert eval(out.stdout) == [
        "pretrain",
        "pretrain.config",
        "pretrain.data",
        "pretrain.data.config",
        "pretrain.errors",
    ]
