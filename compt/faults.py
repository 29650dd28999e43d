"""What a stage does about bad data and bad steps: count them, keep going while they
are rare, stop with a clear error when they are not.

Counters live in the checkpoint's client state, so a resumed stage keeps counting
where the interrupted one left off, and end up in the stage's ``metrics.json``.
All decisions are taken on counts summed over ranks, so every rank decides alike.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from compt.devices import collective_device

# Below this many samples drawn, a stage only stops if the bad count already exceeds the
# allowed fraction of this window (so a bad sample in the first batch does not stop it).
MIN_WINDOW = 1000
MAX_EXAMPLES = 5


class StageFailed(RuntimeError):
    """A stage stopped on purpose: too much bad data, or too many non-finite losses."""


def sum_across_ranks(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=collective_device())  # NCCL reduces device tensors only
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def gather_examples(local: list[str]) -> list[str]:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, local)
        local = [e for part in parts for e in part]
    return local[:MAX_EXAMPLES]


@dataclass
class Counters:
    """Per-stage fault counters (global over ranks, except ``examples``: this rank's first few)."""

    samples: int = 0  # samples drawn for training, all ranks
    bad_samples: int = 0  # of which unreadable/empty and replaced by the next good sample
    nonfinite_steps: int = 0  # steps whose loss was NaN/Inf on some rank: skipped
    examples: list[str] = field(default_factory=list)

    @classmethod
    def from_state(cls, state: dict[str, Any] | None) -> "Counters":
        return cls(**state) if state else cls()

    def state(self) -> dict[str, Any]:
        return asdict(self)

    def remember(self, bad: list[str]) -> None:
        """Keep the first few bad-sample descriptions this rank met (for the error message)."""
        room = MAX_EXAMPLES - len(self.examples)
        if room > 0:  # distinct ones: a lost shard counts as many bad samples under one description
            self.examples += [b for b in dict.fromkeys(bad) if b not in self.examples][:room]

    def metrics(self) -> dict[str, Any]:
        return {"bad_samples": {"count": self.bad_samples, "of": self.samples,
                                "fraction": self.bad_samples / self.samples if self.samples else 0.0,
                                "examples": self.examples},
                "nonfinite_steps_skipped": self.nonfinite_steps}


def too_much_bad_data(c: Counters, max_fraction: float, final: bool) -> bool:
    """Stop? Mid-stage only when the fraction is exceeded over at least MIN_WINDOW samples."""
    seen = c.samples if final else max(c.samples, MIN_WINDOW)
    return c.bad_samples > max_fraction * seen


def bad_data_message(label: str, c: Counters, max_fraction: float, examples: list[str], saved_at: int) -> str:
    lines = "\n  ".join(examples) or "(no examples recorded)"
    return (f"{label}: {c.bad_samples} of {c.samples} samples drawn so far were unreadable or had empty captions "
            f"({c.bad_samples / max(c.samples, 1):.2%}, above data.max_bad_fraction = {max_fraction:.2%}). "
            f"Examples:\n  {lines}\nFix or remove the bad files (or raise data.max_bad_fraction), then run the "
            f"same command again: it resumes from the checkpoint saved at step {saved_at}.")


def nonfinite_message(label: str, step: int, c: Counters, limit: int) -> str:
    return (f"{label}: the loss was NaN/Inf at {c.nonfinite_steps} step(s), the last at step {step}, more than "
            f"max_nonfinite_steps = {limit}; those steps were skipped, the stage is stopped. The last periodic "
            "checkpoint is kept. Lower lr, raise warmup_steps or check the data; a changed config must be "
            "confirmed with --accept-config-change.")
