"""Streamed webdataset shards: read in order, never indexed, from local paths, ``pipe:`` commands or http(s)
URLs (opened by the webdataset library's gopen), split across ranks and loader workers, with a position that
a resumed stage continues from.

Passes: in pass ``e`` the shards are taken in an order seeded by (seed, e); of the shards not started before
the last resume, reader slot ``s`` of ``S`` (slot = rank x workers + worker) reads every S-th, so within a pass
no two slots read the same shard. A slot that finishes its share goes on to the next pass on its own.
Resampled mode draws every shard with replacement (seeded by seed, slot and draw), with no passes.

Position (``PassPlan.state``): the shards each pass has *started*. A resumed stage skips them all, so nothing
trained on in the current pass is read again; what is skipped unread is the rest of the shard each slot was
reading and the samples waiting in its shuffle buffer (at most one shard plus data.shuffle_buffer samples per
slot). The state is independent of the rank and worker counts, which may change on resume.

A shard that cannot be opened or read is opened again (remote ones only, data.shard_retries times, the
samples already read skipped), then yields a ``Lost`` counted as bad samples: ``data.max_bad_fraction``
decides, as for an unreadable image.
"""
from __future__ import annotations

import random
import re
import tarfile
import time
from contextlib import closing
from dataclasses import dataclass
from typing import Iterator

from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext

from compt.data.config import DataConfig, Keys
from compt.data.dataset import Example, ImageTextDataset, as_rgb
from compt.data.shards import expand_shards, expand_urls, is_remote
from compt.streaming import UNDECLARED

RETRY_SECONDS = 1.0  # the first retry's wait; each further one doubles it
# A tar writer pads its archive to a multiple of this (tarfile.RECORDSIZE, GNU tar's default blocking factor).
RECORD = tarfile.RECORDSIZE


@dataclass(frozen=True)
class Sample:
    key: str
    url: str
    fields: dict  # extension (lower case) -> bytes


@dataclass(frozen=True)
class Lost:
    """A shard, or its rest, that could not be read: ``weight`` bad samples (the samples it would have held:
    the mean of the shards this slot read whole, else data.train_samples / shards, else 1)."""

    url: str
    why: str
    weight: int = 1

    def describe(self) -> str:
        return f"{self.url}: {self.why}"


class ShardError(RuntimeError):
    pass


# -- reading one shard --------------------------------------------------------------------------------------------

class _Counted:
    """The shard's byte stream, counting what tarfile reads from it."""

    def __init__(self, stream):
        self.stream, self.count = stream, 0

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.count += len(data)
        return data


def _members(stream) -> Iterator[tuple[str, bytes]]:
    """(name, data) of every file in a tar stream. tarfile ends a stream quietly at a header it cannot read
    (truncated, or garbage mid-shard), dropping the rest; webdataset's tar iterator inherits that, so the end is
    checked here: what follows the last good member must be the end-of-archive marker and its padding."""
    counted = _Counted(stream)
    tar = tarfile.open(fileobj=counted, mode="r|*")
    for info in tar:
        if info.isreg():
            yield info.name, tar.extractfile(info).read()
    end = tar.offset  # where the next header would start
    while counted.read(1 << 20):
        pass
    if getattr(tar.fileobj, "comptype", "tar") != "tar":
        return  # offsets are in decompressed bytes here; the decompressor reports a truncated stream itself
    rest = counted.count - end
    if rest < 2 * tarfile.BLOCKSIZE:
        raise ShardError(f"truncated at byte {counted.count}: no end-of-archive marker after the member ending at "
                         f"byte {end}")
    if rest > RECORD + 2 * tarfile.BLOCKSIZE:
        raise ShardError(f"unreadable data at byte {end} (a damaged header or garbage): its {rest} bytes to the end "
                         "were skipped")


def shard_files(url: str, retries: int) -> Iterator[tuple[str, bytes]]:
    """The shard's files; a failure is retried (remote shards) from the start, skipping files already given.
    Raises ShardError naming the cause once out of tries."""
    done, tries, local = 0, 0, not is_remote(url)
    while True:
        try:
            with closing(gopen(url)) as stream:
                for i, member in enumerate(_members(stream)):
                    if i >= done:
                        done += 1
                        yield member
            return
        except Exception as e:  # noqa: BLE001 - any failure to open or read: retried, then a bad shard
            if local or tries >= retries:
                tried = f" after {tries + 1} tries" if tries else ""
                why = _cause(e, url)
                raise ShardError(f"unreadable{tried}{f' ({done} files read)' if done else ''}: {why}") from e
            tries += 1
            time.sleep(RETRY_SECONDS * 2 ** (tries - 1))


CURL_EXITS = {6: "could not resolve the host", 7: "could not connect", 22: "an HTTP error such as 404",
              28: "timed out", 56: "the connection broke"}


def _cause(e: Exception, url: str) -> str:
    """What went wrong, briefly: webdataset's Pipe reports a reader's exit as its whole argument list."""
    if isinstance(e, ShardError):
        return e.args[0]
    exited = re.search(r": exit (\d+) ", str(e)) if isinstance(e, OSError) else None
    if exited is None:
        return f"{type(e).__name__}: {e}"
    code = int(exited.group(1))
    if url.startswith("pipe:"):
        return f"the command exited with status {code}"
    return f"curl exited with status {code}{f' ({CURL_EXITS[code]})' if code in CURL_EXITS else ''}"


def shard_samples(url: str, retries: int) -> Iterator[Sample | Lost]:
    """Files grouped into samples by webdataset's key rule (base_plus_ext); a failure ends the shard with Lost
    (weight 1: the caller knows how many samples shards hold)."""
    key, fields = None, {}
    try:
        for name, data in shard_files(url, retries):
            prefix, ext = base_plus_ext(name)
            if prefix is None or name.startswith("__"):
                continue
            if prefix != key:
                if fields:
                    yield Sample(key, url, fields)
                key, fields = prefix, {}
            fields[ext.lower()] = data
    except ShardError as e:
        if fields:
            yield Sample(key, url, fields)
        yield Lost(url, str(e))
        return
    if fields:
        yield Sample(key, url, fields)


# -- which shards a slot reads ------------------------------------------------------------------------------------

def pass_order(shards: int, seed: int, epoch: int) -> list[int]:
    """Pass ``epoch``'s shard order: the same in every process (a str seed hashes alike everywhere)."""
    return random.Random(f"{seed}:pass:{epoch}").sample(range(shards), shards)


def slot_shards(shards: int, seed: int, epoch: int, slot: int, slots: int,
                started: frozenset = frozenset()) -> list[int]:
    """The shards slot ``slot`` of ``slots`` reads in pass ``epoch``: every slots-th of the pass's order, leaving
    out those ``started`` before the last resume. Disjoint across slots; together, the whole pass."""
    return [i for i in pass_order(shards, seed, epoch) if i not in started][slot::slots]


@dataclass
class PassPlan:
    """Where slots start: ``first`` pass, and per pass the shards already started (from a checkpoint)."""

    shards: int
    seed: int
    first: int = 0
    started: dict | None = None  # pass -> frozenset of shard ids

    @classmethod
    def from_state(cls, shards: int, seed: int, state: dict | None) -> "PassPlan":
        if not state or state.get("mode") != "passes" or state.get("shards") != shards:
            return cls(shards, seed)
        return cls(shards, seed, int(state["first"]), {int(e): frozenset(ids) for e, ids in state["started"].items()})

    def done(self, epoch: int) -> frozenset:
        return (self.started or {}).get(epoch, frozenset())

    def share(self, epoch: int, slot: int, slots: int) -> list[int]:
        return slot_shards(self.shards, self.seed, epoch, slot, slots, self.done(epoch))

    def state(self, positions: dict[int, tuple[int, int]], slots: int) -> dict:
        """The checkpointable position: ``positions[slot] = (pass, shards of its share started)`` (slots absent
        have started nothing since this plan's start)."""
        at = {s: positions.get(s, (self.first, 0)) for s in range(slots)}
        first, last = min(e for e, _ in at.values()), max(e for e, _ in at.values())
        started = {}
        for epoch in range(first, last + 1):
            ids = set(self.done(epoch))
            for s, (e, n) in at.items():
                if e >= epoch:
                    share = self.share(epoch, s, slots)
                    ids.update(share if e > epoch else share[:n])
            started[str(epoch)] = sorted(ids)
        return {"mode": "passes", "shards": self.shards, "first": first, "started": started}


@dataclass
class DrawPlan:
    """Resampled mode: slot s's d-th shard is drawn under (seed, salt, s, d); its position is its draw count."""

    shards: int
    seed: int
    slots: int
    salt: int = 0
    draws: tuple = ()

    @classmethod
    def from_state(cls, shards: int, seed: int, slots: int, state: dict | None) -> "DrawPlan":
        if not state or state.get("mode") != "draws":
            return cls(shards, seed, slots)
        if state["slots"] != slots:  # another layout: fresh draws (with replacement anyway), not the same ones again
            return cls(shards, seed, slots, int(state["salt"]) + 1)
        return cls(shards, seed, slots, int(state["salt"]), tuple(state["draws"]))

    def draw(self, slot: int, d: int) -> int:
        return random.Random(f"{self.seed}:draw:{self.salt}:{slot}:{d}").randrange(self.shards)

    def start(self, slot: int) -> int:
        return self.draws[slot] if self.draws else 0

    def state(self, positions: dict[int, tuple[int, int]], slots: int) -> dict:
        draws = [positions[s][1] if s in positions else self.start(s) for s in range(slots)]
        return {"mode": "draws", "slots": slots, "salt": self.salt, "draws": draws}


# -- the training set ---------------------------------------------------------------------------------------------

class StreamedShards:
    """A training set read as a stream (compt.clip.loader reads it per slot). ``len()`` is the declared
    data.train_samples (compt.streaming.UNDECLARED when not given): opening it reads nothing."""

    def __init__(self, urls: list[str], keys: Keys, samples: int | None, shuffle_buffer: int, resampled: bool,
                 retries: int):
        self.urls, self.keys, self.samples = urls, keys, samples
        self.shuffle_buffer, self.resampled, self.retries = shuffle_buffer, resampled, retries
        self.image_exts = [e.lower() for e in keys.image.split(";")]
        self.caption_exts = [e.lower() for e in keys.caption.split(";")]
        self.label_exts = [e.lower() for e in keys.label.split(";")]

    def __len__(self) -> int:
        return self.samples if self.samples is not None else UNDECLARED

    def plan(self, seed: int, slots: int, state: dict | None):
        if self.resampled:
            return DrawPlan.from_state(len(self.urls), seed, slots, state)
        return PassPlan.from_state(len(self.urls), seed, state)

    def layout_problem(self, slots: int, what: str) -> str | None:
        if self.resampled or len(self.urls) >= slots:
            return None
        return (f"data.train: {len(self.urls)} shard(s) for {slots} reader slots ({what}); each needs at least one "
                "shard per pass: lower data.workers, split the data into more shards, or set data.resampled: true")

    def reader(self, plan, slot: int, slots: int, seed: int) -> "SlotReader":
        return SlotReader(self, plan, slot, slots, seed)

    def complete(self, sample: Sample) -> bool:
        """Has an image and a caption: others are metadata entries, which webdataset drops too."""
        return (any(e in sample.fields for e in self.image_exts)
                and any(e in sample.fields for e in self.caption_exts))

    def example(self, sample: Sample) -> Example:
        """The decoded sample (raises on a missing image or caption, an undecodable image or label)."""
        image = next((sample.fields[e] for e in self.image_exts if e in sample.fields), None)
        caption = next((sample.fields[e] for e in self.caption_exts if e in sample.fields), None)
        if image is None or caption is None:
            raise ValueError(f"no {'image' if image is None else 'caption'} (fields: {sorted(sample.fields)})")
        label = next((sample.fields[e] for e in self.label_exts if e in sample.fields), None)
        return Example(as_rgb(image), caption.decode("utf-8").strip(),
                       int(label.decode("ascii").strip()) if label is not None else -1)


class SlotReader:
    """One slot's samples (and Lost shards), shuffled in its buffer; ``position`` = (pass, shards of its share
    started), or (0, draws) in resampled mode. Endless: passes (or draws) follow each other."""

    def __init__(self, data: StreamedShards, plan, slot: int, slots: int, seed: int):
        self.data, self.plan, self.slot, self.slots, self.seed = data, plan, slot, slots, seed
        self.read_samples, self.read_shards = 0, 0  # shards read whole, for the weight of a lost one
        if isinstance(plan, DrawPlan):
            self.position = (0, plan.start(slot))
        else:
            self.position = (plan.first, 0)
        shares = len(data.urls) / slots
        self.per_pass = max(1, int(shares))  # a slot's shards per pass, at least

    def _shards(self) -> Iterator[str]:
        if isinstance(self.plan, DrawPlan):
            d = self.position[1]
            while True:
                self.position = (0, d + 1)
                yield self.data.urls[self.plan.draw(self.slot, d)]
                d += 1
        epoch = self.position[0]
        while True:
            for n, shard in enumerate(self.plan.share(epoch, self.slot, self.slots)):
                self.position = (epoch, n + 1)
                yield self.data.urls[shard]
            epoch += 1
            self.position = (epoch, 0)

    def _weight(self) -> int:
        if self.read_shards:
            return max(1, round(self.read_samples / self.read_shards))
        if self.data.samples is not None:
            return max(1, round(self.data.samples / len(self.data.urls)))
        return 1

    def _samples(self) -> Iterator[Sample | Lost]:
        for url in self._shards():
            n = 0
            for got in shard_samples(url, self.data.retries):
                if isinstance(got, Lost):
                    got = Lost(got.url, got.why, max(1, self._weight() - n))
                    n = -1
                else:
                    n += 1
                yield got
            if n >= 0:
                self.read_samples, self.read_shards = self.read_samples + n, self.read_shards + 1

    def __iter__(self) -> Iterator[Sample | Lost]:
        """Samples through a shuffle buffer like webdataset's (filled to a fifth, growing to its size, a random
        one out per one in), seeded: the same layout reads the same order. Not webdataset's own: a Lost would
        wait in it behind a fifth of a buffer of samples, and with every shard lost it would never yield."""
        stream = self._samples()
        size = self.data.shuffle_buffer
        if size <= 1:
            yield from stream
            return
        rng = random.Random(f"{self.seed}:buffer:{self.slot}:{self.slots}:{self.position}")
        buf, fill = [], max(1, size // 5)
        for got in stream:
            if isinstance(got, Lost):
                yield got
                continue
            buf.append(got)
            if len(buf) >= fill:
                k = rng.randrange(len(buf))
                buf[k], buf[-1] = buf[-1], buf[k]
                yield buf.pop()
                fill = min(size, fill + 1)


# -- building -----------------------------------------------------------------------------------------------------

def spec_urls(spec: str) -> list[str]:
    if is_remote(spec):
        return expand_urls(spec)
    found, missing = expand_shards(spec)
    if missing or not found:
        raise ValueError(f"'{spec}' names no existing .tar shard (missing: {[str(m) for m in missing[:3]]})")
    return [str(p) for p in found]


def build_stream(cfg: DataConfig, split: str) -> StreamedShards:
    return StreamedShards(spec_urls(getattr(cfg, split)), cfg.resolved_keys(), cfg.train_samples,
                          cfg.shuffle_buffer, cfg.resampled, cfg.shard_retries)


class ReadOnce(ImageTextDataset):
    """A remote validation set, read whole into memory once (validation stays finite and in order): raw sample
    bytes, decoded when indexed. An unreadable shard (or its rest) is one bad sample naming it."""

    def __init__(self, data: StreamedShards, items: list[Sample | Lost], classnames, templates):
        super().__init__(classnames, templates)
        self.data, self.items = data, items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Example:
        item = self.items[index]
        if isinstance(item, Lost):
            raise ValueError(item.why)
        return self.data.example(item)

    def describe(self, index: int) -> str:
        item = self.items[index]
        return item.url if isinstance(item, Lost) else f"{item.url} (sample {item.key})"


def read_once(cfg: DataConfig, split: str) -> ReadOnce:
    data = build_stream(cfg, split)
    items = [got for url in data.urls for got in shard_samples(url, data.retries)
             if isinstance(got, Lost) or data.complete(got)]
    return ReadOnce(data, items, cfg.classnames, cfg.templates)
