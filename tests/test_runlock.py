"""One run per run directory: rank 0 locks <output>/.lock for the whole run. A second launch on the same
--output exits 2 naming the holder (pid, host, since when) while the first finishes normally; the lock of
a run that died (kill -9, or a stale file whose process is gone) is taken over."""
from __future__ import annotations

import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from compt.runlock import LOCK_NAME, RunLock, RunLocked
from conftest import DS, REPO, write_chain

HOLD = """
import sys, time
from compt.runlock import RunLock
lock = RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def _holder(root) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(root)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_live_holder_is_named_and_its_lock_is_taken_over_once_it_is_killed(tmp_path):
    holder = _holder(tmp_path / "run")
    try:
        with pytest.raises(RunLocked) as refused:
            RunLock(tmp_path / "run").acquire()
        message = str(refused.value)
        assert f"pid {holder.pid} on host {socket.gethostname()} (since " in message
        assert "pick a new --output" in message and str(tmp_path / "run" / LOCK_NAME) in message
    finally:
        holder.kill()  # SIGKILL: no cleanup runs, the lock file keeps its content
        holder.wait()
    lock = RunLock(tmp_path / "run").acquire()
    assert lock.stale is not None and lock.stale["pid"] == holder.pid  # detected, and taken over
    assert json.loads((tmp_path / "run" / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert RunLock(tmp_path / "run").acquire().stale is None  # a clean release leaves no holder behind


def test_a_lock_file_left_by_a_process_that_is_gone_is_taken_over(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname(),
                                                  "since": time.time() - 3600}))
    lock = RunLock(tmp_path).acquire()
    assert lock.stale["host"] == socket.gethostname()
    lock.release()


def test_without_flock_the_pid_in_the_file_decides(tmp_path, monkeypatch):
    """On a filesystem with no flock (some network filesystems) a holder on this host that still runs
    keeps the lock, one that is gone loses it, and one on another host is reported with how to clear it."""
    import compt.runlock

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(compt.runlock.fcntl, "flock", no_flock)
    here = socket.gethostname()
    for holder, refused in [({"pid": os.getppid(), "host": here}, "pid"), ({"pid": _dead_pid(), "host": here}, None),
                            ({"pid": 1, "host": "another-node"}, f"if it does not, delete {tmp_path / LOCK_NAME}")]:
        (tmp_path / LOCK_NAME).write_text(json.dumps({**holder, "since": time.time()}))
        if refused:
            with pytest.raises(RunLocked, match=re.escape(refused)):
                RunLock(tmp_path).acquire()
        else:
            RunLock(tmp_path).acquire().release()


def _rank_pid(lock_file, launcher: subprocess.Popen, timeout: float = 300) -> int:
    """The pid rank 0 of ``launcher`` wrote into the lock file once it holds the lock and opened the run."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert launcher.poll() is None, "the first launch ended before it locked its run directory"
        try:
            holder = json.loads(lock_file.read_text())
        except (OSError, ValueError):
            holder = None
        if holder and (lock_file.parent / "manifest.json").is_file():
            return holder["pid"]
        time.sleep(0.2)
    raise AssertionError("the first launch never locked its run directory")


def _ancestors(pid: int) -> list[int]:
    out = []
    while pid > 1:
        with open(f"/proc/{pid}/stat") as f:
            pid = int(f.read().rsplit(")", 1)[1].split()[1])
        out.append(pid)
    return out


def test_a_second_launch_on_the_same_output_exits_2_naming_the_first(tmp_path, chain_dict):
    """Two real launches: the second (2 ranks) starts while the first holds the run directory and exits 2
    on every rank, naming the first's rank-0 pid and writing nothing; the first then finishes normally.
    The first is paused (SIGSTOP) while the second runs, so the overlap does not depend on timing."""
    chain_dict["stages"] = chain_dict["stages"][:2]
    chain = write_chain(tmp_path / "chain.yaml", chain_dict)
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = ["launch/chain.py", "--chain", str(chain), "--ds_config", DS, "--output", str(out)]
    log = open(tmp_path / "first.log", "w")  # a file, not a pipe: nobody reads it while the first runs
    first = subprocess.Popen(["deepspeed", "--master_port", "29781", *cmd], cwd=REPO, env=env, stdout=log,
                             stderr=subprocess.STDOUT)
    try:
        pid = _rank_pid(out / LOCK_NAME, first)
        assert first.pid in _ancestors(pid)  # rank 0 of the first launch holds the lock
        os.kill(pid, signal.SIGSTOP)
        try:
            manifest = (out / "manifest.json").read_text()
            second = subprocess.run(["deepspeed", "--master_port", "29782", "--num_gpus", "2", *cmd], cwd=REPO,
                                    env=env, text=True, capture_output=True, timeout=600)
            assert (out / "manifest.json").read_text() == manifest  # the second wrote nothing
        finally:
            os.kill(pid, signal.SIGCONT)
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"--output {out} is in use by another run: pid {pid} on host {socket.gethostname()}" in second.stderr
        assert "pick a new --output" in second.stderr
        first.wait(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
        log.close()
    assert first.returncode == 0, (tmp_path / "first.log").read_text()[-3000:]
    assert [s["status"] for s in json.loads((out / "manifest.json").read_text())["stages"]] == ["done", "done"]
    assert (out / "results.md").is_file() and (out / LOCK_NAME).read_text() == ""  # released on exit
