"""Documents for language-model data (built-in pydoc text, text files, JSONL, HF datasets) and
the held-out split, made by whole documents so no document is in both splits.
"""
from __future__ import annotations

import contextlib
import json
import random
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

from compt.text.config import TextDataConfig, looks_local

PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n")


class Split(NamedTuple):
    train: list[int]  # document indices, ascending
    val: list[int]


def pydoc_documents() -> list[str]:
    """Python's own documentation topics, sorted by name: ~465 KB of English that every
    install has, so the built-in corpus needs no download. It changes between Python versions;
    the tokenizer fingerprint covers the text, so a cached tokenizer is retrained then."""
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def load_documents(cfg: TextDataConfig) -> list[str]:
    """The corpus in a fixed order; whitespace-only documents are dropped (they would only add eos)."""
    if cfg.kind == "pydoc":
        documents = pydoc_documents()
    elif cfg.kind == "text":
        documents = _text_documents(cfg)
    elif cfg.kind == "jsonl":
        documents = _jsonl_documents(cfg)
    else:
        documents = _hf_documents(cfg)
    return [d for d in documents if d.strip()]


def split_documents(documents: Sequence[str], val_fraction: float, seed: int,
                    min_val: int = 1) -> Split:
    """Hold out documents in a seeded random order until they hold val_fraction of the characters
    (and at least min_val documents). Characters, not documents, because document lengths vary
    a lot (pydoc's run from 200 to 62,000 characters). Raising min_val extends the same order,
    so a larger hold-out always contains a smaller one."""
    n = len(documents)
    if n < 2:
        raise ValueError(
            f"data: the corpus has {n} document(s); a held-out split needs at least 2. Give more "
            "files in data.paths, or for one long text file set data.text_document: paragraph"
        )
    order = list(range(n))
    random.Random(seed).shuffle(order)
    target = val_fraction * sum(len(d) for d in documents)
    taken, chars = 0, 0
    while taken < n - 1 and (taken < min_val or chars < target):
        chars += len(documents[order[taken]])
        taken += 1
    return Split(train=sorted(order[taken:]), val=sorted(order[:taken]))


def _text_documents(cfg: TextDataConfig) -> list[str]:
    documents = []
    for file in cfg.files():
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(f"data.paths: {file} is not UTF-8 text ({error.reason} at byte "
                             f"{error.start}); convert it to UTF-8 or drop it from data.paths") from None
        if cfg.text_document == "paragraph":
            documents.extend(p.strip() for p in PARAGRAPH_BREAK.split(text))
        else:
            documents.append(text)
    return documents


def _jsonl_documents(cfg: TextDataConfig) -> list[str]:
    documents = []
    for file in cfg.files():
        with open(file, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    documents.append(jsonl_text(line, cfg.text_key, file, number))
    return documents


def jsonl_text(line: str | bytes, text_key: str, file: Path, number: int) -> str:
    """The text of one JSON line, or a ValueError naming the file, the line and the fix."""
    try:
        row = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        why = error.msg if isinstance(error, json.JSONDecodeError) else "not UTF-8"
        raise ValueError(f"data.paths: {file} line {number} is not JSON ({why}); "
                         "give JSON-lines files, one object per line") from None
    if not isinstance(row, dict) or text_key not in row:
        keys = list(row) if isinstance(row, dict) else type(row).__name__
        raise ValueError(f"data.text_key: '{text_key}' is not in {file} line {number} "
                         f"(keys: {keys}); set data.text_key to the field holding the text")
    text = row[text_key]
    if not isinstance(text, str):
        raise ValueError(f"data.text_key: '{text_key}' in {file} line {number} holds "
                         f"a {type(text).__name__}, not text; point data.text_key at a "
                         "string field")
    return text


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """datasets and huggingface_hub read HF_HUB_OFFLINE once, at import; set their copies so a
    dataset name resolves from the cache only and never waits on the network."""
    import datasets
    import huggingface_hub.constants as hub

    before = datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE = before


def _hf_documents(cfg: TextDataConfig) -> list[str]:
    import datasets

    path = Path(cfg.hf_path).expanduser()
    saved = (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()
    with offline():
        if path.is_dir() and saved:
            loaded = datasets.load_from_disk(str(path))
        else:
            spec = str(path) if looks_local(cfg.hf_path) else cfg.hf_path
            try:
                loaded = datasets.load_dataset(spec, cfg.hf_name, split=cfg.hf_split,
                                               cache_dir=cfg.hf_cache_dir)
            except (ConnectionError, FileNotFoundError) as error:
                raise ValueError(
                    f"data.hf_path: '{cfg.hf_path}' is neither a local dataset nor in the datasets "
                    f"cache, and compt does not download ({error}); on a machine with network run "
                    f"datasets.load_dataset('{cfg.hf_path}').save_to_disk(DIR) and give DIR"
                ) from None
            except ValueError as error:
                if "split" not in str(error).lower():
                    raise
                raise ValueError(f"data.hf_split: '{cfg.hf_split}' is not a split of "
                                 f"'{cfg.hf_path}' ({error}); set data.hf_split to one of its "
                                 "splits") from None
    if isinstance(loaded, datasets.DatasetDict):
        if cfg.hf_split not in loaded:
            raise ValueError(f"data.hf_split: '{cfg.hf_split}' is not in {cfg.hf_path} "
                             f"(splits: {list(loaded)}); set data.hf_split to one of them")
        loaded = loaded[cfg.hf_split]
    if cfg.text_key not in loaded.column_names:
        raise ValueError(f"data.text_key: column '{cfg.text_key}' is not in {cfg.hf_path} "
                         f"(columns: {loaded.column_names}); set data.text_key to the text column")
    texts = list(loaded[cfg.text_key])
    for number, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"data.text_key: column '{cfg.text_key}' row {number} holds a "
                             f"{type(text).__name__}, not text; set data.text_key to a text column")
    return texts
