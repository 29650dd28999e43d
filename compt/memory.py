"""A stage's memory, per rank: resident memory before its models (baseline) and at its peak, and the
accelerator's peak allocation; ``metrics.json`` gets one list entry per rank under ``memory``.

The peak is the kernel's high-water mark VmHWM, reset at the stage's start by writing "5" to
/proc/self/clear_refs (Linux >= 4.0). Not ``ru_maxrss``: it cannot be reset, so every stage after the
first would report the largest stage so far. Where the reset or /proc is unavailable the peak is the
process's own since it started (``peak_rss_since: "process start"``), and None where nothing tells it.
"""
from __future__ import annotations

import resource
import sys

STATUS = "/proc/self/status"
CLEAR_REFS = "/proc/self/clear_refs"


def _status_kib(field: str) -> int | None:
    try:
        with open(STATUS) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])  # "VmHWM:   123456 kB"
    except (OSError, ValueError, IndexError):
        return None
    return None


def rss_bytes() -> int | None:
    """This process's resident set size now."""
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except Exception:  # noqa: BLE001 - psutil absent or refused: no figure rather than no stage
        return None


def reset_peak_rss() -> bool:
    """Start a new high-water mark; False where the kernel offers none to reset."""
    try:
        with open(CLEAR_REFS, "w") as f:
            f.write("5")
        return _status_kib("VmHWM") is not None
    except OSError:
        return False


def peak_rss_bytes() -> int | None:
    """The resident high-water mark since the last reset (or since the process started)."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    try:
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (OSError, ValueError):
        return None
    return maxrss if sys.platform == "darwin" else maxrss * 1024  # bytes on macOS, KiB elsewhere


def _accelerator():
    from deepspeed.accelerator import get_accelerator

    from compt.engine import on_accelerator

    return get_accelerator() if on_accelerator() else None


class StageMemory:
    """Started where a stage begins (after imports, before its models); ``report()`` at its end."""

    def __init__(self):
        self.resettable = reset_peak_rss()
        self.baseline = rss_bytes()
        self.accelerator = _accelerator()
        if self.accelerator is not None:
            self.accelerator.reset_peak_memory_stats()

    def local(self) -> dict:
        return {"baseline_rss_bytes": self.baseline, "peak_rss_bytes": peak_rss_bytes(),
                "peak_accelerator_bytes": (int(self.accelerator.max_memory_allocated())
                                           if self.accelerator is not None else None)}

    def report(self) -> dict:
        """Every rank's figures, as lists indexed by rank (collective when torch.distributed is initialised)."""
        import torch.distributed as dist

        mine = self.local()
        if dist.is_available() and dist.is_initialized():
            every: list = [None] * dist.get_world_size()
            dist.all_gather_object(every, mine)
        else:
            every = [mine]
        out = {key: [r[key] for r in every] for key in ("baseline_rss_bytes", "peak_rss_bytes")}
        out["peak_rss_since"] = "stage start" if self.resettable else "process start"
        if self.accelerator is not None:
            out["peak_accelerator_bytes"] = [r["peak_accelerator_bytes"] for r in every]
        return out

