"""Stored teacher outputs vs the online teacher: student train-step throughput side by side in one process (steps
alternate online, stored, online, ... so load on the machine hits both alike), and the store's bytes per sample per
epoch.

    python benchmarks/distill_stored.py [--config configs/distill_mobilenet_fmnist.yaml] [--steps 20]
                                        [--samples 4096] [--set key=value ...]

Writes one epoch of top-k outputs of the config's teacher for the first `--samples` samples into a temporary store
(python -m pretrain.distill's code path), then times the config's objective (its student, micro-batch and teacher;
feature distillation off, since a store holds logits only) on the same real views: online (the teacher runs every
step) and stored (a lookup by (epoch, id)). One process, TorchEngine.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.build import build_model, load_config  # noqa: E402
from pretrain.dist import DistContext  # noqa: E402
from pretrain.distill import Saver, _Views, load_student_config, save_teacher  # noqa: E402
from pretrain.engine.ddp import TorchEngine  # noqa: E402
from pretrain.teacher_store import epoch_dir, record_bytes  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/distill_mobilenet_fmnist.yaml")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per mode (after 2 warm-up steps)")
    ap.add_argument(
        "--samples", type=int, default=4096, help="samples in the temporary store (data.max_samples)"
    )
    ap.add_argument(
        "--student", default=None, help="a run dir / checkpoint whose student scores the top-k gap"
    )
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="tessera-distill-bench-"))
    common = [*args.set, f"data.max_samples={args.samples}", "objective.feature_weight=0", "eval.interval=0"]
    store_sets = [*common, f"objective.teacher_outputs={tmp / 'store'}"]
    cfg_s = load_student_config(args.config, store_sets)
    t0 = time.perf_counter()
    save_teacher(cfg_s, DistContext(), epochs=1, log=lambda *_: None)
    t_save = time.perf_counter() - t0
    online_cfg = load_config(args.config, common)
    stored_cfg = load_config(args.config, store_sets)
    torch.manual_seed(0)
    runs = {}
    for name, cfg in (("online teacher", online_cfg), ("stored top-k", stored_cfg)):
        runs[name] = TorchEngine(build_model(cfg), cfg, DistContext())
    saver = Saver(cfg_s, DistContext())
    views = _Views(saver.shard_dir, saver.decoder, cfg_s.seed, 0, [], saver.count)
    n = online_cfg.train.micro_batch_size
    batches = []
    for b in range(4):
        ids = torch.arange(b * n, (b + 1) * n) % saver.count
        batches.append(
            {
                "image": torch.stack([views.view(int(i)) for i in ids]),
                "index": ids,
                "epoch": torch.zeros(n, dtype=torch.long),
                "label": torch.zeros(n, dtype=torch.long),
            }
        )
    times: dict[str, list[float]] = {k: [] for k in runs}
    for i in range(args.steps + 2):
        for name, engine in runs.items():
            t0 = time.perf_counter()
            engine.train_step([copy.copy(batches[i % len(batches)])], lr=1e-4)
            if i >= 2:
                times[name].append(time.perf_counter() - t0)
    od = cfg_s.objective
    rec = record_bytes(od.topk, saver.teacher.num_classes)
    on_disk = sum(f.stat().st_size for f in epoch_dir(tmp / "store", 0).glob("*.mds"))
    t = saver.teacher
    print(
        f"{args.config}: student {online_cfg.model.name}, micro-batch {n}, image {online_cfg.data.image_size} px; "
        f"teacher {t.description} at {t.input.image_size} px, {t.num_classes} classes; "
        f"{torch.get_num_threads()} threads, {args.steps} timed steps per mode (median)"
    )
    print("| targets | samples/s | ratio |")
    print("|---|---|---|")
    base = statistics.median(times["online teacher"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {n / med:.1f} | {base / med:.2f}x |")
    print(
        f"store: k = {od.topk}, {rec} bytes per record (4 + k x (2 + {(rec - 4) // od.topk - 2})) per "
        f"sample per epoch; {on_disk / saver.count:.1f} bytes per sample on disk (MDS shard files, offsets "
        f"included); saving one epoch of {saver.count} samples took {t_save:.1f} s"
    )
    print(topk_gap(runs["online teacher"].module, batches, saver, od, args.student))
    return 0


@torch.no_grad()
def topk_gap(objective, batches, saver, od, student_run: str | None) -> str:
    """KD loss against the full teacher distribution vs against top-k targets (the rest spread evenly), k = 5, 10,
    with the student of `student_run` (else the benchmark's own, barely trained) on the benchmark's batches."""
    from pretrain.objectives.distill import kd_loss
    from pretrain.teacher_store import dense_targets

    student = objective.backbone
    if student_run:
        from pretrain.export import load_checkpoint_model

        student = load_checkpoint_model(student_run)[0].backbone
    student.eval()
    rows = ["| k | KD loss, full distribution | KD loss, top-k targets | gap |", "|---|---|---|---|"]
    full, tops = 0.0, {5: 0.0, 10: 0.0}
    for b in batches:
        logits = saver.teacher(b["image"], saver.student)["logits"]
        p = torch.softmax(logits / od.temperature, -1)
        s = student(b["image"])
        full += float(kd_loss(s, p, od.temperature, od.kd_reduction)) / len(batches)
        for k in tops:
            top = p.topk(k, -1)
            q = dense_targets(top.values.half(), top.indices, p.shape[-1])  # fp16 as stored
            tops[k] += float(kd_loss(s, q, od.temperature, od.kd_reduction)) / len(batches)
    for k, v in tops.items():
        rows.append(f"| {k} | {full:.4f} | {v:.4f} | {v - full:+.4f} ({(v - full) / full:+.1%}) |")
    who = student_run or "the benchmark's student"
    return (
        f"top-k gap ({who}, {sum(len(b['index']) for b in batches)} views, T = {od.temperature}):\n"
        + "\n".join(rows)
    )


if __name__ == "__main__":
    sys.exit(main())
