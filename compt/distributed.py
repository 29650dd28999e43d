"""Joining the process group under any launcher: deepspeed, torchrun, accelerate launch, mpirun, srun,
or plain python (one rank). DeepSpeed does the discovery; this module decides when to let it, and stops
a process that a multi-process launcher started but that would end up training alone.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

# What torch's env:// rendezvous reads. DeepSpeed runs its MPI discovery only when one of these is
# missing; deepspeed's own launcher, torchrun and accelerate launch set all five.
TORCH_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")

# Launchers that start every process directly and leave the rendezvous to MPI discovery, in the order
# they are believed: an mpirun inside a SLURM allocation is an MPI launch, whatever the allocation says.
# (launcher, variables giving the process count, variables giving this process's rank)
DISCOVERED = (
    ("Open MPI mpirun (or deepspeed --launcher openmpi)", ("OMPI_COMM_WORLD_SIZE",), ("OMPI_COMM_WORLD_RANK",)),
    ("MVAPICH (or deepspeed --launcher mvapich)", ("MV2_COMM_WORLD_SIZE",), ("MV2_COMM_WORLD_RANK",)),
    ("an MPI with PMI (MPICH, Intel MPI)", ("PMI_SIZE",), ("PMI_RANK", "PMIX_RANK")),
    ("SLURM srun (or deepspeed --launcher slurm)", ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS"),
     ("SLURM_PROCID",)),
)

# Processes per node, as each launcher says it; the first one set wins.
LOCAL_SIZE_VARS = ("LOCAL_SIZE",                  # deepspeed
                   "LOCAL_WORLD_SIZE",            # torchrun, accelerate launch
                   "OMPI_COMM_WORLD_LOCAL_SIZE",  # Open MPI
                   "MV2_COMM_WORLD_LOCAL_SIZE",   # MVAPICH
                   "MPI_LOCALNRANKS",             # MPICH / Intel MPI (hydra)
                   "SLURM_NTASKS_PER_NODE")       # srun --ntasks-per-node


class LauncherError(RuntimeError):
    """The launcher's environment and the process group disagree; nothing has been written."""


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def launcher_claim(env: Mapping[str, str] = os.environ) -> tuple[str, int, dict[str, str]]:
    """(launcher, number of processes its environment says were started, the variables that say so).
    ("python", 1, {}) when no launcher left a trace."""
    if "WORLD_SIZE" in env:  # torch-style launchers set the whole rendezvous, inside any allocation
        seen = {k: env[k] for k in TORCH_ENV if k in env}
        return "deepspeed / torchrun / accelerate launch", max(1, _int(env["WORLD_SIZE"]) or 1), seen
    for launcher, size_vars, rank_vars in DISCOVERED:
        size = next((n for n in (_int(env.get(k)) for k in size_vars) if n is not None), None)
        rank = next((n for n in (_int(env.get(k)) for k in rank_vars) if n is not None), None)
        if size is None or rank is None:
            continue  # a launcher gives each process it starts a rank; SLURM_NTASKS alone is the allocation's
        return launcher, max(size, rank + 1), {k: env[k] for k in (*size_vars, *rank_vars) if k in env}
    return "python", 1, {}


def local_world_size(env: Mapping[str, str] = os.environ) -> int:
    """Processes of this job on this node, from whichever launcher variable is set (1 when none is)."""
    for name in LOCAL_SIZE_VARS:
        n = _int(env.get(name))
        if n:
            return n
    # srun without --ntasks-per-node: "2(x3),1" lists the tasks of each node of the step.
    spec, node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE"), _int(env.get("SLURM_NODEID"))
    if spec and node is not None:
        counts = [int(n) for n, times in re.findall(r"(\d+)(?:\(x(\d+)\))?", spec) for _ in range(int(times or 1))]
        if node < len(counts) and counts[node] > 0:
            return counts[node]
    return 1


def threads_per_rank(world: int, env: Mapping[str, str] = os.environ) -> int:
    """Intra-op threads for a CPU rank: this process's usable cores shared by the ranks on its node
    (torch would otherwise start one thread per core in every rank)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // (local_world_size(env) if world > 1 else 1))


def _mpi_discovery_problem() -> str | None:
    """Why DeepSpeed's MPI discovery cannot run here, or None (importing mpi4py initialises MPI,
    which DeepSpeed's discovery would do next anyway)."""
    try:
        from mpi4py import MPI  # noqa: F401
    except (ImportError, OSError, RuntimeError) as e:
        return f"mpi4py cannot be imported ({type(e).__name__}: {e})"
    return None


def _alone(launcher: str, claimed: int, seen: dict[str, str], why: str, fix: str) -> LauncherError:
    names = ", ".join(f"{k}={v}" for k, v in seen.items())
    return LauncherError(
        f"this process was started by {launcher} as one of {claimed} processes ({names}), but {why}: "
        f"each process would train alone as rank 0 into the same run directory, so nothing was written. "
        f"Fix: {fix}, or launch with `deepspeed` or `torchrun`, which set RANK, WORLD_SIZE, LOCAL_RANK, "
        "MASTER_ADDR and MASTER_PORT themselves. To train as one process, start it without the launcher.")


def init_distributed() -> tuple[int, int]:
    """Join the process group the launcher set up and return (rank, world size): DeepSpeed's
    ``init_distributed`` with its MPI/AzureML/SageMaker discovery when an MPI-style launcher started
    the process, a 1-rank group under plain python. Raises LauncherError before joining anything
    wrong; call it before writing to the run directory."""
    import deepspeed
    import deepspeed.comm as ds_comm
    import torch
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    launcher, claimed, seen = launcher_claim()
    if all(k in os.environ for k in TORCH_ENV):
        deepspeed.init_distributed()
    elif claimed > 1:
        # DeepSpeed reads AzureML / SageMaker variables itself; everywhere else it asks mpi4py.
        cloud = (ds_comm.in_aml() and not ds_comm.in_dlts()) or ds_comm.in_aws_sm()
        problem = None if cloud else _mpi_discovery_problem()
        if problem:
            raise _alone(launcher, claimed, seen, problem,
                         "`pip install mpi4py` so that DeepSpeed's MPI discovery can find the other ranks")
        # mpi_discovery sets MASTER_PORT to this port: let the user's export choose it.
        port = int(os.environ.get("MASTER_PORT", 29500))
        deepspeed.init_distributed(auto_mpi_discovery=True, distributed_port=port)
    else:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
        deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    if world == 1 and claimed > 1:
        raise _alone(launcher, claimed, seen, "MPI saw only this process, so it joined a 1-rank group",
                     "use an mpi4py built against the MPI that launched the job (`python -c \"from mpi4py import "
                     "MPI; print(MPI.Get_library_version())\"` names it); under srun, pick the cluster's MPI "
                     "plugin (`srun --mpi=pmix`)")
    if get_accelerator().device_name() == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # CPU ranks on one node share its cores.
        torch.set_num_threads(threads_per_rank(world))
    release_shared_memory(rank, world)
    return rank, world


def shm_buffer(rank: int, env: Mapping[str, str] = os.environ) -> Path:
    """The /dev/shm file DeepSpeed's CPU all-reduce (ops/csrc/cpu/comm/shm.cpp) creates for a rank when all
    ranks are on one node."""
    return Path("/dev/shm") / (f"deepspeed_allreduce_buffer_{os.getuid()}_{env.get('MASTER_ADDR', '')}_"
                               f"{env.get('MASTER_PORT', '')}_{rank}")


def release_shared_memory(rank: int, world: int) -> None:
    """Unlink this rank's DeepSpeed shared-memory all-reduce buffer once every rank has mapped it.

    DeepSpeed creates one ~66 MB buffer per rank and never unlinks it, so every CPU run left them in /dev/shm
    (RAM) for good: 11 GiB after a day of test runs here. Once initialisation has returned on every rank, each
    rank has opened every peer's buffer, so the names can go at once: the memory stays mapped while the ranks
    use it and is freed with the last of them, even when a run is killed.
    """
    import torch.distributed as dist

    path = shm_buffer(rank)
    if not path.exists():  # not a CPU run, or ranks on several nodes: DeepSpeed made no buffer
        return
    if world > 1:
        dist.barrier()
    path.unlink(missing_ok=True)
