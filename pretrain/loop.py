"""The training loop: one readable function over an engine, a loader, a logger and a checkpointer.

Around every step it asks three questions, all answered the same on every rank: is the loss bad (roll back to
the last checkpoint and skip the batch: pretrain.guard), did anyone get a stop signal (checkpoint, then stop:
pretrain.preempt), is a checkpoint due.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from pretrain.checkpoint import Checkpointer
from pretrain.config import Config
from pretrain.dist import DistContext
from pretrain.engine import Engine
from pretrain.engine.base import to_device
from pretrain.faults import Faults
from pretrain.guard import LossGuard
from pretrain.logger import MetricsLogger
from pretrain.mfu import Throughput, packed_stats
from pretrain.monitor import Monitor
from pretrain.optim import lr_at
from pretrain.preempt import StopRequest
from pretrain.samplelog import SampleLog

log = logging.getLogger("tessera")


@dataclass
class Progress:
    step: int = 0  # optimizer steps completed
    samples_seen: int = 0  # samples consumed by all ranks
    stopped_by: str | None = None  # the stop signal that ended this process early, if one did
    loss: float | None = None  # the last step's loss (all ranks' mean), recorded in checkpoints


@dataclass
class Session:
    """What the loop works with; built by pretrain.train.run."""

    cfg: Config
    ctx: DistContext
    engine: Engine
    ckpt: Checkpointer
    logger: MetricsLogger
    config_yaml: str
    open_loader: Callable[[dict | None], object]  # a new TrainLoader at a saved position (rollbacks)
    guard: LossGuard
    guard_file: object  # Path of guard.json (written by rank 0)
    stop: StopRequest = field(default_factory=StopRequest)
    samples: SampleLog | None = None
    faults: Faults = field(default_factory=Faults)
    throughput: Throughput | None = None  # FLOPs and tokens per sample, peak FLOP/s: tokens/s, TFLOP/s, MFU
    monitor: Monitor | None = None  # online kNN / linear-probe monitors (eval.interval > 0)


def seed_step(seed: int, step: int, rank: int) -> None:
    """Every random draw of a step (masking, dropout, drop-path) depends only on (seed, step, rank).

    This is what makes a resumed run bit-identical: no RNG stream has to be replayed to reach step N.
    """
    s = ((seed * 1_000_003 + step) * 1_000_033 + rank) % (2**63 - 1)
    torch.manual_seed(s)
    np.random.seed(s % 2**32)
    random.seed(s)


def _ids(batches: list[dict]) -> list[int]:
    return [i for b in batches for i in b["index"].tolist()]


def train_loop(s: Session, progress: Progress, loader) -> Progress:
    """Train from `progress` to train.max_steps (or stop_at_step, or a stop signal); closes `loader`."""
    cfg, ctx, engine, t = s.cfg, s.ctx, s.engine, s.cfg.train
    stop = t.max_steps if t.stop_at_step is None else min(t.max_steps, t.stop_at_step)
    per_step = t.micro_batch_size * t.grad_accum_steps * ctx.world_size
    visuals = getattr(engine.module, "visuals", None)
    train_time = 0.0  # seconds of train steps in this process: eval/time_fraction's denominator
    bar = tqdm(
        total=t.max_steps,
        initial=progress.step,
        disable=not (ctx.is_main and cfg.run.progress),
        dynamic_ncols=True,
        mininterval=1.0,
        desc="train",
    )

    def save() -> None:
        meta = {
            "samples_seen": progress.samples_seen,
            "engine": cfg.engine.backend,
            "zero_stage": cfg.engine.zero_stage,
            "precision": cfg.engine.precision,
            "guard": s.guard.state(),
            "loss": progress.loss,  # for the export's model card
            "classes": getattr(loader, "classes", None),  # the dataset's class names, likewise
        }
        step = progress.step
        s.ckpt.save(
            step,
            engine,
            meta,
            {"loader": loader.state_dict()},
            s.config_yaml,
            before_publish=lambda: s.faults.pause_checkpoint(step),
        )
        if s.guard.record.retries:
            s.guard.on_checkpoint()
            if ctx.is_main:
                s.guard.record.write(s.guard_file)

    def rollback(step: int, why: str, loss: float) -> Progress:
        """Reload the last checkpoint (engine, loader, guard state); the bad step's batch is skipped next time."""
        nonlocal loader
        latest = ctx.broadcast_object(s.ckpt.latest())
        try:
            s.guard.on_anomaly(
                step, why, loss, latest and latest.name
            )  # raises TrainingDiverged past the limit
        finally:
            if ctx.is_main:
                s.guard.record.write(s.guard_file)
        log.warning(
            "step %d: loss %r is bad (%s); rolling back to %s and skipping that batch",
            step,
            loss,
            why,
            latest,
        )
        s.logger.event("rollback", step=step, why=why, loss=repr(loss), to=latest.name)
        loader.close()
        meta, state = s.ckpt.load(latest, engine)
        loader = s.open_loader(state["loader"])
        s.guard.load_state(meta.get("guard"))
        s.logger.rewind(meta["step"])
        if s.samples is not None:
            s.samples.start(s.samples.segment + 1, meta["step"])
        bar.n = meta["step"]
        return Progress(step=meta["step"], samples_seen=meta["samples_seen"], loss=meta.get("loss"))

    try:
        while progress.step < stop:
            step = progress.step + 1
            t0 = time.perf_counter()
            for _ in range(s.guard.skips_at(step)):  # batches a rollback condemned: drawn, never trained on
                dropped = [next(loader) for _ in range(t.grad_accum_steps)]
                if s.samples is not None:
                    s.samples.skipped(step, loader.epoch, _ids(dropped))
            micro, epochs = [], []  # a step may straddle an epoch's end: note each micro-batch's epoch
            for _ in range(t.grad_accum_steps):
                micro.append(s.faults.poison(next(loader)))
                epochs.append(loader.epoch)
            t_data = time.perf_counter() - t0
            seed_step(cfg.seed, step, ctx.rank)
            lr = lr_at(
                step,
                lr=cfg.optim.lr,
                min_lr=cfg.optim.min_lr,
                warmup_steps=cfg.optim.warmup_steps,
                max_steps=t.max_steps,
                schedule=cfg.optim.schedule,
            )
            result = engine.train_step(micro, lr)
            # one collective answers all three: the mean loss, whether any rank was asked to stop, samples skipped
            rank_loss = s.faults.spike_loss(micro, result.loss)
            packed = [packed_stats(b) for b in micro] if "doc_ids" in micro[0] else []
            real_tokens, sum_sq = (sum(p[0] for p in packed), sum(p[1] for p in packed)) if packed else (0, 0)
            loss_sum, stop_votes, bad_samples, real_tokens, sum_sq = ctx.all_reduce_sum(
                [
                    rank_loss,
                    float(s.stop.requested),
                    float(loader.bad_samples),
                    float(real_tokens),
                    float(sum_sq),
                ]
            )
            loss = loss_sum / ctx.world_size
            why = s.guard.judge(loss)
            if why is not None:
                progress = rollback(step, why, loss)
                continue
            s.guard.accept(loss)
            progress.step, progress.samples_seen = step, progress.samples_seen + per_step
            progress.loss = loss
            if s.samples is not None:
                for epoch, batch in zip(epochs, micro):
                    s.samples.step(step, epoch, _ids([batch]))
            dt = time.perf_counter() - t0
            metrics = {
                "loss": loss,
                "lr": lr,
                "grad_norm": result.grad_norm,
                "samples_per_sec": per_step / dt,
                "samples_seen": progress.samples_seen,
                "epoch": loader.epoch,
                "bad_samples": int(
                    bad_samples
                ),  # undecodable samples skipped so far, all ranks (data.bad_samples)
                "step_time": dt,
                "data_time": t_data,
            }
            if packed:  # text: packed rows (pretrain.data packing)
                metrics["packing_efficiency"] = getattr(loader, "packing_efficiency", None)
            if (
                s.throughput is not None
            ):  # tokens_per_sec, tflops (achieved, all ranks), mfu (+ mfu_doc for text)
                metrics.update(
                    s.throughput.step_metrics(per_step, dt, (real_tokens, sum_sq) if packed else None)
                )
            parts = {
                k: v.item()
                for k, v in result.outputs[0].items()
                if k != "loss" and isinstance(v, torch.Tensor) and v.ndim == 0
            }
            train_time += dt
            if s.monitor is not None and s.monitor.due(step):  # every rank: the forwards are collective
                parts.update(s.monitor.evaluate(step, train_time))  # "eval/...": in this step's one row
                for name, image in s.monitor.pictures.items():  # two-tower similarity matrix; rank 0 writes
                    s.logger.image(step, name, image)
            s.logger.log(step, {**metrics, **parts})
            bar.update(1)
            # packed text rows: each token sees its document, and mfu_doc is what the hardware did for the model
            key = "mfu_doc" if "mfu_doc" in metrics else "mfu"
            mfu = f" {key.replace('_', ' ')} {metrics[key]:.1%}" if key in metrics else ""
            bar.set_postfix_str(
                f"loss={loss:.4f}, lr={lr:.2e}{mfu.replace(' mfu doc ', ', mfu_doc=').replace(' mfu ', ', mfu=')}",
                refresh=False,
            )
            if step % cfg.run.log_interval == 0 or step == stop:
                log.info(
                    "step %d/%d loss %.4f lr %.2e grad_norm %.3f %.1f samples/s%s",
                    step,
                    t.max_steps,
                    loss,
                    lr,
                    result.grad_norm,
                    per_step / dt,
                    mfu,
                )
            if (
                visuals is not None
                and cfg.run.image_interval
                and (step % cfg.run.image_interval == 0 or step == 1)
            ):
                if ctx.is_main:
                    for name, image in visuals(to_device(micro[0], ctx.device), result.outputs[0]).items():
                        s.logger.image(step, name, image)
            if step % cfg.checkpoint.interval == 0 or step == stop or stop_votes:  # stop: checkpoint first
                save()
            if stop_votes and step < stop:  # a signal during the last step: the run is done anyway
                progress.stopped_by = s.stop.signal.name if s.stop.signal else "a stop signal on another rank"
                log.warning("stop requested (%s): checkpointed step %d, exiting", progress.stopped_by, step)
                s.logger.event("preempted", step=step, signal=progress.stopped_by)
                break
    finally:
        loader.close()
        bar.close()
    return progress
