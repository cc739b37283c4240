"""benchmarks/contrastive_memory.py, benchmarks/clip_vs_hf.py and benchmarks/patch_dropout.py at toy sizes: every point gives numbers, the JSON and
the markdown table are written, the full and GradCache steps see the same batch loss, and the CLIPModel twin's
parity check passes on the converted weights and fails on changed ones."""

import json
import sys

import pytest
import torch

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import clip_vs_hf  # noqa: E402
import contrastive_memory  # noqa: E402
import patch_dropout  # noqa: E402

pytestmark = pytest.mark.usefixtures("hf_offline")

SPEC = dict(
    micro=8, model="clip_test", img_size=32, vocab=100, text_len=8, warmup=0, steps=1, budget=0.0,
    cold_after=60.0, seed=0, threads=None,
)  # fmt: skip


def test_batch_layout():
    b = contrastive_memory.make_batch(16, SPEC)
    ids, mask = b["input_ids"], b["attention_mask"]
    assert b["image"].shape == (16, 3, 32, 32) and ids.shape == mask.shape == (16, 8)
    assert (ids[:, 0] == 98).all()  # BOS = vocab - 2
    assert ((ids == 99).sum(1) == 1).all()  # one EOS a row, at its last real token
    last = mask.sum(1) - 1
    assert (ids[torch.arange(16), last] == 99).all()
    assert (ids[mask == 0] == 0).all() and (mask.sum(1) >= 3).all()
    parts = contrastive_memory.split(b, 2)
    assert [p["image"].shape[0] for p in parts] == [8, 8]
    assert parts[1]["input_ids"].data_ptr() == ids[8:].data_ptr()  # views, no copy


def test_full_and_cached_points_agree():
    """One micro-batch of 16 vs two of 8 (GradCache): the same loss over the same batch, numbers in every field."""
    full = contrastive_memory.run_point({**SPEC, "n": 16, "mode": "full"})
    cached = contrastive_memory.run_point({**SPEC, "n": 16, "mode": "cached"})
    assert (full["micro_batches"], cached["micro_batches"]) == (1, 2)
    assert cached["first_loss"] == pytest.approx(full["first_loss"], rel=1e-5)
    for r in (full, cached):
        assert r["samples_per_s"] > 0 and r["samples_per_cpu_s"] > 0 and r["step_times"] and not r["cold"]
        assert r["peak_rss_mib"] >= r["base_hw_mib"] > 0 and r["base_rss_mib"] > 0  # high-water: monotonic
    loss = contrastive_memory.run_point({**SPEC, "n": 16, "mode": "loss"})
    assert loss["logits_mib"] == pytest.approx(2 * 16 * 16 * 4 / 2**20)
    assert loss["first_loss"] > 0


def test_contrastive_memory_main(tmp_path):  # three child processes: ~15 s on the shared 2-core VM
    out = tmp_path / "mem.json"
    modes = ["full", "cached", "chunked"]
    res = contrastive_memory.main(
        ["--batches", "16", "--micro", "8", "--modes", *modes, "--vocab", "100", "--text-len", "8"]
        + ["--steps", "1", "--warmup", "0", "--budget", "0", "--json", str(out)]
    )
    rows = json.loads(out.read_text())["rows"]
    assert rows == res["rows"] and not [r for r in rows if "error" in r], rows
    assert [(r["n"], r["mode"], r["micro_batches"]) for r in rows] == [
        (16, m, k) for m, k in zip(modes, (1, 2, 2))
    ]
    for r in rows[1:]:  # the same batch loss in fresh processes, cached and with the loss chunked too
        assert r["first_loss"] == pytest.approx(rows[0]["first_loss"], rel=1e-5)
    md = out.with_suffix(".md").read_text().splitlines()
    assert md[0].startswith("| global batch | micro-batches of 8 |") and len(md) == 3
    assert md[2].startswith("| 16 | 2 | ") and "| — | " in md[2]  # no loss-only point asked for


def test_batches_must_split_into_micro_batches():
    with pytest.raises(SystemExit):
        contrastive_memory.parse_args(["--batches", "24", "--micro", "16"])


def test_clip_vs_hf_main(tmp_path):
    out = tmp_path / "clip.json"
    res = clip_vs_hf.main(
        ["--model", "clip_test", "--batch", "2", "--image-size", "32", "--depth", "1", "--steps", "2"]
        + ["--warmup", "0", "--json", str(out)]
    )
    assert res["depth"] == 1 and res["image_size"] == 32
    assert max(res["parity"]["diffs"].values()) < clip_vs_hf.TOLERANCE
    assert len(res["tessera"]["times"]) == len(res["hf_sdpa"]["times"]) == 2
    assert res["ratio_best"] > 0 and res["ratio_median"] > 0 and res["ratio_cpu"] > 0
    assert json.loads(out.read_text())["ratio_best"] == res["ratio_best"]
    md = out.with_suffix(".md").read_text().splitlines()
    assert md[0].startswith("| model | batch |") and md[2].startswith("| clip_test (")


def test_clip_vs_hf_parity_catches_different_weights():
    args = clip_vs_hf.parse_args(["--model", "clip_test", "--batch", "3", "--image-size", "32"])
    ours, hf = clip_vs_hf.build_pair(args)
    assert type(hf).__name__ == "CLIPModel"
    batch = clip_vs_hf.make_batch(ours.backbone, 3, seed=1)
    clip_vs_hf.check_parity(ours, hf, batch, args)
    with torch.no_grad():
        hf.text_projection.weight[0, 0] += 0.01  # one weight of one tower
    with pytest.raises(AssertionError, match="differ beyond"):
        clip_vs_hf.check_parity(ours, hf, batch, args)


def test_patch_dropout_benchmark(capsys, tmp_path, monkeypatch):
    """One timed step per rate on clip_tiny: a row per rate, fewer image tokens kept as the rate grows."""
    monkeypatch.chdir(tmp_path)
    config = str(ROOT / "configs" / "clip_tiny.yaml")
    assert patch_dropout.main(["--config", config, "--rates", "0.5", "--steps", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 0")]
    assert [r.split("|")[2].strip() for r in rows] == ["64 of 64", "32 of 64"]
