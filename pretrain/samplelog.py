"""Per-sample log: which sample ids each rank trained on at each step, across restarts and rollbacks.

`run.sample_log: true` writes <run.output_dir>/samples/seg_SSSS_rank_RRRRR.jsonl. A *segment* is one stretch of
training that starts from a checkpoint (a launch, a resume, a rollback); its first line says from which step:
    {"segment": 3, "resume_step": 40}
    {"step": 41, "epoch": 1, "index": [...]}         sample ids of one micro-batch of that step on this rank
    {"step": 44, "epoch": 1, "skipped": [...]}        ids drawn but not trained on (a batch skipped by the guard)
Steps a killed process logged after its last checkpoint are redone by the next segment; `effective_steps`
replays the segments in order, dropping what each later one redid, so it answers "what did the final weights
see": the test of no sample lost or repeated. Append-only; a line cut by kill -9 is dropped on read.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

_NAME = re.compile(r"seg_(\d+)_rank_(\d+)\.jsonl$")


def next_segment(folder: Path) -> int:
    """1 + the highest segment number in `folder` (0 for an empty one)."""
    nums = [int(m.group(1)) for p in Path(folder).glob("seg_*_rank_*.jsonl") if (m := _NAME.search(p.name))]
    return max(nums, default=-1) + 1


class SampleLog:
    """One rank's writer. `segment` must be the same number on every rank (rank 0 decides, see train.py)."""

    def __init__(self, folder: Path, rank: int, segment: int, resume_step: int) -> None:
        self.folder, self.rank = Path(folder), rank
        self.folder.mkdir(parents=True, exist_ok=True)
        self.file = None
        self.start(segment, resume_step)

    def start(self, segment: int, resume_step: int) -> None:
        """Begin a new segment (after a launch or a rollback) training from checkpoint step `resume_step`."""
        self.close()
        self.segment = segment
        self.file = open(self.folder / f"seg_{segment:04d}_rank_{self.rank:05d}.jsonl", "a")
        self._write({"segment": segment, "resume_step": resume_step})

    def step(self, step: int, epoch: int, index: list[int]) -> None:
        self._write({"step": step, "epoch": epoch, "index": index})

    def skipped(self, step: int, epoch: int, index: list[int]) -> None:
        self._write({"step": step, "epoch": epoch, "skipped": index})

    def _write(self, row: dict) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def _rows(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by kill -9: that step is redone by the next segment anyway
            continue
    return rows


def effective_steps(folder: Path) -> dict[int, dict]:
    """{step: {"epoch": first epoch, "index": sorted ids over all ranks, "skipped": sorted ids, "by_epoch":
    {epoch: sorted ids}}} of the final trajectory.

    Segments are replayed in order; each one first forgets every step after its resume step (those were redone).
    """
    by_segment: dict[int, list[Path]] = {}
    for p in Path(folder).glob("seg_*_rank_*.jsonl"):
        m = _NAME.search(p.name)
        if m:
            by_segment.setdefault(int(m.group(1)), []).append(p)
    steps: dict[int, dict] = {}
    for seg in sorted(by_segment):
        files = [_rows(p) for p in sorted(by_segment[seg])]
        resume = min(rows[0]["resume_step"] for rows in files if rows and "resume_step" in rows[0])
        steps = {s: v for s, v in steps.items() if s <= resume}
        for rows in files:
            for row in rows:
                if "step" not in row:
                    continue
                entry = steps.setdefault(
                    row["step"], {"epoch": row["epoch"], "index": [], "skipped": [], "by_epoch": {}}
                )
                entry["epoch"] = min(entry["epoch"], row["epoch"])
                if "index" in row:  # a step may straddle two epochs (grad accumulation): keep each sample's
                    entry["index"] += row["index"]
                    entry["by_epoch"].setdefault(row["epoch"], []).extend(row["index"])
                else:
                    entry["skipped"] += row["skipped"]
    for entry in steps.values():
        entry["index"].sort()
        entry["skipped"].sort()
        for ids in entry["by_epoch"].values():
            ids.sort()
    return dict(sorted(steps.items()))


def epoch_counts(steps: dict[int, dict]) -> dict[int, dict[int, int]]:
    """{epoch: {sample id: times trained on}} from `effective_steps`."""
    out: dict[int, dict[int, int]] = {}
    for entry in steps.values():
        for epoch, ids in entry["by_epoch"].items():
            counts = out.setdefault(epoch, {})
            for i in ids:
                counts[i] = counts.get(i, 0) + 1
    return out
