"""Fault injection: corrupt and unsafe checkpoints, a full disk, bad images and captions,
NaN losses, changed configs. Each fault must be detected, reported with its path, and
cost nothing already saved."""
from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from compt.weights import SafetensorsStreamWriter
from conftest import DS, REPO, tiny_model, write_chain


def _checkpoint_job(scenario: str, root, port: int) -> dict:
    env = {**os.environ, "MASTER_PORT": str(port)}
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "_checkpoint_job.py"), scenario, str(root)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return {**json.loads(line[len("RESULT "):]), "stderr": proc.stderr}


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    r = _checkpoint_job("fallback", tmp_path / "ck", 29741)
    assert r["latest"] == "step00000004" and r["resumed_step"] == 2 and r["weights_match_step2"]
    assert "step00000004/zero_pp_rank_0_mp_rank_00_optim_states.pt does not match its sha256" in r["stderr"]
    assert "resumed from the older checkpoint" in r["stderr"]


def test_no_usable_checkpoint_names_every_bad_file(tmp_path):
    r = _checkpoint_job("all-corrupt", tmp_path / "ck", 29742)
    err = r["resume_error"]
    assert "optim_states.pt does not match" in err and "step00000002/zero_pp_rank_0_mp_rank_00_model_states.pt" in err
    assert f"delete {tmp_path / 'ck'}" in err


def test_checkpoints_load_weights_only(tmp_path):
    """A checkpoint file that would run code when unpickled is refused, even with matching hashes."""
    r = _checkpoint_job("unsafe-pickle", tmp_path / "ck", 29743)
    assert r["code_ran"] is False
    assert "Weights only load failed" in r["stderr"] and r["resumed_step"] == 2 and r["weights_match_step2"]


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(tmp_path):
    r = _checkpoint_job("disk-full", tmp_path / "ck", 29744)
    assert "could not write checkpoint" in r["error"] and "step00000002 is intact" in r["error"]
    assert r["latest"] == "step00000002" and r["tags"] == ["step00000002"]  # the partial tag is gone
    assert r["resumed_step"] == 2 and r["weights_match_step2"]


def test_disk_full_while_writing_weights_keeps_the_old_file(tmp_path):
    path = tmp_path / "model.safetensors"
    big = torch.randn(64, 1024)
    with SafetensorsStreamWriter(path, [("w", big.shape, big.dtype)]) as w:
        w.write("w", torch.zeros_like(big))
    before = path.read_bytes()
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100 * 1024, hard))
    try:
        with pytest.raises(OSError):
            with SafetensorsStreamWriter(path, [("w", big.shape, big.dtype)]) as w:
                w.write("w", big)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert path.read_bytes() == before and not (tmp_path / "model.safetensors.tmp").exists()


# -- the launcher with faults -------------------------------------------------------------

def _run(chain_path, out, *extra: str, nan_calls: str = "", port: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "MASTER_PORT": str(port), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(REPO / "tests" / "_fault_job.py"), "--nan-calls", nan_calls, "--",
           "--chain", str(chain_path), "--ds_config", DS, "--output", str(out), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)


def _one_stage(chain_dict: dict, steps: int = 6) -> dict:
    chain_dict["stages"] = chain_dict["stages"][:1]
    chain_dict["stages"][0]["budget"] = {"steps": steps}
    return chain_dict


def test_nan_steps_are_skipped_and_counted(tmp_path, chain_dict):
    chain = write_chain(tmp_path / "chain.yaml", _one_stage(chain_dict))
    proc = _run(chain, tmp_path / "run", nan_calls="3,5", port=29751)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "non-finite loss at step 3, step skipped" in proc.stderr
    m = json.loads((tmp_path / "run" / "stages" / "0-a" / "metrics.json").read_text())
    assert m["nonfinite_steps_skipped"] == 2
    steps = [int(line.split(",")[0]) for line in (tmp_path / "run" / "stages" / "0-a" / "loss.csv").read_text().splitlines()[1:]]
    assert steps == [1, 2, 4, 6]
    assert all(torch.isfinite(t).all() for t in load_file(str(tmp_path / "run" / "stages" / "0-a" / "model.safetensors")).values())


def test_too_many_nan_steps_stop_the_stage_keeping_the_last_checkpoint(tmp_path, chain_dict):
    chain_dict = _one_stage(chain_dict)
    chain_dict["defaults"]["max_nonfinite_steps"] = 1
    chain = write_chain(tmp_path / "chain.yaml", chain_dict)
    proc = _run(chain, tmp_path / "run", nan_calls="3,5", port=29752)
    assert proc.returncode == 1
    assert "NaN/Inf at 2 step(s), the last at step 5, more than max_nonfinite_steps = 1" in proc.stderr
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["stages"][0]["status"] == "failed" and "max_nonfinite_steps" in manifest["stages"][0]["error"]
    ckpt = tmp_path / "run" / "stages" / "0-a" / "checkpoints"
    assert (ckpt / "latest").read_text() == "step00000004" and (ckpt / "step00000004" / "compt-sha256.json").is_file()


def _digit_csv(root, name: str, indices, bad: dict[int, str]) -> str:
    """An open_clip CSV of real handwritten digits; ``bad`` maps row -> corrupt|missing|empty."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    root.mkdir(parents=True, exist_ok=True)
    lines = ["filepath\ttitle\tlabel"]
    for row, i in enumerate(indices):
        path = root / f"{name}-{i}.png"
        label = int(digits.target[i])
        Image.fromarray((digits.images[i] * 255 / 16).astype("uint8")).convert("RGB").resize((16, 16)).save(path)
        caption = f"a handwritten digit {label}"
        if bad.get(row) == "corrupt":
            path.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
        elif bad.get(row) == "missing":
            path.unlink()
        elif bad.get(row) == "empty":
            caption = "  "
        lines.append(f"{path.name}\t{caption}\t{label}")
    csv = root / f"{name}.csv"
    csv.write_text("\n".join(lines) + "\n")
    return str(csv)


@pytest.fixture
def bad_data_chain(tmp_path, chain_dict):
    """160 training rows, 2 of them bad (a corrupt PNG, an empty caption); 60 val rows, 1 missing."""
    data = tmp_path / "data"
    chain_dict = _one_stage(chain_dict, steps=10)  # batch 32: each row is drawn twice
    chain_dict["data"] = {"kind": "csv", "train": _digit_csv(data, "train", range(160), {7: "corrupt", 90: "empty"}),
                          "val": _digit_csv(data, "val", range(160, 220), {3: "missing"}),
                          "classnames": [str(d) for d in range(10)], "templates": ["a handwritten digit {}"]}
    chain_dict["eval"] = {"batch_size": 60}
    chain_dict["stages"][0]["model"] = tiny_model(32, 1)
    return chain_dict


def test_bad_samples_are_skipped_and_counted(tmp_path, bad_data_chain):
    bad_data_chain["data"]["max_bad_fraction"] = 0.05
    chain = write_chain(tmp_path / "chain.yaml", bad_data_chain)
    proc = _run(chain, tmp_path / "run", port=29753)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((tmp_path / "run" / "stages" / "0-a" / "metrics.json").read_text())
    assert m["bad_samples"]["count"] == 4 and m["bad_samples"]["of"] == 320
    text = "\n".join(m["bad_samples"]["examples"])
    assert "train-7.png" in text and "empty caption" in text
    assert m["val_bad_samples"]["count"] == 1 and "val-163.png" in m["val_bad_samples"]["examples"][0]
    assert m["val_samples"] == 59


def test_too_much_bad_data_stops_with_examples_then_resumes(tmp_path, bad_data_chain):
    chain = write_chain(tmp_path / "chain.yaml", bad_data_chain)  # default limit: 1% (4 of 320 is 1.25%)
    proc = _run(chain, tmp_path / "run", port=29754)
    assert proc.returncode == 1
    assert "4 of 320 samples drawn so far were unreadable or had empty captions" in proc.stderr
    assert "train-7.png" in proc.stderr and "resumes from the checkpoint saved at step 10" in proc.stderr
    again = _run(chain, tmp_path / "run", port=29756)  # same threshold: resuming at the last step fails again
    assert again.returncode == 1 and "4 of 320 samples drawn so far" in again.stderr
    # Raising the threshold is not a config change that needs confirming: the run resumes at step 10.
    bad_data_chain["data"]["max_bad_fraction"] = 0.02
    chain = write_chain(tmp_path / "chain.yaml", bad_data_chain)
    proc = _run(chain, tmp_path / "run", port=29755)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from checkpoint at step 10" in proc.stdout + proc.stderr
    m = json.loads((tmp_path / "run" / "stages" / "0-a" / "metrics.json").read_text())
    assert m["bad_samples"]["count"] == 4 and m["steps"] == 10
    entry = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"][0]
    assert entry["status"] == "done" and entry["error"] is None  # the earlier failure is cleared


def test_a_failure_on_one_rank_is_reported_by_that_rank(tmp_path, chain_dict):
    """Rank 1's disk is full while checkpointing: rank 0 only sees a lost connection. Both exit promptly
    (no wait for the process-group timeout) and rank 1's own error reaches the user and the run dir."""
    chain_dict = _one_stage(chain_dict, steps=8)
    chain_dict["defaults"]["checkpoint_every_steps"] = 4
    chain = write_chain(tmp_path / "chain.yaml", chain_dict)
    cmd = ["deepspeed", "--master_port", "29757", "--num_gpus", "2", "tests/_fault_job.py",
           "--fsize-limit", "1:51200", "--", "--chain", str(chain), "--ds_config", DS, "--output", str(tmp_path / "run")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode != 0
    log = proc.stdout + proc.stderr
    assert "error (rank 1 of 2): could not write checkpoint" in log and "file-size limit" in log
    errors = tmp_path / "run" / "stages" / "0-a" / "errors"
    mine = (errors / "rank1.log").read_text()
    assert "rank 1 of 2: CheckpointError: could not write checkpoint" in mine and "step00000004" in mine
    entry = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"][0]
    if entry["status"] == "failed":  # rank 0 may be killed by the launcher before it records its view
        assert "every failing rank's own is in stages/0-a/errors/rank<r>.log" in entry["error"]
    # Nothing half-written is taken for a checkpoint: a rerun without the limit trains the stage from scratch.
    assert not (errors.parent / "checkpoints" / "latest").exists()
