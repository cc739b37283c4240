"""The training loop: one readable function over an engine, a loader, a logger and a checkpointer."""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from pretrain.checkpoint import Checkpointer
from pretrain.config import Config
from pretrain.dist import DistContext
from pretrain.engine import Engine
from pretrain.engine.base import to_device
from pretrain.logger import MetricsLogger
from pretrain.optim import lr_at

log = logging.getLogger("tessera")


@dataclass
class Progress:
    step: int = 0  # optimizer steps completed
    samples_seen: int = 0  # samples consumed by all ranks


def seed_step(seed: int, step: int, rank: int) -> None:
    """Every random draw of a step (masking, dropout, drop-path) depends only on (seed, step, rank).

    This is what makes a resumed run bit-identical: no RNG stream has to be replayed to reach step N.
    """
    s = ((seed * 1_000_003 + step) * 1_000_033 + rank) % (2**63 - 1)
    torch.manual_seed(s)
    np.random.seed(s % 2**32)
    random.seed(s)


def train_loop(
    cfg: Config,
    ctx: DistContext,
    engine: Engine,
    loader,
    logger: MetricsLogger,
    ckpt: Checkpointer,
    progress: Progress,
    config_yaml: str,
) -> Progress:
    t = cfg.train
    stop = t.max_steps if t.stop_at_step is None else min(t.max_steps, t.stop_at_step)
    per_step = t.micro_batch_size * t.grad_accum_steps * ctx.world_size
    visuals = getattr(engine.module, "visuals", None)
    batches = iter(loader)
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
        }
        ckpt.save(progress.step, engine, meta, {"loader": loader.state_dict()}, config_yaml)

    while progress.step < stop:
        step = progress.step + 1
        t0 = time.perf_counter()
        micro = [next(batches) for _ in range(t.grad_accum_steps)]
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
        loss = ctx.all_reduce_mean(result.loss)
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at step {step}; the last checkpoint is in {ckpt.root}")
        progress.step, progress.samples_seen = step, progress.samples_seen + per_step
        dt = time.perf_counter() - t0
        metrics = {
            "loss": loss,
            "lr": lr,
            "grad_norm": result.grad_norm,
            "samples_per_sec": per_step / dt,
            "samples_seen": progress.samples_seen,
            "epoch": loader.epoch,
            "step_time": dt,
            "data_time": t_data,
        }
        parts = {
            k: v.item()
            for k, v in result.outputs[0].items()
            if k != "loss" and isinstance(v, torch.Tensor) and v.ndim == 0
        }
        logger.log(step, {**metrics, **parts})
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
        if step % cfg.run.log_interval == 0 or step == stop:
            log.info(
                "step %d/%d loss %.4f lr %.2e grad_norm %.3f %.1f samples/s",
                step,
                t.max_steps,
                loss,
                lr,
                result.grad_norm,
                per_step / dt,
            )
        if (
            visuals is not None
            and cfg.run.image_interval
            and (step % cfg.run.image_interval == 0 or step == 1)
        ):
            if ctx.is_main:
                for name, image in visuals(to_device(micro[0], ctx.device), result.outputs[0]).items():
                    logger.image(step, name, image)
        if step % cfg.checkpoint.interval == 0 or step == stop:
            save()
    bar.close()
    return progress
