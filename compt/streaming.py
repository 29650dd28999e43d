"""What the core knows about streamed training data, whatever the family: its size is only what the config
declares, and its read position travels in the stage checkpoint.

A family's data config streams when it has ``streams() -> True``; its ``train_samples`` is then the training
set's size (``len`` of the dataset, ``UNDECLARED`` when not given). A streaming train loader has ``state()``
(called on every rank at each checkpoint; a collective) whose value the stage stores in the checkpoint's
client state under ``data`` and hands back to ``family.train_loader(..., data_state=...)`` on resume.
"""
from __future__ import annotations

import sys

# len() of a streamed training set whose size was not declared: larger than any batch, and never a budget
# (epoch budgets need a declared size: epoch_budget_problems).
UNDECLARED = sys.maxsize


def streams(data_cfg) -> bool:
    return bool(getattr(data_cfg, "streams", lambda: False)())


def epoch_budget_problems(cfg) -> list[str]:
    """Stages budgeted in epochs over streamed data that declares no size: an epoch has no length."""
    if not streams(cfg.data) or getattr(cfg.data, "train_samples", None) is not None:
        return []
    return [f"stages.{k}.budget.epochs: the training data is streamed and its size is not declared; give "
            "data.train_samples (the samples in data.train), or a budget in steps or samples"
            for k, stage in enumerate(cfg.stages) if stage.budget.epochs is not None]


def size_text(n: int) -> str:
    """A training set's size for messages."""
    return "streamed (size not declared)" if n == UNDECLARED else str(n)
