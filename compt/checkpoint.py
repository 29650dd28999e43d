"""Mid-stage DeepSpeed checkpoints: save every N steps / minutes, keep the last K,
resume from the latest, and save before exiting on SIGTERM/SIGINT.

The checkpoint holds DeepSpeed's model, optimizer and LR-schedule state; compt adds the
step count, the loss curve so far and the step-0 metrics as client state. The data
position needs nothing more: batches are a pure function of (seed, step).
"""
from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


class StageInterrupted(RuntimeError):
    """A stage stopped on SIGTERM/SIGINT after saving a checkpoint."""


def _any_rank(*flags: bool) -> list[bool]:
    """Each flag true on every rank if it is true on any rank (keeps collective decisions in step)."""
    t = torch.tensor([1 if f else 0 for f in flags], dtype=torch.int64)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


class StopRequest:
    """Turns SIGTERM/SIGINT into a flag the training loop checks between steps."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        for s in self.SIGNALS:
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)


class StageCheckpointer:
    def __init__(self, engine, directory: Path, every_steps: int, every_minutes: float, keep: int, rank: int):
        self.engine, self.dir, self.every_steps, self.every_minutes = engine, directory, every_steps, every_minutes
        self.keep, self.rank = keep, rank
        self._last = time.monotonic()

    @staticmethod
    def exists(directory: Path) -> bool:
        return (directory / "latest").is_file()

    def resume(self) -> dict[str, Any] | None:
        """Load the latest checkpoint into the engine; its client state, or None to start fresh."""
        if not self.exists(self.dir):
            return None
        tag = (self.dir / "latest").read_text().strip()
        try:
            path, client = self.engine.load_checkpoint(str(self.dir), tag=tag)
        except Exception as e:  # noqa: BLE001 - name the checkpoint, keep the cause
            raise RuntimeError(f"cannot resume from checkpoint {self.dir / tag}: {e}; write an older tag "
                               f"(one of the step* folders in {self.dir}) into {self.dir / 'latest'}, or delete "
                               f"{self.dir} to restart the stage") from e
        if path is None:
            raise RuntimeError(f"checkpoint {self.dir / tag} could not be loaded")
        return client

    def poll(self, step: int, total: int, stop: StopRequest) -> tuple[bool, bool]:
        """(stop now, checkpoint now), agreed by all ranks in one collective."""
        by_steps = self.every_steps > 0 and step % self.every_steps == 0 and step < total
        by_time = self.every_minutes > 0 and (time.monotonic() - self._last) >= 60 * self.every_minutes
        stopping, due = _any_rank(stop.signum is not None, by_steps or by_time)
        return stopping, stopping or due

    def save(self, step: int, client_state: dict[str, Any]) -> None:
        self.engine.save_checkpoint(str(self.dir), tag=f"step{step:08d}", client_state=client_state)
        self._last = time.monotonic()
        if self.rank == 0:
            tags = sorted(p for p in self.dir.glob("step*") if p.is_dir())
            for old in tags[:-self.keep] if self.keep > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()

    def remove_all(self) -> None:
        """After the stage's final weights are safely written, its checkpoints are no longer needed."""
        if self.rank == 0:
            shutil.rmtree(self.dir, ignore_errors=True)
