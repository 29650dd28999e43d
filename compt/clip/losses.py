"""The CoM-PT training objective: CLIP contrastive loss + feature alignment to the teacher.

The contrastive part is open_clip's ClipLoss over the *global* batch: each rank scores its own
rows against every rank's features (gathered with gradient, ``local_loss=True``), so a rank holds
a local x global block of logits, not global x global. The mean of the ranks' losses (what the
train loop logs, and what DeepSpeed's gradient averaging differentiates) is the loss one rank
would compute over the whole batch (tests/test_loss.py checks loss and gradients on 2 ranks).
"""
from __future__ import annotations

import open_clip

from compt.kernels import feature_alignment_loss
from compt.loss import LossParts


class ChainLoss:
    def __init__(self, alpha: float | None, rank: int = 0, world_size: int = 1, backend: str = "auto"):
        self.alpha, self.backend = alpha, backend  # backend: auto = fused Triton on GPU, PyTorch reference otherwise
        self.clip = open_clip.ClipLoss(
            local_loss=True, gather_with_grad=world_size > 1, rank=rank, world_size=world_size
        )

    def __call__(self, student: tuple, teacher: tuple | None = None) -> LossParts:
        """``student`` is the model output: (image, text, logit_scale[, image_for_align, text_for_align]);
        the last two exist when the student projects to a different teacher embed_dim."""
        s_img, s_txt, logit_scale = student[:3]
        # In fp32 whatever the training dtype: bf16 logits over a global batch lose the contrast (no-ops in fp32).
        contrastive = self.clip(s_img.float(), s_txt.float(), logit_scale.reshape(()).float())
        if teacher is None or not self.alpha:
            return LossParts(contrastive, contrastive, None)
        a_img, a_txt = student[3:5] if len(student) >= 5 else (s_img, s_txt)
        align = feature_alignment_loss(a_img, a_txt, teacher[0], teacher[1], self.alpha, backend=self.backend)
        return LossParts(contrastive + align, contrastive, align)
