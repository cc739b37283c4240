"""`python -m pretrain.recipe`: pretraining, probe (pretrained / random init / raw pixels, linear and kNN) and the
two fine-tunes at the same budget, end to end on digits with the tiny configs."""

import json
import sys

import yaml

from tests.conftest import launch


def test_recipe_runs_every_stage_and_reports_every_number(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "pretrain.recipe", "configs/mae_tiny.yaml", "--ranks", "1"]
    cmd += ["--finetune", "configs/classify_tiny.yaml", "--probe-samples", "300"]
    cmd += ["--set", f"run.output_dir={run}", "--set", "train.max_steps=4", "--set", "run.progress=false"]
    proc = launch(cmd, timeout=600)
    result = json.loads((run / "recipe.json").read_text())
    for key in ("pretrained", "random_init", "raw_pixels"):  # linear probe and kNN of each
        assert 0.0 <= result["probe"][key] <= 1.0 and 0.0 <= result["probe"][f"{key}_knn"] <= 1.0, key
    ft = result["finetune"]
    for key in ("from_pretrained", "from_scratch"):
        assert 0.0 <= ft[key]["test_accuracy"] <= 1.0 and ft[key]["test_images"] > 0, key
    # the same architecture, data and budget for both; only the start differs
    pre, scratch = (yaml.safe_load((run / f"finetune_{k}" / "config.yaml").read_text()) for k in ft)
    assert pre["model"]["init_from"] == str(run) and scratch["model"]["init_from"] is None
    pre["model"]["init_from"] = None
    pre["run"], scratch["run"] = None, None
    assert pre == scratch
    assert pre["model"]["name"] == "vit_test_patch4" and pre["data"]["image_size"] == 16
    assert "model.init_from: loaded" in proc.stdout + proc.stderr
    assert "[recipe]   from scratch" in proc.stdout
