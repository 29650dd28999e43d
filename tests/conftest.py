"""Shared fixtures: tiny model configs and a tiny chain YAML for fast tests."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from hypothesis import settings

# Property tests draw the same examples on every run: CI results do not depend on luck.
settings.register_profile("compt", derandomize=True, deadline=None)
settings.load_profile("compt")

REPO = Path(__file__).resolve().parent.parent
DS = str(REPO / "ds_configs" / "zero3.json")  # the default DeepSpeed config the tests launch with


def _faults_benchmark():
    """benchmarks/faults.py, which kills and resumes this same tiny chain: one definition serves both."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("compt_faults_benchmark", REPO / "benchmarks" / "faults.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_faults = _faults_benchmark()
tiny_model = _faults.tiny_model  # a tiny open_clip config: tiny_model(width, layers, embed)
TINY_CHAIN = _faults.TINY_CHAIN  # 3 stages: a from scratch, b official growth, c exact growth; checkpoints every 2 steps


@pytest.fixture
def one_thread():
    """Growth and kernel tests: on a 2-core machine intra-op threads only contend with each other."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run_fresh_triton(script: str) -> None:
    """Run a kernel check in a fresh process without TRITON_INTERPRET (it is set late, inside the
    script): it must print 'late interpret: ok'; skips when there is no compiler for the GPU check."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "late interpret: ok" in done.stdout
    if "compile: skipped" in done.stdout:
        pytest.skip(done.stdout)


@pytest.fixture
def chain_dict() -> dict:
    return copy.deepcopy(TINY_CHAIN)


def write_chain(path: Path, chain: dict) -> Path:
    path.write_text(yaml.safe_dump(chain))
    return path


@pytest.fixture
def chain_yaml(tmp_path, chain_dict) -> Path:
    return write_chain(tmp_path / "chain.yaml", chain_dict)


def deepspeed_launch(args: list[str], port: int, timeout: int = 600):
    """``deepspeed --master_port PORT ARGS`` from the repo root; asserts success, returns the CompletedProcess."""
    import os
    import subprocess

    cmd = ["deepspeed", "--master_port", str(port), *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    from compt.distributed import shm_buffer

    left = [shm_buffer(r, {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}) for r in range(8)]
    assert not any(p.exists() for p in left), f"DeepSpeed's shared-memory buffers left in /dev/shm: {left}"
    return proc


def run_chain_with_ranks(root: Path, chain: Path, ports: dict[int, int]) -> dict:
    """The chain trained once per rank count: {ranks: (run_dir, log), "chain": chain}."""
    out: dict = {"chain": chain}
    for ranks, port in ports.items():
        run_dir = root / f"run{ranks}"
        proc = deepspeed_launch(["--num_gpus", str(ranks), "launch/chain.py", "--chain", str(chain), "--ds_config",
                                 DS, "--output", str(run_dir)], port)
        out[ranks] = (run_dir, proc.stdout + proc.stderr)
    return out


def stage_metrics(run_dir: Path, k: int, name: str) -> dict:
    import json

    return json.loads((run_dir / "stages" / f"{k}-{name}" / "metrics.json").read_text())
