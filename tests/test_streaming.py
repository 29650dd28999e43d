"""Streamed webdataset shards (data.streaming): split across ranks and workers, resumed without replay, read
from http:// and pipe: through the real launcher, unreachable shards counted and named."""
from __future__ import annotations

import functools
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from compt.clip.loader import train_loader
from compt.clip.model import preprocess_for
from compt.data import DataConfig, build_dataset
from compt.data.stream import slot_shards
from compt.faults import StageFailed
from conftest import DS, REPO, TINY_CHAIN, deepspeed_launch, tiny_model, write_chain


def write_shards(root: Path, shards: int, per: int, prefix: str = "train") -> list[Path]:
    """``shards`` tar shards of ``per`` 16x16 PNG samples each; captions 'sample <i>', labels i % 10."""
    root.mkdir(parents=True, exist_ok=True)
    rng, i, paths = np.random.RandomState(0), 0, []
    for s in range(shards):
        path = root / f"{prefix}-{s:03d}.tar"
        with tarfile.open(path, "w") as tar:
            for _ in range(per):
                buf = io.BytesIO()
                Image.fromarray(rng.randint(0, 256, (16, 16, 3), dtype=np.uint8)).save(buf, format="PNG")
                fields = (("png", buf.getvalue()), ("txt", f"sample {i}".encode()), ("cls", str(i % 10).encode()))
                for ext, data in fields:
                    info = tarfile.TarInfo(f"{i:06d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                i += 1
        paths.append(path)
    return paths


def shard_of(caption: str, per: int) -> int:
    return int(caption.split()[1]) // per


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    write_shards(root, 8, 10)
    write_shards(root, 1, 24, prefix="val")
    return root


@pytest.fixture(scope="module")
def server(shards):
    """A loopback HTTP server over the shards (as object storage would serve them)."""
    handler = functools.partial(QuietHandler, directory=str(shards))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def streamed(spec: str, **kw) -> DataConfig:
    return DataConfig(kind="webdataset", train=spec, val=spec, streaming=True, **kw)


# -- the split --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shards_n,slots,started", [(8, 2, ()), (10, 6, ()), (9, 4, (3, 7, 1)), (5, 5, (0,))])
def test_slots_read_disjoint_shares_that_cover_the_pass(shards_n, slots, started):
    for epoch in (0, 1):
        shares = [slot_shards(shards_n, 3, epoch, s, slots, frozenset(started)) for s in range(slots)]
        flat = [i for share in shares for i in share]
        assert len(flat) == len(set(flat)) and set(flat) == set(range(shards_n)) - set(started)
    assert slot_shards(shards_n, 3, 0, 0, 1) != slot_shards(shards_n, 3, 1, 0, 1)  # each pass has its order


def test_two_ranks_read_disjoint_samples_within_a_pass(shards):
    """Through the loader, as 2 ranks with 2 workers each (4 reader slots) read it: one pass (80 samples, 40 per
    rank, micro-batches of 4) gives each sample to exactly one rank."""
    cfg = streamed(str(shards / "train-{000..007}.tar"), shuffle_buffer=0)
    ds, pre = build_dataset(cfg, "train"), preprocess_for(tiny_model())
    seen = []
    for rank in (0, 1):
        feed = train_loader(ds, pre, None, global_batch=8, steps=10, rank=rank, world=2, gas=1, seed=0,
                            num_workers=2)
        seen.append([c for batch in feed for c in batch.captions])
    assert len(seen[0]) == len(seen[1]) == 40
    assert not set(seen[0]) & set(seen[1]) and len(set(seen[0]) | set(seen[1])) == 80
    assert {shard_of(c, 10) for c in seen[0]}.isdisjoint({shard_of(c, 10) for c in seen[1]})


# -- resume -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("taken", [0, 7, 25, 41])
@pytest.mark.parametrize("slots_after", [2, 3])
def test_resume_reads_nothing_again_of_the_current_pass(shards, taken, slots_after):
    """Readers stopped after ``taken`` samples each; the state merged as a checkpoint keeps it; resumed with the
    same or another number of slots, the rest of the pass holds no sample read before, and what is skipped is
    at most the rest of the shard each slot was in."""
    ds = build_dataset(streamed(str(shards / "train-{000..007}.tar"), shuffle_buffer=0), "train")
    plan, slots = ds.plan(5, 2, None), 2
    readers = [ds.reader(plan, s, slots, 5) for s in range(slots)]
    before = []
    for r in readers:
        it = iter(r)
        before += [next(it).fields["txt"].decode() for _ in range(taken)]
    state = plan.state({s: r.position for s, r in enumerate(readers) if taken}, slots)
    json.dumps(state)  # plain data: it goes into the checkpoint's client state
    plan2 = ds.plan(5, slots_after, state)
    after = []
    for s in range(slots_after):
        reader = ds.reader(plan2, s, slots_after, 5)
        for got in reader:
            if reader.position[0] > 0:
                break
            after.append(got.fields["txt"].decode())
    assert not set(before) & set(after)
    skipped = {f"sample {i}" for i in range(80)} - set(before) - set(after)
    assert len({shard_of(c, 10) for c in skipped}) <= slots
    assert not skipped or all(shard_of(c, 10) in {shard_of(b, 10) for b in before} for c in skipped)


def test_resampled_draws_continue_after_resume(shards):
    ds = build_dataset(streamed(str(shards / "train-{000..007}.tar"), shuffle_buffer=0, resampled=True), "train")
    plan = ds.plan(1, 2, None)
    reader = ds.reader(plan, 1, 2, 1)
    it = iter(reader)
    first = [next(it).url for _ in range(35)]  # 3 shards started, the fourth's first 5 samples read
    state = plan.state({1: reader.position}, 2)
    again = ds.reader(ds.plan(1, 2, state), 1, 2, 1)
    urls = [g.url for _, g in zip(range(20), again)]
    fresh = [g.url for _, g in zip(range(60), ds.reader(ds.plan(1, 2, None), 1, 2, 1))]
    assert first == fresh[:35] and urls == fresh[40:60]


# -- data faults --------------------------------------------------------------------------------------------------

def test_unreachable_shards_are_retried_counted_and_named(shards, server, monkeypatch):
    import compt.data.stream as stream

    monkeypatch.setattr(stream, "RETRY_SECONDS", 0.01)
    cfg = streamed(f"{server}/{{train-000,gone-000,train-001}}.tar", shuffle_buffer=0, shard_retries=1,
                   train_samples=30)
    pre = preprocess_for(tiny_model())
    feed = train_loader(build_dataset(cfg, "train"), pre, None, global_batch=4, steps=6, rank=0, world=1, gas=1,
                        seed=0)
    batches = list(feed)
    assert sum(len(b.captions) for b in batches) == 24  # the lost shard's place taken by the next samples
    bad = [d for batch in batches for d in batch.bad]
    # met once or twice (pass 0, maybe the start of pass 1), each time counted as the 10 samples a shard holds
    assert len(bad) in (10, 20) and set(bad) == {bad[0]}, bad
    assert bad[0].startswith(f"{server}/gone-000.tar: unreadable after 2 tries"), bad
    nothing = streamed(f"{server}/gone-{{000..002}}.tar", shard_retries=0)
    with pytest.raises(StageFailed, match=r"no sample of a training batch could be read(.|\n)*gone-00\d\.tar: "
                                          r"unreadable: curl exited with status 22 \(an HTTP error such as 404\)"):
        list(train_loader(build_dataset(nothing, "train"), pre, None, global_batch=4, steps=2, rank=0, world=1, gas=1,
                          seed=0))


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_a_damaged_streamed_shard_is_a_counted_loss(tmp_path, how):
    """tarfile ends a stream quietly at a bad header; the reader notices and counts the rest as lost."""
    from compt.data.stream import Lost, shard_samples

    path = write_shards(tmp_path, 1, 10)[0]
    data = path.read_bytes()
    with tarfile.open(path) as tar:
        at = [m for m in tar][15].offset  # sample 5's caption header
    data = data[:at + 100] if how == "truncated" else data[:at] + bytes(range(7, 207)) * 3 + data[at + 600:]
    path.write_bytes(data)
    got = list(shard_samples(str(path), retries=0))
    assert [g.fields["txt"] for g in got[:5]] == [f"sample {i}".encode() for i in range(5)]
    assert isinstance(got[-1], Lost) and ("truncated" if how == "truncated" else f"unreadable data at byte {at}") \
        in got[-1].why, got[-1]


# -- config -------------------------------------------------------------------------------------------------------

def test_config_edge(tmp_path, chain_dict):
    from compt.config import ChainConfigError, load_chain

    chain_dict["data"] = {"kind": "webdataset", "train": "pipe:cat x-{000..003}.tar", "val": "s3://bucket/v.tar"}
    chain_dict["stages"][0]["budget"] = {"epochs": 1}
    with pytest.raises(ChainConfigError) as e:
        load_chain(str(write_chain(tmp_path / "c.yaml", chain_dict)))
    assert any(p.startswith("stages.0.budget.epochs: the training data is streamed") and "data.train_samples" in p
               for p in e.value.problems), e.value.problems
    assert any(p.startswith("data.val:") and "pipe:aws s3 cp" in p for p in e.value.problems)
    chain_dict["data"].update(train_samples=320, val="pipe:cat v.tar")
    cfg = load_chain(str(write_chain(tmp_path / "c.yaml", chain_dict)))
    assert cfg.data.streams() and len(build_dataset(cfg.data, "train")) == 320
    assert cfg.stages[0].budget.steps_for(320, 32) == 10
    local = DataConfig(kind="webdataset", train=str(tmp_path), val=str(tmp_path))
    assert not local.streams()  # auto: local shards keep the indexed, bit-identical path
    assert DataConfig(kind="webdataset", train="http://h/a.tar", val="http://h/a.tar", streaming=False).problems()


# -- through the launcher -----------------------------------------------------------------------------------------

def streaming_chain(path: Path, train: str, val: str, stages: int, steps: int) -> Path:
    chain = json.loads(json.dumps(TINY_CHAIN))
    chain["data"] = {"kind": "webdataset", "train": train, "val": val, "workers": 2, "shuffle_buffer": 20,
                     "classnames": [str(d) for d in range(10)]}
    chain["defaults"].update(batch_size=8, checkpoint_every_steps=2)
    chain["stages"] = chain["stages"][:stages]
    chain["stages"][0]["budget"] = {"steps": steps}
    return write_chain(path, chain)


@pytest.fixture(scope="module")
def http_run(shards, server, tmp_path_factory):
    """A chain trained from http:// (1 rank, 2 loader workers), SIGTERM mid-stage, then the same command again."""
    root = tmp_path_factory.mktemp("http-run")
    chain = streaming_chain(root / "chain.yaml", f"{server}/train-{{000..007}}.tar", f"{server}/val-000.tar", 1, 24)
    cmd = [sys.executable, "launch/chain.py", "--chain", str(chain), "--ds_config", DS, "--output", str(root / "run")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MASTER_PORT": "29871"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "stage 0 a: step 10/24" in line:
            os.killpg(proc.pid, signal.SIGTERM)
    code = proc.wait(timeout=300)
    saved = sorted((root / "run" / "stages" / "0-a" / "checkpoints").glob("step*/*model_states.pt"))
    data_state = torch.load(saved[-1], weights_only=False).get("data") if saved else None
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                           env={**env, "MASTER_PORT": "29872"})
    return {"root": root, "code": code, "log": "".join(lines), "again": again, "data_state": data_state}


def test_a_stage_streamed_over_http_stops_on_sigterm_and_resumes(http_run):
    log, again = http_run["log"], http_run["again"]
    assert http_run["code"] == 143, log[-4000:]
    assert "streamed (size not declared) train / 24 val samples" in log
    assert "checkpoint saved" in log
    state = http_run["data_state"]  # the stream's position, in the checkpoint: the shards each pass started
    assert state["mode"] == "passes" and state["shards"] == 8 and any(state["started"].values()), state
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-4000:]
    resumed = int(out.split("stage 0 a: resuming from checkpoint at step ")[1].split()[0])
    assert 10 <= resumed < 24
    metrics = json.loads((http_run["root"] / "run" / "stages" / "0-a" / "metrics.json").read_text())
    assert metrics["steps"] == 24 and metrics["bad_samples"]["count"] == 0 and metrics["val_samples"] == 24


@pytest.fixture(scope="module")
def pipe_run(shards, tmp_path_factory):
    """One stage from `pipe:cat ...` on 2 ranks (2 workers each: 4 reader slots over 8 shards)."""
    root = tmp_path_factory.mktemp("pipe-run")
    chain = streaming_chain(root / "chain.yaml", f"pipe:cat {shards}/train-{{000..007}}.tar",
                            f"pipe:cat {shards}/val-000.tar", 1, 6)
    proc = deepspeed_launch(["--num_gpus", "2", "launch/chain.py", "--chain", str(chain), "--ds_config", DS,
                             "--output", str(root / "run")], 29873)
    return {"root": root, "log": proc.stdout + proc.stderr}


def test_a_chain_trains_from_pipe_commands_on_two_ranks(pipe_run):
    metrics = json.loads((pipe_run["root"] / "run" / "stages" / "0-a" / "metrics.json").read_text())
    assert metrics["ranks"] == 2 and metrics["steps"] == 6 and metrics["bad_samples"]["count"] == 0
    assert torch.isfinite(torch.tensor(metrics["final_loss"]))
