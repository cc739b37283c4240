"""End-to-end runs through main(argv) in this process: training, checkpoints, exact resume, export, probe."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from pretrain import export, probe
from pretrain.train import main
from tests.conftest import read_metrics, tiny_args


def test_tiny_run_learns_logs_and_checkpoints(tmp_path):
    out, shards = tmp_path / "run", tmp_path / "not_converted_yet"
    assert main(tiny_args(out, str(shards), "checkpoint.keep_last=2", "checkpoint.interval=5")) == 0
    assert (shards / "index.json").is_file()  # converted on first use
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 21))
    for key in ("loss", "lr", "grad_norm", "samples_per_sec", "samples_seen"):
        assert all(isinstance(r[key], float | int) for r in rows), key
    assert all(r["grad_norm"] > 0 and r["samples_per_sec"] > 0 for r in rows)
    first, last = sum(r["loss"] for r in rows[:5]) / 5, sum(r["loss"] for r in rows[-5:]) / 5
    assert last < 0.8 * first, (first, last)  # it learns
    assert rows[-1]["samples_seen"] == 20 * 16
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (out / "images").glob("*.png"))[:1] == [
        "mae_reconstruction_step00000001.png"
    ]
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert ckpts == ["step_00000015", "step_00000020"]  # keep_last=2
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000020"
    saved = (out / "checkpoints" / "step_00000020" / "config.yaml").read_text()
    assert saved == (out / "config.yaml").read_text() and "max_steps: 20" in saved


def _weights(run_dir):
    return torch.load(Path(run_dir) / "checkpoints" / "step_00000012" / "engine" / "model.pt")


def test_resume_is_bit_identical(tmp_path, digits_shards):
    common = ("train.max_steps=12", "checkpoint.interval=4", "data.num_workers=2", "train.grad_accum_steps=2")
    assert main(tiny_args(tmp_path / "a", digits_shards, *common)) == 0
    assert main(tiny_args(tmp_path / "b", digits_shards, *common, "train.stop_at_step=6")) == 0
    assert [r["step"] for r in read_metrics(tmp_path / "b")] == list(range(1, 7))
    assert main(tiny_args(tmp_path / "b", digits_shards, *common)) == 0  # same output dir: auto-resume
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["step"] for r in b] == list(range(1, 13))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r["grad_norm"] for r in a] == [r["grad_norm"] for r in b]
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_crash_mid_checkpoint_keeps_previous(tmp_path, digits_shards, monkeypatch):
    from pretrain.engine.ddp import TorchEngine

    common = ("train.max_steps=12", "checkpoint.interval=4")
    assert main(tiny_args(tmp_path / "ref", digits_shards, *common)) == 0
    real_save = TorchEngine.save

    def dying_save(self, folder):
        real_save(self, folder)
        if "step_00000008" in str(folder):  # engine files written, then the process "dies"
            (folder / "model.pt").write_bytes(b"truncated")
            raise KeyboardInterrupt("killed mid-checkpoint")

    monkeypatch.setattr(TorchEngine, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        main(tiny_args(tmp_path / "run", digits_shards, *common))
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "step_00000008.tmp").is_dir() and (
        ckpts / "latest"
    ).read_text().strip() == "step_00000004"
    monkeypatch.setattr(TorchEngine, "save", real_save)
    assert main(tiny_args(tmp_path / "run", digits_shards, *common)) == 0  # resumes from step 4
    assert not (ckpts / "step_00000008.tmp").exists()
    assert [r["loss"] for r in read_metrics(tmp_path / "run")] == [
        r["loss"] for r in read_metrics(tmp_path / "ref")
    ]


@pytest.mark.parametrize(
    "change, key",
    [
        ("model.kwargs.depth=3", "model:"),
        ("engine.precision=bf16", "engine.precision:"),
        ("checkpoint.resume=false", "checkpoint.resume:"),
        ("seed=1", "seed:"),  # another sample order
        ("data.image_size=32", "data.image_size:"),
        ("train.micro_batch_size=8", "train.micro_batch_size:"),
    ],
)
def test_refusals_leave_the_run_untouched(tmp_path, digits_shards, capsys, change, key):
    run = tmp_path / "r"
    assert main(tiny_args(run, digits_shards, "train.max_steps=2")) == 0
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert main(tiny_args(run, digits_shards, "train.max_steps=4", change)) == 2
    assert key in capsys.readouterr().err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_missing_shard_is_named(tmp_path, capsys):
    from pretrain.data import convert

    shards = tmp_path / "shards"
    convert("digits", "train", str(shards), size_limit=20_000)
    index = json.loads((shards / "index.json").read_text())
    victim = index["shards"][1]["raw_data"]["basename"]
    (shards / victim).unlink()
    assert main(tiny_args(tmp_path / "r", str(shards))) == 2
    err = capsys.readouterr().err
    assert victim in err and "missing" in err


def test_demo_pipeline_tiny(tmp_path, digits_shards, capsys, monkeypatch):
    """train -> export to HF -> linear probe of pretrained and random-init encoders, as the demo does."""
    monkeypatch.chdir(tmp_path)  # the probe converts its splits under ./data
    run = tmp_path / "run"
    assert main(tiny_args(run, digits_shards, "train.max_steps=30")) == 0
    assert export.main([str(run), str(tmp_path / "hf")]) == 0
    meta = json.loads((tmp_path / "hf" / "tessera.json").read_text())
    assert meta["step"] == 30 and meta["data"]["dataset"] == "digits"
    # the exported weights are the checkpoint's weights
    model, _ = export.load_checkpoint_model(run)
    back = export.from_hf(tmp_path / "hf")
    x, noise = torch.randn(2, 1, 16, 16), torch.rand(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(
            back({"image": x}, noise=noise)["pred"], model({"image": x}, noise=noise)["pred"]
        )
    assert (
        probe.main(
            [
                str(tmp_path / "hf"),
                "--train-samples",
                "600",
                "--test-samples",
                "300",
                "--json",
                str(tmp_path / "probe.json"),
            ]
        )
        == 0
    )
    result = json.loads((tmp_path / "probe.json").read_text())
    assert result["train_samples"] == 600 and result["test_samples"] == 300
    assert result["pretrained"] > 0.3 and result["random_init"] > 0.3  # 10 classes: chance is 0.1
    assert "random-init encoder" in capsys.readouterr().out


def test_export_cli_errors(tmp_path, capsys):
    assert export.main([str(tmp_path), str(tmp_path / "out")]) == 2
    assert "complete checkpoint" in capsys.readouterr().err
    shutil.rmtree(tmp_path)
