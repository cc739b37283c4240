"""Loss guard: judge each step's loss; on a non-finite or spiking one the loop rolls back and skips the batch.

Why roll back rather than skip the update: by the time the loss is known the optimizer has stepped (inside the
engine), so the weights already carry the bad gradient. The loop reloads the last checkpoint, replays the steps
after it (bit-identical: data order and randomness are functions of the step), and at the bad step discards the
offending batch and draws the next one. The skip list lives in <run.output_dir>/guard.json, so a restart from an
older checkpoint skips the same batches without tripping again: the data order stays deterministic.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from pretrain.checkpoint import write_atomic
from pretrain.config import GuardConfig


class TrainingDiverged(RuntimeError):
    """The loss stayed bad after guard.max_retries rollbacks, or there was no checkpoint to roll back to."""


@dataclass
class GuardRecord:
    """What must survive a restart: batches to skip and rollbacks since the last good checkpoint."""

    skips: dict[int, int] = field(default_factory=dict)  # step -> step-batches to discard before training it
    retries: int = 0  # rollbacks since the last checkpoint written after an anomaly
    events: list[dict] = field(default_factory=list)

    @classmethod
    def read(cls, path: Path) -> GuardRecord:
        if not path.is_file():
            return cls()
        data = json.loads(path.read_text())
        return cls({int(k): v for k, v in data["skips"].items()}, data["retries"], data["events"])

    def write(self, path: Path) -> None:
        data = {"skips": {str(k): v for k, v in sorted(self.skips.items())}, "retries": self.retries}
        write_atomic(path, json.dumps({**data, "events": self.events}, indent=1) + "\n")


class LossGuard:
    def __init__(self, cfg: GuardConfig, record: GuardRecord) -> None:
        self.cfg, self.record = cfg, record
        self.ema: float | None = None  # running mean of good losses; saved in checkpoint meta
        self.good_steps = 0

    def state(self) -> dict:
        return {"ema": self.ema, "good_steps": self.good_steps}

    def load_state(self, state: dict | None) -> None:
        state = state or {}
        self.ema, self.good_steps = state.get("ema"), state.get("good_steps", 0)

    def judge(self, loss: float) -> str | None:
        """None for a good loss, else why it is bad ("non-finite" or "spike: ...")."""
        if not math.isfinite(loss):
            if not self.cfg.enabled:
                raise TrainingDiverged(f"loss is {loss} and guard.enabled is false: stopping; no rollback")
            return "non-finite"
        if not self.cfg.enabled:
            return None
        f = self.cfg.spike_factor
        if f and self.ema is not None and self.good_steps >= self.cfg.spike_warmup and loss > f * self.ema:
            return f"spike: {loss:.4g} > {f:g} x running mean {self.ema:.4g}"
        return None

    def accept(self, loss: float) -> None:
        d = self.cfg.ema_decay
        self.ema = loss if self.ema is None else d * self.ema + (1 - d) * loss
        self.good_steps += 1

    def skips_at(self, step: int) -> int:
        return self.record.skips.get(step, 0)

    def on_anomaly(self, step: int, why: str, loss: float, checkpoint: str | None) -> None:
        """Record the anomaly and the skip it implies; raise TrainingDiverged when rolling back is not allowed."""
        self.record.events.append({"step": step, "why": why, "loss": repr(loss), "rollback_to": checkpoint})
        if checkpoint is None:
            raise TrainingDiverged(
                f"loss at step {step} is bad ({why}) and there is no checkpoint to roll back to yet; "
                "lower checkpoint.interval or fix the run (e.g. optim.lr)"
            )
        self.record.retries += 1
        if self.record.retries > self.cfg.max_retries:
            steps = [e["step"] for e in self.record.events[-self.record.retries :]]
            raise TrainingDiverged(
                f"loss still bad after guard.max_retries={self.cfg.max_retries} rollbacks (steps {steps}, last: "
                f"{why}); giving up. Last good checkpoint: {checkpoint}. Lower optim.lr, check the data, or "
                "raise guard.max_retries"
            )
        self.record.skips[step] = self.record.skips.get(step, 0) + 1

    def on_checkpoint(self) -> None:
        self.record.retries = 0  # the run got past its last anomaly to a new good checkpoint
