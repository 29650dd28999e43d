"""Deterministic data feeding: N ranks see exactly the global batches one rank sees."""
from __future__ import annotations

import torch

from compt.clip.model import preprocess_for
from compt.data import DataConfig, build_dataset
from compt.clip.loader import train_loader
from compt.sampler import GlobalBatchSampler
from conftest import tiny_model


def test_rank_slices_tile_the_global_batch():
    one = list(GlobalBatchSampler(100, 16, steps=12, rank=0, world=1, gas=1, seed=3))
    r0 = list(GlobalBatchSampler(100, 16, steps=12, rank=0, world=2, gas=1, seed=3))
    r1 = list(GlobalBatchSampler(100, 16, steps=12, rank=1, world=2, gas=1, seed=3))
    assert len(one) == 12
    for full, a, b in zip(one, r0, r1):
        assert full == a + b
    # an epoch holds 6 batches; a new epoch reshuffles, and no index repeats inside one
    epoch0 = [i for batch in one[:6] for _, i in batch]
    assert len(set(epoch0)) == 96 and one[6][0][0] == 1
    ga = list(GlobalBatchSampler(100, 16, steps=12, rank=1, world=2, gas=2, seed=3))
    assert len(ga) == 24 and ga[0] == one[0][4:8]  # micro-step 0 of rank 1
    flat_ga = [list(GlobalBatchSampler(100, 16, 12, r, 2, 2, 3)) for r in (0, 1)]
    step0 = flat_ga[0][0] + flat_ga[1][0] + flat_ga[0][1] + flat_ga[1][1]
    assert step0 == one[0]


def test_augmentation_is_seeded_per_sample():
    ds = build_dataset(DataConfig(kind="digits", render_size=16), "train")
    pre = preprocess_for(tiny_model())
    kw = dict(global_batch=8, steps=2, gas=1, seed=5)
    full = list(train_loader(ds, pre, None, rank=0, world=1, **kw))
    halves = [list(train_loader(ds, pre, None, rank=r, world=2, **kw)) for r in (0, 1)]
    for step in range(2):
        joined = torch.cat([halves[0][step].images, halves[1][step].images])
        assert torch.equal(full[step].images, joined)
        assert torch.equal(full[step].texts, torch.cat([halves[0][step].texts, halves[1][step].texts]))
    assert full[0].images.shape == (8, 3, 16, 16) and full[0].texts.shape == (8, 12)
