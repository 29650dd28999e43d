"""Turn a webdataset shard spec into the shards it names: local tar files, or URLs the webdataset
library opens (``pipe:`` commands, http(s), gs, hf). Shared by config checks and the datasets.
"""
from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

from braceexpand import braceexpand
from webdataset.gopen import gopen_schemes

# What webdataset's gopen opens (pipe: runs a shell command; http(s)/sftp/scp through curl; gs through gsutil).
READABLE_SCHEMES = tuple(s for s in gopen_schemes if s != "__default__")
# Schemes users write that gopen has no reader for, and how to read them anyway.
UNREADABLE_SCHEMES = {
    "s3": "give 'pipe:aws s3 cp s3://bucket/shard-{000..009}.tar -' (the usual route to S3), or presigned https URLs",
}


def scheme(spec: str) -> str:
    """The URL scheme of a spec ('' for a local path; a Windows drive letter is a path too)."""
    s = urlparse(spec.strip()).scheme.lower()
    return "" if len(s) <= 1 or s == "file" else s


def is_remote(spec: str) -> bool:
    return scheme(spec) != ""


def expand_urls(spec: str) -> list[str]:
    """A remote spec's URLs, brace patterns expanded (nothing is opened)."""
    return list(braceexpand(spec.strip()))


def expand_shards(spec: str) -> tuple[list[Path], list[Path]]:
    """Return (existing shard files, named paths that do not exist).

    A spec is a tar file, a brace pattern such as ``shard-{000..003}.tar``, or a
    directory whose ``*.tar`` files are taken in sorted order.
    """
    found: list[Path] = []
    missing: list[Path] = []
    for name in braceexpand(spec):
        path = Path(name.removeprefix("file://")).expanduser()
        if path.is_dir():
            found.extend(sorted(path.glob("*.tar")))
        elif path.is_file():
            found.append(path)
        else:
            missing.append(path)
    return found, missing
