"""How the families' DataLoaders run: worker processes per rank, prefetch, pinned memory.

``loader_options`` turns ``data.workers`` and the device into DataLoader keyword arguments.
"""
from __future__ import annotations

import os
import signal
import threading
from functools import partial

import torch

from compt.distributed import local_world_size

MAX_DEFAULT_WORKERS = 8  # past this, more decoding processes per rank rarely feed a GPU faster
PREFETCH_FACTOR = 2  # batches each worker prepares ahead (PyTorch's default)


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity API (macOS)
        return os.cpu_count() or 1


def default_workers() -> int:
    """The CPUs this rank may use (this process's CPUs over the ranks on the node), at most 8."""
    return min(MAX_DEFAULT_WORKERS, usable_cpus() // local_world_size())


def data_workers(data_cfg) -> int:
    """``data.workers``, or the default from the CPUs when it is None (or absent)."""
    workers = getattr(data_cfg, "workers", None)
    return default_workers() if workers is None else int(workers)


def _exit_if_orphaned(rank_pid: int, signum, frame) -> None:
    try:
        os.kill(rank_pid, 0)
    except ProcessLookupError:
        os._exit(0)


def leave_stop_signals_to_the_rank(rank_pid: int, worker_id: int) -> None:
    """Worker init: SIGINT/SIGTERM sent to the whole process group (Ctrl-C, scancel, systemd) are the
    rank's to handle: it checkpoints (for which it may still need batches), then shuts its workers down.
    A worker they killed would make the rank fail with "DataLoader worker exited unexpectedly" first.
    SIGTERM from the rank itself (its shutdown, or Python's at exit) still ends the worker, as in PyTorch.
    ``rank_pid``, not the parent's pid: a worker started by forkserver has the server for a parent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):  # macOS: no way to tell who sent a SIGTERM; PyTorch's handling
        return
    # Threads the worker already runs (the copy of torch's pools) do not get the mask below; a group SIGTERM
    # the kernel hands to one of them must not take the default action (death) either: it ends the worker
    # only once the rank is gone. (A worker forked inside the rank's stop handler inherits a no-op anyway.)
    signal.signal(signal.SIGTERM, partial(_exit_if_orphaned, rank_pid))
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def watch() -> None:
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid != rank_pid:
            pass
        os._exit(0)

    threading.Thread(target=watch, name="compt-sigterm", daemon=True).start()


def loader_options(data_cfg, device) -> dict:
    """DataLoader kwargs for ``data_cfg`` on ``device``: num_workers; persistent_workers, prefetch_factor
    and worker_init_fn with workers; pin_memory on an accelerator.

    Results do not depend on the worker count: the families' datasets seed any randomness per sample,
    and DataLoader returns batches in sampler order whatever the number of workers."""
    workers = data_workers(data_cfg)
    options: dict = {"num_workers": workers, "pin_memory": torch.device(device).type != "cpu"}
    if workers > 0:
        options.update(persistent_workers=True, prefetch_factor=PREFETCH_FACTOR,
                       worker_init_fn=partial(leave_stop_signals_to_the_rank, os.getpid()))
    return options
