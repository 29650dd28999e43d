"""One run at a time per run directory: rank 0 holds an exclusive lock on ``<run>/.lock`` for the
whole run, so a second launch on the same ``--output`` is refused instead of sharing its checkpoints.

The lock is ``flock(2)`` on the file, which the kernel drops when its holder dies (even by ``kill -9``):
a lock file left behind by a crashed run is free and simply taken over. The file holds the holder's
pid, host and start time for the refusal message. Where the filesystem has no flock (some network
filesystems), the pid in the file decides: a holder on this host that no longer runs is stale.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK_NAME = ".lock"


class RunLocked(RuntimeError):
    """The run directory is in use by another launch (or cannot be locked); nothing was written."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def describe_holder(holder: dict | None) -> str:
    if not holder:
        return "another process (it left no pid in the lock file)"
    since = holder.get("since")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else "?"
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} (since {when})"


class RunLock:
    """An exclusive lock on ``<root>/.lock``; :meth:`acquire` raises RunLocked naming the holder.

    ``stale``: who held the lock file before us and no longer runs (None when the file was clean).
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.path = self.root / LOCK_NAME
        self.stale: dict | None = None
        self._file = None

    def _read_holder(self, f) -> dict | None:
        try:
            f.seek(0)
            text = f.read()
            holder = json.loads(text) if text.strip() else None
        except (OSError, ValueError):
            return None
        return holder if isinstance(holder, dict) else None

    def _refusal(self, holder: dict | None, why: str = "") -> RunLocked:
        return RunLocked(
            f"--output {self.root} is in use by another run: {describe_holder(holder)} holds {self.path}{why}. "
            "Two launches on one run directory would share (and prune) each other's checkpoints and manifest. "
            "Wait for that run to finish or stop it (SIGTERM saves a checkpoint; rerun the same command to "
            "resume), or pick a new --output")

    def acquire(self) -> "RunLock":
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            f = open(self.path, "a+")
        except OSError as e:
            raise RunLocked(f"--output {self.root}: cannot create the run directory's lock file {self.path} "
                            f"({e.strerror or e}); pick a writable --output directory") from e
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                holder = self._read_holder(f)
                f.close()
                raise self._refusal(holder) from None
            # No flock on this filesystem: judge the holder by its pid.
            holder = self._read_holder(f)
            if holder and holder.get("pid") != os.getpid():
                here = holder.get("host") == socket.gethostname()
                if not here or _alive(int(holder.get("pid", -1))):
                    f.close()
                    raise self._refusal(holder, "" if here else (
                        f" (this filesystem has no flock, so compt cannot tell whether it still runs: if it "
                        f"does not, delete {self.path})")) from None
        self.stale = self._read_holder(f)
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}) + "\n")
        f.flush()
        os.fsync(f.fileno())
        self._file, self._pid = f, os.getpid()
        return self

    def release(self) -> None:
        """Empty the file (a clean exit leaves no holder to report) and drop the lock."""
        if self._file is None:
            return
        try:
            self._file.truncate(0)
        except OSError:
            pass
        self._file.close()  # closing the descriptor drops the flock
        self._file = None

    def __del__(self) -> None:  # main() returning (or raising) ends the run: the lock goes with it
        if getattr(self, "_file", None) is not None and getattr(self, "_pid", None) == os.getpid():
            self.release()

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def lock_run_dir(root: str | Path, rank: int) -> RunLock | None:
    """Rank 0 takes the run directory's lock before any rank writes there; every rank calls this and
    learns the outcome (collective), so a refusal stops every rank. Returns rank 0's held lock (None on
    the other ranks); raises RunLocked on every rank when rank 0 could not take it (rank 0's message
    names the holder)."""
    from compt.checkpoint import any_rank

    lock, problem = None, None
    if rank == 0:
        try:
            lock = RunLock(root).acquire()
        except RunLocked as e:
            problem = e
        else:
            if lock.stale and lock.stale.get("pid") is not None:
                print(f"note: took over the lock of {root} from {describe_holder(lock.stale)}, which no longer "
                      "runs (a run that was killed); resuming its run directory", flush=True)
    if any_rank(problem is not None)[0]:
        if lock is not None:
            lock.release()
        raise problem or RunLocked(f"rank 0 could not lock --output {root} (its error says why)")
    return lock
