"""Signals in every phase (issue 20): SIGTERM during a stage's final evaluation and save lets the save finish,
exits 143 and leaves a run the rerun continues (the stage is not trained again); a second signal is ignored
without a traceback; SIGTERM to the `deepspeed` launcher alone (which does not pass it on) still stops its
ranks, which notice it is gone, checkpoint and exit, and the rerun resumes from that checkpoint."""
from __future__ import annotations

import copy
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import DS, REPO, TINY_CHAIN, deepspeed_launch, write_chain


class Watched:
    """A launch whose output (stdout and stderr) is read line by line as it runs."""

    def __init__(self, cmd: list[str], env: dict[str, str]):
        self.proc = subprocess.Popen(cmd, cwd=REPO, env={**env, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: list[str] = []
        self.closed = threading.Event()  # every process holding the output pipe is gone
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
        self.closed.set()

    def wait_for(self, text: str, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        while not any(text in ln for ln in self.lines):
            assert not self.closed.is_set() and time.time() < deadline, f"no {text!r} in:\n{self.log[-5000:]}"
            time.sleep(0.01)

    @property
    def log(self) -> str:
        return "".join(self.lines)


def one_stage_chain(path, steps: int, checkpoint_every: int):
    chain = copy.deepcopy(TINY_CHAIN)
    chain["stages"] = chain["stages"][:1]
    chain["stages"][0]["budget"] = {"steps": steps}
    chain["defaults"]["checkpoint_every_steps"] = checkpoint_every
    return write_chain(path, chain)


@pytest.fixture(scope="module")
def stopped_while_saving(tmp_path_factory):
    """SIGTERM to the run's process group just after the last step, while the stage is evaluated and saved
    (about 0.5 s of evaluation, then 0.6 s of saving here), then SIGINT (a second Ctrl-C); then the same command
    again."""
    root = tmp_path_factory.mktemp("signals-save")
    chain = one_stage_chain(root / "chain.yaml", steps=6, checkpoint_every=2)
    cmd = [sys.executable, "launch/chain.py", "--chain", str(chain), "--ds_config", DS, "--output", str(root / "run")]
    run = Watched(cmd, {**os.environ, "MASTER_PORT": "29861"})
    run.wait_for("stage 0 a: step 6/6")  # printed after the last step, before the evaluation
    time.sleep(0.25)  # past the loop's own stop check, which follows the line within microseconds
    os.killpg(run.proc.pid, signal.SIGTERM)
    time.sleep(0.3)
    os.killpg(run.proc.pid, signal.SIGINT)
    code = run.proc.wait(timeout=300)
    run.closed.wait(60)
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                           env={**os.environ, "MASTER_PORT": "29862"})
    return {"root": root, "code": code, "log": run.log, "again": again}


def test_a_signal_during_the_final_evaluation_and_save_exits_143_after_the_save(stopped_while_saving):
    log = stopped_while_saving["log"]
    assert stopped_while_saving["code"] == 143, log[-5000:]
    assert "Traceback" not in log, log[-5000:]
    assert log.count("stopping at the next safe point") == 1, log[-5000:]  # said once; the SIGINT is ignored
    # The signal lands in the evaluation, which goes on, and the save finishes; on a machine so loaded that it
    # beats the loop's stop check after the last step, the stage checkpoints that step. Nothing is lost either way.
    assert ("stage 0 a: stopped by SIGTERM with the stage done (weights saved)" in log
            or "stage 0 a: stopped by SIGTERM after step 6; checkpoint saved" in log), log[-5000:]


def test_the_rerun_does_not_train_that_stage_again(stopped_while_saving):
    again = stopped_while_saving["again"]
    log = again.stdout + again.stderr
    assert again.returncode == 0, log[-5000:]
    assert ("stage 0 a: already done (weights verified), skipping" in log
            or "stage 0 a: resuming from checkpoint at step 6" in log), log[-5000:]
    assert "stage 0 a: step 2/6" not in log
    manifest = json.loads((stopped_while_saving["root"] / "run" / "manifest.json").read_text())
    assert manifest["stages"][0]["status"] == "done"


@pytest.fixture(scope="module")
def launcher_killed(tmp_path_factory):
    """SIGTERM to the `deepspeed` command's own process only, a few steps into a 60-step stage."""
    import psutil

    root = tmp_path_factory.mktemp("signals-launcher")
    chain = one_stage_chain(root / "chain.yaml", steps=60, checkpoint_every=50)
    args = ["launch/chain.py", "--chain", str(chain), "--ds_config", DS, "--output", str(root / "run")]
    run = Watched(["deepspeed", "--master_port", "29863", *args], dict(os.environ))
    run.wait_for("stage 0 a: step 4/60")
    runner = psutil.Process(run.proc.pid)
    assert any(os.path.basename(a) == "deepspeed" for a in runner.cmdline()[:2]), runner.cmdline()
    sent = time.time()
    os.kill(run.proc.pid, signal.SIGTERM)
    run.proc.wait(timeout=30)  # DeepSpeed's command dies at once, passing nothing on
    while True:  # the launcher's other process, the rank and its data workers
        left = [p for p in psutil.process_iter(["status"])
                if p.info["status"] != psutil.STATUS_ZOMBIE and _session(p.pid) == run.proc.pid]
        seconds = time.time() - sent
        if (not left and run.closed.is_set()) or seconds > 90:
            break
        time.sleep(0.1)
    finished = (root / "run" / "stages" / "0-a" / "metrics.json").exists()
    again = deepspeed_launch(args, 29864)
    return {"root": root, "log": run.log, "seconds": seconds, "left": left, "finished": finished,
            "again": again.stdout + again.stderr}


def _session(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


def test_sigterm_to_the_deepspeed_launcher_alone_stops_its_ranks(launcher_killed):
    log = launcher_killed["log"]
    assert not launcher_killed["left"] and launcher_killed["seconds"] < 60, (launcher_killed, log[-5000:])
    assert "its launcher (pid" in log and "has exited; stopping as on SIGTERM" in log, log[-5000:]
    assert re.search(r"stage 0 a: stopped by SIGTERM after step \d+; checkpoint saved", log), log[-5000:]
    assert not launcher_killed["finished"]  # stopped early, not trained to the end unseen


def test_the_run_stopped_with_its_launcher_resumes(launcher_killed):
    step = re.search(r"stage 0 a: resuming from checkpoint at step (\d+)", launcher_killed["again"])
    assert step and 4 <= int(step.group(1)) < 60, launcher_killed["again"][-5000:]
    assert (launcher_killed["root"] / "run" / "stages" / "0-a" / "metrics.json").is_file()


def test_a_repeated_signal_is_ignored_and_acknowledged_once(capfd):
    from compt.checkpoint import StopRequest

    before = signal.getsignal(signal.SIGINT)
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)  # a second Ctrl-C: no KeyboardInterrupt
        time.sleep(0.1)
    assert stop.signum == signal.SIGTERM and stop.reason == "SIGTERM"
    assert capfd.readouterr().err.count("SIGTERM: stopping at the next safe point") == 1
    assert signal.getsignal(signal.SIGINT) is before


RANK = """
import os, signal, sys, time
from compt.stopping import watch_launcher
signal.signal(signal.SIGTERM, lambda *_: (open(sys.argv[1], "w").write("stopped"), os._exit(143)))
print(watch_launcher({"WORLD_SIZE": "2"}, poll=0.1) is not None, watch_launcher({}) is None, flush=True)
time.sleep(60)
"""
LAUNCHER = """
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]])
time.sleep(60)
"""


def test_a_rank_stops_when_its_launcher_dies_and_not_without_a_launcher(tmp_path):
    """The watch itself, without DeepSpeed: the launcher is killed with SIGKILL (nothing could pass a signal on)."""
    flag = tmp_path / "stopped"
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, RANK, str(flag)], cwd=REPO, stdout=subprocess.PIPE,
                                text=True, start_new_session=True)
    try:
        assert launcher.stdout.readline().split() == ["True", "True"]  # watching with a launcher, not without
        launcher.kill()
        launcher.wait()
        deadline = time.time() + 30
        while not flag.exists() and time.time() < deadline:
            time.sleep(0.05)
        assert flag.exists() and flag.read_text() == "stopped"
    finally:
        try:
            os.killpg(launcher.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class _BlockedSignals:
    """A dataset whose items are the signals blocked in the process that reads them."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> list[int]:
        return sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, []))


@pytest.mark.skipif(not hasattr(signal, "sigwaitinfo"), reason="held only where workers can tell who signals them")
def test_data_workers_start_with_stop_signals_held():
    """A worker starts with SIGTERM/SIGINT blocked, so a group signal cannot kill it before compt's worker init."""
    from torch.utils.data import DataLoader

    from compt.stopping import started_with_signals_held

    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    batches = started_with_signals_held(DataLoader(_BlockedSignals(), batch_size=None, num_workers=1))
    assert {int(signal.SIGTERM), int(signal.SIGINT)} <= set(next(batches))
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before  # the rank's own mask is back
