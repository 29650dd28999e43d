"""build_dataset: the one entry point from a DataConfig to a dataset (map-style, or a streamed training set).

Validates the config first so every problem is reported at once, with its fix.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from compt.data.config import DataConfig
from compt.data.dataset import ImageTextDataset
from compt.data.shards import is_remote

if TYPE_CHECKING:
    from compt.data.stream import StreamedShards


def build_dataset(cfg: DataConfig, split: Literal["train", "val"]) -> ImageTextDataset | StreamedShards:
    """A map-style dataset, or for a streamed training set (cfg.streams()) a StreamedShards, which reads nothing
    until a loader iterates it."""
    if split not in ("train", "val"):
        raise ValueError(f"split: got {split!r}; use 'train' or 'val'")
    problems = cfg.problems()
    if problems:
        raise ValueError("invalid data config:\n  " + "\n  ".join(problems))
    # Imported per kind so digits-only runs never pay for `datasets`' import.
    if cfg.kind == "digits":
        from compt.data.digits import build_digits as build
    elif cfg.kind == "digit-numbers":
        from compt.data.numbers import build_digit_numbers as build
    elif cfg.kind == "csv":
        from compt.data.csv import build_csv as build
    elif cfg.kind == "webdataset" and split == "train" and cfg.streams():
        from compt.data.stream import build_stream as build
    elif cfg.kind == "webdataset" and split == "val" and is_remote(cfg.val):
        from compt.data.stream import read_once as build  # validation stays finite: a remote one is read once
    elif cfg.kind == "webdataset":
        from compt.data.wds import build_webdataset as build
    else:
        from compt.data.hf import build_hf as build
    return build(cfg, split)
