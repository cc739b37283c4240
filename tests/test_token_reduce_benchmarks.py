"""benchmarks/token_reduce.py and benchmarks/token_reduce_quality.py at toy sizes: every setting gets numbers, the
token counts are the switches', and the quality run's table compares each setting with the plain model."""

import json
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import token_reduce  # noqa: E402
import token_reduce_quality  # noqa: E402

FASHION = Path(
    "/usr/share/datasets/fashion-mnist"
)  # scripts/setup.sh installs it (Debian dataset-fashion-mnist)


def test_throughput_table(capsys):
    argv = ["--model", "vit_test_patch4", "--batch", "2", "--steps", "1", "--tome", "4", "--evit", "0.5"]
    assert token_reduce.main(argv) == 0
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| ") and "---" not in r][1:]
    assert [r.split(" | ")[0] for r in rows] == ["| plain", "| tome_r=4", "| evit_keep_rate=0.5"]
    left = [int(r.split(" | ")[1]) for r in rows]
    assert left[0] == 65 and left[1] == 65 - 2 * 4 and left[2] < left[0]  # 2 blocks merge 4 each; EViT prunes


@pytest.mark.slow  # three short trainings, a probe and three whole-test-split scorings of Fashion-MNIST: ~3 min
@pytest.mark.skipif(not FASHION.exists(), reason="apt-get install dataset-fashion-mnist")
def test_quality_run_end_to_end(tmp_path):
    out = tmp_path / "q"
    argv = ["--out", str(out), "--pretrain-steps", "4", "--finetune-steps", "2", "--probe-samples", "200"]
    assert token_reduce_quality.main(argv + ["--timed-steps", "1", "--tome", "16", "--evit", "0.5"]) == 0
    r = json.loads((out / "token_reduce_quality.json").read_text())
    assert list(r["settings"]) == ["plain", "tome_r=16", "evit_keep_rate=0.5"]
    left = {k: v["tokens_left"] for k, v in r["settings"].items()}
    assert left["plain"] == 197 and left["tome_r=16"] == 197 - 4 * 16 and left["evit_keep_rate=0.5"] < 100
    for v in r["settings"].values():
        assert 0 <= v["linear_probe"] <= 1 and 0 <= v["knn"] <= 1 and v["finetune_test_images"] == 10000
        assert v["img_per_s"] > 0 and v["speedup"] > 0
    assert r["settings"]["plain"]["speedup"] == 1.0
    for name in ("plain", "tome_r16", "evit_keep_rate0.5"):  # each fine-tune ran with its own switch
        cfg = (out / f"finetune_{name}" / "config.yaml").read_text()
        assert ("tome_r: 16" in cfg) == (name == "tome_r16")
        assert ("evit_keep_rate: 0.5" in cfg) == (name == "evit_keep_rate0.5")
        assert f"init_from: {out / 'mae'}" in cfg
