"""Packed language-model data: documents tokenized, each followed by </s>, concatenated into one
stream and cut into fixed blocks of seq_len + 1 tokens, served by index so a trainer can shard.
build_text_datasets reads the corpus whole, or hands a streamed one to compt.text.stream.
"""
from __future__ import annotations

import operator
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from tokenizers import Tokenizer

from compt.text.config import TextDataConfig
from compt.text.corpus import Split, load_documents, split_documents
from compt.text.tokenizer import (EOS, TOKENIZER_FILE, as_transformers, install_tokenizer, load_cached_tokenizer,
                                  save_tokenizer, train_tokenizer)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

ENCODE_BATCH = 1024  # documents per encode call: bounds the memory of a large corpus


class PackedTextDataset(torch.utils.data.Dataset):
    """Block i is tokens[i * (seq_len + 1) : (i + 1) * (seq_len + 1)]; the tail shorter than a
    block is dropped. A block is a LongTensor [seq_len + 1]: input block[:-1], target block[1:]
    (see inputs_and_targets). Blocks run across document boundaries; </s> marks them."""

    def __init__(self, tokens: np.ndarray | Sequence[int], seq_len: int,
                 document_ids: Sequence[int] = ()):
        if seq_len < 1:
            raise ValueError(f"seq_len: {seq_len} is not a length; give a positive number of tokens")
        self.tokens = np.asarray(tokens)
        self.seq_len = seq_len
        self.document_ids = tuple(document_ids)  # indices into the corpus these tokens come from

    @property
    def block_len(self) -> int:
        return self.seq_len + 1

    @property
    def dropped_tokens(self) -> int:
        return len(self.tokens) - len(self) * self.block_len

    def __len__(self) -> int:
        return len(self.tokens) // self.block_len

    def __getitem__(self, index: int) -> torch.Tensor:
        index = operator.index(index)
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"block {index} out of range for {n} blocks")
        start = index * self.block_len
        return torch.from_numpy(self.tokens[start:start + self.block_len].astype(np.int64))


def inputs_and_targets(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token pairs from blocks [..., seq_len + 1]: inputs [..., :-1], targets [..., 1:]."""
    return blocks[..., :-1], blocks[..., 1:]


def token_stream(tokenizer: Tokenizer, documents: Sequence[str], eos_id: int | None = None) -> np.ndarray:
    """Every document's tokens followed by </s> (or a given tokenizer's eos_id), concatenated in order.
    No <s>: packed blocks start mid-document anyway, and one separator is enough to learn where a
    document ends."""
    eos = tokenizer.token_to_id(EOS) if eos_id is None else eos_id
    dtype = np.uint16 if tokenizer.get_vocab_size() <= np.iinfo(np.uint16).max + 1 else np.int32
    pieces = []
    for start in range(0, len(documents), ENCODE_BATCH):
        batch = list(documents[start:start + ENCODE_BATCH])
        for encoding in tokenizer.encode_batch_fast(batch, add_special_tokens=False):
            pieces.append(np.asarray(encoding.ids, dtype=dtype))
            pieces.append(np.asarray([eos], dtype=dtype))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)


class TextData(NamedTuple):
    train: PackedTextDataset
    val: PackedTextDataset
    tokenizer: PreTrainedTokenizerFast


def build_text_datasets(cfg: TextDataConfig, cache_dir: str | Path) -> TextData:
    """Train and val blocks and the tokenizer (trained on the train documents only, or data.tokenizer_path,
    in cache_dir: the run's text-data directory). Validates the config first, reporting every problem.
    With data.streaming the train split is a compt.text.stream.TextStream."""
    problems = cfg.problems()
    if problems:
        raise ValueError("invalid text data config:\n  " + "\n  ".join(problems))
    if cfg.streaming:
        from compt.text.stream import build_text_stream

        return build_text_stream(cfg, cache_dir)
    documents = load_documents(cfg)
    split, tokenizer, eos = _hold_out(documents, cfg, Path(cache_dir))
    train_tokens = token_stream(tokenizer, [documents[i] for i in split.train], eos)
    if len(train_tokens) < cfg.seq_len + 1:
        raise ValueError(f"data.seq_len: the training split has {len(train_tokens)} tokens, less than "
                         f"one block of seq_len + 1 = {cfg.seq_len + 1}; lower data.seq_len or give "
                         "more text")
    val_tokens = token_stream(tokenizer, [documents[i] for i in split.val], eos)
    return TextData(
        train=PackedTextDataset(train_tokens, cfg.seq_len, split.train),
        val=PackedTextDataset(val_tokens, cfg.seq_len, split.val),
        tokenizer=as_transformers(Path(cache_dir) / TOKENIZER_FILE),
    )


def _hold_out(documents: list[str], cfg: TextDataConfig, cache_dir: Path) -> tuple[Split, Tokenizer, int]:
    """The split, the tokenizer of its train documents (or the given one) and its end-of-document id, with
    val holding at least one block. A val split too short for a block takes the next document in its seeded
    order; since the tokenizer depends on the train documents, each try's tokenizer stays in memory and only
    the final one is written, so the cache never holds a tokenizer for a split that was not used."""
    given = install_tokenizer(cfg.tokenizer_path, cache_dir) if cfg.tokenizer_path is not None else None
    min_val = 1
    while True:
        split = split_documents(documents, cfg.val_fraction, cfg.seed, min_val)
        val = [documents[i] for i in split.val]
        # Byte-level BPE never gives more tokens than bytes, so this needs no tokenizer.
        short = sum(len(d.encode("utf-8")) for d in val) + len(val) < cfg.seq_len + 1
        if not short and given is not None:
            short = len(token_stream(given.tokenizer, val, given.eos_id)) < cfg.seq_len + 1
            if not short:
                return split, given.tokenizer, given.eos_id
        elif not short:
            train = [documents[i] for i in split.train]
            tokenizer = load_cached_tokenizer(train, cfg.vocab_size, cache_dir)
            cached = tokenizer is not None
            tokenizer = tokenizer or train_tokenizer(train, cfg.vocab_size)
            short = len(token_stream(tokenizer, val)) < cfg.seq_len + 1
            if not short:
                if not cached:
                    save_tokenizer(tokenizer, train, cfg.vocab_size, cache_dir)
                return split, tokenizer, tokenizer.token_to_id(EOS)
        if len(split.train) == 1:
            raise ValueError(
                f"data.seq_len: even holding out all but one of the {len(documents)} documents "
                f"leaves no validation block of seq_len + 1 = {cfg.seq_len + 1} tokens; lower "
                "data.seq_len or give more text"
            )
        min_val = len(split.val) + 1
