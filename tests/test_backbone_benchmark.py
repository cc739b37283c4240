"""benchmarks/backbones_vs_twins.py at the CI sizes: every image family has a row, each row gives numbers (a twin's
with its float64 parity check, or none where no twin runs here), and the MFU column is a fraction of the peak."""

import sys

import pytest

from models import MODELS
from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import backbones_vs_twins as bt  # noqa: E402

pytestmark = pytest.mark.usefixtures("hf_offline")
NOT_BENCHED = {"MobileNetV2"}  # a distillation teacher (ImageNet weights), not a backbone Tessera pretrains


def image_backbones() -> set[str]:
    names = {getattr(MODELS.get(n), "builds", None) for n in MODELS.names()}
    return {
        c.__name__
        for c in names
        if c is not None and getattr(c, "modality", "image") == "image" and c.__name__ not in NOT_BENCHED
    }


def test_every_image_family_has_a_benchmark_row():
    benched = {MODELS.get(name).builds.__name__ for name in bt.BASE.values()}
    assert benched == image_backbones()
    assert set(bt.TEST) == set(bt.BASE) and bt.NO_TWIN < set(bt.BASE)
    for family in bt.BASE:  # the CI size is the same class as the base size
        assert MODELS.get(bt.TEST[family]).builds is MODELS.get(bt.BASE[family]).builds


@pytest.mark.parametrize("family", list(bt.BASE))
def test_row_at_ci_size(family):
    args = bt.parse_args(["--size", "test", "--rounds", "1", "--batch", "2", "--warmup", "0"])
    row = bt.bench(family, args, peak_tflops=bt.device_peak_tflops(bt.torch.device("cpu"), "fp32")[0])
    assert row["model"] == bt.TEST[family] and row["ours"] > 0 and row["gflop_per_img"] > 0
    assert 0 < row["mfu"] < 1
    if family in bt.NO_TWIN:
        assert row["theirs"] is None and row["ratio"] is None and row["max_logit_diff"] is None
    else:
        assert row["theirs"] > 0 and row["ratio"] > 0 and row["max_logit_diff"] < 1e-6
