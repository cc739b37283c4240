"""Image-text contrastive training end to end: the tiny configs train and resume bit-identically (GradCache and
FLIP patch dropout included), 2 ranks evaluate after a resume and at the last step without hanging, and bad
pairings are refused at load_config naming the key."""

from __future__ import annotations

import math

import pytest

from pretrain.build import load_config
from pretrain.config import ConfigError
from tests.conftest import ROOT, read_metrics

SMALL = ["data.max_samples=64", "train.micro_batch_size=8", "train.max_steps=6", "checkpoint.interval=3"]
SMALL += ["run.progress=false", "optim.warmup_steps=1"]


def args(config: str, out, *extra: str) -> list[str]:
    a = [str(ROOT / "configs" / config)]
    for o in (f"run.output_dir={out}", *SMALL, *extra):
        a += ["--set", o]
    return a


@pytest.mark.parametrize(
    "config,extra",
    [
        ("clip_tiny.yaml", ["objective.patch_dropout=0.5"]),
        ("siglip_tiny.yaml", ["objective.chunk_size=4"]),
        ("filip_tiny.yaml", []),
    ],
)
def test_tiny_config_resumes_bit_identically(tmp_path, monkeypatch, config, extra):
    """Stopped at step 3 and resumed = never stopped, loss for loss, with two micro-batches per step (GradCache's
    RNG replay) and, for CLIP, half the patches dropped at random (drawn from (seed, step, rank))."""
    from pretrain.train import main

    monkeypatch.chdir(tmp_path)  # the pairs are converted under ./data
    assert main(args(config, tmp_path / "a", *extra)) == 0
    assert main(args(config, tmp_path / "b", *extra, "train.stop_at_step=3")) == 0
    assert main(args(config, tmp_path / "b", *extra)) == 0
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert all(math.isfinite(r["loss"]) for r in a)
    assert all(0.0 < r["logit_scale"] <= 100.0 for r in a)  # exp of the clamped raw scale, logged every step
    if config.startswith("siglip"):
        assert a[0]["logit_bias"] == pytest.approx(-10.0, abs=0.1)


def test_patch_dropout_changes_the_step(tmp_path, monkeypatch):
    """The FLIP switch is live: the same run with and without patch dropout takes different steps."""
    from pretrain.train import main

    monkeypatch.chdir(tmp_path)
    common = ["train.max_steps=2", "checkpoint.interval=10"]
    assert main(args("clip_tiny.yaml", tmp_path / "a", *common)) == 0
    assert main(args("clip_tiny.yaml", tmp_path / "b", *common, "objective.patch_dropout=0.5")) == 0
    assert read_metrics(tmp_path / "a")[0]["loss"] != read_metrics(tmp_path / "b")[0]["loss"]


@pytest.mark.slow
def test_two_ranks_evaluate_after_a_resume_and_at_the_last_step(tmp_path):
    """2 gloo ranks, GradCache, eval in the loop: stop at step 3, resume; the evals at step 4 and at the last
    step (6) run on both ranks and finish (a hang fails the test at the timeout), as in the one run."""
    from tests.test_zeroshot import train_two_ranks

    common = (
        *SMALL,
        "train.micro_batch_size=4",
        "eval.interval=4",
        "eval.test_samples=24",
        "eval.batch_size=8",
    )
    config = str(ROOT / "configs" / "clip_tiny.yaml")
    out = tmp_path / "run"
    train_two_ranks(tmp_path, config, f"run.output_dir={out}", *common, "train.stop_at_step=3", timeout=300)
    train_two_ranks(tmp_path, config, f"run.output_dir={out}", *common, timeout=300)
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    evals = [r["step"] for r in rows if "eval/i2t_R@1" in r]
    assert evals == [4, 6]
    assert all(0.0 <= r["eval/zeroshot_top1"] <= 1.0 for r in rows if "eval/zeroshot_top1" in r)


def test_bad_pairings_are_refused_naming_the_key():
    tiny = str(ROOT / "configs" / "clip_tiny.yaml")
    with pytest.raises(ConfigError, match="data.dataset"):
        load_config(tiny, ["data.dataset=digits", "data.max_samples=null"])  # a two-tower model on images
    with pytest.raises(ConfigError, match="objective.name: 'clip' cannot train model.name 'vit_test_patch4'"):
        load_config(tiny, ["model.name=vit_test_patch4"])
    with pytest.raises(ConfigError, match="init_logit_bias"):
        load_config(tiny, ["objective.name=siglip"])  # clip_test has no logit bias
    with pytest.raises(ConfigError, match="objective.patch_dropout"):
        load_config(tiny, ["objective.patch_dropout=1.0"])
    with pytest.raises(ConfigError, match="needs a ViT image tower"):
        load_config(
            tiny, ["objective.patch_dropout=0.5", "model.kwargs={image_tower: swin_test, image_kwargs: {}}"]
        )
    with pytest.raises(ConfigError, match="image_proj"):
        load_config(tiny, ["model.kwargs={image_proj: none, embed_dim: 48}"])  # the tower is 32 wide
    with pytest.raises(ConfigError, match="objective.impl"):
        load_config(str(ROOT / "configs" / "siglip_tiny.yaml"), ["objective.impl=bidir"])
