"""Watching a run (issue 16): metrics.jsonl lines as a stage trains, DeepSpeed's CSV monitor on one
step axis for the whole chain, monitor settings that are not a config change, wall time summed over
a SIGTERM + resume, the chain plot, and `--help` without torch."""
from __future__ import annotations

import copy
import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import DS, REPO, TINY_CHAIN, deepspeed_launch, write_chain

FIELDS = {"step", "samples_seen", "chain_samples", "loss", "contrastive", "alignment", "lr", "grad_norm",
          "samples_per_s", "tokens_per_s", "tflops_per_rank", "mfu", "peak_memory_gb"}


def monitored(ds_path, csv_dir, job: str) -> None:
    ds = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    ds["csv_monitor"] = {"enabled": True, "output_path": str(csv_dir), "job_name": job}
    ds_path.write_text(json.dumps(ds))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("live")
    chain = copy.deepcopy(TINY_CHAIN)
    chain["stages"] = chain["stages"][:2]
    path = write_chain(root / "chain.yaml", chain)
    ds = root / "ds.json"
    monitored(ds, root / "csv", "chain")
    out = root / "run"
    proc = deepspeed_launch(["launch/chain.py", "--chain", str(path), "--ds_config", str(ds), "--output", str(out)],
                            29771)
    return {"root": root, "chain": path, "ds": ds, "out": out, "log": proc.stdout + proc.stderr}


def test_every_stage_writes_metrics_jsonl_lines_as_it_trains(run):
    for stage, steps in (("0-a", 6), ("1-b", 8)):
        lines = [json.loads(ln) for ln in (run["out"] / "stages" / stage / "metrics.jsonl").read_text().splitlines()]
        assert [ln["step"] for ln in lines] == list(range(2, steps + 1, 2))  # log_every 2
        for ln in lines:
            assert FIELDS <= ln.keys(), FIELDS - ln.keys()
            assert ln["samples_per_s"] > 0 and ln["tflops_per_rank"] > 0 and ln["samples_seen"] == ln["step"] * 32
            assert ln["mfu"] is None and ln["tokens_per_s"] is None  # CPU: no peak; CLIP: samples, not tokens
    # Not a terminal: plain lines, no carriage-return redraws.
    assert "stage 1 b: step 8/8 loss" in run["log"] and "samples/s" in run["log"]


def test_the_csv_monitor_has_one_step_axis_across_stages(run):
    with open(run["root"] / "csv" / "chain" / "compt_loss.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["step", "compt_loss"] or rows[0][0] == "step"
    axis = [int(r[0]) for r in rows[1:]]
    assert axis == [64, 128, 192, 256, 320, 384, 448, 512, 576, 640, 704, 768, 832, 896][:len(axis)]
    assert len(axis) == 3 + 4 and axis == sorted(axis)  # stage 0: 3 records; stage 1 continues after 6 x 32


def test_the_chain_plot_and_loss_plots_are_written(run):
    assert (run["out"] / "chain.png").stat().st_size > 1000
    assert all((run["out"] / "stages" / s / "loss.png").is_file() for s in ("0-a", "1-b"))


def test_a_changed_monitor_section_is_not_a_config_change(run):
    ds = run["root"] / "ds2.json"
    monitored(ds, run["root"] / "csv2", "other")
    proc = deepspeed_launch(["launch/chain.py", "--chain", str(run["chain"]), "--ds_config", str(ds), "--output",
                             str(run["out"])], 29772)
    assert proc.stdout.count("already done (weights verified), skipping") == 2


def test_sigterm_then_resume_reports_the_summed_wall_time(run, tmp_path):
    import torch

    out = tmp_path / "run"
    cmd = [sys.executable, "launch/chain.py", "--chain", str(run["chain"]), "--ds_config", DS, "--output", str(out)]
    env = {**os.environ, "MASTER_PORT": "29773"}
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=True)  # one rank, signalled directly (no launcher in between)
    latest = out / "stages" / "1-b" / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    tag = (out / "stages" / "1-b" / "checkpoints" / "latest").read_text().strip()
    state = next((out / "stages" / "1-b" / "checkpoints" / tag).glob("*model_states.pt"))
    saved = torch.load(state, map_location="cpu", weights_only=False)["elapsed"]
    assert saved["wall_seconds"] > 0 and saved["train_seconds"] > 0
    deepspeed_launch(cmd[1:], 29774)
    metrics = json.loads((out / "stages" / "1-b" / "metrics.json").read_text())
    assert metrics["wall_seconds"] > saved["wall_seconds"] and metrics["train_seconds"] > saved["train_seconds"]


def test_stage_clock_sums_resumed_segments():
    from compt.stage import StageClock

    clock = StageClock()
    clock.resume({"wall_seconds": 100.0, "train_seconds": 80.0})
    clock.training_done()
    state = clock.state()
    assert 100.0 <= state["wall_seconds"] < 110.0 and 80.0 <= state["train_seconds"] <= state["wall_seconds"] - 20


def test_help_answers_without_importing_torch():
    code = ("import runpy, sys, io, contextlib\nsys.argv = ['chain.py', '--help']\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "    try:\n        runpy.run_path('launch/chain.py', run_name='__main__')\n"
            "    except SystemExit:\n        pass\n"
            "print('torch' in sys.modules, '--peak-tflops' in out.getvalue())")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["False", "True"], done.stderr[-2000:]


def test_peak_lookup():
    from compt.metrics import peak_tflops

    assert peak_tflops(None, "NVIDIA H100 80GB HBM3") == pytest.approx(989.4)
    assert peak_tflops(None, "NVIDIA H100 PCIe") == pytest.approx(756.0)
    assert peak_tflops(None, "NVIDIA H200") == pytest.approx(989.4)
    assert peak_tflops(None, "cpu") is None and peak_tflops(312.0, "cpu") == 312.0
