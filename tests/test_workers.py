"""Data workers (``data.workers``): DataLoader options per rank, and weights that do not depend on
the worker count, through the real launcher."""
from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import sys

import pytest

from compt.config import ChainConfig
from compt.data import DataConfig
from compt.loading import MAX_DEFAULT_WORKERS, default_workers, loader_options
from compt.rundir import stage_fingerprints
from compt.text import TextDataConfig
from conftest import DS, REPO, TINY_CHAIN, deepspeed_launch, write_chain


def test_default_workers_share_the_cpus_between_local_ranks(monkeypatch):
    for name in ("LOCAL_SIZE", "LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(12)))
    assert default_workers() == MAX_DEFAULT_WORKERS == 8  # one rank: capped
    monkeypatch.setenv("LOCAL_SIZE", "4")  # deepspeed
    assert default_workers() == 3
    monkeypatch.delenv("LOCAL_SIZE")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")  # torchrun: fewer CPUs than ranks
    assert default_workers() == 0
    assert loader_options(DataConfig(), "cpu") == {"num_workers": 0, "pin_memory": False}
    assert loader_options(TextDataConfig(workers=3), "cpu")["num_workers"] == 3  # an explicit count wins


def test_loader_options():
    none = loader_options(DataConfig(workers=0), "cpu")
    assert none == {"num_workers": 0, "pin_memory": False}  # no persistent_workers / prefetch_factor without workers
    two = loader_options(DataConfig(workers=2), "cuda:0")
    assert two["num_workers"] == 2 and two["pin_memory"] and two["persistent_workers"] and two["prefetch_factor"] >= 1
    assert callable(two["worker_init_fn"])
    import torch

    assert loader_options(TextDataConfig(workers=1), torch.device("cpu"))["pin_memory"] is False


def test_negative_workers_are_reported():
    assert any(p.startswith("data.workers: -1 is negative") for p in DataConfig(workers=-1).problems())
    assert any(p.startswith("data.workers: -2 is negative") for p in TextDataConfig(workers=-2).problems())
    assert not [p for p in DataConfig(workers=0).problems() if "workers" in p]


def test_the_worker_count_leaves_the_fingerprints_alone():
    def prints(workers):
        chain = copy.deepcopy(TINY_CHAIN)
        chain["data"]["workers"] = workers
        return stage_fingerprints(ChainConfig.model_validate(chain), {"zero_optimization": {"stage": 3}})

    assert prints(0) == prints(2) == prints(None)


STOP_SCRIPT = r"""
import os, signal, subprocess, time, torch
from torch.utils.data import DataLoader, Dataset
from compt.data import DataConfig
from compt.loading import loader_options

class Slow(Dataset):
    def __len__(self): return 24
    def __getitem__(self, i):
        time.sleep(0.05)
        return torch.tensor(i)

stop = []
signal.signal(signal.SIGTERM, lambda s, f: stop.append(s))
loader = DataLoader(Slow(), batch_size=4, **loader_options(DataConfig(workers=2), "cpu"))
seen = []
for k, batch in enumerate(loader):
    seen += batch.tolist()
    if k == 0:
        # as scancel or systemd signal the whole group, from another process
        subprocess.run(["kill", "-TERM", "--", f"-{os.getpgrp()}"])
        time.sleep(0.5)
assert stop and seen == list(range(24)), (stop, seen)
print("kept loading")
"""


def test_workers_leave_stop_signals_to_the_rank(tmp_path):
    """A SIGTERM to the process group reaches the workers too: they ignore it, so the rank can save a
    checkpoint (it still needs its batches) instead of failing with "worker exited unexpectedly"."""
    proc = subprocess.run([sys.executable, "-c", STOP_SCRIPT], capture_output=True, text=True, timeout=120, cwd=REPO,
                          start_new_session=True)
    assert proc.returncode == 0 and "kept loading" in proc.stdout, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The tiny chain's first two stages (a grown, aligned stage included), once with 0 and once with 2
    loader workers per rank."""
    root = tmp_path_factory.mktemp("workers")
    out = {}
    for workers, port in ((0, 29911), (2, 29912)):
        chain = copy.deepcopy(TINY_CHAIN)
        chain["stages"] = chain["stages"][:2]
        chain["data"]["workers"] = workers
        path = write_chain(root / f"chain{workers}.yaml", chain)
        run_dir = root / f"run{workers}"
        deepspeed_launch(["--num_gpus", "1", "launch/chain.py", "--chain", str(path), "--ds_config", DS,
                          "--output", str(run_dir)], port)
        out[workers] = run_dir
    return out


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_weights_do_not_depend_on_the_worker_count(runs):
    for k, name in enumerate(("a", "b")):
        zero, two = (_sha256(runs[w] / "stages" / f"{k}-{name}" / "model.safetensors") for w in (0, 2))
        assert zero == two, f"stage {k} {name}: weights differ between 0 and 2 loader workers"
    metrics = [json.loads((runs[w] / "stages" / "1-b" / "metrics.json").read_text()) for w in (0, 2)]
    assert metrics[0]["zeroshot_top1"] == metrics[1]["zeroshot_top1"]  # evaluation went through workers too
    assert metrics[0]["init_zeroshot_top1"] == metrics[1]["init_zeroshot_top1"]


def test_llama_batches_do_not_depend_on_the_worker_count(tmp_path):
    import torch

    from compt.llama.train import train_loader
    from compt.text import build_text_datasets

    cfg = TextDataConfig(kind="text", paths=[str(tmp_path / "a.txt")], text_document="paragraph", vocab_size=300,
                         seq_len=16)
    (tmp_path / "a.txt").write_text("\n\n".join(f"word{i % 97} and more text {i}" for i in range(600)))
    data = build_text_datasets(cfg, tmp_path / "tok")
    kw = dict(global_batch=8, steps=6, rank=0, world=1, gas=1, seed=3)
    zero, two = ([b.blocks for b in train_loader(data.train, **kw, **loader_options(cfg.model_copy(update={"workers": w}),
                                                                                      "cpu"))]
                 for w in (0, 2))
    assert len(zero) == 6 and all(torch.equal(a, b) for a, b in zip(zero, two))


def test_batches_pin_every_tensor(monkeypatch):
    """DataLoader's pin_memory thread calls the batches' own pin_memory (a dataclass is not pinned otherwise)."""
    import torch

    from compt.clip.loader import Batch
    from compt.llama.train import TokenBatch

    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a, **k: pinned.append(self) or self.clone())
    batch = Batch(torch.ones(2, 3), torch.ones(2, 4, dtype=torch.long), captions=["a", "b"], labels=torch.zeros(2),
                  bad=["x"])
    out = batch.pin_memory()
    assert isinstance(out, Batch) and len(pinned) == 3 and out.captions == ["a", "b"] and out.bad == ["x"]
    assert torch.equal(out.images, batch.images) and out.teacher_images is None
    tokens = TokenBatch(torch.arange(6).view(2, 3)).pin_memory()
    assert isinstance(tokens, TokenBatch) and len(pinned) == 4
