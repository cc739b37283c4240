"""Online monitors: kNN and linear-probe accuracy of the backbone's features every `eval.interval` steps.

The eval images are fixed: the first `eval.train_samples` of the train split (the kNN bank and the probe's
training set) and the first `eval.test_samples` of the test split (scored), normalized as training normalizes,
loaded once. Features and scores come from pretrain.probe, the offline probe's own code.

Distributed, without deadlocks (the bugs of open_clip #1121/#1152 and of lightly's kNN callback):
  - the images are cut into chunks of `eval.batch_size` (train then test); chunk j is embedded by rank j % world,
    so every chunk has the same contents on 1 or N ranks and its features are the same bits;
  - every rank runs the same number of forwards (a rank out of chunks embeds a dummy image and drops it): under
    ZeRO-3 each forward gathers parameters collectively, so ranks must stay in lockstep;
  - the features are all-gathered (padded to equal rows), then every rank scores the same tensors on CPU. Nothing
    collective sits in a rank-0-only branch; rank 0's logger alone writes.
The forward runs as training runs (the engine's unwrapped module, eval mode, no grad, bf16 as the engine does it)
with the RNG forked and restored: a run with eval on trains bit-identically to one with eval off.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import random
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from pretrain import probe
from pretrain.config import Config, ConfigError
from pretrain.dist import DistContext

log = logging.getLogger("tessera")


def check_eval_config(cfg: Config) -> None:
    """What only the model and the datasets can say about the eval section (Config.validate checks the rest):
    monitors need an image backbone, a labelled image dataset and something to score."""
    from pretrain.build import is_text_model
    from pretrain.data.sources import get_dataset

    e = cfg.eval
    if e.interval <= 0:
        return
    if is_text_model(cfg.model.name):
        raise ConfigError(
            f"eval.interval: {e.interval}, but model.name {cfg.model.name!r} is a text model; the online monitors "
            "score image features (text runs: python -m pretrain.text_eval). Set eval.interval=0"
        )
    if not (e.knn or e.linear_probe):
        raise ConfigError(
            f"eval.interval: {e.interval}, but eval.knn and eval.linear_probe are both false: nothing to score"
        )
    name = e.dataset or cfg.data.dataset
    key = "eval.dataset" if e.dataset else "data.dataset"
    try:
        source = get_dataset(name)
    except KeyError as err:
        raise ConfigError(f"{key}: {err.args[0]}") from err
    if source.modality != "image" or "test" not in (source.splits or ("test",)):
        raise ConfigError(
            f"{key}: the monitors need a labelled image dataset with a test split; {name!r} is not"
        )


def _rng_kept(device: torch.device):
    """Every random stream (torch CPU and this device, numpy, python) as it was, whatever happens inside."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.random.fork_rng(devices=[device] if device.type == "cuda" else []))
    py, npy = random.getstate(), np.random.get_state()
    stack.callback(lambda: (random.setstate(py), np.random.set_state(npy)))
    return stack


class Monitor:
    """Built once per run on every rank (`Monitor(cfg, ctx, engine.module)`); `due(step)` says when to call
    `evaluate(step, train_time)`, which every rank must call at the same steps."""

    def __init__(self, cfg: Config, ctx: DistContext, module: nn.Module):
        check_eval_config(cfg)
        e = cfg.eval
        self.cfg, self.ctx, self.module = cfg, ctx, module
        self.encoder = getattr(module, "backbone", module)  # an objective's backbone, or a bare backbone
        self.dataset = e.dataset or cfg.data.dataset
        self.eval_time = 0.0  # seconds spent evaluating in this process
        # the engine's precision (pretrain/engine/*.py): torch autocasts; DeepSpeed holds bf16 weights, bf16 inputs
        bf16 = cfg.engine.precision == "bf16"
        self.autocast = bf16 and cfg.engine.backend == "torch"
        self.input_dtype = torch.bfloat16 if bf16 and cfg.engine.backend == "deepspeed" else None

        train_x, self.train_y, test_x, self.test_y = self._load()
        images = torch.cat([train_x, test_x])  # (N, C, S, S): the train bank, then the test images
        self.n_train, n, b = len(self.train_y), len(images), e.batch_size
        self.sizes = [min(b, n - s) for s in range(0, n, b)]  # chunk j holds images [j*b, j*b + sizes[j])
        self.rounds = math.ceil(len(self.sizes) / ctx.world_size)  # forwards per rank, the same on every rank
        mine = range(ctx.rank, len(self.sizes), ctx.world_size)
        # this rank's share only (copies: views would keep every image alive on every rank)
        self.chunks = {j: images[j * b : j * b + self.sizes[j]].clone() for j in mine}
        self.dummy = images[:1].clone()  # what a rank out of chunks embeds, to keep in step with the others

    def _load(self):
        """The fixed eval splits; rank 0 loads first (it may convert shards), the others then read them."""
        e, d = self.cfg.eval, self.cfg.data
        own = (
            self.dataset == d.dataset and d.split == "train" and not (d.streams or d.remote or d.max_samples)
        )
        local = d.local if own else None  # the run's own train shards, when that is what they are
        size = self.encoder.hparams()["img_size"]

        def load():
            return probe.load_eval_images(
                dataclasses.asdict(d), self.dataset, size, e.train_samples, e.test_samples, local=local
            )

        splits, error = None, None
        if self.ctx.is_main:
            try:
                splits = load()
            except Exception as err:  # every rank must raise, not wait in the broadcast below forever
                self.ctx.broadcast_object(f"{type(err).__name__}: {err}")
                raise
        error = self.ctx.broadcast_object(error)
        if error is not None:
            raise RuntimeError(f"eval: rank 0 could not load the {self.dataset!r} eval images: {error}")
        if splits is None:
            splits = load()
        log.info(
            "eval every %d steps on %s: %d train / %d test images",
            self.cfg.eval.interval,
            self.dataset,
            len(splits[1]),
            len(splits[3]),
        )
        return splits

    def due(self, step: int) -> bool:
        """Every eval.interval steps and at the run's last step (train.max_steps), on every rank alike."""
        i = self.cfg.eval.interval
        return i > 0 and (step % i == 0 or step == self.cfg.train.max_steps)

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.ctx.device, dtype=self.input_dtype or images.dtype)
        cast = torch.autocast(self.ctx.device.type, dtype=torch.bfloat16) if self.autocast else None
        with cast or contextlib.nullcontext():
            return probe.embed(self.encoder, x).float()  # (b, D)

    @torch.no_grad()
    def features(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(train features (N_train, D), test features (N_test, D)): fp32 on CPU, in sample order, on every
        rank. Collective: every rank calls it together."""
        was = self.module.training
        self.module.eval()
        try:
            with _rng_kept(self.ctx.device):
                mine = []
                for r in range(self.rounds):
                    j = r * self.ctx.world_size + self.ctx.rank
                    out = self._embed(self.chunks[j] if j in self.chunks else self.dummy)
                    if j in self.chunks:
                        mine.append(out)
        finally:
            self.module.train(was)
        dim = out.shape[1]
        local = torch.cat(mine) if mine else out.new_zeros(0, dim)  # (rows of this rank, D)
        parts = self._gather(local)  # [rank r's rows] for every r
        chunks, offset = [], [0] * self.ctx.world_size
        for j, size in enumerate(self.sizes):  # rank r's rows are its chunks r, r + world, ... in order
            r = j % self.ctx.world_size
            chunks.append(parts[r][offset[r] : offset[r] + size])
            offset[r] += size
        feats = torch.cat(chunks).cpu()  # (N, D)
        return feats[: self.n_train], feats[self.n_train :]

    def _gather(self, local: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's rows (all_gather needs equal shapes: padded to the largest share, cut back after)."""
        w = self.ctx.world_size
        if not self.ctx.distributed:
            return [local]
        rows = [sum(self.sizes[r::w]) for r in range(w)]
        padded = local.new_zeros(max(rows), local.shape[1])
        padded[: len(local)] = local
        out = [torch.empty_like(padded) for _ in range(w)]
        dist.all_gather(out, padded)
        return [t[:n] for t, n in zip(out, rows)]

    def evaluate(self, step: int, train_time: float) -> dict[str, float]:
        """The monitors' metrics at `step` ("eval/..."), the same on every rank; `train_time`: seconds this
        process has trained so far (for eval/time_fraction). Collective: every rank calls it at the same step."""
        e = self.cfg.eval
        t0 = time.perf_counter()
        train_x, test_x = self.features()
        out = {}
        if e.knn:
            out["eval/knn_top1"] = probe.knn_accuracy(
                train_x, self.train_y, test_x, self.test_y, e.k, e.temperature
            )
        if e.linear_probe:
            out["eval/linear_probe"] = probe.logistic_accuracy(train_x, self.train_y, test_x, self.test_y)
        dt = time.perf_counter() - t0
        self.eval_time += dt
        out["eval/time_s"] = dt
        out["eval/time_fraction"] = self.eval_time / max(train_time, 1e-9)
        scores = ", ".join(
            f"{name} {out[key]:.4f}"
            for name, key in (("kNN top-1", "eval/knn_top1"), ("linear probe", "eval/linear_probe"))
            if key in out
        )
        log.info(
            "step %d eval on %s: %s (%.1fs; eval so far %.1f%% of train time)",
            step,
            self.dataset,
            scores,
            dt,
            100 * out["eval/time_fraction"],
        )
        return out
