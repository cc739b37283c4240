"""benchmarks/text_context.py and benchmarks/text_vs_hf.py at toy sizes: every setting gives numbers, the JSON and
the markdown table are written, and the equal-work checks (losses to 1e-4) pass."""

import json
import sys

import pytest
import torch

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import text_context  # noqa: E402
import text_vs_hf  # noqa: E402

pytestmark = pytest.mark.usefixtures("hf_offline")


def test_packed_row_layout():
    lengths = text_context.doc_lengths(4096, seed=0)
    assert sum(lengths) == 4096 and len(lengths) > 2
    assert all(1 <= s <= 2048 for s in lengths)
    row = text_context.make_row(4096, 100, "gla", seed=0)
    assert row["keys"] == pytest.approx(sum(s * s for s in lengths) / 4096)
    starts = (row["positions"][0] == 0).nonzero().squeeze(1).tolist()
    assert len(starts) == len(lengths)
    t = text_context.targets_of(row)
    ends = [s - 1 for s in starts[1:]] + [4095]  # each document's last token predicts nothing
    assert (t[0, ends] == -100).all()
    assert (t[0, :-1] != -100).sum() == 4096 - len(lengths)


@pytest.mark.parametrize("variant", text_context.VARIANTS)
def test_text_context_setting(variant):
    spec = dict(dim=32, depth=2, heads=2, vocab=256, warmup=1, steps=2, budget=0.0, cold_after=60.0)
    spec.update(ckpt_from=64, seed=0, threads=None, n=64, variant=variant)
    r = text_context.run_setting(spec)
    assert r["checkpointing"] and r["step_times"] and not r["cold"]
    assert r["tokens_per_s"] > 0 and r["flops_per_step"] > 0
    assert r["peak_rss_mib"] >= r["base_rss_mib"] > 0
    assert r["docs"] == (1 if variant == "softmax_1doc" else len(text_context.doc_lengths(64, 0)))


def test_text_context_main(tmp_path):  # a child process per setting: ~15 s on the shared 2-core VM
    out = tmp_path / "tc.json"
    text_context.main(
        ["--contexts", "64", "--variants", "softmax_1doc", "gla", "--dim", "32", "--depth", "2"]
        + ["--heads", "2", "--vocab", "256", "--budget", "0", "--json", str(out)]
    )
    res = json.loads(out.read_text())
    assert [(r["variant"], r["n"]) for r in res["rows"]] == [("softmax_1doc", 64), ("gla", 64)]
    assert not [r for r in res["rows"] if "error" in r], res["rows"]
    assert res["matmul_tflops_start"] > 0 and all(min(r["matmul_tflops"]) > 0 for r in res["rows"])
    md = out.with_suffix(".md").read_text().splitlines()
    assert md[0].startswith("| tokens/row | attention |") and len(md) == 4
    assert "| 64 | softmax, 1 document | 1 |" in md[2] and "| 64 | gla |" in md[3]


@pytest.mark.slow  # 14-30 s on the shared 2-core VM (tokenizer training, HF twin, 1 s matmul probes)
def test_text_vs_hf_main(tmp_path):
    out = tmp_path / "tvh.json"
    text_vs_hf.main(
        ["--model", "llama_test", "--seqs", "32", "--steps", "1", "--rounds", "1", "--docs", "24"]
        + ["--pack-len", "256", "--rows", "2", "--vocab", "512", "--tokenizer-docs", "2000"]
        + ["--hf-batch", "matched", "8", "--data-dir", str(tmp_path / "data"), "--json", str(out)]
    )
    res = json.loads(out.read_text())
    (same,) = res["same"]
    assert same["loss_diff"] < 1e-4 and same["ratio"] > 0 and len(same["times"]["tessera"]) == 1
    p = res["packed"]
    assert p["loss_diff"] < 1e-4 and p["docs"] == 24
    names = list(p["variants"])
    assert names[0] == "tessera" and names[-1] == "hf_sdpa_b8" and len(names) == 3
    for name, v in p["variants"].items():
        assert 0 <= v["padding"] < 1 and v["real_tokens_per_s"] > 0
        assert name == "tessera" or v["ratio"] > 0
    assert p["variants"]["tessera"]["padding"] < p["variants"]["hf_sdpa_b8"]["padding"]
    md = out.with_suffix(".md").read_text()
    assert "| 32 × 1 |" in md and "Tessera packed (2 × 256)" in md and "HF sdpa, padded (8 docs)" in md


def test_packing_refuses_cut_documents():
    args = text_vs_hf.parse_args(["--pack-len", "4", "--rows", "1"])
    docs = [torch.arange(3), torch.arange(6)]
    with pytest.raises(ValueError, match="--pack-len 4 is shorter than"):
        text_vs_hf.packed_batches(docs, 0, args)
    args = text_vs_hf.parse_args(["--pack-len", "8", "--rows", "2"])
    (batch,) = text_vs_hf.packed_batches(docs, 0, args)
    assert batch["doc_ids"].tolist() == [[0, 0, 0, -1, -1, -1, -1, -1], [0] * 6 + [-1, -1]]
    (padded,) = text_vs_hf.padded_batches(docs, 0, 2)
    assert padded["attention_mask"].sum() == 9 and (padded["labels"] == -100).sum() == 3
