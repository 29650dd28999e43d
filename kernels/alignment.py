"""Feature-space alignment loss of CoM-PT (PyTorch reference).

The student's L2-normalised image/text embeddings are pulled towards the frozen
teacher's (also L2-normalised) with a per-element mean squared error, times alpha.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def feature_alignment_loss_reference(
    student_image: torch.Tensor,
    student_text: torch.Tensor,
    teacher_image: torch.Tensor,
    teacher_text: torch.Tensor,
    alpha: float,
    proj: torch.nn.Module | None = None,
) -> torch.Tensor:
    """alpha * (mean_i mean_d (s_img - t_img)^2 + mean_i mean_d (s_txt - t_txt)^2).

    ``student_text`` may hold several captions per image ([B*C, D] or [B, C, D]);
    the mean runs over all of them. ``proj`` maps student_dim -> teacher_dim when
    the embedding sizes differ (it is applied before normalisation).
    Teacher inputs are detached: they never receive gradients.
    """
    if proj is not None:
        student_image = proj(student_image)
        student_text = proj(student_text)
    s_img = F.normalize(student_image.float(), dim=-1)
    s_txt = F.normalize(student_text.float(), dim=-1)
    t_img = F.normalize(teacher_image.detach().float(), dim=-1)
    t_txt = F.normalize(teacher_text.detach().float(), dim=-1)
    if s_img.shape != t_img.shape or s_txt.shape != t_txt.shape:
        raise ValueError(
            f"alignment loss: student/teacher embedding shapes differ "
            f"(image {tuple(s_img.shape)} vs {tuple(t_img.shape)}, text {tuple(s_txt.shape)} vs "
            f"{tuple(t_txt.shape)}); pass proj=Linear(student_dim, teacher_dim) when dims differ"
        )
    return alpha * ((s_img - t_img).pow(2).mean() + (s_txt - t_txt).pow(2).mean())
