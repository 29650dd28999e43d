"""A rank stops when its launcher goes away: DeepSpeed's `deepspeed` command (single node) neither forwards
SIGTERM/SIGINT to its ranks nor takes them down when it dies, so each rank watches the launcher's processes.

``watch_launcher`` starts a thread that sends this process SIGTERM once they are gone: the run then stops as
on any SIGTERM (a checkpoint at the next step, or the end of the stage's save; exit 143). ``signals_held`` keeps
a signal to the whole process group (Ctrl-C, scancel) from killing a data worker as it starts.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from compt.distributed import launcher_claim

POLL_SECONDS = 1.0
DEEPSPEED = ("deepspeed", "ds", "deepspeed.launcher.runner", "deepspeed.launcher.launch")
ANCESTORS = 3  # how far above this rank the `deepspeed` command may sit (runner -> launch.py, or -> mpirun)


def _parent_of(pid: int) -> int | None:
    import psutil  # a DeepSpeed dependency

    if pid == os.getpid():
        return os.getppid()
    try:
        return psutil.Process(pid).ppid()
    except psutil.Error:
        return None


def _is_deepspeed(pid: int) -> bool:
    import psutil

    try:
        return any(Path(a).name in DEEPSPEED for a in psutil.Process(pid).cmdline()[:4])
    except psutil.Error:
        return False


def launcher_links(env: Mapping[str, str] = os.environ) -> list[tuple[int, int]]:
    """(process, its parent) for each link from this rank up to its launcher: the parent, or, when a
    `deepspeed` command sits within a few levels above, every process up to the outermost one. None
    without a launcher (plain python): a shell that exits (nohup, a closed terminal) is no reason to stop."""
    if launcher_claim(env)[0] == "python":
        return []
    chain = [os.getpid(), os.getppid()]
    for _ in range(ANCESTORS):
        parent = _parent_of(chain[-1])
        if parent is None or parent <= 1:
            break
        chain.append(parent)
    outermost = max((i for i in range(2, len(chain)) if _is_deepspeed(chain[i])), default=1)
    return [(chain[i], chain[i + 1]) for i in range(outermost)]


def watch_launcher(env: Mapping[str, str] = os.environ, poll: float = POLL_SECONDS) -> threading.Thread | None:
    """Start the watch (call it before anything changes the environment: plain python gets a 1-rank one)."""
    links = launcher_links(env)
    if not links:
        return None

    def watch() -> None:
        while True:
            time.sleep(poll)
            gone = next((parent for pid, parent in links if _parent_of(pid) != parent), None)
            if gone is not None:
                print(f"rank process {os.getpid()}: its launcher (pid {gone}) has exited; stopping as on SIGTERM",
                      file=sys.stderr, flush=True)
                os.kill(os.getpid(), signal.SIGTERM)
                return

    thread = threading.Thread(target=watch, name="compt-launcher-watch", daemon=True)
    thread.start()
    return thread


@contextmanager
def signals_held() -> Iterator[None]:
    """SIGTERM/SIGINT blocked in this thread for the block, and in the processes it starts meanwhile (DataLoader
    workers inherit the mask). A group signal would otherwise kill a worker in the moment between PyTorch's worker
    setup and compt's worker init (compt.loading), and the rank would fail instead of stopping. The rank loses
    nothing: another of its threads takes the signal for it, or it arrives when the block ends; a stop is checked
    only after the block anyway. Where workers cannot tell who sent a SIGTERM (no sigwaitinfo: macOS), nothing is
    held."""
    if not hasattr(signal, "sigwaitinfo"):
        yield
        return
    before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def started_with_signals_held(batches: Iterable) -> Iterator:
    """``batches`` one by one, the first fetched with signals held: that is when a DataLoader starts its workers."""
    with signals_held():
        it = iter(batches)
        first = next(it, StopIteration)
    if first is not StopIteration:
        yield first
        yield from it
