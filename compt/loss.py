"""What every family's training step returns: the total loss and its two parts, the model's
own objective and the transfer term toward the frozen predecessor.

The contract: a family's ``loss(...)`` returns ``step(engine, batch, teacher) -> LossParts``.
Where the transfer term is computed is the family's choice, for memory: CLIP aligns pooled
embeddings (small, computed in compt/clip/losses.py after both forwards), while LLaMA's KL
needs both models' final hidden states and output weights and is fused into the student's
forward (compt/llama/train.py) so full [tokens x vocab] logits of both models never coexist.
The stage loop (compt/stage.py) only sums, logs and checks these tensors.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LossParts:
    total: torch.Tensor  # what is back-propagated: task + transfer
    task: torch.Tensor  # the model's own loss (CLIP: contrastive; LLaMA: next-token cross-entropy)
    transfer: torch.Tensor | None  # toward the predecessor (CLIP: alignment; LLaMA: KL); None without a teacher
