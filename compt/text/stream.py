"""Streamed text corpora: every loader process (of every rank) reads the corpus in order, tokenizes the train
documents it owns (document i goes to loader process i mod S of S) and packs them into seq_len + 1 blocks on
the fly, through a seeded shuffle buffer. Its blocks are a pure function of (seed, layout), so a stage resumed
at step s regenerates and drops what each process served before s (nothing is trained on twice); the layout
travels in the stage checkpoint (compt.streaming's loader state) and a resume on another layout is refused.

Why not datasets' own streaming for JSONL and text files: its readers decode (parse) every line in every
process; here a process parses only the lines it owns. Hugging Face datasets (kind hf) stream through it.
"""
from __future__ import annotations

import contextlib
import itertools
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tokenizers import Tokenizer

from compt.faults import StageFailed
from compt.streaming import UNDECLARED
from compt.text.config import TextDataConfig, looks_local
from compt.text.corpus import jsonl_text, offline
from compt.text.dataset import ENCODE_BATCH, PackedTextDataset, TextData, token_stream
from compt.text.tokenizer import (EOS, TOKENIZER_FILE, GivenTokenizer, as_transformers, install_tokenizer,
                                  load_or_train_tokenizer)

# open_clip_train starts its sample shuffle at 1000 of 5000: yield once a fifth of the buffer is filled.
SHUFFLE_INITIAL_FRACTION = 5


class Document(NamedTuple):
    index: int  # position in the corpus, held-out documents included
    text: str


def documents(cfg: TextDataConfig, keep: Callable[[int], bool], paths: list[str] | None = None) -> Iterator[Document]:
    """The kept documents, in corpus order; the others are only counted (a JSON line is not parsed, a file
    not read). ``paths``: other files of the same kind (validation files)."""
    if cfg.kind == "jsonl":
        return _jsonl(cfg.files(paths), cfg.text_key, keep)
    if cfg.kind == "text":
        files = cfg.files(paths)
        return _paragraphs(files, keep) if cfg.text_document == "paragraph" else _text_files(files, keep)
    if cfg.kind == "hf":
        return _hf_rows(cfg, keep)
    raise ValueError(f"data.streaming: kind {cfg.kind} is not streamed; stream kind text, jsonl or hf")


def _jsonl(files: list[Path], text_key: str, keep: Callable[[int], bool]) -> Iterator[Document]:
    index = 0
    for file in files:
        with open(file, "rb") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                if keep(index):
                    yield Document(index, jsonl_text(line, text_key, file, number))
                index += 1


def _text_files(files: list[Path], keep: Callable[[int], bool]) -> Iterator[Document]:
    for index, file in enumerate(files):
        if keep(index):
            yield Document(index, _utf8(file.read_bytes(), file))


def _paragraphs(files: list[Path], keep: Callable[[int], bool]) -> Iterator[Document]:
    """Blank-line-separated paragraphs, read a line at a time (the in-memory path splits whole files)."""
    index = 0
    for file in files:
        with open(file, "rb") as handle:
            lines: list[bytes] = []
            for line in itertools.chain(handle, [b"\n"]):  # a final blank line closes the last paragraph
                if line.strip():
                    lines.append(line)
                    continue
                if lines:
                    if keep(index):
                        yield Document(index, _utf8(b"".join(lines), file).strip())
                    index += 1
                    lines = []


def _utf8(data: bytes, file: Path) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"data.paths: {file} is not UTF-8 text ({error.reason}); convert it to UTF-8 or drop "
                         "it from data.paths") from None


def _hf_rows(cfg: TextDataConfig, keep: Callable[[int], bool]) -> Iterator[Document]:
    with offline():
        rows = _hf_iterable(cfg)
        index = 0
        for batch in rows.iter(batch_size=ENCODE_BATCH):  # .iter: no splitting by DataLoader worker behind us
            if cfg.text_key not in batch:
                raise ValueError(f"data.text_key: column '{cfg.text_key}' is not in {cfg.hf_path} (columns: "
                                 f"{list(batch)}); set data.text_key to the text column")
            for text in batch[cfg.text_key]:
                if keep(index):
                    if not isinstance(text, str):
                        raise ValueError(f"data.text_key: column '{cfg.text_key}' row {index} holds a "
                                         f"{type(text).__name__}, not text; set data.text_key to a text column")
                    yield Document(index, text)
                index += 1


def _hf_iterable(cfg: TextDataConfig):
    """datasets' IterableDataset of the split: a save_to_disk folder, or load_dataset(streaming=True) of a
    local data folder or a dataset name the cache holds."""
    import datasets

    path = Path(cfg.hf_path).expanduser()
    if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if cfg.hf_split not in loaded:
                raise ValueError(f"data.hf_split: '{cfg.hf_split}' is not in {cfg.hf_path} "
                                 f"(splits: {list(loaded)}); set data.hf_split to one of them")
            loaded = loaded[cfg.hf_split]
        return loaded.to_iterable_dataset()
    spec = str(path) if looks_local(cfg.hf_path) else cfg.hf_path
    try:
        return datasets.load_dataset(spec, cfg.hf_name, split=cfg.hf_split, cache_dir=cfg.hf_cache_dir,
                                     streaming=True)
    except (ConnectionError, FileNotFoundError) as error:
        raise ValueError(f"data.hf_path: '{cfg.hf_path}' is neither a local dataset nor in the datasets cache, "
                         f"and compt does not download ({error}); on a machine with network run "
                         f"datasets.load_dataset('{cfg.hf_path}').save_to_disk(DIR) and give DIR") from None
    except ValueError as error:
        if "split" not in str(error).lower():
            raise
        raise ValueError(f"data.hf_split: '{cfg.hf_split}' is not a split of '{cfg.hf_path}' ({error}); set "
                         "data.hf_split to one of its splits") from None


def held_out(cfg: TextDataConfig) -> int:
    """How many of the corpus's first documents are validation (0 with data.val_paths)."""
    return 0 if cfg.val_paths else int(cfg.val_documents or 0)


def shard_texts(cfg: TextDataConfig, shard: int, shards: int) -> Iterator[str]:
    """Loader process ``shard`` of ``shards``: its train documents' texts, pass after pass, without end."""
    first = held_out(cfg)

    def mine(i: int) -> bool:
        return i >= first and (i - first) % shards == shard

    for _ in itertools.count():
        empty = True
        for document in documents(cfg, mine):
            if document.text.strip():  # whitespace would only add </s>
                empty = False
                yield document.text
        if empty:
            raise StageFailed(f"data: loader process {shard} of {shards} (ranks x data.workers) owns no train "
                              "document: the corpus has fewer non-empty train documents than loader processes; "
                              "lower data.workers or the number of ranks, or give more documents")


def packed_blocks(texts: Iterator[str], tokenizer: Tokenizer, eos_id: int, block_len: int) -> Iterator[np.ndarray]:
    """Each text's tokens then eos, concatenated and cut into blocks of block_len tokens (the in-memory path's
    packing, done as the texts come)."""
    dtype = np.uint16 if tokenizer.get_vocab_size() <= np.iinfo(np.uint16).max + 1 else np.int32
    eos = np.asarray([eos_id], dtype=dtype)
    rest = np.zeros(0, dtype=dtype)
    while batch := list(itertools.islice(texts, ENCODE_BATCH)):
        pieces = [rest]
        for encoding in tokenizer.encode_batch_fast(batch, add_special_tokens=False):
            pieces += [np.asarray(encoding.ids, dtype=dtype), eos]
        tokens = np.concatenate(pieces)
        full = len(tokens) // block_len
        for b in range(full):
            yield tokens[b * block_len:(b + 1) * block_len].copy()  # a copy: a buffered block keeps no batch alive
        rest = tokens[full * block_len:]


class Share(NamedTuple):
    """What one loader process of a rank serves in one run of a stage, in blocks of its shard."""
    role: int  # which of the rank's shards it plays: the DataLoader asks its processes in turn from step 0
    skip: int  # blocks of that shard trained on before this run: regenerated and dropped
    take: int  # blocks it serves now


def loader_shares(steps: int, gas: int, micro: int, loaders: int, start_step: int = 0) -> list[Share]:
    """Micro-batch j of a rank's stage (j < steps x gas) comes from its shard j mod loaders. A DataLoader asks
    its worker processes in turn, the first for the first batch it serves: resumed at start_step, worker w
    serves micro-batches start_step x gas + w, + loaders, ..., so it plays shard (start_step x gas + w) mod
    loaders, and the stage sees the very batches an uninterrupted run would have."""
    done, total = start_step * gas, steps * gas

    def count(n: int, shard: int) -> int:  # micro-batches j < n with j mod loaders == shard
        return max(0, (n - shard + loaders - 1) // loaders)

    shares = []
    for w in range(loaders):
        role = (done + w) % loaders
        shares.append(Share(role, micro * count(done, role), micro * (count(total, role) - count(done, role))))
    return shares


class TextStream:
    """A streamed train split: a recipe every loader process follows, not data. ``len`` is data.train_samples
    (compt.streaming.UNDECLARED when not given: epoch budgets are refused then)."""

    def __init__(self, cfg: TextDataConfig, directory: str | Path, eos_id: int):
        self.cfg, self.eos_id = cfg, eos_id
        self.tokenizer_file = Path(directory) / TOKENIZER_FILE
        self._tokenizer: Tokenizer | None = None

    def __len__(self) -> int:
        return self.cfg.train_samples if self.cfg.train_samples is not None else UNDECLARED

    def blocks(self, shard: int, shards: int, seed: int) -> Iterator[np.ndarray]:
        """Shard ``shard`` of ``shards``: its blocks, shuffled in a buffer seeded by (seed, shard), without end."""
        if self._tokenizer is None:  # loaded in the process that reads: a Tokenizer is not shared across fork
            self._tokenizer = Tokenizer.from_file(str(self.tokenizer_file))
        out = packed_blocks(shard_texts(self.cfg, shard, shards), self._tokenizer, self.eos_id, self.cfg.seq_len + 1)
        if self.cfg.shuffle_blocks:
            from webdataset.filters import shuffle

            size = self.cfg.shuffle_blocks
            out = shuffle(size, max(1, size // SHUFFLE_INITIAL_FRACTION), rng=random.Random(seed * 1_000_003 + shard))(out)
        return out

    def stage(self, *, global_batch: int, steps: int, rank: int, world: int, gas: int, seed: int,
              start_step: int = 0, workers: int = 0, data_state: dict | None = None) -> StageBlocks:
        """This rank's blocks for a stage: ``workers`` DataLoader processes (0: the rank itself), each serving
        micro-batches of global_batch / (world x gas) blocks in turn. A resumed stage (start_step > 0) must
        run on the layout it started with, ``data_state`` from its checkpoint: each position derives from it."""
        loaders = max(1, workers)
        layout = {"ranks": world, "loader_processes": loaders, "global_batch": global_batch,
                  "gradient_accumulation_steps": gas, "seq_len": self.cfg.seq_len, "seed": seed}
        if start_step and data_state != layout:
            raise StageFailed(
                f"data.streaming: the stage resumes at step {start_step} as {layout}, but its checkpoint's stream "
                f"ran as {data_state}: where each loader process resumes is derived from that layout; rerun with "
                "the ranks and data.workers it started with, or delete the stage's checkpoints to restart it")
        shares = loader_shares(steps, gas, global_batch // (world * gas), loaders, start_step)
        return StageBlocks(self, shares, rank, loaders, world, seed, layout)


class StageBlocks(torch.utils.data.IterableDataset):
    """One rank's blocks for one run of a stage; each DataLoader process serves its Share."""

    def __init__(self, stream: TextStream, shares: list[Share], rank: int, loaders: int, world: int, seed: int,
                 layout: dict):
        self.stream, self.shares, self.rank, self.loaders, self.world, self.seed = stream, shares, rank, loaders, world, seed
        self.layout = layout

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = torch.utils.data.get_worker_info()
        share = self.shares[info.id if info is not None else 0]
        blocks = self.stream.blocks(self.rank * self.loaders + share.role, self.world * self.loaders, self.seed)
        for block in itertools.islice(blocks, share.skip, share.skip + share.take):
            yield torch.from_numpy(block.astype(np.int64))


class StreamLoader(torch.utils.data.DataLoader):
    """A DataLoader over StageBlocks whose state() (stored in every stage checkpoint) is the stream's layout."""

    def state(self) -> dict:
        return dict(self.dataset.layout)


def stream_loader(ds: TextStream, *, global_batch: int, steps: int, rank: int, world: int, gas: int, seed: int,
                  start_step: int = 0, data_state: dict | None = None, **options) -> StreamLoader:
    """This rank's micro-batches of a streamed split; ``options`` are DataLoader kwargs (collate_fn, workers...)."""
    blocks = ds.stage(global_batch=global_batch, steps=steps, rank=rank, world=world, gas=gas, seed=seed,
                      start_step=start_step, workers=options.get("num_workers", 0), data_state=data_state)
    return StreamLoader(blocks, batch_size=global_batch // (world * gas), **options)


# ---------------------------------------------------------------------------------------------------------------
# Building: the tokenizer, the held-out blocks, the train stream's size.
# ---------------------------------------------------------------------------------------------------------------

def build_text_stream(cfg: TextDataConfig, cache_dir: str | Path) -> TextData:
    """The tokenizer (given, or trained on the first data.tokenizer_sample_bytes of train text and cached in
    cache_dir), the validation blocks (in memory: they are few) and the train stream."""
    cache_dir = Path(cache_dir)
    first = held_out(cfg)
    with contextlib.closing(documents(cfg, lambda i: i >= first)) as train:
        if next(train, None) is None:
            raise ValueError(f"data.val_documents: the corpus has no document after the {first} held out for "
                             "validation; hold out fewer or give more documents")
    given = _stream_tokenizer(cfg, cache_dir)
    val = _validation_documents(cfg)
    val_tokens = token_stream(given.tokenizer, [d.text for d in val if d.text.strip()], given.eos_id)
    if len(val_tokens) < cfg.seq_len + 1:
        field = "data.val_paths" if cfg.val_paths else "data.val_documents"
        raise ValueError(f"{field}: the {len(val)} validation documents hold {len(val_tokens)} tokens, less than "
                         f"one block of seq_len + 1 = {cfg.seq_len + 1}; give more validation text")
    return TextData(train=TextStream(cfg, cache_dir, given.eos_id),
                    val=PackedTextDataset(val_tokens, cfg.seq_len, [d.index for d in val]),
                    tokenizer=as_transformers(cache_dir))


def _validation_documents(cfg: TextDataConfig) -> list[Document]:
    if cfg.val_paths:
        return list(documents(cfg, lambda i: True, cfg.val_paths))
    first = held_out(cfg)
    with contextlib.closing(documents(cfg, lambda i: i < first)) as docs:
        return list(itertools.islice(docs, first))


def _stream_tokenizer(cfg: TextDataConfig, cache_dir: Path) -> GivenTokenizer:
    if cfg.tokenizer_path is not None:
        return install_tokenizer(cfg.tokenizer_path, cache_dir)
    first, sample, nbytes = held_out(cfg), [], 0
    with contextlib.closing(documents(cfg, lambda i: i >= first)) as docs:
        for document in docs:
            if nbytes >= cfg.tokenizer_sample_bytes:
                break
            sample.append(document.text)
            nbytes += len(document.text.encode("utf-8"))
    tokenizer = Tokenizer.from_file(str(load_or_train_tokenizer(sample, cfg.vocab_size, cache_dir)))
    return GivenTokenizer(tokenizer, tokenizer.token_to_id(EOS), tokenizer.get_vocab_size())


def stream_size(cfg: TextDataConfig) -> int:
    """A streamed split's declared size in blocks (counting it would tokenize the whole corpus)."""
    if cfg.train_samples is None:
        raise ValueError("data.train_samples: a streamed corpus is not counted; declare the blocks of "
                         "seq_len + 1 tokens one pass holds (tokens / (seq_len + 1)) for epoch budgets")
    return cfg.train_samples
