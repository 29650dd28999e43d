"""Deterministic data feeding: global batches from a seeded permutation, each rank
takes its slice, and per-sample augmentation is seeded by (seed, epoch, index), so
1 rank and N ranks see the same global batches with the same pixels.

Bad samples (an image that cannot be read or decoded, an empty caption) never stop
a batch: in training the next good sample in index order takes the bad one's place
(so every rank's batch keeps its size, as the global contrastive loss needs), past
NEXT_IN_ORDER bad ones a sample drawn at random (a missing image folder is a long run
of bad rows), and past MAX_TRIES a good sample of the same batch is repeated; in
evaluation the bad sample is dropped. Either way the batch carries a description of
each bad sample in ``Batch.bad`` for the trainer to count against data.max_bad_fraction.
Only a training batch with no readable sample at all stops the stage here (StageFailed).
Nothing depends on the number of loader workers: every choice is seeded by the sample.

A streamed training set (compt.data.stream) is read in order instead: each loader worker of each rank is a
reader slot that decodes, augments and collates its own batches; bad samples and unreadable shards are left
out and counted in ``Batch.bad`` the same way, and each batch carries its slot's read position, which the
checkpoint keeps (``StreamFeed.state``).
"""
from __future__ import annotations

import random
import zlib
from dataclasses import dataclass, field, fields, replace
from itertools import islice

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from compt.clip.model import Preprocess
from compt.data.stream import Lost, StreamedShards
from compt.faults import StageFailed
from compt.devices import to_device
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
    position: tuple | None = None  # streamed: (reader slot, its position once this batch was read)

    def teacher_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """What the teacher reads: its own tensors when its preprocessing differs, else the student's."""
        return (self.teacher_images if self.teacher_images is not None else self.images,
                self.teacher_texts if self.teacher_texts is not None else self.texts)

    def to(self, device, dtype: torch.dtype | None = None, non_blocking: bool = False) -> "Batch":
        """The tensors the models read on ``device``, images in ``dtype`` (the training dtype)."""
        move = lambda x: to_device(x, device, dtype, non_blocking)  # noqa: E731
        return Batch(move(self.images), move(self.texts), move(self.teacher_images), move(self.teacher_texts),
                     self.captions, self.labels, self.bad)

    def pin_memory(self) -> "Batch":
        """Page-locked tensors (DataLoader's pin_memory thread calls this) for non-blocking copies to a device."""
        return replace(self, **{f.name: getattr(self, f.name).pin_memory() for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})


NEXT_IN_ORDER = 8  # a bad training sample is replaced by the next good one among this many that follow it,
MAX_TRIES = 64  # then by one drawn at random: this many tries per sample in all, each bad one counted


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

    def _candidates(self, epoch: int, i: int) -> list[int]:
        """Sample ``i``, then where a training sample's replacement is looked for: the samples after it in
        index order, then samples drawn at random under a seed of (seed, epoch, i); every sample of a small
        dataset."""
        n = len(self.ds)
        if not self.train:
            return [i]
        if n <= MAX_TRIES:
            return [(i + j) % n for j in range(n)]
        rng = random.Random(f"{self.seed}:{epoch}:{i}")  # a str seed hashes alike in every process
        return [(i + j) % n for j in range(NEXT_IN_ORDER + 1)] + [rng.randrange(n)
                                                                  for _ in range(MAX_TRIES - NEXT_IN_ORDER - 1)]

    def __getitem__(self, key):
        """(item or None, bad-sample descriptions): None when sample ``i`` and every try in its place were bad."""
        epoch, i = key if isinstance(key, tuple) else (0, key)
        bad: list[str] = []
        for j in self._candidates(epoch, i):
            try:
                return self._item(epoch, j), bad
            except Exception as e:  # noqa: BLE001 - any decoding/reading failure is a bad sample
                bad.append(self._bad(j, e))
        return None, bad


class _Collate:
    """(item or None, bad) pairs -> Batch. In training a slot left empty (every try bad) repeats one of the
    batch's good items, so the batch keeps its size; in evaluation it is dropped. A class, not a closure:
    loader workers started by spawn/forkserver receive it by pickle."""

    def __init__(self, student: Preprocess, teacher: Preprocess | None, train: bool):
        self.student, self.teacher, self.train = student, teacher, train

    def __call__(self, pairs) -> Batch:
        good = [it for it, _ in pairs if it is not None]
        bad = [b for _, descriptions in pairs for b in descriptions]
        items = good
        if self.train and good:  # a slot whose every try was bad repeats a good item of this batch
            items = [it if it is not None else good[k % len(good)] for k, (it, _) in enumerate(pairs)]
        if not items:
            return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), captions=[],
                         labels=torch.empty(0, dtype=torch.long), bad=bad)
        captions = [it[1] for it in items]
        batch = Batch(torch.stack([it[0] for it in items]), self.student.tokenizer(captions), captions=captions,
                      labels=torch.tensor([it[2] for it in items]), bad=bad)
        if self.teacher is not None and self.teacher.key != self.student.key:
            batch.teacher_images = torch.stack([it[3] for it in items])
            batch.teacher_texts = self.teacher.tokenizer(captions)
        return batch


class TrainFeed:
    """The training DataLoader, checked in the training process: a batch none of whose samples (nor the
    tries in their place) could be read cannot be trained on, and says the data is unreadable as a whole."""

    def __init__(self, loader: DataLoader):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            if not batch.captions:
                examples = "\n  ".join(list(dict.fromkeys(batch.bad))[:5])
                raise StageFailed(
                    f"no sample of a training batch could be read: all {len(batch.bad)} tried (the batch's own "
                    "and those drawn in their place) were bad, and no data.max_bad_fraction allows a batch with "
                    f"nothing to train on. Examples:\n  {examples}\nThe training data looks unreadable as a whole: "
                    "check data.train and the files it names, then run the same command again (it resumes from "
                    "the stage's last checkpoint, if any).")
            yield batch


class _StreamBatches(IterableDataset):
    """One reader slot per loader worker (slot = rank x workers + worker): its shards' samples, decoded, augmented
    and collated into micro-batches. A batch that cannot be filled because nothing is readable (MAX_TRIES bad
    samples per slot of the batch, or every shard of a pass lost in a row) comes out empty, and TrainFeed stops
    the stage naming what was tried."""

    def __init__(self, data: StreamedShards, plan, student: Preprocess, teacher: Preprocess | None, micro: int,
                 rank: int, world: int, seed: int):
        self.data, self.plan, self.student, self.teacher = data, plan, student, teacher
        self.micro, self.rank, self.world, self.seed = micro, rank, world, seed

    def _item(self, sample) -> list:
        ex = self.data.example(sample)
        if not ex.caption:
            raise ValueError("empty caption")
        if self.teacher is None or self.teacher.key == self.student.key:
            return [self.student.train_transform(ex.image), ex.caption, ex.label]
        seed = int(torch.randint(2**62, ()))  # the teacher's crop is the student's
        out = []
        for pre in (self.student, self.teacher):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                out.append(pre.train_transform(ex.image))
        return [out[0], ex.caption, ex.label, out[1]]

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        slot, slots = self.rank * workers + worker, self.world * workers
        reader = self.data.reader(self.plan, slot, slots, self.seed)
        torch.manual_seed(zlib.crc32(f"{self.seed}:{slot}:{slots}:{reader.position}".encode()))  # augmentation
        collate = _Collate(self.student, self.teacher, train=True)
        items, bad, misses, lost_in_row = [], [], 0, 0
        for got in reader:
            if isinstance(got, Lost):
                bad += [got.describe()] * got.weight  # counted as the samples the shard would have held
                misses, lost_in_row = misses + 1, lost_in_row + 1
            elif self.data.complete(got):
                lost_in_row = 0
                try:
                    items.append(self._item(got))
                except Exception as e:  # noqa: BLE001 - any decoding failure is a bad sample
                    bad.append(f"{got.url} (sample {got.key}): {type(e).__name__}: {e}")
                    misses += 1
            if len(items) == self.micro or (not items and (misses >= MAX_TRIES * self.micro
                                                           or lost_in_row >= reader.per_pass)):
                batch = collate([(it, []) for it in items])
                batch.bad, batch.position = bad, (slot, reader.position)
                yield batch
                items, bad, misses = [], [], 0


class StreamFeed(TrainFeed):
    """Exactly ``batches`` micro-batches of an endless stream; ``state()`` is where each slot got to in the
    batches trained on so far (a collective: every rank calls it at each checkpoint)."""

    def __init__(self, loader: DataLoader, batches: int, plan, slots: int):
        super().__init__(loader)
        self.batches, self.plan, self.slots = batches, plan, slots
        self.positions: dict[int, tuple] = {}

    def __len__(self) -> int:
        return self.batches

    def __iter__(self):
        for batch in islice(super().__iter__(), self.batches):
            self.positions[batch.position[0]] = batch.position[1]
            yield batch

    def state(self) -> dict:
        parts = [self.positions]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, self.positions)
        return self.plan.state({s: p for part in parts for s, p in part.items()}, self.slots)


def stream_loader(ds: StreamedShards, student: Preprocess, teacher: Preprocess | None, *, global_batch: int,
                  steps: int, rank: int, world: int, gas: int, seed: int, start_step: int = 0,
                  data_state: dict | None = None, **options) -> StreamFeed:
    """This rank's training batches from a streamed set, continuing at ``data_state`` (a checkpoint's)."""
    workers = max(1, options.get("num_workers", 0))
    slots = world * workers
    problem = ds.layout_problem(slots, f"{world} rank(s) x {workers} loader worker(s)")
    if problem:
        raise StageFailed(problem)
    plan = ds.plan(seed, slots, data_state)
    batches = _StreamBatches(ds, plan, student, teacher, global_batch // (world * gas), rank, world, seed)
    return StreamFeed(DataLoader(batches, batch_size=None, **options), (steps - start_step) * gas, plan, slots)


def train_loader(ds, student: Preprocess, teacher: Preprocess | None, *, global_batch: int, steps: int,
                 rank: int, world: int, gas: int, seed: int, start_step: int = 0, data_state: dict | None = None,
                 **options) -> TrainFeed:
    """This rank's training batches; ``options`` are DataLoader kwargs (compt.loading.loader_options).
    ``data_state``: a streamed set's position from the checkpoint (map-style sets need only ``start_step``)."""
    if isinstance(ds, StreamedShards):
        return stream_loader(ds, student, teacher, global_batch=global_batch, steps=steps, rank=rank, world=world,
                             gas=gas, seed=seed, start_step=start_step, data_state=data_state, **options)
    sampler = GlobalBatchSampler(len(ds), global_batch, steps, rank, world, gas, seed, start_step)
    return TrainFeed(DataLoader(_Seeded(ds, student, teacher, seed, train=True), batch_sampler=sampler,
                                collate_fn=_Collate(student, teacher, train=True), **options))


def eval_loader(ds, pre: Preprocess, batch_size: int, **options) -> DataLoader:
    """Validation batches in index order, bad samples dropped; ``options`` as for train_loader."""
    return DataLoader(_Seeded(ds, pre, None, 0, train=False), batch_size=batch_size, shuffle=False,
                      collate_fn=_Collate(pre, None, train=False), **options)
