"""Metrics as JSON lines + TensorBoard + images, on rank 0. Other ranks get a no-op logger."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pretrain.dist import DistContext


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever sys.stdout is when a record is emitted, not the one of the first run in this process
    (a notebook or test harness may have replaced it since)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ and setStream assign it: always sys.stdout
        pass


def setup_logging(ctx: DistContext) -> logging.Logger:
    log = logging.getLogger("tessera")
    if not log.handlers:
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter(f"%(asctime)s [tessera r{ctx.rank}] %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(logging.INFO if ctx.is_main else logging.WARNING)
    return log


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop lines logged after `last_step` (a run that died after its last checkpoint logged steps it will redo)."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    keep = []
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # the last line, cut by a crash mid-write
                continue
            raise ValueError(f"{path}: line {i + 1} is not JSON; not rewriting this file") from None
        if row.get("step", 0) <= last_step:
            keep.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


class MetricsLogger:
    def __init__(self, out_dir: Path, ctx: DistContext, tensorboard: bool, resume_step: int = 0):
        self.enabled = ctx.is_main
        self.out_dir = Path(out_dir)
        self.tb = None
        if not self.enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / "metrics.jsonl"
        self.tensorboard = tensorboard
        self._open(resume_step)

    def _open(self, resume_step: int) -> None:
        truncate_metrics(self.path, resume_step)
        self.file = open(self.path, "a")
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=resume_step + 1)

    def rewind(self, step: int) -> None:
        """Forget what was logged after `step` (a rollback redoes those steps)."""
        if self.enabled:
            self.close()
            self._open(step)

    def event(self, kind: str, **fields) -> None:
        """One line in events.jsonl (never truncated): resumes, rollbacks, preemptions, skipped samples."""
        if self.enabled:
            with open(self.out_dir / "events.jsonl", "a") as f:
                f.write(json.dumps({"event": kind, "time": round(time.time(), 3), **fields}) + "\n")

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, **metrics}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, int | float) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)

    def image(self, step: int, name: str, chw: torch.Tensor) -> Path | None:
        """Save a (3, H, W) image in [0, 1] as PNG under images/ and to TensorBoard."""
        if not self.enabled:
            return None
        from PIL import Image

        chw = chw.detach().float().cpu().clamp(0, 1)
        scale = max(1, 384 // chw.shape[-1])  # small images (28 px digits) are upscaled to be visible
        chw = chw.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
        folder = self.out_dir / "images"
        folder.mkdir(exist_ok=True)
        path = folder / f"{name.replace('/', '_')}_step{step:08d}.png"
        array = (chw.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(array).save(path)
        if self.tb is not None:
            self.tb.add_image(name, chw, step)
        return path

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()
                self.tb = None
