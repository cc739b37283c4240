"""Distillation: the losses, the frozen teacher, stored sparse teacher outputs (format, exactness, provenance)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pretrain.build import build_model, load_config
from pretrain.config import ConfigError
from pretrain.dist import DistContext
from pretrain.objectives.distill import kd_loss
from pretrain.teacher import TeacherInput, convert_images, load_teacher
from pretrain.teacher_store import TeacherStore, decode, dense_targets, encode, read_epoch, record_bytes
from tests.conftest import ROOT, launch, read_metrics


def py(args: list[str], **kw):
    """`python ARGS` from the repo root (fails the test with its output)."""
    return launch([sys.executable, *args], **kw)


def trun(n: int, args: list[str], **kw):
    """`torchrun --standalone --nproc_per_node n ARGS` (ARGS start with -m MODULE)."""
    return launch(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", *args], **kw
    )


TINY = str(ROOT / "configs" / "distill_tiny.yaml")
STORED = str(ROOT / "configs" / "distill_stored_tiny.yaml")
# a seeded random-init 10-class teacher: cheap, and the same weights in every process
RANDOM_TEACHER = [
    "objective.teacher=vit_test_patch4",
    "objective.teacher_weights=null",
    'objective.teacher_kwargs={"num_classes": 10}',
]


def sets(*pairs: str) -> list[str]:
    out = []
    for p in pairs:
        out += ["--set", p]
    return out


# --- losses ----------------------------------------------------------------------------------------------


def test_kd_loss_normalizations_are_pinned():
    """batchmean = torch's kl_div 'batchmean' x T^2; deit = DeiT's kl_div(sum) / numel x T^2 = batchmean / C."""
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 7, generator=g), torch.randn(6, 7, generator=g)
    T = 3.0
    p = F.softmax(t / T, -1)
    ours = kd_loss(s, p, T, "batchmean")
    ref = (
        F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), reduction="batchmean", log_target=True)
        * T
        * T
    )
    deit = (
        F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), reduction="sum", log_target=True)
        * T
        * T
        / s.numel()
    )
    assert torch.allclose(ours, ref, atol=1e-6)
    assert torch.allclose(kd_loss(s, p, T, "deit"), deit, atol=1e-7)
    assert torch.allclose(kd_loss(s, p, T, "batchmean") / 7, kd_loss(s, p, T, "deit"), atol=1e-7)
    assert kd_loss(t, p, T, "batchmean").abs() < 1e-6  # a student equal to the teacher: 0


def test_dense_targets_spread_the_rest_evenly():
    probs = torch.tensor([[0.5, 0.3], [0.9, 0.05]])
    idx = torch.tensor([[3, 0], [1, 2]])
    d = dense_targets(probs, idx, 5)
    assert torch.allclose(d.sum(1), torch.ones(2))
    assert torch.allclose(d[0], torch.tensor([0.3, 0.2 / 3, 0.2 / 3, 0.5, 0.2 / 3]))
    full = F.softmax(torch.randn(3, 4), -1)
    top = full.topk(4)
    assert torch.allclose(dense_targets(top.values, top.indices, 4), full)  # k = C: the distribution itself


def test_record_size_is_exact_and_round_trips():
    assert record_bytes(10, 1000) == 4 + 10 * (2 + 2)
    assert record_bytes(5, 40000) == 4 + 5 * (2 + 4)  # classes beyond int16: int32 indices
    g = torch.Generator().manual_seed(1)
    p = F.softmax(torch.randn(9, 1000, generator=g), -1).topk(10)
    seeds = np.arange(9, dtype=np.uint32) * 123457
    rec = encode(seeds, p.values, p.indices, 1000)
    assert rec.shape == (9, 44) and rec.dtype == np.uint8
    s, v, i = decode(rec, 10, 1000)
    assert (s == seeds).all() and (i == p.indices.numpy()).all()
    assert np.abs(v.astype(np.float32) - p.values.numpy()).max() < 1e-3  # fp16


# --- the teacher -----------------------------------------------------------------------------------------


def test_convert_images_matches_by_hand():
    src = TeacherInput(8, 1, (0.5,), (0.25,))
    dst = TeacherInput(16, 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    x = torch.randn(2, 1, 8, 8)
    out = convert_images(x, src, dst)
    pix = F.interpolate(x * 0.25 + 0.5, size=(16, 16), mode="bilinear", antialias=True, align_corners=False)
    want = (pix.expand(-1, 3, -1, -1) - torch.tensor(dst.mean).view(1, 3, 1, 1)) / torch.tensor(dst.std).view(
        1, 3, 1, 1
    )
    assert torch.allclose(out, want, atol=1e-6)
    assert convert_images(x, src, src) is not None and torch.equal(convert_images(x, src, src), x)


def test_imagenet_teacher_loads_strictly_and_is_never_part_of_the_student():
    cfg = load_config(TINY)
    model = build_model(cfg)
    t = model.teacher
    assert t.num_classes == 1000 and t.input.image_size == 32 and t.input.channels == 3
    teacher_params = {id(p) for p in t.net.parameters()}
    assert not teacher_params & {id(p) for p in model.parameters()}  # not trained, not in the optimizer
    assert not any(k.startswith("teacher") for k in model.state_dict())  # not checkpointed
    assert all(not p.requires_grad for p in t.net.parameters()) and not t.net.training
    model.train()
    assert not t.net.training  # the objective's train() never reaches it
    out = model(
        {
            "image": torch.randn(4, 1, 32, 32),
            "index": torch.arange(4),
            "epoch": torch.zeros(4, dtype=torch.long),
        }
    )
    out["loss"].backward()
    assert all(p.grad is None for p in t.net.parameters())
    assert set(out) >= {"loss", "kd", "feat", "teacher_agree"}


def test_teacher_file_of_another_architecture_is_refused_naming_keys(tmp_path):
    f = tmp_path / "w.pth"
    torch.save({"conv.weight": torch.zeros(3, 3, 3, 3)}, f)
    with pytest.raises(
        ConfigError,
        match=r"teacher_weights: .* not a state dict of 'mobilenet_v2_100': missing keys \[features",
    ):
        load_config(TINY, [f"objective.teacher_weights={f}"])
    (tmp_path / "junk.pth").write_bytes(b"not a pickle")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(TINY, [f"objective.teacher_weights={tmp_path / 'junk.pth'}"])
    with pytest.raises(ConfigError, match="neither a registered model"):
        load_config(TINY, ["objective.teacher=/nonexistent/teacher"])


def test_teacher_from_a_run_and_from_its_export_give_the_same_outputs(tmp_path, digits_shards):
    """A Tessera run dir and its Hugging Face export as teachers: same logits and features (1e-5)."""
    run, out = tmp_path / "cls", tmp_path / "hf"
    proc = py(
        ["-m", "pretrain.train", str(ROOT / "configs" / "classify_tiny.yaml")]
        + sets(
            f"run.output_dir={run}", f"data.local={digits_shards}", "train.max_steps=3", "run.progress=false"
        )
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = py(["-m", "pretrain.export", str(run), str(out)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = load_teacher(str(run)), load_teacher(str(out))
    assert a.num_classes == b.num_classes == 10
    x = torch.randn(3, a.input.channels, a.input.image_size, a.input.image_size)
    oa, ob = a(x, a.input), b(x, a.input)
    for k in ("logits", "features"):
        assert torch.allclose(oa[k], ob[k], atol=1e-5), k


# --- stored outputs --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory, digits_shards):
    """2 epochs of top-5 outputs of the seeded random teacher on digits, saved by one process, no workers."""
    root = tmp_path_factory.mktemp("store") / "outputs"
    proc = py(
        ["-m", "pretrain.distill", "save-teacher", STORED, "--epochs", "2"]
        + sets(
            f"objective.teacher_outputs={root}",
            f"data.local={digits_shards}",
            "data.num_workers=0",
            "objective.topk=5",
            *RANDOM_TEACHER,
        )
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def _bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.glob("epoch_*/*")) if p.is_file()}


def test_store_records_are_exactly_sized(store):
    meta = json.loads((store / "store.json").read_text())
    assert meta["k"] == 5 and meta["num_classes"] == 10 and meta["epochs"] == [0, 1]
    for e in (0, 1):
        recs = read_epoch(store, e, record_bytes(5, 10))
        assert recs.shape == (meta["data"]["samples"], 4 + 5 * (2 + 2))
    index = json.loads((store / "epoch_0000" / "index.json").read_text())
    assert index["shards"][0]["column_encodings"] == [f"ndarray:uint8:{4 + 5 * 4}"]


def test_store_bytes_do_not_depend_on_world_size_workers_or_start_epoch(tmp_path, store, digits_shards):
    root = tmp_path / "outputs"
    common = sets(
        f"objective.teacher_outputs={root}",
        f"data.local={digits_shards}",
        "objective.topk=5",
        *RANDOM_TEACHER,
    )
    proc = trun(
        2,
        ["-m", "pretrain.distill", "save-teacher", STORED, "--epochs", "1"]
        + common
        + sets("data.num_workers=2"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # a second save continues at epoch 1 (epoch 0 kept): started from another epoch, on one process
    proc = py(
        ["-m", "pretrain.distill", "save-teacher", STORED, "--epochs", "2"]
        + common
        + sets("data.num_workers=0")
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _bytes(root) == _bytes(store)
    shutil.rmtree(root / "epoch_0000")  # start from epoch 1's neighbour: epoch 0 redone alone
    meta = json.loads((root / "store.json").read_text())
    proc = py(["-m", "pretrain.distill", "save-teacher", STORED, "--epochs", "2"] + common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _bytes(root) == _bytes(store) and meta["epochs"] == [0, 1]


@pytest.mark.parametrize("cmd", [["check"], ["save-teacher", "--epochs", "2", "--check"]])
def test_check_mode_reports_fp16_error_only(store, digits_shards, cmd):
    """`check` (and `save-teacher --check` on a complete store: nothing redone) recompute 64 records."""
    proc = py(
        ["-m", "pretrain.distill", cmd[0], STORED, *cmd[1:], "--samples", "64"]
        + sets(
            f"objective.teacher_outputs={store}",
            f"data.local={digits_shards}",
            "objective.topk=5",
            *RANDOM_TEACHER,
        )
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("[check]")][0]
    err = float(line.split("probability ")[1].split(",")[0])
    assert 0 < err < 5e-4 and "differing 0.00%" in line


def _stored_objective(store, digits_shards, *extra):
    cfg = load_config(
        STORED,
        [
            f"objective.teacher_outputs={store}",
            f"data.local={digits_shards}",
            "objective.topk=5",
            *RANDOM_TEACHER,
            *extra,
        ],
    )
    return cfg, build_model(cfg)


def test_stored_loss_with_k_equal_classes_matches_the_online_teacher(tmp_path, digits_shards):
    root = tmp_path / "full"
    common = [
        f"objective.teacher_outputs={root}",
        f"data.local={digits_shards}",
        *RANDOM_TEACHER,
        "objective.topk=10",
    ]
    proc = py(
        ["-m", "pretrain.distill", "save-teacher", STORED, "--epochs", "1"]
        + sum((["--set", c] for c in common), [])
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = load_config(STORED, common)
    stored = build_model(cfg)
    online = build_model(load_config(STORED, [*common[1:], "objective.teacher_outputs=null"]))
    online.load_state_dict(stored.state_dict())
    from pretrain.distill import Saver

    saver = Saver(cfg, DistContext())
    from pretrain.distill import _Views

    views = _Views(saver.shard_dir, saver.decoder, cfg.seed, 0, [], saver.count)
    ids = torch.tensor([0, 5, 17, 300, 1000])
    batch = {
        "image": torch.stack([views.view(int(i)) for i in ids]),
        "index": ids,
        "epoch": torch.zeros(5, dtype=torch.long),
    }
    a, b = stored(batch)["loss"], online(batch)["loss"]
    assert abs(float(a) - float(b)) < 2e-3 * max(1.0, float(b)), (a, b)


def test_store_refuses_another_seed_augmentation_teacher_or_classes(store, digits_shards):
    with pytest.raises(ConfigError, match="seed=0, this run has seed=1"):
        _stored_objective(store, digits_shards, "seed=1")
    with pytest.raises(ConfigError, match="crop_scale_min"):
        _stored_objective(store, digits_shards, "data.crop_scale_min=0.5")
    with pytest.raises(ConfigError, match="fingerprint"):
        _stored_objective(store, digits_shards, 'objective.teacher_kwargs={"num_classes": 10, "depth": 1}')
    with pytest.raises(ConfigError, match="num_classes: 7"):
        _stored_objective(store, digits_shards, "objective.num_classes=7", "objective.teacher=null")
    with pytest.raises(ConfigError, match="temperature"):
        _stored_objective(store, digits_shards, "objective.temperature=1.0")
    with pytest.raises(ConfigError, match="holds no store.json"):
        _stored_objective(store / "nope", digits_shards)


def test_lookup_names_missing_records_and_epochs(store):
    s = TeacherStore(store, seed=0)
    n = s.samples
    with pytest.raises(RuntimeError, match=f"sample id {n} has no record"):
        s.lookup(torch.tensor([0, n]), torch.tensor([0, 0]))
    with pytest.raises(RuntimeError, match="no stored outputs for epoch 2"):
        s.lookup(torch.tensor([0]), torch.tensor([2]))
    with pytest.raises(RuntimeError, match="augmentation seed"):
        TeacherStore(store, seed=5).lookup(torch.tensor([3]), torch.tensor([0]))
    got = s.lookup(torch.tensor([3, 3, 4]), torch.tensor([0, 1, 0]))
    assert got.probs.shape == (3, 5) and not torch.equal(
        got.probs[0], got.probs[1]
    )  # epochs differ: views do


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 2)])
def test_student_sees_exactly_the_saved_views_and_resumes(tmp_path, store, digits_shards, world, workers):
    """The student's loader (1 or 2 ranks, 0 or 2 workers) hashes each view it trains on; the hashes equal the
    saver's views of the same (epoch, id). The run stops mid-epoch and resumes on the other world size."""
    out = tmp_path / "student"
    common = sets(
        f"objective.teacher_outputs={store}",
        f"data.local={digits_shards}",
        f"data.num_workers={workers}",
        f"run.output_dir={out}",
        "run.progress=false",
        "train.micro_batch_size=8",
        f"train.grad_accum_steps={2 // world}",
        "train.max_steps=12",
        "checkpoint.interval=5",
        "train.stop_at_step=5",
        *RANDOM_TEACHER,
    )
    common += sets("objective.topk=5")
    env = {"TESSERA_DISTILL_VIEW_LOG": str(tmp_path / "views")}
    run = (lambda a: trun(2, a, env=env)) if world == 2 else (lambda a: py(a, env=env))
    proc = run(["-m", "pretrain.train", STORED] + common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    other = (lambda a: py(a, env=env)) if world == 2 else (lambda a: trun(2, a, env=env))
    resume = [c if not c.startswith("train.stop_at_step") else "train.stop_at_step=null" for c in common]
    resume = [
        c if not c.startswith("train.grad_accum_steps") else f"train.grad_accum_steps={world}" for c in resume
    ]
    proc = other(["-m", "pretrain.train", STORED] + resume)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_metrics(out)[-1]["step"] == 12
    from pretrain.distill import Saver, _Views

    cfg = load_config(
        STORED,
        [
            f"objective.teacher_outputs={store}",
            f"data.local={digits_shards}",
            "objective.topk=5",
            *RANDOM_TEACHER,
        ],
    )
    saver = Saver(cfg, DistContext())
    seen = [
        json.loads(ln)
        for f in sorted((tmp_path / "views").glob("*.jsonl"))
        for ln in f.read_text().splitlines()
    ]
    assert len(seen) >= 12 * 16
    views = {e: _Views(saver.shard_dir, saver.decoder, cfg.seed, e, [], saver.count) for e in (0, 1)}
    import hashlib

    for row in seen[:: max(1, len(seen) // 40)]:
        v = views[row["epoch"]].view(row["index"])
        assert hashlib.sha256(v.numpy().tobytes()).hexdigest() == row["sha256"], row


# --- distributed: the same loss as one rank ---------------------------------------------------------------


@pytest.mark.parametrize(
    "engine",
    [
        pytest.param([], id="ddp"),
        pytest.param(["engine.backend=deepspeed", "engine.zero_stage=2"], id="zero2", marks=pytest.mark.slow),
        pytest.param(["engine.backend=deepspeed", "engine.zero_stage=3"], id="zero3", marks=pytest.mark.slow),
    ],
)
def test_two_ranks_train_like_one(tmp_path, digits_shards, engine):
    """Online KD + feature distillation, global batch 16: 1 rank x 16 vs 2 ranks x 8 (DDP, ZeRO-2, ZeRO-3), fp32.
    Each rank's teacher scores its own half; the losses of 4 steps agree to reduction-order noise. The teacher is
    in no checkpoint."""
    common = [
        f"data.local={digits_shards}",
        "run.progress=false",
        "train.max_steps=4",
        "checkpoint.interval=4",
    ]
    one, two = tmp_path / "one", tmp_path / "two"
    py(["-m", "pretrain.train", TINY] + sets(f"run.output_dir={one}", "train.micro_batch_size=16", *common))
    trun(
        2,
        ["-m", "pretrain.train", TINY]
        + sets(f"run.output_dir={two}", "train.micro_batch_size=8", *common, *engine),
    )
    a, b = read_metrics(one), read_metrics(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):  # "loss" is all ranks' mean (the parts are rank 0's micro-batch)
        assert abs(x["loss"] - y["loss"]) < 1e-4 * max(1.0, abs(x["loss"])), (x, y)
    from pretrain.export import load_checkpoint_model

    model, _ = load_checkpoint_model(two)
    assert not any("teacher" in k for k in model.state_dict())


# --- DeiT and the export of students ---------------------------------------------------------------------


def test_deit_hard_and_soft_losses_are_what_deit_computes():
    cfg = load_config(str(ROOT / "configs" / "deit_tiny.yaml"))
    model = build_model(cfg)
    assert model.distilled and model.cfg.hard
    torch.manual_seed(0)
    batch = {"image": torch.randn(4, 1, 32, 32), "label": torch.tensor([0, 3, 5, 9])}
    out = model(batch)
    feats = model.backbone.forward_features(batch["image"])
    cls, dist = model.backbone.forward_head_distilled(feats)
    t = model.teacher(batch["image"], model.student_input)["logits"]
    want = 0.5 * F.cross_entropy(cls, batch["label"]) + 0.5 * F.cross_entropy(dist, t.argmax(-1))
    assert torch.allclose(out["loss"], want, atol=1e-6)
    soft = build_model(
        load_config(
            str(ROOT / "configs" / "deit_tiny.yaml"), ["objective.hard=false", "objective.temperature=3.0"]
        )
    )
    soft.load_state_dict(model.state_dict())
    out = soft(batch)
    kd = (
        F.kl_div(
            F.log_softmax(dist / 3, -1), F.log_softmax(t / 3, -1), reduction="batchmean", log_target=True
        )
        * 9
    )
    assert torch.allclose(out["loss"], 0.5 * F.cross_entropy(cls, batch["label"]) + 0.5 * kd, atol=1e-5)
    assert torch.allclose(model.backbone(batch["image"]), (cls + dist) / 2, atol=1e-6)  # inference: the mean


def test_a_distilled_student_exports_without_its_store(tmp_path, store, digits_shards):
    """Export (and probe) rebuild the student from the run's config.yaml, which records the resolved head size:
    neither the teacher nor the store is read, so a store deleted after training does not matter."""
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    run = tmp_path / "run"
    py(
        ["-m", "pretrain.train", STORED]
        + sets(
            f"objective.teacher_outputs={copy}",
            f"data.local={digits_shards}",
            "objective.topk=5",
            f"run.output_dir={run}",
            "run.progress=false",
            "train.max_steps=2",
            *RANDOM_TEACHER,
        )
    )
    shutil.rmtree(copy)
    py(["-m", "pretrain.export", str(run), str(tmp_path / "hf")])
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == [
        "ConvNextForImageClassification"
    ]


def test_a_transformers_classifier_tessera_has_no_family_for_is_a_teacher(tmp_path):
    """A Hugging Face folder of a family Tessera cannot import (ResNet) is loaded through transformers' own Auto
    classes, with the folder's preprocessing: logits from AutoModelForImageClassification, pooled features."""
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    cfg = ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=7, layer_type="basic"
    )
    ResNetForImageClassification(cfg).eval().save_pretrained(tmp_path / "resnet")
    (tmp_path / "resnet" / "preprocessor_config.json").write_text(
        json.dumps(
            {"size": {"height": 40, "width": 40}, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.2, 0.2, 0.2]}
        )
    )
    t = load_teacher(str(tmp_path / "resnet"))
    assert t.num_classes == 7 and t.input.image_size == 40 and "transformers" in t.description
    student = TeacherInput(28, 1, (0.3,), (0.35,))
    out = t(torch.randn(2, 1, 28, 28), student)
    assert out["logits"].shape == (2, 7) and out["features"].shape == (2, 16)


def test_save_teacher_refuses_more_top_k_than_classes(tmp_path, digits_shards):
    proc = subprocess.run(
        [sys.executable, "-m", "pretrain.distill", "save-teacher", STORED]
        + sets(
            f"objective.teacher_outputs={tmp_path / 's'}",
            f"data.local={digits_shards}",
            "objective.topk=11",
            *RANDOM_TEACHER,
        ),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "objective.topk: 11 is more than the teacher's 10 classes" in proc.stderr
    assert not (tmp_path / "s").exists()


def test_feature_stage_is_read_in_the_same_pass():
    """feature_stage = 1 of a hierarchical student: the pooled stage map and the logits of one pass equal
    forward_intermediates' map and forward()'s logits; the projection maps it to the teacher's width."""
    model = build_model(load_config(TINY, ["objective.feature_stage=1"]))
    b = model.backbone.eval()
    x = torch.randn(3, 1, 32, 32)
    kd_logits, _, pooled = model._student(x)
    assert torch.allclose(pooled, b.forward_intermediates(x, indices=[1])[0].mean((2, 3)), atol=1e-6)
    assert torch.allclose(kd_logits, b(x), atol=1e-6)
    assert (
        model.feature_proj.in_features == b.feature_info[1]["num_chs"]
        and model.feature_proj.out_features == 1280
    )


@pytest.mark.parametrize("stored", [False, True], ids=["online", "stored"])
def test_resume_is_bit_exact(tmp_path, store, digits_shards, stored):
    """Stopped at step 3 and relaunched = uninterrupted, loss for loss (the teacher is reloaded, the store re-read)."""
    config = STORED if stored else TINY
    extra = [f"objective.teacher_outputs={store}", "objective.topk=5", *RANDOM_TEACHER] if stored else []
    common = [
        f"data.local={digits_shards}",
        "run.progress=false",
        "train.max_steps=6",
        "checkpoint.interval=3",
        *extra,
    ]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    py(["-m", "pretrain.train", config] + sets(f"run.output_dir={ref}", *common))
    py(["-m", "pretrain.train", config] + sets(f"run.output_dir={cut}", *common, "train.stop_at_step=3"))
    proc = py(["-m", "pretrain.train", config] + sets(f"run.output_dir={cut}", *common))
    assert "resumed from" in proc.stdout
    a, b = read_metrics(ref), read_metrics(cut)
    assert [r["step"] for r in b] == list(range(1, 7))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
