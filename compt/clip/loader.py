"""Deterministic data feeding: global batches from a seeded permutation, each rank
takes its slice, and per-sample augmentation is seeded by (seed, epoch, index), so
1 rank and N ranks see the same global batches with the same pixels.

Bad samples (an image that cannot be read or decoded, an empty caption) never stop
a batch: in training the next good sample in index order takes the bad one's place
(so every rank's batch keeps its size, as the global contrastive loss needs); in
evaluation the bad sample is dropped. Either way the batch carries a description of
each bad sample in ``Batch.bad`` for the trainer to count.
"""
from __future__ import annotations

from dataclasses import dataclass, field
import torch
from torch.utils.data import DataLoader, Dataset

from compt.clip.model import Preprocess
from compt.sampler import GlobalBatchSampler


@dataclass
class Batch:
    images: torch.Tensor
    texts: torch.Tensor
    teacher_images: torch.Tensor | None = None
    teacher_texts: torch.Tensor | None = None
    captions: list[str] | None = None
    labels: torch.Tensor | None = None
    bad: list[str] = field(default_factory=list)  # descriptions of bad samples met building this batch

    def teacher_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """What the teacher reads: its own tensors when its preprocessing differs, else the student's."""
        return (self.teacher_images if self.teacher_images is not None else self.images,
                self.teacher_texts if self.teacher_texts is not None else self.texts)


MAX_CONSECUTIVE_BAD = 64


class _Seeded(Dataset):
    """Applies transforms under a per-sample seed so augmentation is rank-count independent."""

    def __init__(self, ds, student: Preprocess, teacher: Preprocess | None, seed: int, train: bool):
        self.ds, self.student, self.teacher, self.seed, self.train = ds, student, teacher, seed, train

    def __len__(self):
        return len(self.ds)

    def _transform(self, pre: Preprocess, image, epoch: int, i: int):
        if not self.train:
            return pre.eval_transform(image)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + epoch * 10_007 + i) % (2**63))
            return pre.train_transform(image)

    def _item(self, epoch: int, i: int) -> list:
        ex = self.ds[i]
        if not isinstance(ex.caption, str) or not ex.caption.strip():
            raise ValueError("empty caption")
        out = [self._transform(self.student, ex.image, epoch, i), ex.caption, ex.label]
        if self.teacher is not None and self.teacher.key != self.student.key:
            out.append(self._transform(self.teacher, ex.image, epoch, i))
        return out

    def _bad(self, i: int, e: Exception) -> str:
        return f"{self.ds.describe(i) if hasattr(self.ds, 'describe') else f'sample {i}'}: {type(e).__name__}: {e}"

    def __getitem__(self, key):
        """(item or None, bad-sample descriptions). Training replaces a bad sample by the next good one."""
        epoch, i = key if isinstance(key, tuple) else (0, key)
        bad: list[str] = []
        for j in range(i, i + min(len(self.ds), MAX_CONSECUTIVE_BAD)):
            try:
                return self._item(epoch, j % len(self.ds)), bad
            except Exception as e:  # noqa: BLE001 - any decoding/reading failure is a bad sample
                bad.append(self._bad(j % len(self.ds), e))
                if not self.train:
                    return None, bad
        raise RuntimeError(f"{len(bad)} consecutive bad samples starting at index {i}, e.g. {bad[0]}; "
                           "the data looks unreadable as a whole: check its paths and format")


def _collate(student: Preprocess, teacher: Preprocess | None):
    def collate(pairs) -> Batch:
        items = [it for it, _ in pairs if it is not None]
        bad = [b for _, descriptions in pairs for b in descriptions]
        if not items:
            return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), captions=[],
                         labels=torch.empty(0, dtype=torch.long), bad=bad)
        captions = [it[1] for it in items]
        batch = Batch(torch.stack([it[0] for it in items]), student.tokenizer(captions), captions=captions,
                      labels=torch.tensor([it[2] for it in items]), bad=bad)
        if teacher is not None and teacher.key != student.key:
            batch.teacher_images = torch.stack([it[3] for it in items])
            batch.teacher_texts = teacher.tokenizer(captions)
        return batch
    return collate


def train_loader(ds, student: Preprocess, teacher: Preprocess | None, *, global_batch: int, steps: int,
                 rank: int, world: int, gas: int, seed: int, workers: int = 0, start_step: int = 0) -> DataLoader:
    sampler = GlobalBatchSampler(len(ds), global_batch, steps, rank, world, gas, seed, start_step)
    return DataLoader(_Seeded(ds, student, teacher, seed, train=True), batch_sampler=sampler,
                      collate_fn=_collate(student, teacher), num_workers=workers)


def eval_loader(ds, pre: Preprocess, batch_size: int, workers: int = 0) -> DataLoader:
    return DataLoader(_Seeded(ds, pre, None, 0, train=False), batch_size=batch_size, shuffle=False,
                      collate_fn=_collate(pre, None), num_workers=workers)
