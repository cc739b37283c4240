"""Fault injection for drills and tests, read from $TESSERA_FAULTS (never from the config: a run's config stays
the run's). Empty or unset = no faults, and every hook below is a no-op.

    TESSERA_FAULTS="nan=5,17;spike=33;ckpt_pause=6:20"
        nan=IDS          images of these sample ids become NaN (a corrupt sample that poisons its batch)
        spike=IDS        the loss of a step whose batch holds one of these ids is reported x1e4 (a loss spike; input
                         scaling would not do: most backbones normalize it away right after the stem)
        ckpt_pause=S:SEC checkpoint of step S sleeps SEC seconds after the engine files are written and before the
                         checkpoint is published: a window for `kill -9` during a checkpoint write
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

log = logging.getLogger("tessera")
SPIKE_SCALE = 1e4


@dataclass
class Faults:
    nan: set[int] = field(default_factory=set)
    spike: set[int] = field(default_factory=set)
    ckpt_pause: dict[int, float] = field(default_factory=dict)

    @classmethod
    def from_env(cls, text: str | None = None) -> Faults:
        text = os.environ.get("TESSERA_FAULTS", "") if text is None else text
        faults = cls()
        for part in filter(None, (p.strip() for p in text.split(";"))):
            key, _, value = part.partition("=")
            try:
                if key in ("nan", "spike"):
                    getattr(faults, key).update(int(v) for v in value.split(","))
                elif key == "ckpt_pause":
                    step, seconds = value.split(":")
                    faults.ckpt_pause[int(step)] = float(seconds)
                else:
                    raise ValueError(f"unknown fault {key!r}")
            except ValueError as e:
                raise ValueError(
                    f"TESSERA_FAULTS: cannot parse {part!r} ({e}); see pretrain/faults.py"
                ) from e
        if faults.nan or faults.spike or faults.ckpt_pause:
            log.warning("fault injection is on: TESSERA_FAULTS=%s", text)
        return faults

    def poison(self, batch: dict) -> dict:
        """NaN the images of the listed sample ids in a batch {"image": (B, ...), "index": (B,)}."""
        if not self.nan:
            return batch
        image = batch["image"].clone()
        for row, i in enumerate(batch["index"].tolist()):
            if i in self.nan:
                image[row] = float("nan")
        return {**batch, "image": image}

    def spike_loss(self, micro_batches: list[dict], loss: float) -> float:
        """The step's loss on this rank, x1e4 when its batches hold a spike id."""
        if self.spike and any(i in self.spike for b in micro_batches for i in b["index"].tolist()):
            return loss * SPIKE_SCALE
        return loss

    def pause_checkpoint(self, step: int) -> None:
        seconds = self.ckpt_pause.get(step)
        if seconds:
            log.warning("TESSERA_FAULTS: pausing %.0fs inside the checkpoint write of step %d", seconds, step)
            time.sleep(seconds)
