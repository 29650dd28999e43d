"""The training objective: open_clip's contrastive loss + METHOD.md's alignment loss."""
from __future__ import annotations

import open_clip
import torch
import torch.nn.functional as F

from compt.kernels import feature_alignment_loss_reference
from compt.clip.losses import ChainLoss


def _emb(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_alignment_matches_formula():
    s_img, s_txt, t_img, t_txt = _emb(5, 7, seed=1), _emb(5, 7, seed=2), _emb(5, 7, seed=3), _emb(5, 7, seed=4)
    n = lambda x: x / x.norm(dim=-1, keepdim=True)  # noqa: E731
    expected = 500 * (((n(s_img) - n(t_img)) ** 2).sum() / 35 + ((n(s_txt) - n(t_txt)) ** 2).sum() / 35)
    got = feature_alignment_loss_reference(s_img, s_txt, t_img, t_txt, alpha=500)
    assert torch.allclose(got.double(), expected, rtol=1e-5)


def test_alignment_zero_for_identical_direction_and_no_teacher_grad():
    s = _emb(4, 8).float().requires_grad_()
    t = (3 * s.detach()).requires_grad_()  # same direction, different norm
    loss = feature_alignment_loss_reference(s, s, t, t, alpha=10)
    assert loss.item() < 1e-10
    loss2 = feature_alignment_loss_reference(s, s, _emb(4, 8, seed=9).float().requires_grad_(), t, alpha=10)
    loss2.backward()
    assert s.grad is not None and t.grad is None


def test_alignment_with_projection_and_several_captions():
    proj = torch.nn.Linear(6, 4, bias=False)
    s_img, s_txt = _emb(3, 6).float(), _emb(3 * 7, 6, seed=1).float()
    t_img, t_txt = _emb(3, 4, seed=2).float(), _emb(3 * 7, 4, seed=3).float()
    loss = feature_alignment_loss_reference(s_img, s_txt, t_img, t_txt, 2.0, proj)
    ref = 2.0 * ((F.normalize(proj(s_img), dim=-1) - F.normalize(t_img, dim=-1)).pow(2).mean()
                 + (F.normalize(proj(s_txt), dim=-1) - F.normalize(t_txt, dim=-1)).pow(2).mean())
    assert torch.allclose(loss, ref)


def test_chain_loss_is_clip_loss_plus_alignment():
    img, txt = F.normalize(_emb(6, 8).float(), dim=-1), F.normalize(_emb(6, 8, seed=1).float(), dim=-1)
    scale = torch.tensor([10.0])
    clip = open_clip.ClipLoss()(img, txt, scale.reshape(()))
    only = ChainLoss(alpha=None)((img, txt, scale))
    assert torch.allclose(only.total, clip) and only.transfer is None
    t_img, t_txt = _emb(6, 8, seed=2).float(), _emb(6, 8, seed=3).float()
    both = ChainLoss(alpha=500)((img, txt, scale), (t_img, t_txt, scale))
    align = feature_alignment_loss_reference(img, txt, t_img, t_txt, 500)
    assert torch.allclose(both.total, clip + align) and torch.allclose(both.transfer, align)
