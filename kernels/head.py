"""A language model's training loss at its output head (PyTorch reference): next-token
cross-entropy, plus KL distillation from a frozen teacher when one is given.

It builds the full [tokens x vocab] logits of both models, as a plain lm_head does; the
chunked, fused version beside it (``head_triton.py``) must compute the same.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from compt.kernels.distill import distill_kl_reference

IGNORE_INDEX = -100  # F.cross_entropy's default: a target that is padding, not a token to predict


class HeadLoss(NamedTuple):
    total: torch.Tensor  # ce + alpha * kl: the one to back-propagate
    ce: torch.Tensor  # mean next-token cross-entropy over the valid tokens (float32 scalar)
    kl: torch.Tensor | None  # T^2 * mean KL(p_teacher || p_student) over the same tokens; None without a teacher


def lm_head_loss_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    *,
    alpha: float = 1.0,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
) -> HeadLoss:
    """ce = F.cross_entropy(hidden @ weight.T, targets, ignore_index) with the logits made in
    the inputs' dtype and taken to float32 (as a LLaMA head does); with a teacher,
    kl = distill_kl_reference over the same tokens and total = ce + alpha * kl, else total = ce.

    ``hidden`` [..., D], ``weight`` [vocab, D] (as nn.Linear.weight), ``targets`` int [...]
    (the hidden states' leading dims). A target equal to ``ignore_index`` (padding) drops its
    token from both terms; the means are over the tokens left, and with none left both are 0
    (F.cross_entropy would give NaN); its hidden state is not read. The teacher gets no gradient.
    """
    targets = targets.reshape(-1)
    valid = targets != ignore_index
    rows = hidden.reshape(-1, hidden.shape[-1])
    if not bool(valid.any()):
        zero = (rows.sum() * 0.0 + weight.sum() * 0.0).float()  # 0, still connected to the inputs
        return HeadLoss(zero, zero.detach(), None if teacher_hidden is None else zero.detach())
    # Ignored rows are dropped before the matmul, not masked after it (F.cross_entropy's way): a NaN
    # in a padding token's hidden state would otherwise reach every gradient through the backward.
    ce = F.cross_entropy(F.linear(rows[valid], weight).float(), targets[valid])
    if teacher_hidden is None:
        return HeadLoss(ce, ce, None)
    kl = distill_kl_reference(hidden, weight, teacher_hidden, teacher_weight, temperature=temperature,
                              mask=valid.view(hidden.shape[:-1]))
    return HeadLoss(ce + alpha * kl, ce, kl)
