"""TextDataConfig: which text a language-model stage trains and evaluates on, read whole into memory
or streamed (compt.text.stream), with a tokenizer trained per run or given.

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
# The fields only one of the two paths reads.
STREAM_FIELDS = frozenset({"train_samples", "val_documents", "val_paths", "shuffle_blocks", "tokenizer_sample_bytes"})
IN_MEMORY_FIELDS = frozenset({"val_fraction", "max_memory_bytes"})
# Peak resident memory of the in-memory path per byte of JSONL corpus, BPE trained per run: 3.6-3.7 bytes per
# added byte between 8 and 32 MiB, on top of ~110 MB (benchmarks/text_memory.py, results in
# benchmarks/results/text-memory.md); rounded up. Measured on repeated text, whose few distinct words keep
# the BPE trainer small: a lower bound. The default budget is a rule, not a measurement: half of this
# machine's memory, shared by the ranks on it.
IN_MEMORY_BYTES_PER_CORPUS_BYTE = 4

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
    # Ignored with tokenizer_path (the given tokenizer's size decides then).
    vocab_size: int = 4096
    seed: int = 0
    # A tokenizer to use instead of training one: a tokenizer.json file or a transformers tokenizer
    # folder (save_pretrained), local; it is copied into the run so exports carry it.
    tokenizer_path: str | None = None
    # Read the corpus whole into memory on every rank (exact, bit-identical resume), or stream it:
    # documents are tokenized in the loader workers and packed on the fly (compt.text.stream).
    streaming: bool = False
    # In-memory path: refuse a corpus whose estimated footprint (IN_MEMORY_BYTES_PER_CORPUS_BYTE x its
    # bytes) exceeds this; None: half of this machine's memory over the ranks on it.
    max_memory_bytes: int | None = None
    # Streaming: the blocks of seq_len + 1 tokens one pass over the train documents holds, counted or
    # estimated; epoch budgets need it (compt.streaming), and it is the train set's len().
    train_samples: int | None = None
    # Streaming validation: separate files (kind text or jsonl), or else the first val_documents documents
    # of the corpus, held out of training.
    val_paths: list[str] = []
    val_documents: int | None = None
    # Streaming: blocks shuffled in a buffer of this many per loader process (webdataset's shuffle;
    # open_clip_train shuffles samples in 5000); 0 keeps the corpus order.
    shuffle_blocks: int = 5000
    # Streaming without tokenizer_path: the BPE is trained on the first train documents up to this many
    # bytes of UTF-8 text.
    tokenizer_sample_bytes: int = 64 * 2**20
    # Processes per rank that feed batches (0: the training process itself); None: the CPUs per local
    # rank, at most 8 (compt.loading). The weights do not depend on it.
    workers: int | None = None

    @field_validator("paths", "val_paths", mode="before")
    @classmethod
    def _one_path_is_a_list(cls, value):
        return [value] if isinstance(value, str) else value

    def streams(self) -> bool:
        """Whether the train split is streamed (compt.streaming); then its len() is data.train_samples."""
        return self.streaming

    def files(self, paths: list[str] | None = None) -> list[Path]:
        """The files `paths` (or the given entries) names, globs expanded, sorted within each entry,
        duplicates dropped."""
        found: list[Path] = []
        for entry in self.paths if paths is None else paths:
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
        unread, path = (IN_MEMORY_FIELDS, "true") if self.streaming else (STREAM_FIELDS, "false")
        for field in sorted(changed & unread):
            found.append(f"data.{field}: not read with data.streaming: {path}; remove it or set "
                         f"data.streaming: {'false' if self.streaming else 'true'}")
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
        if self.tokenizer_path is None and self.vocab_size < MIN_VOCAB:
            found.append(f"data.vocab_size: {self.vocab_size} is below {MIN_VOCAB} (256 bytes and "
                         "4 special tokens); give more, e.g. 4096")
        if self.tokenizer_path is not None:
            found.extend(self._tokenizer_problems(changed))
        found.extend(self._stream_problems() if self.streaming else self._memory_problems())
        return found

    def tokenizer_size(self) -> int | None:
        """The vocabulary the data's token ids come from: the given tokenizer's (added tokens included),
        else vocab_size; None when data.tokenizer_path does not load (problems() says why). A model needs at
        least this many embedding rows."""
        if self.tokenizer_path is None:
            return self.vocab_size
        from compt.text.tokenizer import existing_tokenizer, tokenizer_problem

        return None if tokenizer_problem(self.tokenizer_path) else existing_tokenizer(self.tokenizer_path).size

    def _tokenizer_problems(self, changed: set[str]) -> list[str]:
        from compt.text.tokenizer import tokenizer_problem

        problem = tokenizer_problem(self.tokenizer_path)
        if problem:
            return [problem]
        found = []
        size = self.tokenizer_size()
        if "vocab_size" in changed and self.vocab_size != size:
            found.append(f"data.vocab_size: {self.vocab_size} differs from the {size} tokens of "
                         f"data.tokenizer_path '{self.tokenizer_path}', which decides the vocabulary; "
                         "remove data.vocab_size")
        if "tokenizer_sample_bytes" in changed:
            found.append("data.tokenizer_sample_bytes: no tokenizer is trained with data.tokenizer_path; "
                         "remove one of them")
        return found

    def _stream_problems(self) -> list[str]:
        found = []
        if self.kind == "pydoc":
            found.append("data.streaming: kind pydoc is a small built-in corpus; stream kind text, jsonl "
                         "or hf, or set data.streaming: false")
        if self.val_paths:
            if self.kind not in ("text", "jsonl"):
                found.append(f"data.val_paths: read for kind text and jsonl, not '{self.kind}'; hold out "
                             "the first documents with data.val_documents instead")
            elif not self.files(self.val_paths):
                found.append(f"data.val_paths: {self.val_paths} names no file; give validation files "
                             "or globs of the same kind as data.paths")
            if self.val_documents is not None:
                found.append("data.val_documents: give either data.val_paths or data.val_documents, "
                             "not both; remove one")
        elif self.val_documents is None:
            found.append("data.val_documents: a stream needs a held-out part for validation; give how many "
                         "of the corpus's first documents to hold out (e.g. 1000) or data.val_paths")
        elif self.val_documents < 1:
            found.append(f"data.val_documents: {self.val_documents} holds out nothing; give at least 1")
        if self.train_samples is not None and self.train_samples < 1:
            found.append(f"data.train_samples: {self.train_samples} is not a count of blocks; give the "
                         "blocks one pass holds (tokens / (seq_len + 1)), or leave it out")
        if self.shuffle_blocks < 0:
            found.append(f"data.shuffle_blocks: {self.shuffle_blocks} is negative; give a buffer size, "
                         "or 0 to keep the corpus order")
        if self.tokenizer_sample_bytes < 1:
            found.append(f"data.tokenizer_sample_bytes: {self.tokenizer_sample_bytes} trains on nothing; "
                         "give a number of bytes, e.g. 67108864 (64 MiB), or data.tokenizer_path")
        return found

    def memory_budget(self) -> int:
        """data.max_memory_bytes, or half of this machine's memory over the ranks on it."""
        if self.max_memory_bytes is not None:
            return self.max_memory_bytes
        import psutil

        from compt.distributed import local_world_size

        return psutil.virtual_memory().total // (2 * local_world_size())

    def corpus_bytes(self) -> int | None:
        """The corpus's size on disk, when it is files (None for a dataset name resolved in the cache)."""
        if self.kind in ("text", "jsonl"):
            return sum(f.stat().st_size for f in self.files())
        if self.kind == "hf" and self.hf_path and looks_local(self.hf_path):
            root = Path(self.hf_path).expanduser()
            return sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) if root.is_dir() else None
        return None

    def _memory_problems(self) -> list[str]:
        if self.max_memory_bytes is not None and self.max_memory_bytes < 1:
            return [f"data.max_memory_bytes: {self.max_memory_bytes} is not a budget; give bytes, or leave "
                    "it out for half of the machine's memory over its ranks"]
        size = self.corpus_bytes()
        if size is None:
            return []
        need, budget = size * IN_MEMORY_BYTES_PER_CORPUS_BYTE, self.memory_budget()
        if need <= budget:
            return []
        return [f"data.max_memory_bytes: the corpus holds {size:,} bytes, about {need:,} bytes in memory on "
                f"every rank read whole ({IN_MEMORY_BYTES_PER_CORPUS_BYTE} x its size), above the budget of "
                f"{budget:,}; set data.streaming: true (tokenized in the loader workers, memory bounded) "
                "or raise data.max_memory_bytes"]

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
