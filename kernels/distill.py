"""Token-level KL distillation loss between two language models (PyTorch reference).

The student's next-token distribution is pulled towards the frozen teacher's (same
vocabulary): mean over valid tokens of KL(p_teacher || p_student), times T^2.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def distill_kl_reference(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """T^2 * mean over valid tokens of KL(softmax(z_t / T) || softmax(z_s / T)).

    z_s = student_hidden @ student_weight.T and z_t = teacher_hidden @ teacher_weight.T
    are the full [tokens, vocab] logits, computed in the inputs' dtype (as an lm_head
    does) and then taken to float32 for the softmaxes and the KL. The T^2 factor is
    Hinton et al.'s: the gradient w.r.t. the logits scales as 1/T, so T^2 keeps the
    loss's gradient magnitude independent of T (and comparable to a hard-label loss).

    Hidden states are [..., D]; ``mask`` (bool, shaped as their leading dims, True =
    valid token) selects the tokens that count; masked tokens do not enter at all.
    With no valid token the loss is 0. Teacher tensors never get gradients. Returns a
    float32 scalar.
    """
    h_s = _rows(student_hidden)
    h_t = _rows(teacher_hidden.detach())
    if mask is not None:
        keep = mask.reshape(-1)
        h_s, h_t = h_s[keep], h_t[keep]
    log_p_s = F.log_softmax((h_s @ student_weight.t()).float() / temperature, dim=-1)
    with torch.no_grad():
        log_p_t = F.log_softmax((h_t @ teacher_weight.detach().t()).float() / temperature, dim=-1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="sum", log_target=True)  # sum_tokens sum_v p_t (log p_t - log p_s)
    return kl * (temperature * temperature / max(h_s.shape[0], 1))
