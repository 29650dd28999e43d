"""Turn a webdataset shard spec into the list of local tar files it names.

Shared by config checks and the dataset, so both agree on what a spec means.
"""
from __future__ import annotations

from pathlib import Path

from braceexpand import braceexpand

REMOTE_PREFIXES = ("http://", "https://", "s3://", "gs://", "pipe:", "hf://")


def is_remote(spec: str) -> bool:
    return spec.strip().lower().startswith(REMOTE_PREFIXES)


def expand_shards(spec: str) -> tuple[list[Path], list[Path]]:
    """Return (existing shard files, named paths that do not exist).

    A spec is a tar file, a brace pattern such as ``shard-{000..003}.tar``, or a
    directory whose ``*.tar`` files are taken in sorted order.
    """
    found: list[Path] = []
    missing: list[Path] = []
    for name in braceexpand(spec):
        path = Path(name).expanduser()
        if path.is_dir():
            found.extend(sorted(path.glob("*.tar")))
        elif path.is_file():
            found.append(path)
        else:
            missing.append(path)
    return found, missing
