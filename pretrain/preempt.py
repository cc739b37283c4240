"""Preemption: a signal asks the run to stop; it finishes the step, checkpoints, and exits so the job requeues.

Slurm sends SIGUSR1 before a time limit (`#SBATCH --signal=B:USR1@120`, forwarded by slurm/pretrain.sh) and
SIGTERM when it preempts or cancels. Either one sets a flag here; the loop reads it once per step, in a collective
(`DistContext.all_reduce_sum`), so every rank stops after the same step even when the signal reached only one of
them. The process then exits with EXIT_REQUEUE, and rank 0 records why in $TESSERA_STATUS_FILE (if set) for the
batch script, because torchrun reports any worker exit code as its own 1.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from pretrain.checkpoint import write_atomic

EXIT_REQUEUE = 75  # EX_TEMPFAIL: "try again later" — the sbatch script requeues the job on it
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopRequest:
    """Records the first stop signal this process receives. Install once per process, from the main thread."""

    def __init__(self) -> None:
        self.signal: signal.Signals | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> StopRequest:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: object) -> None:
        if self.signal is None:  # keep the first: a SIGTERM after SIGUSR1 is the same request
            self.signal = signal.Signals(signum)

    @property
    def requested(self) -> bool:
        return self.signal is not None


def write_status(status: str, step: int, sig: str | None = None, path: str | None = None) -> None:
    """{"status": finished | preempted | failed, "step": N, "signal": name or null} into $TESSERA_STATUS_FILE."""
    path = path or os.environ.get("TESSERA_STATUS_FILE")
    if not path:
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(target, json.dumps({"status": status, "step": step, "signal": sig}) + "\n")
