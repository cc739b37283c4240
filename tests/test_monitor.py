"""Online kNN / linear-probe monitors (pretrain.monitor) and the generic probe (pretrain.probe): the scores against
hand-computed cases, the monitor's features against the offline probe's, 1 rank vs 2 ranks, no hang under ZeRO-3,
and training untouched by evaluating."""

import json
import math
import os
import random
import subprocess

import numpy as np
import pytest
import torch

from pretrain import probe
from pretrain.build import build_model, load_config
from pretrain.config import ConfigError
from pretrain.dist import DistContext
from pretrain.monitor import Monitor
from pretrain.train import main
from tests.conftest import ROOT, TINY, read_metrics, tiny_args, torchrun_cmd

CLASSIFY = str(ROOT / "configs" / "classify_tiny.yaml")
SMALL_EVAL = ("eval.train_samples=300", "eval.test_samples=100", "eval.batch_size=64")  # 7 chunks: 4 + 3


@pytest.fixture(scope="session")
def eval_data(tmp_path_factory):
    """A working directory shared by this file's runs: the eval splits are converted under ./data once."""
    return tmp_path_factory.mktemp("eval_cwd")


@pytest.fixture
def in_eval_data(eval_data, monkeypatch):
    monkeypatch.chdir(eval_data)
    return eval_data


def eval_rows(run) -> dict[int, dict]:
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("eval/")} for r in read_metrics(run)}


# --- the scores ----------------------------------------------------------------------------------------------


def test_knn_matches_a_hand_computed_vote():
    """Test point q = (1, 0). Train: two class-0 points at 60 degrees (cos 0.5), one class-1 point at 0 degrees
    (cos 1, and 10x longer: cosine ignores length), one class-2 point far away (cos -1)."""
    train = torch.tensor([[0.5, math.sqrt(3) / 2], [0.5, -math.sqrt(3) / 2], [10.0, 0.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 2])
    q = torch.tensor([[1.0, 0.0]])
    # k = 3 takes sims 1, 0.5, 0.5. T = 0.07: class 1 gets e^(1/0.07) = 1.6e6, class 0 2 e^(0.5/0.07) = 2.5e3: 1 wins
    assert probe.knn_accuracy(train, labels, q, torch.tensor([1]), k=3, temperature=0.07) == 1.0
    # T = 10: class 1 gets e^0.1 = 1.105, class 0 gets 2 e^0.05 = 2.103: the two weak votes outweigh it
    assert probe.knn_accuracy(train, labels, q, torch.tensor([0]), k=3, temperature=10.0) == 1.0
    # k = 1: the nearest alone
    assert probe.knn_accuracy(train, labels, q, torch.tensor([1]), k=1, temperature=10.0) == 1.0


def test_knn_agrees_with_brute_force():
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(50, 8, generator=g), torch.randn(30, 8, generator=g)
    train_y, test_y = torch.randint(0, 4, (50,), generator=g), torch.randint(0, 4, (30,), generator=g)
    k, t = 5, 0.2
    correct = 0
    for x, y in zip(test.tolist(), test_y.tolist()):
        sims = []
        for f, label in zip(train.tolist(), train_y.tolist()):
            dot = sum(a * b for a, b in zip(x, f))
            sims.append((dot / math.sqrt(sum(a * a for a in x) * sum(b * b for b in f)), label))
        votes = [0.0] * 4
        for sim, label in sorted(sims, reverse=True)[:k]:
            votes[label] += math.exp(sim / t)
        correct += votes.index(max(votes)) == y
    got = probe.knn_accuracy(train, train_y, test, test_y, k=k, temperature=t, chunk=7)  # chunks of test rows
    assert got == correct / 30 and 0 < got < 1


def test_linear_probe_is_deterministic_and_learns():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 16, generator=g) * 2
    y = torch.randint(0, 3, (400,), generator=g)
    x = centers[y] + torch.randn(400, 16, generator=g)
    a = probe.logistic_accuracy(x[:300], y[:300], x[300:], y[300:])
    b = probe.logistic_accuracy(x[:300], y[:300], x[300:], y[300:])
    assert a == b and a > 0.8  # chance is 1/3
    with torch.no_grad():  # the monitor may call it under no_grad
        assert probe.logistic_accuracy(x[:300], y[:300], x[300:], y[300:]) == a


# --- config refusals ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config, change, key",
    [
        (str(ROOT / "configs" / "clm_tiny.yaml"), [], "eval.interval"),  # a text model
        (TINY, ["eval.knn=false", "eval.linear_probe=false"], "eval.interval"),
        (TINY, ["eval.dataset=no_such_dataset"], "eval.dataset"),
    ],
)
def test_monitor_refuses(config, change, key):
    with pytest.raises(ConfigError, match=key):  # at load_config, before any work
        load_config(config, ["eval.interval=5", *change])
    cfg = load_config(config, change)  # and the Monitor itself, for a config changed after loading
    cfg.eval.interval = 5
    with pytest.raises(ConfigError, match=key):
        Monitor(cfg, DistContext(), torch.nn.Identity())


# --- the monitor's features are the offline probe's ------------------------------------------------------


@pytest.mark.parametrize("config", [TINY, CLASSIFY])  # ViT: [cls ‖ mean patch]; ConvNeXt: pooled pre-logits
def test_monitor_features_equal_offline_probe(tmp_path, digits_shards, in_eval_data, config):
    from pretrain.checkpoint import Checkpointer
    from pretrain.engine import build_engine

    run = tmp_path / "run"
    args = tiny_args(run, digits_shards, "train.max_steps=3", *SMALL_EVAL)
    args[0] = config
    assert main(args) == 0
    # way 1: the training engine, restored from the run's checkpoint as a resume does it
    cfg = load_config(run / "config.yaml")
    ctx = DistContext()
    engine = build_engine(build_model(cfg), cfg, ctx)
    ckpt = Checkpointer(run / "checkpoints", ctx, 2)
    ckpt.load(ckpt.latest(), engine)
    monitor = Monitor(cfg, ctx, engine.module)
    train_f, test_f = monitor.features()
    assert engine.module.training  # put back in train mode
    # way 2: the offline probe's loader (consolidated checkpoint) and its image loading
    encoder, meta = probe.load_encoder(run)
    train_x, train_y, test_x, test_y = probe.load_eval_images(
        meta["data"], None, encoder.hparams()["img_size"], 300, 100
    )
    assert torch.equal(train_y, monitor.train_y) and torch.equal(test_y, monitor.test_y)
    assert torch.equal(probe.features(encoder, train_x), train_f)
    assert torch.equal(probe.features(encoder, test_x), test_f)
    width = 2 * encoder.embed_dim if config == TINY else encoder.num_features
    assert train_f.shape == (300, width) and test_f.shape == (100, width)


def test_probe_cli_on_a_run_dir_of_another_family(tmp_path, digits_shards, in_eval_data, capsys):
    """python -m pretrain.probe RUN_DIR for a ConvNeXt: linear probe and kNN of pretrained, random-init, pixels."""
    run = tmp_path / "run"
    args = tiny_args(run, digits_shards, "train.max_steps=2")
    args[0] = CLASSIFY
    assert main(args) == 0
    out = tmp_path / "probe.json"
    argv = [str(run), "--train-samples", "300", "--test-samples", "100", "--json", str(out)]
    assert probe.main(argv) == 0
    result = json.loads(out.read_text())
    names = [f"{n}{s}" for n in ("pretrained", "random_init", "raw_pixels") for s in ("", "_knn")]
    assert all(0.1 < result[n] <= 1.0 for n in names), result  # 10 classes: chance is 0.1
    text = capsys.readouterr().out
    assert f"pretrained encoder  ({run}): accuracy {result['pretrained']:.4f}" in text
    assert f"random-init encoder (same shape):  accuracy {result['random_init']:.4f}" in text
    assert f"{result['raw_pixels_knn']:.4f}" in text.splitlines()[-1]  # the table's last row
    assert probe.main([str(tmp_path / "nothing")]) == 2  # neither an export, a run nor a checkpoint


# --- training is not changed by evaluating ---------------------------------------------------------------


@pytest.mark.parametrize(
    "precision, scores",
    [("fp32", ("eval/knn_top1", "eval/linear_probe")), ("bf16", ("eval/knn_top1",))],  # bf16: autocast
)
def test_eval_on_and_off_train_identically(tmp_path, digits_shards, in_eval_data, precision, scores):
    common = ("train.max_steps=8", f"engine.precision={precision}", "run.image_interval=0", *SMALL_EVAL)
    only = [] if len(scores) == 2 else ["eval.linear_probe=false"]
    assert main(tiny_args(tmp_path / "off", digits_shards, *common)) == 0
    assert main(tiny_args(tmp_path / "on", digits_shards, *common, "eval.interval=3", *only)) == 0
    off, on = read_metrics(tmp_path / "off"), read_metrics(tmp_path / "on")
    assert [r["step"] for r in on] == list(range(1, 9))  # still one row per step
    assert [r["loss"] for r in on] == [r["loss"] for r in off]
    assert [r["grad_norm"] for r in on] == [r["grad_norm"] for r in off]
    evals = {step: row for step, row in eval_rows(tmp_path / "on").items() if row}
    assert sorted(evals) == [3, 6, 8]  # every 3 steps and the last
    for row in evals.values():
        assert sorted(row) == sorted([*scores, "eval/time_s", "eval/time_fraction"])
        assert all(0.1 < row[key] <= 1 for key in scores)  # 10 classes: chance is 0.1
        assert row["eval/time_s"] > 0 and row["eval/time_fraction"] > 0
    assert not any(eval_rows(tmp_path / "off").values())


class Noisy(torch.nn.Module):
    """A backbone that draws from every random stream in its forward and records how it was called."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(256, 8)
        self.calls = []

    def hparams(self) -> dict:
        return {"img_size": 16}

    def forward_features(self, images):
        self.calls.append((self.training, torch.is_grad_enabled(), len(images)))
        noise = torch.rand(()) + np.random.rand() + random.random()
        return self.proj(images.flatten(1)) + 0 * noise  # (B, 8)

    def forward_head(self, x, pre_logits=False):
        return x


def test_evaluating_leaves_rng_mode_and_grad_alone(in_eval_data):
    cfg = load_config(TINY, ["eval.interval=2", *SMALL_EVAL])
    module = Noisy().train()
    monitor = Monitor(cfg, DistContext(), module)
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    out = monitor.evaluate(step=2, train_time=10.0)
    assert torch.equal(torch.get_rng_state(), before[0])
    assert (np.random.get_state()[1] == before[1]).all() and random.getstate() == before[2]
    assert module.training  # back in train mode
    assert module.calls == [(False, False, 64)] * 6 + [(False, False, 16)]  # 400 images in chunks of 64
    assert out["eval/time_fraction"] == out["eval/time_s"] / 10.0
    assert [monitor.due(s) for s in (1, 2, 3, 4, 19, 20)] == [False, True, False, True, False, True]


def test_a_rank_out_of_chunks_keeps_step_with_a_dummy_forward(in_eval_data, monkeypatch):
    """Rank 1 of 2 owns chunks 1, 3, 5 of 7 (its neighbour 0, 2, 4, 6): it runs a 4th, dummy forward, as many as
    rank 0, and the gathered rows are put back in sample order."""
    cfg = load_config(TINY, ["eval.interval=2", *SMALL_EVAL])
    module = Noisy()
    monitor = Monitor(cfg, DistContext(rank=1, world_size=2), module)
    assert sorted(monitor.chunks) == [1, 3, 5] and monitor.rounds == 4
    seen = {}

    def fake_gather(local):  # rank 0's rows (chunks 0, 2, 4, 6: 64 + 64 + 64 + 16) marked -1
        seen["local"] = local
        return [torch.full((208, local.shape[1]), -1.0), local]

    monkeypatch.setattr(monitor, "_gather", fake_gather)
    train_f, test_f = monitor.features()
    assert module.calls == [(False, False, 64)] * 3 + [(False, False, 1)]  # the dummy is dropped
    assert seen["local"].shape == (192, 8)
    feats = torch.cat([train_f, test_f])  # (400, 8): chunk j is rows [64 j, 64 j + 64)
    for j in range(7):
        assert bool((feats[64 * j : 64 * j + 64] == -1).all()) == (j % 2 == 0), j
    assert torch.equal(feats[64:128], seen["local"][:64])


# --- distributed ---------------------------------------------------------------------------------------------


def run_in(cwd, nproc: int, args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """torchrun in `cwd` (the eval splits are converted under ./data there), one thread per rank (the same
    matmul blocking in every run), failing the test with the output on a non-zero exit or a hang."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        torchrun_cmd(nproc, args), cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc


def test_two_ranks_score_exactly_as_one(tmp_path, digits_shards, in_eval_data, monkeypatch):
    """Same global batch, same weights (lr 0: the weights stay at their seeded init) => the same features, bit for
    bit, whichever rank embeds which chunk => the same accuracies. Rank 1 runs a dummy forward in round 4. The
    one-rank run is this process, on one thread as each torchrun rank."""
    common = ("train.max_steps=6", "optim.lr=0", "eval.interval=3", "data.num_workers=0", *SMALL_EVAL)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # pretrain.dist then leaves torch's thread count alone
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(tiny_args(tmp_path / "one", digits_shards, *common, "train.micro_batch_size=32")) == 0
    finally:
        torch.set_num_threads(threads)
    proc = run_in(
        in_eval_data, 2, tiny_args(tmp_path / "two", digits_shards, *common, "train.micro_batch_size=16")
    )
    assert "world_size=2" in proc.stdout and "engine=torch (DDP" in proc.stdout
    one, two = eval_rows(tmp_path / "one"), eval_rows(tmp_path / "two")
    for step in (3, 6):
        for key in ("eval/knn_top1", "eval/linear_probe"):
            assert one[step][key] == two[step][key] and one[step][key] > 0.1, (step, key, one, two)
    assert not one[4] and not two[4]


@pytest.mark.slow
def test_deepspeed_zero3_eval_no_hang_at_last_step_and_after_resume(tmp_path, digits_shards, eval_data):
    """ZeRO-3 gathers parameters in every forward: the ranks must run the same forwards. A run stopped at step 3
    and resumed evaluates at step 4 (right after the resume) and at the last step, 6; a hang fails the timeout."""
    common = (
        "train.max_steps=6",
        "eval.interval=4",
        "checkpoint.interval=3",
        "engine.backend=deepspeed",
        "engine.zero_stage=3",
        "engine.precision=bf16",
        *SMALL_EVAL,
    )
    run = tmp_path / "run"
    run_in(eval_data, 2, tiny_args(run, digits_shards, *common, "train.stop_at_step=3"), timeout=240)
    proc = run_in(eval_data, 2, tiny_args(run, digits_shards, *common), timeout=240)
    assert "resumed from" in proc.stdout and "engine=deepspeed (ZeRO-3, bf16)" in proc.stdout
    rows = eval_rows(run)
    assert sorted(rows) == list(range(1, 7))
    assert sorted(step for step, row in rows.items() if row) == [4, 6]
    for step in (4, 6):
        assert 0.1 < rows[step]["eval/knn_top1"] <= 1 and 0.1 < rows[step]["eval/linear_probe"] <= 1
    assert "step 6 eval on digits" in proc.stdout
