"""Text pretraining end to end through Tessera's one entry point (`pretrain.train.main`, or torchrun for several
ranks): the tiny CLM and MLM runs on packed WordNet rows, exact resume with packing, a 2-rank DeepSpeed ZeRO-3 run
checked against a replay of its own batches, elastic 2 -> 1 resume that neither repeats nor loses a document,
long rows (8k by default, 32k slow) with activation checkpointing, and the refusals of bad text configs.

Runs use one CPU thread (OMP_NUM_THREADS=1): the machines running the suite have two cores shared with other
jobs, where two threads per process are several times slower than one for these tiny models.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pretrain import export
from pretrain.train import main
from tests.conftest import ROOT, read_metrics, torchrun

CLM = str(ROOT / "configs" / "clm_tiny.yaml")
MLM = str(ROOT / "configs" / "mlm_tiny.yaml")
LONG = str(ROOT / "configs" / "clm_8k_tiny.yaml")
DOCS = 2000  # data.max_samples of the three configs: WordNet's first 2000 train synsets, one document each
LONGEST = 200  # tokens of the longest of them (its tessera.json says so; asserted in `wordnet`)
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def convert_wordnet(root: Path) -> str:
    """The configs' data (first 2000 WordNet train synsets, a 512-id BPE trained next to them) converted under
    `root`; returns the shard dir, for data.local."""
    from pretrain.data import DataConfig
    from pretrain.data.prepare import ensure_shards
    from pretrain.dist import DistContext

    cfg = DataConfig(
        dataset="wordnet", local=str(root / "train"), max_samples=DOCS, vocab_size=512, seq_len=128
    )
    shards = ensure_shards(cfg, DistContext())
    meta = json.loads((Path(shards) / "tessera.json").read_text())
    assert meta["documents"] == DOCS and meta["longest_document"] == LONGEST, meta
    return shards


def text_args(config: str, out: Path, shards: str, *extra: str) -> list[str]:
    args = [config]
    for s in (f"run.output_dir={out}", f"data.local={shards}", "run.progress=false", *extra):
        args += ["--set", s]
    return args


@pytest.fixture(scope="module")
def wordnet(tmp_path_factory) -> str:
    return convert_wordnet(tmp_path_factory.mktemp("wordnet"))


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """In-process runs on one thread (pretrain.dist leaves the count alone when OMP_NUM_THREADS is set)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def sample_rows(run: Path) -> dict[tuple[int, int], list[dict]]:
    """{(segment, rank): the sample log's lines in order} (pretrain.samplelog), one list per file."""
    out = {}
    for path in sorted((run / "samples").glob("seg_*_rank_*.jsonl")):
        _, seg, _, rank = path.stem.split("_")
        out[int(seg), int(rank)] = [json.loads(line) for line in path.read_text().splitlines()]
    return out


def loader_state(run: Path, step: int) -> dict:
    ckpt = run / "checkpoints" / f"step_{step:08d}" / "rank_state" / "rank_00000.pt"
    return torch.load(ckpt, weights_only=False)["loader"]


# ---------------------------------------------------------------------------------------------- 1. tiny runs


@pytest.mark.parametrize("config", [CLM, MLM], ids=["clm", "mlm"])
def test_tiny_text_run_learns_logs_and_checkpoints(tmp_path, wordnet, config):
    out = tmp_path / "run"
    assert main(text_args(config, out, wordnet, "run.sample_log=true")) == 0
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 21))
    first, last = sum(r["loss"] for r in rows[:5]) / 5, sum(r["loss"] for r in rows[-5:]) / 5
    assert last < first - 0.4, (first, last)  # it learns (both start near ln 512 = 6.24)
    assert abs(rows[0]["loss"] - math.log(512)) < 0.3  # a fresh model is near uniform over the vocabulary
    real_so_far = 0
    logged = {r["step"]: r["index"] for r in sample_rows(out)[0, 0] if "step" in r}
    for k, r in enumerate(rows, start=1):
        for key in ("packing_efficiency", "tokens_per_sec", "mfu", "mfu_doc", "real_tokens_per_sec"):
            assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert r["samples_seen"] == 8 * k
        # a packed row is data.seq_len token slots, and tokens/s counts them
        assert r["tokens_per_sec"] == pytest.approx(r["samples_per_sec"] * 128, rel=1e-9)
        # real (document) tokens of the step; padding fills the rest of its 8 x 128 slots
        real = round(r["real_tokens_per_sec"] * r["step_time"])
        assert 0 < real <= 8 * 128 and real == pytest.approx(
            r["real_tokens_per_sec"] * r["step_time"], abs=1e-6
        )
        real_so_far += real
        # packing efficiency: real tokens / row slots since the run began
        assert r["packing_efficiency"] == pytest.approx(real_so_far / (k * 8 * 128), rel=1e-12)
        assert r["mfu_doc"] < r["mfu"]  # documents attend within themselves only: fewer FLOPs than full rows
        if config == CLM:  # every document piece's last token has no next-token target
            assert r["tokens"] == real - len(logged[k]), (k, r["tokens"], real, len(logged[k]))
        else:  # mlm predicts ~30% of the non-special tokens
            assert 0.2 * real < r["masked"] < 0.4 * real, (k, r["masked"], real)
    assert 0.75 < rows[-1]["packing_efficiency"] < 1.0
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000010", "step_00000020"]
    assert (ckpts / "latest").read_text().strip() == "step_00000020"
    assert (ckpts / "step_00000020" / "config.yaml").read_text() == (out / "config.yaml").read_text()
    model, meta = export.load_checkpoint_model(out)
    assert meta["step"] == 20 and meta["loss"] == rows[-1]["loss"]
    assert type(model).__name__ == ("CLM" if config == CLM else "MLM")


# ---------------------------------------------------------------------------------------------- 2. resume


@pytest.mark.parametrize(
    "config, workers", [(CLM, 0), (CLM, 2), (MLM, 2)], ids=["clm-workers0", "clm-workers2", "mlm-workers2"]
)
def test_resume_with_packing_is_bit_identical(tmp_path, wordnet, config, workers):
    common = (f"data.num_workers={workers}", "run.sample_log=true", "run.tensorboard=false")
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(text_args(config, a, wordnet, *common)) == 0
    assert main(text_args(config, b, wordnet, *common, "train.stop_at_step=10")) == 0
    assert [r["step"] for r in read_metrics(b)] == list(range(1, 11))
    state = loader_state(b, 10)
    assert state["packing"]["ranks"][0]["pending"], (
        "nothing pending at the cut: the resume would prove little"
    )
    assert main(text_args(config, b, wordnet, *common)) == 0  # same output dir: resumes at step 10
    ra, rb = read_metrics(a), read_metrics(b)
    assert [r["step"] for r in rb] == list(range(1, 21))
    for key in ("loss", "grad_norm", "packing_efficiency", "acc"):
        assert [r[key] for r in ra] == [r[key] for r in rb], key
    # the same document pieces in the same rows at every step
    sa, sb = sample_rows(a), sample_rows(b)
    assert sorted(sb) == [(0, 0), (1, 0)] and sb[1, 0][0] == {"segment": 1, "resume_step": 10}
    assert [r for r in sa[0, 0] if "step" in r] == [r for r in sb[0, 0] + sb[1, 0] if "step" in r]
    wa, wb = export.load_checkpoint_model(a)[0].state_dict(), export.load_checkpoint_model(b)[0].state_dict()
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    init = export.load_checkpoint_model(b / "checkpoints" / "step_00000010")[0].state_dict()
    assert any(not torch.equal(wa[k], init[k]) for k in wa)  # the last 10 steps changed the weights


# ---------------------------------------------------------------------------------------------- 3. ZeRO-3


def replay_rows(shards: str, index: list[int], seq_len: int, rows: int) -> dict[str, torch.Tensor]:
    """The packed micro-batch that holds the documents `index` (a sample-log line), packed again from the
    shards: with no document longer than a row none is ever cut, so a micro-batch's rows depend only on its
    documents in order (a row ends where the next document does not fit)."""
    from streaming import LocalDataset

    from pretrain.data.packing import Packer

    data = LocalDataset(shards)
    packer = Packer(seq_len, pad_id=0)
    for i in index:
        packer.add(i, torch.from_numpy(data[i]["tokens"].astype("int64")))
    batch = packer.emit(rows, final=True)
    assert batch["input_ids"].shape == (rows, seq_len) and batch["index"].tolist() == index
    return batch


@pytest.mark.slow
@pytest.mark.usefixtures("hf_offline")
def test_deepspeed_zero3_two_ranks_trains_and_exports(tmp_path, wordnet):
    """2 ranks on CPU/gloo with ZeRO-3. The consolidated step-10 checkpoint, run on the rows each rank trained
    on at step 11 (rebuilt from the shards), gives the loss the run logged at step 11: the shards were gathered
    into the weights the run had. Then the run exports to a LlamaForCausalLM that transformers loads."""
    run, seq = tmp_path / "z3", 256  # rows longer than any document: none is cut, so rows can be rebuilt
    extra = ("engine.backend=deepspeed", "engine.zero_stage=3", "run.sample_log=true", f"data.seq_len={seq}")
    proc = torchrun(2, text_args(CLM, run, wordnet, *extra), env=ONE_THREAD)
    assert "world_size=2 launcher=torchrun" in proc.stdout
    assert "engine=deepspeed (ZeRO-3, fp32)" in proc.stdout
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 21)) and rows[-1]["samples_seen"] == 20 * 16
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5
    engine_files = sorted(p.name for p in (run / "checkpoints" / "step_00000010" / "engine").iterdir())
    assert [f for f in engine_files if "optim_states" in f] == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]
    assert loader_state(run, 20)["packing"]["ranks"][0]["splits"] == 0
    model, meta = export.load_checkpoint_model(run / "checkpoints" / "step_00000010")
    assert meta["zero_stage"] == 3 and meta["world_size"] == 2
    logs = sample_rows(run)
    losses, lines = [], []
    for rank in (0, 1):
        (line,) = [r for r in logs[0, rank] if r.get("step") == 11]
        lines.append(line)
        batch = replay_rows(wordnet, line["index"], seq, 8)
        model.train()  # as in training (the decoder has no dropout: train and eval compute the same)
        with torch.no_grad():
            losses.append(model(batch)["loss"].item())
    assert sum(losses) / 2 == pytest.approx(rows[10]["loss"], abs=2e-5), (losses, rows[10]["loss"])
    final, meta = export.load_checkpoint_model(run)
    assert meta["step"] == 20
    with torch.no_grad():  # what the check tells apart: other weights on the same rows give another loss
        later = sum(
            final.train()(replay_rows(wordnet, line["index"], seq, 8))["loss"].item() for line in lines
        )
    assert abs(later / 2 - rows[10]["loss"]) > 1e-2, (later / 2, rows[10]["loss"])

    out = tmp_path / "hf"
    assert export.main([str(run), str(out)]) == 0
    from transformers import LlamaForCausalLM

    hf, info = LlamaForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    final.eval()
    ids = replay_rows(wordnet, [5, 6, 7], seq, 1)["input_ids"][:, :40]
    with torch.no_grad():
        ours = final.backbone(ids)
        theirs = hf.eval()(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------- 4. elastic


@pytest.mark.slow
def test_elastic_two_ranks_to_one_keeps_every_document_once(tmp_path, wordnet):
    """2 ranks (global batch 16 = 2 x 8) stopped at step 12, resumed on 1 rank (8 x 2 accumulation) past the end
    of the first epoch. The rows of the resumed steps are packed anew (the documents the 2 ranks had fetched
    but not packed are dealt to the one), so per-step documents differ from the uninterrupted run's; what must
    hold is that the first epoch's 2000 documents are each trained on exactly once, and that the uninterrupted
    run trained on the same documents."""
    seq, steps, cut = 256, 30, 12  # ~25 steps per epoch; rows longer than any document (none cut)
    common = (
        f"data.seq_len={seq}",
        "train.global_batch_size=16",
        f"train.max_steps={steps}",
        "checkpoint.interval=6",
        "run.sample_log=true",
        "run.tensorboard=false",
    )
    ref, run = tmp_path / "ref", tmp_path / "elastic"
    torchrun(2, text_args(CLM, ref, wordnet, *common), env=ONE_THREAD)
    torchrun(2, text_args(CLM, run, wordnet, *common, f"train.stop_at_step={cut}"), env=ONE_THREAD)
    proc = torchrun(1, text_args(CLM, run, wordnet, *common), env=ONE_THREAD)
    assert (
        "world_size=1 " in proc.stdout and "resumed from" in proc.stdout and f"at step {cut} " in proc.stdout
    )

    a, b = read_metrics(ref), read_metrics(run)
    assert [r["step"] for r in b] == list(range(1, steps + 1))
    assert [r["loss"] for r in a[:cut]] == [r["loss"] for r in b[:cut]]  # the same 2-rank run up to the cut
    assert all(math.isfinite(r["loss"]) for r in b) and b[-1]["loss"] < b[0]["loss"] - 0.5
    assert a[-1]["samples_seen"] == b[-1]["samples_seen"] == 16 * steps

    def trained(rows: list[dict]) -> list[int]:
        return [i for r in rows if "step" in r for i in r["index"]]

    logs, ref_logs = sample_rows(run), sample_rows(ref)
    assert sorted(logs) == [(0, 0), (0, 1), (1, 0)] and sorted(ref_logs) == [(0, 0), (0, 1)]
    assert logs[1, 0][0] == {"segment": 1, "resume_step": cut}
    for rank in (0, 1):  # up to the cut, the elastic run is the 2-rank run
        assert [r for r in logs[0, rank] if "step" in r] == [
            r for r in ref_logs[0, rank] if 0 < r.get("step", 0) <= cut
        ]
    assert all(r["epoch"] == 0 for seg in logs.values() for r in seg if 0 < r.get("step", 0) <= cut)
    before = trained(logs[0, 0]) + trained(logs[0, 1])  # the 2-rank steps, all in epoch 0
    after = trained(logs[1, 0])  # in the order the one rank packed them (first in, first out)
    assert len(set(before)) == len(before), "a document trained twice before the cut"
    rest = DOCS - len(before)  # the first epoch's documents not trained before the cut
    assert len(after) > rest, "the run did not get past the first epoch"
    assert sorted(before + after[:rest]) == list(range(DOCS)), "first epoch: a document lost or repeated"
    assert len(set(after[rest:])) == len(after[rest:])  # the second epoch's, none twice either
    assert (
        loader_state(run, steps)["epoch"] == 1
        and loader_state(run, steps)["packing"]["ranks"][0]["splits"] == 0
    )
    # the uninterrupted run trained on the same documents (all of the first epoch, each once per rank's share)
    ref_first = set(trained(ref_logs[0, 0])) | set(trained(ref_logs[0, 1]))
    assert ref_first == set(range(DOCS)) == set(before + after)


# ---------------------------------------------------------------------------------------------- 5. long rows


def _long_run(tmp_path, shards, monkeypatch, *extra) -> list[dict]:
    """Train configs/clm_8k_tiny.yaml, counting the blocks run under activation checkpointing."""
    import models.text_layers

    calls = []
    real = models.text_layers.checkpoint

    def counting(fn, *args, **kw):
        calls.append(args[0].shape)  # (B, N, D) hidden states entering a block
        return real(fn, *args, **kw)

    monkeypatch.setattr(models.text_layers, "checkpoint", counting)
    out = tmp_path / "long"
    assert main(text_args(LONG, out, shards, "run.tensorboard=false", *extra)) == 0
    rows = read_metrics(out)
    assert calls and len(calls) == 2 * len(rows)  # both blocks of every training step were checkpointed
    seq = rows and calls[0][1]
    assert all(c == (1, seq, 64) for c in calls)
    return rows


def test_8k_rows_train_with_activation_checkpointing(tmp_path, wordnet, monkeypatch):
    rows = _long_run(tmp_path, wordnet, monkeypatch)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert rows[0]["tokens_per_sec"] == pytest.approx(rows[0]["samples_per_sec"] * 8192, rel=1e-9)
    assert rows[-1]["packing_efficiency"] > 0.95  # ~180 short documents per 8k row: little padding
    # attention within documents of ~45 tokens costs a fraction of full 8k-row attention
    assert rows[-1]["mfu_doc"] < 0.2 * rows[-1]["mfu"]


@pytest.mark.slow
def test_32k_rows_train(tmp_path, wordnet, monkeypatch):
    rows = _long_run(
        tmp_path,
        wordnet,
        monkeypatch,
        "data.seq_len=32768",
        "model.kwargs.max_seq_len=32768",
        "train.max_steps=2",
        "checkpoint.interval=2",
    )
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    assert rows[0]["tokens_per_sec"] == pytest.approx(rows[0]["samples_per_sec"] * 32768, rel=1e-9)


# ---------------------------------------------------------------------------------------------- 6. bad input


@pytest.mark.parametrize(
    "config, change, key, why",
    [
        (CLM, "model.kwargs.vocab_size=256", "model.kwargs.vocab_size:", "smaller than the tokenizer's"),
        (MLM, "model.kwargs.vocab_size=300", "model.kwargs.vocab_size:", "smaller than the tokenizer's"),
        (CLM, "data.seq_len=16384", "data.seq_len:", "beyond the 8192 positions"),
        (CLM, "model.kwargs.max_seq_len=64", "data.seq_len:", "beyond the 64 positions"),
        (MLM, "data.seq_len=9000", "data.seq_len:", "beyond the 8192 positions"),
        (CLM, "model.name=modernbert_test", "model.name", "(family ModernBert); objectives that can: mlm"),
        (MLM, "model.name=llama_test", "model.name", "(family LlamaDecoder); objectives that can: clm"),
        (CLM, "data.dataset=digits", "data.dataset", "holds no text"),
        (MLM, "data.dataset=fashion_mnist", "data.dataset", "holds no text"),
        (
            CLM,
            "model.name=modernbert_test --set model.kwargs.max_seq_len=256",
            "objective.name: 'clm' cannot train model.name 'modernbert_test'",
            "objectives that can: mlm",
        ),
    ],
    ids=[
        "clm-vocab",
        "mlm-vocab",
        "clm-seq-len",
        "clm-max-seq-len",
        "mlm-seq-len",
        "clm-on-encoder",
        "mlm-on-decoder",
        "clm-on-images",
        "mlm-on-images",
        "clm-on-encoder-with-kwargs",
    ],
)
def test_bad_text_configs_are_refused_naming_the_key(tmp_path, wordnet, capsys, config, change, key, why):
    out = tmp_path / "run"
    assert main(text_args(config, out, wordnet, *change.split(" --set "))) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and key in err and why in err, err
    assert not out.exists()  # refused before any work


def test_bad_text_config_exit_code_from_the_command_line(tmp_path, wordnet):
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "pretrain.train",
        *text_args(CLM, out, wordnet, "model.kwargs.vocab_size=100"),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert (
        "error: model.kwargs.vocab_size: 100 is smaller than the tokenizer's vocabulary (512 ids"
        in proc.stderr
    )
    assert not out.exists()
