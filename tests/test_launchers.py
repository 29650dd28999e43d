"""Any launcher: torchrun (and mpirun, where installed) train the same weights as the deepspeed launcher,
and a process a multi-process launcher started but that ends up alone stops before writing anything."""
from __future__ import annotations

import copy
import importlib.util
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from compt.distributed import launcher_claim, local_world_size, threads_per_rank
from conftest import DS, REPO, TINY_CHAIN, stage_metrics, write_chain

STAGES = ["a", "b"]  # the tiny chain's first two stages: plain training, then growth + alignment
# Variables a launcher sets; a test process must not pass on its own to the launches below.
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "PMI_SIZE", "PMI_RANK", "MV2_COMM_WORLD_SIZE",
               "MV2_COMM_WORLD_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_NPROCS", "SLURM_STEP_NUM_TASKS")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict:
    # One thread per rank under every launcher (torchrun would default to 1, deepspeed to cores / ranks):
    # the thread count changes the order of float sums, hence the weights.
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def launch(cmd: list[str], env: dict | None = None, timeout: int = 600) -> str:
    proc = subprocess.run(cmd, cwd=REPO, env=env or clean_env(), capture_output=True, text=True, timeout=timeout)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{log[-6000:]}"
    return log


def chain_args(chain, out) -> list[str]:
    return ["launch/chain.py", "--chain", str(chain), "--ds_config", DS, "--output", str(out)]


@pytest.fixture(scope="module")
def two_stage(tmp_path_factory):
    root = tmp_path_factory.mktemp("launchers")
    chain = dict(copy.deepcopy(TINY_CHAIN), stages=copy.deepcopy(TINY_CHAIN["stages"][:2]))
    return root, write_chain(root / "chain.yaml", chain)


@pytest.fixture(scope="module")
def deepspeed_run(two_stage):
    root, chain = two_stage
    log = launch(["deepspeed", "--master_port", str(free_port()), "--num_gpus", "2", *chain_args(chain, root / "ds")])
    return root / "ds", log


def assert_same_weights(ours, reference) -> None:
    for k, name in enumerate(STAGES):
        m, ref = stage_metrics(ours, k, name), stage_metrics(reference, k, name)
        assert m["ranks"] == ref["ranks"] == 2 and m["steps"] == ref["steps"]
        w = load_file(str(ours / "stages" / f"{k}-{name}" / "model.safetensors"))
        w_ref = load_file(str(reference / "stages" / f"{k}-{name}" / "model.safetensors"))
        assert w.keys() == w_ref.keys()
        differ = [n for n in w if not torch.equal(w[n], w_ref[n])]
        assert not differ, f"stage {name}: {len(differ)} tensors differ, e.g. {differ[:3]}"


def test_torchrun_matches_deepspeed_launcher(two_stage, deepspeed_run):
    root, chain = two_stage
    log = launch(["torchrun", "--nnodes", "1", "--nproc_per_node", "2", "--master_port", str(free_port()),
                  *chain_args(chain, root / "torchrun")])
    assert "chain 'tiny' (2 rank(s))" in log
    assert_same_weights(root / "torchrun", deepspeed_run[0])


@pytest.mark.skipif(shutil.which("mpirun") is None or importlib.util.find_spec("mpi4py") is None,
                    reason="needs mpirun and mpi4py (e.g. apt-get install openmpi-bin libopenmpi-dev; pip install mpi4py)")
def test_mpirun_matches_deepspeed_launcher(two_stage, deepspeed_run):
    """No rank variables at all: DeepSpeed's MPI discovery (mpi4py) builds the group."""
    root, chain = two_stage
    env = clean_env(MASTER_PORT=str(free_port()))
    log = launch(["mpirun", "--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "-np", "2",
                  "-x", "OMP_NUM_THREADS", "-x", "MASTER_PORT", "-x", "PYTHONUNBUFFERED",
                  sys.executable, *chain_args(chain, root / "mpirun")], env)
    assert "chain 'tiny' (2 rank(s))" in log
    assert_same_weights(root / "mpirun", deepspeed_run[0])


def run_alone(tmp_path, **env: str) -> subprocess.CompletedProcess:
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, *chain_args("demo", out)], cwd=REPO,
                          env=clean_env(**env), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert not out.exists(), f"{out} was written: {sorted(p.name for p in out.iterdir())}"
    return proc


def test_mpi_process_without_mpi4py_stops_before_writing(tmp_path):
    """mpirun started this process as one of 2, but DeepSpeed cannot discover the others (no mpi4py)."""
    hidden = tmp_path / "no-mpi4py" / "mpi4py"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('mpi4py hidden by the test')\n")
    proc = run_alone(tmp_path, OMPI_COMM_WORLD_SIZE="2", OMPI_COMM_WORLD_RANK="0",
                     PYTHONPATH=os.pathsep.join(filter(None, [str(hidden.parent), os.environ.get("PYTHONPATH")])))
    err = proc.stderr
    assert "OMPI_COMM_WORLD_SIZE=2" in err and "one of 2 processes" in err and "pip install mpi4py" in err
    assert "nothing was written" in err


@pytest.mark.skipif(importlib.util.find_spec("mpi4py") is None, reason="needs mpi4py")
def test_srun_process_alone_in_its_group_stops_before_writing(tmp_path):
    """SLURM says 2 tasks, but MPI (a singleton here) sees one process: the group has 1 rank."""
    proc = run_alone(tmp_path, SLURM_NTASKS="2", SLURM_PROCID="0")
    assert "SLURM_NTASKS=2, SLURM_PROCID=0" in proc.stderr and "1-rank group" in proc.stderr


@pytest.mark.parametrize("env, claim", [
    ({}, ("python", 1)),
    ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, (2, "RANK")),
    # torchrun inside a SLURM allocation: torchrun's own variables describe the group
    ({"WORLD_SIZE": "4", "RANK": "0", "SLURM_NTASKS": "2", "SLURM_PROCID": "0"}, (4, "WORLD_SIZE")),
    ({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1"}, (2, "OMPI_COMM_WORLD_RANK")),
    # mpirun inside an allocation of 8 tasks started 2 processes
    ({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0", "SLURM_NTASKS": "8", "SLURM_PROCID": "0"},
     (2, "OMPI_COMM_WORLD_SIZE")),
    ({"MV2_COMM_WORLD_SIZE": "3", "MV2_COMM_WORLD_RANK": "0"}, (3, "MV2_COMM_WORLD_SIZE")),
    ({"PMI_SIZE": "2", "PMI_RANK": "0"}, (2, "PMI_SIZE")),
    ({"SLURM_NTASKS": "2", "SLURM_PROCID": "0"}, (2, "SLURM_NTASKS")),
    ({"SLURM_NPROCS": "2", "SLURM_PROCID": "1"}, (2, "SLURM_PROCID")),
    ({"SLURM_STEP_NUM_TASKS": "2", "SLURM_NTASKS": "8", "SLURM_PROCID": "0"}, (2, "SLURM_STEP_NUM_TASKS")),
    ({"SLURM_NTASKS": "8"}, ("python", 1)),  # an allocation, no task started by srun
])
def test_launcher_claim(env, claim):
    launcher, n, seen = launcher_claim(env)
    if claim[0] == "python":
        assert (launcher, n, seen) == ("python", 1, {})
    else:
        assert n == claim[0] and claim[1] in seen and launcher != "python"


@pytest.mark.parametrize("env, local", [
    ({}, 1), ({"LOCAL_SIZE": "4"}, 4), ({"LOCAL_WORLD_SIZE": "2"}, 2), ({"OMPI_COMM_WORLD_LOCAL_SIZE": "8"}, 8),
    ({"SLURM_NTASKS_PER_NODE": "4"}, 4),
    ({"SLURM_STEP_TASKS_PER_NODE": "2(x3),1", "SLURM_NODEID": "3"}, 1),
    ({"SLURM_STEP_TASKS_PER_NODE": "2(x3),1", "SLURM_NODEID": "2"}, 2),
])
def test_local_world_size(env, local):
    assert local_world_size(env) == local


def test_threads_per_rank_share_the_node():
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert threads_per_rank(1, {"LOCAL_WORLD_SIZE": "2"}) == cores  # one rank owns the cores
    assert threads_per_rank(2, {"LOCAL_WORLD_SIZE": "2"}) == max(1, cores // 2)
    assert threads_per_rank(64, {"OMPI_COMM_WORLD_LOCAL_SIZE": "64"}) == max(1, cores // 64)
