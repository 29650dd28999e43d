"""A byte-level BPE tokenizer for LLaMA-style models, trained locally on the training split and
cached in the run directory as tokenizer.json beside a fingerprint of what it was trained on; or an
existing tokenizer (a tokenizer.json or a transformers folder), copied into the run directory.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import tokenizers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
# LLaMA's ids: unk 0, bos 1, eos 2. LLaMA has no pad; a distinct one keeps padding out of the loss
# by id without ever being confused with eos.
SPECIAL_TOKENS: tuple[str, ...] = (UNK, BOS, EOS, PAD)
TOKENIZER_FILE = "tokenizer.json"
FINGERPRINT_FILE = "tokenizer.fingerprint.json"
# What transformers' save_pretrained writes beside tokenizer.json: its presence marks a given tokenizer,
# loaded with AutoTokenizer (its own special tokens), not with compt's.
TRANSFORMERS_CONFIG = "tokenizer_config.json"
# Bump when the training recipe below changes, so cached tokenizers are retrained.
RECIPE = 1
MIN_FREQUENCY = 2  # a pair seen once is noise, not a merge worth a vocabulary slot


def train_tokenizer(documents: Sequence[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE: every byte is in the vocabulary, so no text is ever <unk> and decoding
    gives back the exact input. Deterministic: the same documents and vocab_size give the same
    tokenizer.json bytes (ties between merges are broken by the pair, not by hash order).
    A small corpus may stop short of vocab_size; the model keeps vocab_size rows regardless."""
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=MIN_FREQUENCY,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer=trainer, length=len(documents))
    # Like LLaMA: encode(text) starts with <s>; the packed datasets add </s> between documents.
    bos = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos)]
    )
    return tokenizer


def fingerprint(documents: Sequence[str], vocab_size: int) -> str:
    """What the tokenizer is a function of: the training text, vocab_size and the recipe.
    Not the tokenizers version: a run resumed after an upgrade keeps the ids its weights learned."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"recipe": RECIPE, "vocab_size": vocab_size,
                              "special_tokens": SPECIAL_TOKENS,
                              "min_frequency": MIN_FREQUENCY}).encode())
    for document in documents:
        data = document.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))  # so ["ab", "c"] differs from ["a", "bc"]
        digest.update(data)
    return digest.hexdigest()


def load_cached_tokenizer(documents: Sequence[str], vocab_size: int,
                          directory: str | Path) -> Tokenizer | None:
    """directory/tokenizer.json when its fingerprint matches the documents and settings and the
    file is the one that was written (not edited or truncated since); None otherwise."""
    directory = Path(directory)
    path, record_path = directory / TOKENIZER_FILE, directory / FINGERPRINT_FILE
    if not (path.is_file() and record_path.is_file()):
        return None
    try:
        record = json.loads(record_path.read_text())
    except json.JSONDecodeError:
        return None
    data = path.read_bytes()
    if (record.get("fingerprint") != fingerprint(documents, vocab_size)
            or record.get("tokenizer_sha256") != hashlib.sha256(data).hexdigest()):
        return None
    return Tokenizer.from_str(data.decode("utf-8"))


def save_tokenizer(tokenizer: Tokenizer, documents: Sequence[str], vocab_size: int,
                   directory: str | Path) -> Path:
    """Write directory/tokenizer.json and its fingerprint record. Ranks racing on one directory
    are safe: each writes the same bytes, and each file is replaced atomically."""
    directory = Path(directory)
    text = tokenizer.to_str(pretty=True)
    record = {
        "fingerprint": fingerprint(documents, vocab_size),
        "tokenizer_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        "vocab_size": vocab_size,
        "trained_vocab_size": tokenizer.get_vocab_size(),
        "documents": len(documents),
        "characters": sum(len(d) for d in documents),
        "tokenizers": tokenizers.__version__,
    }
    directory.mkdir(parents=True, exist_ok=True)
    (directory / TRANSFORMERS_CONFIG).unlink(missing_ok=True)  # a given tokenizer's, from an earlier config
    _write_atomically(directory / TOKENIZER_FILE, text)
    _write_atomically(directory / FINGERPRINT_FILE, json.dumps(record, indent=2) + "\n")
    return directory / TOKENIZER_FILE


def load_or_train_tokenizer(documents: Sequence[str], vocab_size: int, directory: str | Path) -> Path:
    """The path of directory/tokenizer.json: reused when it matches, trained and written otherwise."""
    if load_cached_tokenizer(documents, vocab_size, directory) is None:
        save_tokenizer(train_tokenizer(documents, vocab_size), documents, vocab_size, directory)
    return Path(directory) / TOKENIZER_FILE


def as_transformers(path: str | Path) -> PreTrainedTokenizerFast:
    """The tokenizer as transformers' fast tokenizer, from tokenizer.json or its directory, offline.
    Its save_pretrained writes a folder AutoTokenizer.from_pretrained loads without the network.
    A directory that holds a given tokenizer (install_tokenizer) loads as that tokenizer."""
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer at {path}; build the text data first "
                                "(build_text_datasets writes it to the run directory)")
    if (path.parent / TRANSFORMERS_CONFIG).is_file():
        return _auto_tokenizer(path.parent)
    return PreTrainedTokenizerFast(
        tokenizer_file=str(path),
        unk_token=UNK, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        clean_up_tokenization_spaces=False,  # would turn "a , b" into "a, b": decoding must be exact
    )


class GivenTokenizer(NamedTuple):
    tokenizer: Tokenizer  # the fast tokenizer's own object: what the datasets encode with
    eos_id: int  # ends every document in the packed blocks
    size: int  # token ids run below this (added tokens included): the model's minimum vocab_size


def existing_tokenizer(path: str | Path) -> GivenTokenizer:
    """A tokenizer.json file (its end-of-document token must be compt's </s>) or a transformers tokenizer
    folder (its eos_token). Raises ValueError naming data.tokenizer_path and the fix."""
    loaded = _as_given_transformers(Path(path).expanduser())
    eos = loaded.eos_token_id
    if eos is None:
        raise ValueError(f"data.tokenizer_path: '{path}' has no end-of-sequence token, which packing puts "
                         "between documents; give a tokenizer with an eos_token (or a '</s>' token)")
    return GivenTokenizer(loaded.backend_tokenizer, int(eos), len(loaded))


def tokenizer_problem(path: str) -> str | None:
    """Why data.tokenizer_path cannot be used, or None; loads it (a local file, no network)."""
    where = Path(path).expanduser()
    give = ("give a tokenizer.json file or a folder written by a transformers tokenizer's save_pretrained; "
            "to use a hub tokenizer, save_pretrained it on a machine with network first")
    if not where.exists():
        return f"data.tokenizer_path: '{path}' does not exist; {give}"
    if where.is_dir() and not (where / TOKENIZER_FILE).is_file() and not (where / TRANSFORMERS_CONFIG).is_file():
        return f"data.tokenizer_path: '{path}' holds no {TOKENIZER_FILE} or {TRANSFORMERS_CONFIG}; {give}"
    try:
        existing_tokenizer(where)
    except ValueError as error:
        return str(error)
    except Exception as error:  # noqa: BLE001 - tokenizers and transformers raise many types on bad files
        return f"data.tokenizer_path: '{path}' does not load as a fast tokenizer ({type(error).__name__}: " \
               f"{error}); {give}"
    return None


def install_tokenizer(path: str | Path, directory: str | Path) -> GivenTokenizer:
    """Copy the given tokenizer into directory as a transformers folder (what exports and `compt eval`
    read), unless the same one is there already; returns it as loaded from directory."""
    directory = Path(directory)
    wanted = _as_given_transformers(Path(path).expanduser())
    there = directory / TOKENIZER_FILE
    if not ((directory / TRANSFORMERS_CONFIG).is_file() and there.is_file()
            and Tokenizer.from_file(str(there)).to_str() == wanted.backend_tokenizer.to_str()):
        directory.mkdir(parents=True, exist_ok=True)
        (directory / FINGERPRINT_FILE).unlink(missing_ok=True)  # a trained tokenizer's, from an earlier config
        staging = directory.with_name(f".{directory.name}.{os.getpid()}.partial")
        wanted.save_pretrained(str(staging))
        for file in sorted(staging.iterdir()):  # each file replaced atomically: ranks may race here
            os.replace(file, directory / file.name)
        staging.rmdir()
    return existing_tokenizer(directory)


def _as_given_transformers(path: Path) -> PreTrainedTokenizerFast:
    """A folder through AutoTokenizer; a bare tokenizer.json with compt's special tokens, those it has."""
    if path.is_dir() and (path / TRANSFORMERS_CONFIG).is_file():
        return _auto_tokenizer(path)
    from transformers import PreTrainedTokenizerFast

    file = path / TOKENIZER_FILE if path.is_dir() else path
    raw = Tokenizer.from_file(str(file))
    special = {f"{name}_token": token for name, token in zip(("unk", "bos", "eos", "pad"), SPECIAL_TOKENS)
               if raw.token_to_id(token) is not None}  # naming one it lacks would add it: a new id
    return PreTrainedTokenizerFast(tokenizer_object=raw, clean_up_tokenization_spaces=False, **special)


def _auto_tokenizer(folder: Path) -> PreTrainedTokenizerFast:
    from transformers import AutoTokenizer

    from compt.text.corpus import offline

    with offline():
        loaded = AutoTokenizer.from_pretrained(str(folder))
    if not loaded.is_fast:
        raise ValueError(f"data.tokenizer_path: '{folder}' loads as a slow (Python) tokenizer; give a folder "
                         "with a tokenizer.json (save_pretrained of a fast tokenizer)")
    return loaded


def _write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_bytes(text.encode("utf-8"))
    os.replace(partial, path)
