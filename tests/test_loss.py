"""The training objective: open_clip's contrastive loss + METHOD.md's alignment loss."""
from __future__ import annotations

import open_clip
import pytest
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


# -- the contrastive loss on 2 ranks: local_loss=True against the global x global logits -----------------

def _two_rank_grads(rank: int, port: int, out: str) -> None:
    """One rank of a 2-process gloo group: the loss and the gradient of this rank's features, with
    compt's ChainLoss (local x global logits) and with open_clip's global x global ClipLoss."""
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    img_all, txt_all = _emb(8, 16, seed=5).float(), _emb(8, 16, seed=6).float()
    scale = torch.tensor([3.0])
    result = {}
    for kind, loss_fn in (("compt", ChainLoss(None, rank=rank, world_size=2)),
                          ("global", open_clip.ClipLoss(local_loss=False, gather_with_grad=True, rank=rank,
                                                        world_size=2))):
        img = img_all[4 * rank: 4 * rank + 4].clone().requires_grad_()
        txt = txt_all[4 * rank: 4 * rank + 4].clone().requires_grad_()
        s = scale.clone().requires_grad_()
        loss = loss_fn((img, txt, s)).total if kind == "compt" else loss_fn(img, txt, s.reshape(()))
        loss.backward()
        logged = loss.detach().clone()
        dist.all_reduce(logged)  # the train loop's sum over ranks, then / world
        result[kind] = {"loss": logged.item() / 2, "img": img.grad, "txt": txt.grad, "scale": s.grad}
    torch.save(result, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_local_loss_gives_the_global_loss_and_its_gradients_on_two_ranks(tmp_path):
    """local_loss=True (each rank: its rows x every rank's features) against the global x global logits
    every rank built before: the same logged loss (the loss one rank computes over the whole batch), the same
    gradients of each rank's features, and the same logit-scale gradient after DeepSpeed's average over ranks."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_two_rank_grads, args=(port, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    one_rank = open_clip.ClipLoss()(_emb(8, 16, seed=5).float(), _emb(8, 16, seed=6).float(), torch.tensor(3.0))
    for got in ranks:
        assert got["compt"]["loss"] == pytest.approx(got["global"]["loss"], rel=1e-6)
        assert got["compt"]["loss"] == pytest.approx(one_rank.item(), rel=1e-6)
        for name in ("img", "txt"):  # each rank's features: their gradient through every rank's loss
            assert torch.allclose(got["compt"][name], got["global"][name], rtol=1e-5, atol=1e-7), name
        assert got["compt"]["img"].abs().sum() > 0  # gradients flowed through the gather
    # The replicated logit scale: each rank differentiates its own rows' loss now, the whole batch's before;
    # DeepSpeed's average over ranks makes them the same gradient.
    mean = lambda kind: sum(got[kind]["scale"] for got in ranks) / 2  # noqa: E731
    assert torch.allclose(mean("compt"), mean("global"), rtol=1e-5, atol=1e-7)
    assert not torch.allclose(ranks[0]["compt"]["scale"], ranks[1]["compt"]["scale"])  # the ranks did differ
