"""The chain end to end, as a user runs it: the real `deepspeed` launcher, 1 and 2 CPU ranks."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import open_clip
import pytest
import torch
from safetensors.torch import load_file

from compt.weights import sha256_file
from conftest import DS, REPO, deepspeed_launch, run_chain_with_ranks, stage_metrics, write_chain


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from conftest import TINY_CHAIN

    root = tmp_path_factory.mktemp("e2e")
    return run_chain_with_ranks(root, write_chain(root / "chain.yaml", TINY_CHAIN), {2: 29611, 1: 29612})


def test_run_directory_contract(runs):
    run_dir, log = runs[2]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["chain"] == "tiny" and manifest["config"]["stages"][1]["transfer"]["init"] == "official"
    assert [s["status"] for s in manifest["stages"]] == ["done"] * 3
    for k, entry in enumerate(manifest["stages"]):
        stage_dir = run_dir / entry["dir"]
        assert sha256_file(run_dir / entry["weights"]) == entry["sha256"]
        m = stage_metrics(run_dir, k, entry["name"])
        assert m["ranks"] == 2
        mem = m["memory"]  # one entry per rank; later stages' teachers are ZeRO-3 partitioned like the students
        assert len(mem["peak_rss_bytes"]) == len(mem["baseline_rss_bytes"]) == 2
        assert all(peak >= base > 0 for peak, base in zip(mem["peak_rss_bytes"], mem["baseline_rss_bytes"]))
        assert m.get("teacher") == ("sharded" if k > 0 else None)
        for key in ("zeroshot_top1", "zeroshot_top5", "samples_seen", "wall_seconds"):
            assert m[key] is not None
        assert set(m["retrieval"]) == {"image_to_text", "text_to_image"}
        assert set(m["retrieval"]["image_to_text"]) == {"R@1", "R@5", "R@10"}
        assert m["flops"]["total"] == m["flops"]["student_train"] + m["flops"]["teacher_forward"] > 0
        assert (m["flops"]["teacher_forward"] > 0) == (k > 0)
        assert m["samples_seen"] == m["steps"] * 32
        rows = list((stage_dir / "loss.csv").read_text().splitlines())
        assert len(rows) == m["steps"] + 1 and (stage_dir / "loss.png").stat().st_size > 0
        if k > 0:
            assert -1 <= m["init_cosine"]["image"] <= 1 and m["init_zeroshot_top1"] is not None
            assert m["grown_tensors"] > 0
    # exact growth (stage c, depth 1 -> 2 with noise) starts where its teacher ended
    b, c = stage_metrics(run_dir, 1, "b"), stage_metrics(run_dir, 2, "c")
    assert c["init_zeroshot_top1"] == b["zeroshot_top1"]
    assert min(c["init_cosine"].values()) > 0.9999
    assert "chain 'tiny' (2 rank(s))" in log
    assert (run_dir / "results.md").read_text().count("\n") == 5


def test_stage_weights_load_into_stock_open_clip(runs):
    run_dir, _ = runs[2]
    stage = run_dir / "stages" / "2-c"
    cfg = json.loads((stage / "config.json").read_text())
    model = open_clip.CLIP(**cfg)
    model.load_state_dict(load_file(str(stage / "model.safetensors")), strict=True)
    assert model.visual.transformer.resblocks[1].mlp.c_fc.weight.shape == (256, 64)


def test_one_and_two_ranks_agree(runs):
    (one, _), (two, _) = runs[1], runs[2]
    for k, name in enumerate(["a", "b", "c"]):
        m1, m2 = stage_metrics(one, k, name), stage_metrics(two, k, name)
        assert m1["steps"] == m2["steps"] and m1["flops"] == m2["flops"]
        assert abs(m1["final_loss"] - m2["final_loss"]) < 1e-3 * abs(m1["final_loss"])
        assert abs(m1["zeroshot_top1"] - m2["zeroshot_top1"]) <= 2 / 360 + 1e-9
        w1 = load_file(str(one / "stages" / f"{k}-{name}" / "model.safetensors"))
        w2 = load_file(str(two / "stages" / f"{k}-{name}" / "model.safetensors"))
        assert w1.keys() == w2.keys()
        worst = max((w1[n] - w2[n]).abs().max().item() for n in w1)
        assert worst < 1e-3, f"stage {name}: weights differ by {worst}"


def test_compt_eval_reproduces_metrics(runs):
    run_dir, _ = runs[1]
    proc = subprocess.run([sys.executable, "-m", "compt.cli", "eval", str(run_dir / "stages" / "1-b"), "--json"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    saved = stage_metrics(run_dir, 1, "b")
    assert got["zeroshot_top1"] == pytest.approx(saved["zeroshot_top1"], abs=1e-6)
    assert got["retrieval"]["text_to_image"]["R@5"] == pytest.approx(saved["retrieval"]["text_to_image"]["R@5"])
    bad = subprocess.run([sys.executable, "-m", "compt.cli", "eval", str(run_dir)], capture_output=True, text=True,
                         cwd=REPO, timeout=300)
    assert bad.returncode == 2 and "not a finished stage directory" in bad.stderr


def test_rerun_skips_finished_stages(runs):
    run_dir, _ = runs[1]
    before = (run_dir / "stages" / "0-a" / "model.safetensors").stat().st_mtime_ns
    proc = deepspeed_launch(["launch/chain.py", "--chain", str(runs["chain"]), "--ds_config", DS, "--output", str(run_dir)],
                   29613)
    log = proc.stdout + proc.stderr
    assert log.count("already done (weights verified), skipping") == 3
    assert (run_dir / "stages" / "0-a" / "model.safetensors").stat().st_mtime_ns == before


def test_bad_config_fails_before_compute(tmp_path, chain_dict):
    chain_dict["stages"][1]["budget"] = {"steps": 0}
    chain_dict["stages"][2]["model"] = "ViT-Bogus"
    path = write_chain(tmp_path / "bad.yaml", chain_dict)
    proc = subprocess.run([sys.executable, "launch/chain.py", "--chain", str(path), "--ds_config", DS],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2
    assert "stages.1.budget: steps must be > 0" in proc.stderr
    assert not (REPO / "runs" / "tiny").exists()


def test_zero3_student_starts_from_open_clips_own_init(runs):
    """Step 1's loss under ZeRO-3 (2 ranks) equals plain PyTorch's on the same open_clip-initialised model."""
    from compt.clip.model import build_clip, preprocess_for
    from compt.config import load_chain
    from compt.data import build_dataset
    from compt.clip.loader import train_loader
    from compt.clip.losses import ChainLoss

    cfg = load_chain(str(runs["chain"]))
    torch.manual_seed(cfg.seed + 0)
    model = build_clip(cfg.model_cfg(0))
    batch = next(iter(train_loader(build_dataset(cfg.data, "train"), preprocess_for(cfg.model_cfg(0)), None,
                                   global_batch=32, steps=1, rank=0, world=1, gas=1, seed=cfg.seed + 0)))
    with torch.no_grad():
        expected = ChainLoss(None)(model(batch.images, batch.texts)).total.item()
    first = (runs[2][0] / "stages" / "0-a" / "loss.csv").read_text().splitlines()[1].split(",")
    assert float(first[1]) == pytest.approx(expected, rel=1e-5)


def test_sigkill_mid_stage_then_resume_is_bit_identical(runs, tmp_path):
    """kill -9 while stage 1 trains (after its first checkpoint), run again: same weights as uninterrupted."""
    import signal
    import time

    run_dir = tmp_path / "killed"
    cmd = ["deepspeed", "--master_port", "29614", "launch/chain.py", "--chain", str(runs["chain"]),
           "--ds_config", DS, "--output", str(run_dir)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    latest = run_dir / "stages" / "1-b" / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert [s["status"] for s in manifest["stages"]] == ["done", "running", "pending"]

    log = deepspeed_launch(cmd[3:], 29615)
    assert "stage 1 b: resuming from checkpoint at step" in log.stdout + log.stderr
    reference = runs[1][0]
    for k, name in enumerate(["a", "b", "c"]):
        got = load_file(str(run_dir / "stages" / f"{k}-{name}" / "model.safetensors"))
        want = load_file(str(reference / "stages" / f"{k}-{name}" / "model.safetensors"))
        assert all(torch.equal(got[n], want[n]) for n in want), f"stage {name} differs after resume"
        assert not (run_dir / "stages" / f"{k}-{name}" / "checkpoints").exists()
    curve = (run_dir / "stages" / "1-b" / "loss.csv").read_text()
    assert curve == (reference / "stages" / "1-b" / "loss.csv").read_text()


def _plain(args: list[str], port: int) -> subprocess.CompletedProcess:
    """launch/chain.py as one rank without the deepspeed launcher (quicker to start)."""
    env = {**os.environ, "MASTER_PORT": str(port), "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "launch/chain.py", "--ds_config", DS, *args], capture_output=True,
                          text=True, cwd=REPO, timeout=600, env=env)


def _weights(run_dir, k, name):
    return load_file(str(run_dir / "stages" / f"{k}-{name}" / "model.safetensors"))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize("ranks,trial", [(1, 1), (2, 2)])
def test_sigkill_at_a_random_moment_then_resume_is_bit_identical(runs, tmp_path, ranks, trial):
    """kill -9 at a random moment (any stage, mid-step, mid-checkpoint or mid-save), resume: same family."""
    import random
    import signal
    import time

    run_dir = tmp_path / "killed"
    port = 29620 + 2 * trial
    cmd = ["deepspeed", "--master_port", str(port), "--num_gpus", str(ranks), "launch/chain.py", "--chain",
           str(runs["chain"]), "--ds_config", DS, "--output", str(run_dir)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    first = run_dir / "stages" / "0-a" / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(random.Random(trial).uniform(0.0, 4.0))
    assert proc.poll() is None, "the run finished before the kill; lower the random delay"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    statuses = [s["status"] for s in json.loads((run_dir / "manifest.json").read_text())["stages"]]
    print(f"killed with stages {statuses}")

    deepspeed_launch(cmd[3:], port + 1)
    reference = runs[ranks][0]
    for k, name in enumerate(["a", "b", "c"]):
        assert _same(_weights(run_dir, k, name), _weights(reference, k, name)), f"stage {name} differs ({statuses})"
        assert (run_dir / "stages" / f"{k}-{name}" / "loss.csv").read_text() == \
            (reference / "stages" / f"{k}-{name}" / "loss.csv").read_text()


def test_corrupt_stage_weights_are_detected_and_retrained(runs, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(runs[1][0], run_dir)
    b = run_dir / "stages" / "1-b" / "model.safetensors"
    b.write_bytes(b.read_bytes()[:-100])  # truncated
    c = run_dir / "stages" / "2-c" / "model.safetensors"
    data = bytearray(c.read_bytes())
    data[-5] ^= 0x10  # one flipped bit in the last tensor
    c.write_bytes(bytes(data))
    proc = _plain(["--chain", str(runs["chain"]), "--output", str(run_dir)], 29631)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for k, name in ((1, "b"), (2, "c")):
        assert f"stage {k} {name}: {run_dir / 'stages' / f'{k}-{name}' / 'model.safetensors'} does not match" in proc.stderr
        assert _same(_weights(run_dir, k, name), _weights(runs[1][0], k, name))
    assert "stage 0 a: already done" in proc.stdout


def test_changed_config_names_the_changed_stages_and_needs_confirming(runs, chain_dict, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(runs[1][0], run_dir)
    chain_dict["stages"][2]["lr"] = 1.0e-3  # only stage c's inputs change
    chain_dict["defaults"]["log_every"] = 1  # cannot change any weights: no confirmation needed for it
    path = write_chain(tmp_path / "changed.yaml", chain_dict)
    before = (run_dir / "manifest.json").read_text()
    proc = _plain(["--chain", str(path), "--output", str(run_dir)], 29632)
    assert proc.returncode == 2 and "differs for stage(s) with progress: 2 'c' (done)." in proc.stderr
    assert "--accept-config-change" in proc.stderr and (run_dir / "manifest.json").read_text() == before

    proc = _plain(["--chain", str(path), "--output", str(run_dir), "--accept-config-change"], 29633)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "stage 0 a: already done" in out and "stage 1 b: already done" in out
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["config"]["stages"][2]["lr"] == 1.0e-3 and manifest["stages"][2]["status"] == "done"
    replaced = list((run_dir / "replaced").glob("*/2-c/model.safetensors"))
    assert len(replaced) == 1 and _same(load_file(str(replaced[0])), _weights(runs[1][0], 2, "c"))
    assert not _same(_weights(run_dir, 2, "c"), _weights(runs[1][0], 2, "c"))


def test_changed_config_on_existing_run_is_refused(runs, chain_dict, tmp_path):
    run_dir, _ = runs[1]
    chain_dict["defaults"]["lr"] = 1.0e-3
    path = write_chain(tmp_path / "changed.yaml", chain_dict)
    before = (run_dir / "manifest.json").read_text()
    proc = subprocess.run([sys.executable, "launch/chain.py", "--chain", str(path), "--ds_config", DS,
                           "--output", str(run_dir)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2
    assert "differs for stage(s) with progress: 0 'a' (done), 1 'b' (done), 2 'c' (done)" in proc.stderr
    assert (run_dir / "manifest.json").read_text() == before
