"""Remove shared memory that streaming leaked from killed processes — and only that.

A StreamingDataset keeps its state in /dev/shm segments named `<6-digit prefix>_<name>`, freed at interpreter
exit. A process killed with -9 (preemption, OOM killer, a fault drill) leaks them, and a leaked `_locals` segment
that names the same local directory makes the next run's dataset refuse to start. streaming's own
`clean_stale_shared_memory` unlinks every segment from prefix 0 up, live ones included, which would pull the
segments from under another job training on the same node. Here a segment is stale only when no process on the
machine has it mapped (every StreamingDataset and loader worker maps the segments it uses).

streaming also races with itself: each new dataset walks the prefixes to the first free one and then creates
`<prefix>_locals`, so two jobs starting together on one node can pick the same prefix and one dies with
`FileExistsError: '/<prefix>_locals'`. `prefix_lock` serializes that step between Tessera processes on a node.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterator
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


def prefix_lock_path() -> str:
    """The node-wide lock file (in the temp dir, where streaming keeps its own file locks)."""
    return os.path.join(tempfile.gettempdir(), "tessera-streaming-prefix.lock")


@contextlib.contextmanager
def prefix_lock(hold: bool, timeout_s: float = 300.0) -> Iterator[bool]:
    """Hold the node's streaming-prefix lock while a dataset registers its shared memory; yields whether held.

    Only a job's local leader takes it (`hold`), and its other ranks must start their own prefix walk after it
    holds it (the caller's barrier), or they could read the prefixes before another job's registration. A lock
    not had within `timeout_s` (say two multi-node jobs each holding one node) is given up with a warning: then
    streaming's own race is back, which is no worse than without the lock.
    """
    if not hold:
        yield False
        return
    path = prefix_lock_path()
    try:
        # read-only: flock needs no write access, so another user's lock file works too
        fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)
    except OSError as err:
        log.warning("cannot open %s (%s): registering the streaming prefix without the node lock", path, err)
        yield False
        return
    held = False
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held = True
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    log.warning(
                        "%s still held by another process after %.0f s: registering the streaming prefix "
                        "without it",
                        path,
                        timeout_s,
                    )
                    break
                time.sleep(0.05)
        yield held
    finally:
        if held:
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


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
