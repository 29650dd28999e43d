"""Deterministic global batches for every family: a seeded permutation per epoch, each rank
takes its slice of each micro-step, so 1 rank and N ranks see the same global batches.
"""
from __future__ import annotations

from typing import Iterator

import torch


class GlobalBatchSampler:
    """Yields this rank's index list for every micro-step; ``step`` global steps in total."""

    def __init__(self, n: int, global_batch: int, steps: int, rank: int, world: int, gas: int, seed: int,
                 start_step: int = 0):
        if global_batch > n:
            raise ValueError(f"batch_size {global_batch} is larger than the dataset ({n} samples); lower batch_size")
        self.n, self.gb, self.steps, self.rank, self.world, self.gas, self.seed = n, global_batch, steps, rank, world, gas, seed
        self.micro = global_batch // (world * gas)
        self.per_epoch = n // global_batch
        self.start_step = start_step  # resuming: batches are a pure function of (seed, step)

    def __len__(self) -> int:
        return (self.steps - self.start_step) * self.gas

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        perm, epoch = None, -1
        for step in range(self.start_step, self.steps):
            e, b = divmod(step, self.per_epoch)
            if e != epoch:
                epoch = e
                perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + e)).tolist()
            for m in range(self.gas):
                start = b * self.gb + (m * self.world + self.rank) * self.micro
                yield [(epoch, i) for i in perm[start:start + self.micro]]
