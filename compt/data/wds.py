"""Map-style access to local webdataset tar shards, without unpacking them (data.streaming false, or auto with
local shards): exact, bit-identical resume, at the cost of indexing every shard at start-up.

Members are indexed once (shard, byte offset, size); __getitem__ reads one sample. A damaged shard
(truncated inside a member or a header, garbage in the middle) keeps every sample that can still be
read: each unreadable stretch becomes one bad sample named by shard and byte offset, counted like an
unreadable image (``data.max_bad_fraction`` decides), and indexing goes on after it.
"""
from __future__ import annotations

import re
import tarfile
from pathlib import Path
from typing import NamedTuple

import numpy as np

from compt.data.config import DataConfig
from compt.data.dataset import Example, ImageTextDataset, as_rgb
from compt.data.shards import expand_shards, is_remote

# webdataset's own rule (tariterators.base_plus_ext): the key is the member path up
# to the first dot of its file name, the field is everything after that dot.
_KEY_FIELD = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")

# Index columns: shard, then (offset, size) for image, caption, label; -1 = absent.
_SHARD, _IMAGE, _CAPTION, _LABEL = 0, 1, 3, 5


BLOCK = tarfile.BLOCKSIZE


class TarShardDataset(ImageTextDataset):
    def __init__(self, shards: list[Path], index: np.ndarray,
                 classnames: list[str] | None, templates: list[str] | None,
                 faults: dict[int, tuple[int, str]] | None = None):
        super().__init__(classnames, templates)
        self.shards = [str(s) for s in shards]
        self.index = index  # one int64 array: cheap to pickle into loader workers
        self.faults = faults or {}  # row -> (byte offset, what is wrong there): rows that are bad samples

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, index: int) -> Example:
        if index in self.faults:
            raise ValueError(self.faults[index][1])
        row = self.index[index]
        with open(self.shards[row[_SHARD]], "rb") as f:
            image = as_rgb(_read(f, row, _IMAGE))
            caption = _read(f, row, _CAPTION).decode("utf-8").strip()
            label = int(_read(f, row, _LABEL).decode("ascii").strip()) if row[_LABEL] >= 0 else -1
        return Example(image, caption, label)

    def describe(self, index: int) -> str:
        row = self.index[index]
        if index in self.faults:
            return f"{self.shards[row[_SHARD]]} (byte {self.faults[index][0]})"
        return f"{self.shards[row[_SHARD]]} (member at byte {int(row[_IMAGE])})"


def _read(f, row: np.ndarray, col: int) -> bytes:
    f.seek(int(row[col]))
    data = f.read(int(row[col + 1]))
    if len(data) != int(row[col + 1]):
        raise ValueError(f"member data truncated: {len(data)} of {int(row[col + 1])} bytes (the shard changed "
                         "since it was indexed)")
    return data


def build_webdataset(cfg: DataConfig, split: str) -> TarShardDataset:
    spec = getattr(cfg, split)
    if is_remote(spec):
        raise ValueError(f"data.{split}: '{spec}' is remote: it is read streamed (compt.data.stream), not indexed")
    shards, missing = expand_shards(spec)
    if missing or not shards:
        raise ValueError(f"data.{split}: '{spec}' names no existing .tar shard "
                         f"(missing: {[str(m) for m in missing[:3]]})")
    keys = cfg.resolved_keys()
    image_exts = [e.lower() for e in keys.image.split(";")]
    caption_exts = [e.lower() for e in keys.caption.split(";")]
    label_exts = [e.lower() for e in keys.label.split(";")]
    rows: list[list[int]] = []
    faults: dict[int, tuple[int, str]] = {}
    seen_fields: set[str] = set()
    for shard_id, shard in enumerate(shards):
        for fields in _samples(shard):
            if isinstance(fields, Fault):
                faults[len(rows)] = (fields.offset, fields.reason)
                rows.append([shard_id, -1, -1, -1, -1, -1, -1])
                continue
            seen_fields.update(fields)
            image = _first(fields, image_exts)
            caption = _first(fields, caption_exts)
            if image is None or caption is None:
                continue  # e.g. a metadata-only entry; webdataset drops these too
            label = _first(fields, label_exts) or (-1, -1)
            rows.append([shard_id, *image, *caption, *label])
    if len(rows) == len(faults):
        raise ValueError(
            f"data.image_key / data.caption_key: no sample in '{spec}' has both an image "
            f"({keys.image}) and a caption ({keys.caption}); fields found: {sorted(seen_fields)}. "
            "Set data.image_key and data.caption_key to the shard's extensions"
        )
    return TarShardDataset(shards, np.asarray(rows, dtype=np.int64), cfg.classnames, cfg.templates, faults)


class Fault(NamedTuple):
    """An unreadable stretch of a shard: one bad sample."""

    offset: int
    reason: str


def _samples(shard: Path):
    """Yield {field: (offset, size)} per sample, or a Fault per unreadable stretch, in shard order."""
    key, fields = None, {}
    for member in _members(shard):
        if isinstance(member, Fault):
            if fields:
                yield fields
            key, fields = None, {}
            yield member
            continue
        match = _KEY_FIELD.match(member.name)
        if not member.isfile() or match is None:
            continue
        name, field = match.group(1), match.group(2).lower()
        if name != key:
            if fields:
                yield fields
            key, fields = name, {}
        fields[field] = (member.offset_data, member.size)
    if fields:
        yield fields


def _members(shard: Path):
    """The shard's members (TarInfo) and a Fault for each stretch tarfile cannot read; after one, reading
    resumes at the next valid header. tarfile alone raises on a member truncated at the end and stops
    silently at a bad or truncated header, dropping the rest of the shard."""
    size = shard.stat().st_size
    if size == 0:
        raise ValueError(f"{shard}: an empty file, not a tar shard; remove it or write the shard again")
    with open(shard, "rb") as f:
        pos = 0
        while pos < size:
            f.seek(pos)
            try:
                tar = tarfile.open(fileobj=f, mode="r:")  # uncompressed only: offsets must be raw bytes
            except tarfile.ReadError as e:  # only at byte 0: a header elsewhere that is bad ends the iteration
                if _next_header(f, BLOCK, size) is None:
                    raise ValueError(f"{shard}: not an uncompressed tar ({e}); webdataset shards are plain "
                                     ".tar files; decompress .tar.gz shards first") from None
                tar = None
            stop = pos
            if tar is not None:
                try:
                    for member in tar:
                        end = member.offset_data + member.size
                        if end > size:
                            yield Fault(member.offset, f"member {member.name} is truncated: its data ends at byte "
                                                       f"{end}, the shard at byte {size}")
                            return
                        yield member
                        stop = member.offset_data + -(-member.size // BLOCK) * BLOCK
                except tarfile.ReadError as e:  # the end inside a member's padding; an extended header + garbage
                    yield Fault(stop, f"the shard ends at byte {size}, inside the padding of its last member: "
                                      "truncated; samples after this point are lost" if stop >= size else
                                      f"unreadable tar header ({e})")
                    stop = _next_header(f, stop + BLOCK, size) or size
                    pos = stop
                    continue
                stop = max(stop, tar.offset)
            # Where tarfile stopped: the end-of-archive zero blocks (good), or a header it could not read.
            bad = _first_nonzero(f, stop, size)
            if bad is None:
                if stop >= size:  # tarfile stops at the end-of-archive zero blocks: here there are none
                    yield Fault(size, "the shard ends without the tar end-of-archive marker (truncated); "
                                      "samples after this point are lost")
                return
            bad -= bad % BLOCK
            resume = _next_header(f, bad + BLOCK, size)
            what = ("truncated inside a member header" if size - bad < BLOCK else
                    "unreadable data where a member header should be (garbage or a damaged header)")
            yield Fault(bad, f"{what}: bytes {bad}-{resume or size} skipped, the samples there are lost")
            if resume is None:
                return
            pos = resume


def _first_nonzero(f, start: int, end: int) -> int | None:
    f.seek(start)
    pos = start
    while pos < end:
        chunk = f.read(min(1 << 20, end - pos))
        if not chunk:
            return None
        stripped = chunk.lstrip(b"\0")
        if stripped:
            return pos + len(chunk) - len(stripped)
        pos += len(chunk)
    return None


def _next_header(f, start: int, size: int) -> int | None:
    """The offset of the first block at or after ``start`` (block-aligned) that is a valid tar header."""
    pos = start + (-start % BLOCK)
    while pos + BLOCK <= size:
        f.seek(pos)
        block = f.read(BLOCK)
        if block.strip(b"\0"):
            try:
                tarfile.TarInfo.frombuf(block, tarfile.ENCODING, "surrogateescape")
                return pos
            except tarfile.HeaderError:
                pass
        pos += BLOCK
    return None


def _first(fields: dict, exts: list[str]):
    return next((fields[e] for e in exts if e in fields), None)
