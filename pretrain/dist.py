"""Who am I in the job: rank, world size, device — built once at launch, passed everywhere.

The same entry point runs under `python -m`, `torchrun`, `accelerate launch` and `srun`. torchrun and
accelerate export RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR; under a bare `srun` we derive them from the
SLURM_* variables. Nothing here runs at import time.
"""

from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    launcher: str = "python"  # python | torchrun | accelerate | slurm

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """More than one rank, joined in a process group (a world-size-1 group for DeepSpeed does not count)."""
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def broadcast_object(self, obj):
        """Rank 0's `obj` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_reduce_mean(self, value: float) -> float:
        """Mean of a float over ranks (float64 on CPU: the same value on every rank, in any order)."""
        return self.all_reduce_sum([value])[0] / self.world_size

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks in one collective (float64 on CPU: identical on every rank)."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)  # NCCL reduces CUDA tensors only
        dist.all_reduce(t)
        return t.tolist()


def _slurm_master_addr() -> str:
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if nodelist:
        try:
            out = subprocess.run(
                ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True
            )
            first = out.stdout.split()[0]
            return socket.gethostbyname(first)
        except (OSError, subprocess.CalledProcessError, IndexError, socket.gaierror):
            pass
    return os.environ.get("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1")


def _from_env(env: dict[str, str]) -> tuple[int, int, int, int, str]:
    """(rank, world_size, local_rank, local_world_size, launcher) from the launcher's variables."""
    if "RANK" in env and "WORLD_SIZE" in env:
        launcher = "accelerate" if any(k.startswith("ACCELERATE_") for k in env) else "torchrun"
        world = int(env["WORLD_SIZE"])
        return (
            int(env["RANK"]),
            world,
            int(env.get("LOCAL_RANK", 0)),
            int(env.get("LOCAL_WORLD_SIZE", world)),
            launcher,
        )
    # Only inside an `srun` step: the batch script itself also sees SLURM_PROCID=0 and SLURM_NTASKS, and a
    # plain `python` there must not wait for ranks that will never start. srun sets SLURM_STEP_NUM_TASKS.
    if "SLURM_PROCID" in env and int(env.get("SLURM_STEP_NUM_TASKS", "1")) > 1:
        world = int(env["SLURM_STEP_NUM_TASKS"])
        per_node = (env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_NTASKS_PER_NODE", "")).split("(")[
            0
        ]
        nodes = int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES", "1"))
        local_world = int(per_node) if per_node.isdigit() else max(1, world // nodes)
        return int(env["SLURM_PROCID"]), world, int(env.get("SLURM_LOCALID", 0)), local_world, "slurm"
    return 0, 1, 0, 1, "python"


def init_distributed(force_process_group: bool = False) -> DistContext:
    """Read the launcher's variables, set threads and device, and join the process group.

    A process group is created when world_size > 1, or when `force_process_group` (DeepSpeed wants one even
    for a single process; it then lives in an in-memory store, no port needed).
    """
    rank, world, local_rank, local_world, launcher = _from_env(dict(os.environ))
    if launcher == "slurm":
        os.environ.setdefault("MASTER_ADDR", _slurm_master_addr())
        os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000))
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank))
        os.environ["LOCAL_WORLD_SIZE"] = str(local_world)

    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
        if "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))

    if not dist.is_initialized():
        if world > 1:
            dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world)
        elif force_process_group:
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    return DistContext(rank, world, local_rank, local_world, device, launcher)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
