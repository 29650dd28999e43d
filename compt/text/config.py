"""TextDataConfig: which text a language-model stage trains and evaluates on.

Typed and checked once at the edge; problems() lists every issue with its fix.
"""
from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, field_validator

Kind = Literal["pydoc", "text", "jsonl", "hf"]
TextDocument = Literal["file", "paragraph"]

# The fields each kind reads; setting one another kind ignores is reported, not silently dropped.
FIELDS_OF_KIND: dict[str, frozenset[str]] = {
    "pydoc": frozenset(),
    "text": frozenset({"paths", "text_document"}),
    "jsonl": frozenset({"paths", "text_key"}),
    "hf": frozenset({"hf_path", "hf_name", "hf_split", "hf_cache_dir", "text_key"}),
}
KIND_FIELDS = frozenset().union(*FIELDS_OF_KIND.values())

# Byte-level BPE starts from all 256 bytes; the special tokens come on top.
MIN_VOCAB = 256 + 4


class TextDataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # NaN or inf is never a valid setting

    kind: Kind = "pydoc"
    # text, jsonl: files or glob patterns, expanded and sorted so the corpus order is fixed
    paths: list[str] = []
    # text: one document per file, or per blank-line-separated paragraph (for one long file)
    text_document: TextDocument = "file"
    # jsonl, hf: the field holding a document's text
    text_key: str = "text"
    # hf: a save_to_disk directory, a local data folder, or a dataset name already in the cache
    hf_path: str | None = None
    hf_name: str | None = None
    hf_split: str = "train"
    hf_cache_dir: str | None = None
    seq_len: int = 128
    val_fraction: float = 0.05
    vocab_size: int = 4096
    seed: int = 0
    # Processes per rank that feed batches (0: the training process itself); None: the CPUs per local
    # rank, at most 8 (compt.loading). The weights do not depend on it.
    workers: int | None = None

    @field_validator("paths", mode="before")
    @classmethod
    def _one_path_is_a_list(cls, value):
        return [value] if isinstance(value, str) else value

    def files(self) -> list[Path]:
        """The files `paths` names, globs expanded, sorted within each entry, duplicates dropped."""
        found: list[Path] = []
        for entry in self.paths:
            pattern = str(Path(entry).expanduser())
            matches = sorted(glob.glob(pattern, recursive=True)) if is_glob(pattern) else [pattern]
            found.extend(Path(m) for m in matches if Path(m).is_file())
        return list(dict.fromkeys(found))

    def problems(self) -> list[str]:
        """Every problem found, each naming its field and fix; cheap (reads at most a line per file)."""
        found: list[str] = []
        # Fields another kind reads, set to something other than their default (a config read back from a
        # run manifest lists every field with its default value: that is not a mistake).
        changed = {f for f in self.model_fields_set
                   if getattr(self, f) != type(self).model_fields[f].get_default(call_default_factory=True)}
        for field in sorted((changed & KIND_FIELDS) - FIELDS_OF_KIND[self.kind]):
            users = " and ".join(k for k, fields in FIELDS_OF_KIND.items() if field in fields)
            found.append(f"data.{field}: only read by kind {users}, not '{self.kind}'; "
                         f"remove it or set data.kind")
        if self.kind in ("text", "jsonl"):
            found.extend(self._path_problems())
        if self.kind in ("jsonl", "hf") and not self.text_key:
            found.append("data.text_key: empty; give the field that holds the text, e.g. 'text'")
        if self.kind == "jsonl" and self.text_key:
            found.extend(self._jsonl_key_problems())
        if self.kind == "hf":
            found.extend(self._hf_problems())
        if self.seq_len < 1:
            found.append(f"data.seq_len: {self.seq_len} is not a length; give a positive number "
                         "of tokens, e.g. 128")
        if not 0.0 < self.val_fraction < 1.0:
            found.append(f"data.val_fraction: {self.val_fraction} is not between 0 and 1; "
                         "give a fraction such as 0.05")
        if self.workers is not None and self.workers < 0:
            found.append(f"data.workers: {self.workers} is negative; give 0 (load in the training process), "
                         "a number of loader processes per rank, or leave it out for the CPUs per rank (at most 8)")
        if self.vocab_size < MIN_VOCAB:
            found.append(f"data.vocab_size: {self.vocab_size} is below {MIN_VOCAB} (256 bytes and "
                         "4 special tokens); give more, e.g. 4096")
        return found

    def _path_problems(self) -> list[str]:
        give = ("text files or globs like 'corpus/*.txt'" if self.kind == "text"
                else "JSON-lines files or globs like 'corpus/*.jsonl'")
        if not self.paths:
            return [f"data.paths: missing for kind '{self.kind}'; give {give}"]
        found = []
        for entry in self.paths:
            path = Path(entry).expanduser()
            if is_glob(str(path)):
                if not any(Path(m).is_file() for m in glob.glob(str(path), recursive=True)):
                    found.append(f"data.paths: '{entry}' matches no file; give {give}")
            elif path.is_dir():
                found.append(f"data.paths: '{entry}' is a directory; give a glob like "
                             f"'{entry.rstrip('/')}/*.{'txt' if self.kind == 'text' else 'jsonl'}'")
            elif not path.is_file():
                found.append(f"data.paths: file '{entry}' does not exist; give {give}")
        return found

    def _jsonl_key_problems(self) -> list[str]:
        found = []
        for file in self.files():
            first = _first_line(file)
            if first is None:
                continue  # an empty file adds no documents; not an error
            try:
                row = json.loads(first)
            except json.JSONDecodeError as error:
                found.append(f"data.paths: {file} line 1 is not JSON ({error.msg}); "
                             "give JSON-lines files, one object per line")
                continue
            if not isinstance(row, dict) or self.text_key not in row:
                keys = list(row) if isinstance(row, dict) else type(row).__name__
                found.append(f"data.text_key: '{self.text_key}' is not in {file} line 1 "
                             f"(keys: {keys}); set data.text_key to the field holding the text")
        return found

    def _hf_problems(self) -> list[str]:
        give = ("a directory written by datasets' save_to_disk, a local data folder, "
                "or the name of a dataset already in the datasets cache")
        if not self.hf_path:
            return [f"data.hf_path: missing for kind 'hf'; give {give}"]
        path = Path(self.hf_path).expanduser()
        if not looks_local(self.hf_path):
            return []  # a dataset name: found in the cache (or not) at build time, offline
        if not path.exists():
            return [f"data.hf_path: '{self.hf_path}' does not exist; give {give}"]
        # A save_to_disk directory describes its splits and columns; check them without loading.
        if (path / "dataset_dict.json").is_file():
            splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
            if self.hf_split not in splits:
                return [f"data.hf_split: '{self.hf_split}' is not in {self.hf_path} "
                        f"(splits: {splits}); set data.hf_split to one of them"]
            path = path / self.hf_split
        info = path / "dataset_info.json"
        if info.is_file():
            columns = list(json.loads(info.read_text()).get("features") or {})
            if columns and self.text_key and self.text_key not in columns:
                return [f"data.text_key: column '{self.text_key}' is not in {self.hf_path} "
                        f"(columns: {columns}); set data.text_key to the text column"]
        return []


def looks_local(path: str) -> bool:
    """Dataset names are 'name' or 'owner/name'; anything else is meant as a local path."""
    return (
        path.startswith(("/", ".", "~"))
        or path.count("/") > 1
        or "\\" in path
        or Path(path).expanduser().exists()
    )


def is_glob(path: str) -> bool:
    return any(c in path for c in "*?[")


def _first_line(file: Path) -> str | None:
    with open(file, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                return line
    return None
