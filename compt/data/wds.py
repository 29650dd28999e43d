"""Map-style access to local webdataset tar shards, without unpacking them.

Members are indexed once (shard, byte offset, size); __getitem__ reads one sample.
"""
from __future__ import annotations

import re
import tarfile
from pathlib import Path

import numpy as np

from compt.data.config import DataConfig
from compt.data.dataset import Example, ImageTextDataset, as_rgb
from compt.data.shards import expand_shards, is_remote

# webdataset's own rule (tariterators.base_plus_ext): the key is the member path up
# to the first dot of its file name, the field is everything after that dot.
_KEY_FIELD = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")

# Index columns: shard, then (offset, size) for image, caption, label; -1 = absent.
_SHARD, _IMAGE, _CAPTION, _LABEL = 0, 1, 3, 5


class TarShardDataset(ImageTextDataset):
    def __init__(self, shards: list[Path], index: np.ndarray,
                 classnames: list[str] | None, templates: list[str] | None):
        super().__init__(classnames, templates)
        self.shards = [str(s) for s in shards]
        self.index = index  # one int64 array: cheap to pickle into loader workers

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, index: int) -> Example:
        row = self.index[index]
        with open(self.shards[row[_SHARD]], "rb") as f:
            image = as_rgb(_read(f, row, _IMAGE))
            caption = _read(f, row, _CAPTION).decode("utf-8").strip()
            label = int(_read(f, row, _LABEL).decode("ascii").strip()) if row[_LABEL] >= 0 else -1
        return Example(image, caption, label)

    def describe(self, index: int) -> str:
        row = self.index[index]
        return f"{self.shards[row[_SHARD]]} (member at byte {int(row[_IMAGE])})"


def _read(f, row: np.ndarray, col: int) -> bytes:
    f.seek(int(row[col]))
    return f.read(int(row[col + 1]))


def build_webdataset(cfg: DataConfig, split: str) -> TarShardDataset:
    spec = getattr(cfg, split)
    if is_remote(spec):
        raise ValueError(
            f"data.{split}: '{spec}' is remote; only local shards are supported. "
            "Download the shards and give their local path or brace pattern"
        )
    shards, missing = expand_shards(spec)
    if missing or not shards:
        raise ValueError(f"data.{split}: '{spec}' names no existing .tar shard "
                         f"(missing: {[str(m) for m in missing[:3]]})")
    keys = cfg.resolved_keys()
    image_exts = [e.lower() for e in keys.image.split(";")]
    caption_exts = [e.lower() for e in keys.caption.split(";")]
    label_exts = [e.lower() for e in keys.label.split(";")]
    rows: list[list[int]] = []
    seen_fields: set[str] = set()
    for shard_id, shard in enumerate(shards):
        for fields in _samples(shard):
            seen_fields.update(fields)
            image = _first(fields, image_exts)
            caption = _first(fields, caption_exts)
            if image is None or caption is None:
                continue  # e.g. a metadata-only entry; webdataset drops these too
            label = _first(fields, label_exts) or (-1, -1)
            rows.append([shard_id, *image, *caption, *label])
    if not rows:
        raise ValueError(
            f"data.image_key / data.caption_key: no sample in '{spec}' has both an image "
            f"({keys.image}) and a caption ({keys.caption}); fields found: {sorted(seen_fields)}. "
            "Set data.image_key and data.caption_key to the shard's extensions"
        )
    return TarShardDataset(shards, np.asarray(rows, dtype=np.int64), cfg.classnames, cfg.templates)


def _samples(shard: Path):
    """Yield {field: (offset, size)} per sample, in the order the shard stores them."""
    try:
        tar = tarfile.open(shard, mode="r:")  # uncompressed only: offsets must be raw bytes
    except tarfile.ReadError as e:
        raise ValueError(f"{shard}: not an uncompressed tar ({e}); webdataset shards are plain "
                         ".tar files; decompress .tar.gz shards first") from None
    with tar:
        key, fields = None, {}
        for member in tar:
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


def _first(fields: dict, exts: list[str]):
    return next((fields[e] for e in exts if e in fields), None)
