"""Remove shared memory that streaming leaked from killed processes — and only that.

A StreamingDataset keeps its state in /dev/shm segments named `<6-digit prefix>_<name>`, freed at interpreter
exit. A process killed with -9 (preemption, OOM killer, a fault drill) leaks them, and a leaked `_locals` segment
that names the same local directory makes the next run's dataset refuse to start. streaming's own
`clean_stale_shared_memory` unlinks every segment from prefix 0 up, live ones included, which would pull the
segments from under another job training on the same node. Here a segment is stale only when no process on the
machine has it mapped (every StreamingDataset and loader worker maps the segments it uses).
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

log = logging.getLogger(__name__)
SHM_DIR = "/dev/shm"
_STREAMING_NAME = re.compile(
    r"^\d{6}_(locals|barrier|next_epoch|cache_usage|shard_states|shard_access_times|epoch_shape|epoch_data|"
    r"resume)$"  # streaming.base.constant.SHM_TO_CLEAN (tests check they agree)
)


def _mapped_segments() -> set[str] | None:
    """Basenames of /dev/shm files mapped by any process we can see; None if /proc cannot tell us."""
    mapped: set[str] = set()
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return None
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    i = line.find(SHM_DIR + "/")
                    if i >= 0:
                        mapped.add(line[i + len(SHM_DIR) + 1 :].split()[0])
        except (OSError, IndexError):  # gone, or not ours to read: its segments are not ours to unlink either
            continue
    return mapped


def clean_stale_segments() -> list[str]:
    """Unlink streaming segments no live process maps; returns their names. Other users' files are left alone."""
    if not os.path.isdir(SHM_DIR):
        return []
    names = [n for n in os.listdir(SHM_DIR) if _STREAMING_NAME.match(n)]
    if not names:
        return []
    mapped = _mapped_segments()
    if mapped is None:
        return []
    removed = []
    uid = os.getuid()
    for name in names:
        path = os.path.join(SHM_DIR, name)
        try:
            if name in mapped or os.stat(path).st_uid != uid:
                continue
            os.unlink(path)
            removed.append(name)
        except OSError:
            continue
    if removed:
        log.info("removed %d streaming shared-memory segments leaked by killed processes", len(removed))
    return removed


def release_dataset_memory(ds: Any) -> None:
    """Free what a StreamingDataset holds in this process, so its `local` dir can be used again right away.

    streaming frees its segments only at interpreter exit; until then a second dataset on the same local dir
    (with a remote) is refused. We stop its prefetch threads, mark its local dirs free (what its __del__ does)
    and unlink the segments this process created.
    """
    it = getattr(ds, "_iterator", None)
    if it is not None:
        it.exit()  # num_workers=0: the prefetch threads run in this process
    executor = getattr(ds, "_executor", None)
    if executor is not None:
        executor.shutdown(wait=True)
    handles = [
        ds._locals_shm,
        ds._next_epoch.arr.shm,
        ds._cache_usage.arr.shm,
        ds._shard_states.shm,
        ds._shard_access_times.shm,
        ds._shared_barrier._arr.shm,
        getattr(ds, "_resume_shm", None),
    ]
    try:
        ds._locals_shm.buf[:4] = bytes(4)
    except (ValueError, TypeError, BufferError):
        pass
    for handle in handles:
        if handle is not None:
            try:
                handle.cleanup()
            except (BufferError, OSError):  # a live view or an already-gone segment: exit will finish the job
                pass
