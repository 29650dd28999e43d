"""compt.text: language-model data built the way a user's config builds it: the built-in pydoc
corpus, its tokenizer and cache, packed blocks, text/JSONL/HF inputs, and config errors."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from tokenizers import Tokenizer

from compt.text import (BOS, EOS, PAD, UNK, PackedTextDataset, TextDataConfig, as_transformers,
                        build_text_datasets, inputs_and_targets, load_documents, pydoc_documents,
                        split_documents, token_stream)
from compt.text.tokenizer import (FINGERPRINT_FILE, TOKENIZER_FILE, load_cached_tokenizer,
                                  load_or_train_tokenizer)

TEXTS = [
    "Hello, world!",
    "  two leading spaces, a , b . and a trailing newline\n",
    "naïve café — 日本語のテキスト 🙂 Ünïcödé ∑ x² \u200b",
    "def f(x):\n\treturn x ** 2  # tabs\r\n",
    "",
]


@pytest.fixture(scope="module")
def documents():
    return pydoc_documents()


@pytest.fixture(scope="module")
def pydoc(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    return run, build_text_datasets(TextDataConfig(), run)


def split_stream(tokens: np.ndarray, eos: int) -> list[np.ndarray]:
    ends = np.flatnonzero(tokens == eos)
    return np.split(tokens, ends + 1)[:-1]  # each piece ends with its </s>


# --- the built-in pydoc corpus ------------------------------------------------------------------

def test_pydoc_corpus_builds_with_plausible_counts(pydoc, documents):
    run, (train, val, tokenizer) = pydoc
    characters = sum(len(d) for d in documents)
    tokens = len(train.tokens) + len(val.tokens) - len(documents)  # minus one </s> per document
    print(f"\npydoc corpus: {len(documents)} documents, {characters} characters, {tokens} tokens "
          f"at vocab {len(tokenizer)} ({characters / tokens:.2f} characters/token); seq_len 128: "
          f"{len(train)} train blocks ({len(train.document_ids)} documents), {len(val)} val blocks "
          f"({len(val.document_ids)} documents)")
    assert len(documents) > 50 and characters > 300_000
    assert len(tokenizer) == 4096
    assert 3.0 < characters / tokens < 6.0  # English under a 4k byte-level BPE
    assert len(train) == len(train.tokens) // 129 and len(val) == len(val.tokens) // 129
    assert len(val) >= 1
    assert 0.02 < len(val.tokens) / (len(train.tokens) + len(val.tokens)) < 0.25
    assert (run / TOKENIZER_FILE).is_file() and (run / FINGERPRINT_FILE).is_file()


def test_no_document_in_both_splits(pydoc, documents):
    _, (train, val, _) = pydoc
    assert set(train.document_ids).isdisjoint(val.document_ids)
    assert sorted(train.document_ids + val.document_ids) == list(range(len(documents)))
    # and the token streams hold exactly those documents, each closed by </s>
    tokenizer = Tokenizer.from_file(str(pydoc[0] / TOKENIZER_FILE))
    eos = tokenizer.token_to_id(EOS)
    for dataset in (train, val):
        pieces = split_stream(dataset.tokens, eos)
        assert [tokenizer.decode(p[:-1].tolist()) for p in pieces] == \
            [documents[i] for i in dataset.document_ids]


def test_split_is_deterministic(pydoc, documents, tmp_path):
    _, (train, val, _) = pydoc
    again = build_text_datasets(TextDataConfig(), tmp_path)
    assert again.val.document_ids == val.document_ids
    assert np.array_equal(again.train.tokens, train.tokens)
    assert split_documents(documents, 0.05, 0) == split_documents(documents, 0.05, 0)
    assert split_documents(documents, 0.05, 1).val != split_documents(documents, 0.05, 0).val
    bigger = split_documents(documents, 0.05, 0, min_val=len(val.document_ids) + 3)
    assert set(val.document_ids) < set(bigger.val)  # growing the hold-out keeps what it had


# --- the tokenizer ------------------------------------------------------------------------------

def test_tokenizer_round_trips_text(pydoc, tmp_path, monkeypatch):
    run, (_, _, tokenizer) = pydoc
    raw = Tokenizer.from_file(str(run / TOKENIZER_FILE))
    assert [tokenizer.convert_tokens_to_ids(t) for t in (UNK, BOS, EOS, PAD)] == [0, 1, 2, 3]
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id,
            tokenizer.pad_token_id) == (0, 1, 2, 3)
    for text in TEXTS:
        ids = raw.encode(text, add_special_tokens=False).ids
        assert 0 not in ids  # byte-level: nothing is unknown
        assert raw.decode(ids) == text
        with_bos = tokenizer(text)["input_ids"]
        assert with_bos == [1] + ids  # LLaMA-style: <s> first, no </s>
        assert tokenizer.decode(with_bos, skip_special_tokens=True) == text
    # an exported folder loads with AutoTokenizer, offline, and tokenizes identically
    import huggingface_hub.constants
    from transformers import AutoTokenizer

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tokenizer.save_pretrained(tmp_path / "export")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "export")
    assert as_transformers(run)("x")["input_ids"] == tokenizer("x")["input_ids"]
    for text in TEXTS:
        assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
        assert loaded.decode(loaded(text)["input_ids"], skip_special_tokens=True) == text
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token, loaded.unk_token) == (BOS, EOS, PAD, UNK)


def test_tokenizer_file_is_deterministic(pydoc, documents, tmp_path):
    run, (train, _, _) = pydoc
    texts = [documents[i] for i in train.document_ids]
    first = load_or_train_tokenizer(texts, 4096, tmp_path / "a").read_bytes()
    assert first == load_or_train_tokenizer(texts, 4096, tmp_path / "b").read_bytes()
    assert first == (run / TOKENIZER_FILE).read_bytes()
    # another process, another hash seed, one thread: still the same bytes
    script = ("import sys; from compt.text import pydoc_documents, load_or_train_tokenizer; "
              "d = pydoc_documents(); ids = [int(i) for i in sys.argv[2].split(',')]; "
              "load_or_train_tokenizer([d[i] for i in ids], 4096, sys.argv[1])")
    env = {**os.environ, "PYTHONHASHSEED": "12345", "RAYON_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "c"),
                           ",".join(map(str, train.document_ids))],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "c" / TOKENIZER_FILE).read_bytes() == first


def test_tokenizer_cache_is_reused_and_invalidated(tmp_path):
    cfg = TextDataConfig(vocab_size=1024)
    built = build_text_datasets(cfg, tmp_path)
    path = tmp_path / TOKENIZER_FILE
    before = path.stat()
    original = path.read_bytes()

    again = build_text_datasets(cfg, tmp_path)  # same corpus and settings: the file is reused
    assert (path.stat().st_ino, path.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert np.array_equal(again.train.tokens, built.train.tokens)

    build_text_datasets(cfg.model_copy(update={"vocab_size": 512}), tmp_path)  # settings changed
    assert len(as_transformers(tmp_path)) == 512
    assert json.loads((tmp_path / FINGERPRINT_FILE).read_text())["vocab_size"] == 512

    build_text_datasets(cfg, tmp_path)  # back again: retrained, to the very same bytes
    assert path.read_bytes() == original

    build_text_datasets(cfg.model_copy(update={"seed": 3}), tmp_path)  # other train documents
    assert path.read_bytes() != original

    build_text_datasets(cfg, tmp_path)
    path.write_bytes(original.replace(b'"<pad>"', b'"<PAD>"'))  # an edited file is not trusted
    rebuilt = build_text_datasets(cfg, tmp_path)
    assert path.read_bytes() == original and rebuilt.tokenizer.pad_token_id == 3


# --- packed blocks ------------------------------------------------------------------------------

def test_blocks_are_contiguous_slices_of_the_stream(pydoc, documents):
    run, (train, val, _) = pydoc
    tokenizer = Tokenizer.from_file(str(run / TOKENIZER_FILE))
    for dataset in (train, val):
        stream = token_stream(tokenizer, [documents[i] for i in dataset.document_ids])
        assert np.array_equal(dataset.tokens, stream)
        blocks = torch.stack([dataset[i] for i in range(len(dataset))])
        assert blocks.dtype == torch.long and blocks.shape == (len(dataset), 129)
        used = len(dataset) * 129
        assert torch.equal(blocks.flatten(), torch.from_numpy(stream[:used].astype(np.int64)))
        assert dataset.dropped_tokens == len(stream) - used < 129
        assert int((stream == tokenizer.token_to_id(EOS)).sum()) == len(dataset.document_ids)
    inputs, targets = inputs_and_targets(torch.stack([train[0], train[1]]))
    assert inputs.shape == targets.shape == (2, 128)
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    assert torch.equal(train[-1], train[len(train) - 1])
    with pytest.raises(IndexError):
        train[len(train)]


def test_val_always_gets_a_full_block(documents, tmp_path):
    # seed 1 holds out a 559-character topic first: ~140 tokens, not a 513-token block
    cfg = TextDataConfig(val_fraction=0.001, seed=1, seq_len=512, vocab_size=1024)
    first = split_documents(documents, cfg.val_fraction, cfg.seed)
    train, val, _ = build_text_datasets(cfg, tmp_path)
    assert len(val) >= 1 and set(first.val) < set(val.document_ids)
    assert set(train.document_ids).isdisjoint(val.document_ids)
    # the cached tokenizer is the one for the split that was used, trained on its train documents
    assert load_cached_tokenizer([documents[i] for i in train.document_ids], 1024, tmp_path)


def test_packed_dataset_from_a_known_stream():
    data = PackedTextDataset(np.arange(23, dtype=np.uint16), seq_len=4)
    assert len(data) == 4 and data.dropped_tokens == 3
    assert data[1].tolist() == [5, 6, 7, 8, 9]
    assert data[1].dtype == torch.long


# --- text files, JSONL, HF datasets -------------------------------------------------------------

def test_text_files_one_document_per_file(documents, tmp_path):
    for i in range(6):
        (tmp_path / f"doc{i}.txt").write_text(documents[i], encoding="utf-8")
    (tmp_path / "blank.txt").write_text("\n\n  \n")  # no text: no document
    cfg = TextDataConfig(kind="text", paths=[str(tmp_path / "*.txt")], vocab_size=512,
                         seq_len=32, val_fraction=0.2)
    assert load_documents(cfg) == documents[:6]
    train, val, tokenizer = build_text_datasets(cfg, tmp_path / "run")
    assert len(train) > 0 and len(val) > 0
    assert sorted(train.document_ids + val.document_ids) == list(range(6))
    assert set(train.document_ids).isdisjoint(val.document_ids)
    assert tokenizer.decode(tokenizer("café")["input_ids"], skip_special_tokens=True) == "café"


def test_text_file_paragraphs(documents, tmp_path):
    paragraphs = ["First paragraph,\nover two lines.", "Second one.", "Third — with ünïcode."]
    (tmp_path / "book.txt").write_text("\n\n".join(paragraphs[:2]) + "\n \n\n" + paragraphs[2] + "\n")
    one_file = TextDataConfig(kind="text", paths=str(tmp_path / "book.txt"))
    with pytest.raises(ValueError, match="data.text_document"):
        split_documents(load_documents(one_file), 0.05, 0)  # one document cannot be split
    by_paragraph = one_file.model_copy(update={"text_document": "paragraph"})
    assert load_documents(by_paragraph) == paragraphs


def test_jsonl(documents, tmp_path):
    for part in range(2):
        rows = [{"id": i, "body": documents[i]} for i in range(part * 4, part * 4 + 4)]
        (tmp_path / f"part{part}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    cfg = TextDataConfig(kind="jsonl", paths=[str(tmp_path / "part*.jsonl")], text_key="body",
                         vocab_size=512, seq_len=64, val_fraction=0.2)
    assert load_documents(cfg) == documents[:8]
    train, val, _ = build_text_datasets(cfg, tmp_path / "run")
    assert len(train) > 0 and len(val) > 0

    wrong_key = cfg.model_copy(update={"text_key": "text"})
    assert any(p.startswith("data.text_key: 'text' is not in") and "'body'" in p
               for p in wrong_key.problems())
    with pytest.raises(ValueError, match="data.text_key"):
        build_text_datasets(wrong_key, tmp_path / "run")
    # a bad row further down is reported by file and line when the documents are read
    with open(tmp_path / "part1.jsonl", "a") as handle:
        handle.write(json.dumps({"id": 99, "content": "no body"}) + "\n")
    with pytest.raises(ValueError, match=r"data.text_key: 'body' is not in .*part1.jsonl line 6"):
        load_documents(cfg)


def test_hf_datasets_from_disk(documents, tmp_path):
    import datasets

    datasets.Dataset.from_dict({"content": documents[:10]}).save_to_disk(tmp_path / "flat")
    cfg = TextDataConfig(kind="hf", hf_path=str(tmp_path / "flat"), text_key="content",
                         vocab_size=512, seq_len=64, val_fraction=0.2)
    assert load_documents(cfg) == documents[:10]
    train, val, _ = build_text_datasets(cfg, tmp_path / "run")
    assert len(train) > 0 and len(val) > 0

    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": documents[:3]}),
        "validation": datasets.Dataset.from_dict({"text": documents[3:6]}),
    }).save_to_disk(tmp_path / "dict")
    split_cfg = TextDataConfig(kind="hf", hf_path=str(tmp_path / "dict"), hf_split="validation")
    assert load_documents(split_cfg) == documents[3:6]
    assert any(p.startswith("data.hf_split: 'test' is not in")
               for p in split_cfg.model_copy(update={"hf_split": "test"}).problems())
    assert any(p.startswith("data.text_key: column 'text' is not in")
               for p in cfg.model_copy(update={"text_key": "text"}).problems())


def test_hf_dataset_name_not_cached_is_a_clear_error(tmp_path):
    cfg = TextDataConfig(kind="hf", hf_path="compt-tests/not-a-cached-dataset",
                         hf_cache_dir=str(tmp_path))
    assert cfg.problems() == []  # a name is only resolved at build time
    with pytest.raises(ValueError, match="data.hf_path: 'compt-tests/not-a-cached-dataset' is "
                                         "neither a local dataset nor in the datasets cache"):
        build_text_datasets(cfg, tmp_path / "run")


# --- config errors ------------------------------------------------------------------------------

@pytest.mark.parametrize("fields, expected", [
    ({"kind": "text"}, "data.paths: missing for kind 'text'"),
    ({"kind": "text", "paths": ["/no/such/file.txt"]}, "data.paths: file '/no/such/file.txt' does not exist"),
    ({"kind": "jsonl", "paths": "/no/such/*.jsonl"}, "data.paths: '/no/such/*.jsonl' matches no file"),
    ({"kind": "text", "paths": ["/tmp"]}, "data.paths: '/tmp' is a directory; give a glob like '/tmp/*.txt'"),
    ({"kind": "jsonl", "paths": "/no/such/*.jsonl", "text_key": ""}, "data.text_key: empty"),
    ({"kind": "hf"}, "data.hf_path: missing for kind 'hf'"),
    ({"kind": "hf", "hf_path": "./no/such/dataset"}, "data.hf_path: './no/such/dataset' does not exist"),
    ({"text_key": "body"}, "data.text_key: only read by kind jsonl and hf, not 'pydoc'"),
    ({"kind": "jsonl", "paths": "/no/*.jsonl", "text_document": "paragraph"},
     "data.text_document: only read by kind text, not 'jsonl'"),
    ({"seq_len": 0}, "data.seq_len: 0 is not a length"),
    ({"val_fraction": 0.0}, "data.val_fraction: 0.0 is not between 0 and 1"),
    ({"val_fraction": 1.5}, "data.val_fraction: 1.5 is not between 0 and 1"),
    ({"vocab_size": 100}, "data.vocab_size: 100 is below 260"),
])
def test_problems_name_the_field_and_the_fix(fields, expected):
    problems = TextDataConfig(**fields).problems()
    assert any(p.startswith(expected) for p in problems), problems
    assert all(";" in p for p in problems)  # every problem says what to do about it


def test_every_problem_is_reported_at_once(tmp_path):
    cfg = TextDataConfig(kind="text", seq_len=0, vocab_size=10, val_fraction=2)
    with pytest.raises(ValueError) as error:
        build_text_datasets(cfg, tmp_path)
    for field in ("data.paths", "data.seq_len", "data.vocab_size", "data.val_fraction"):
        assert field in str(error.value)
    assert not any(tmp_path.iterdir())  # nothing written for a config that cannot build
    assert TextDataConfig().problems() == []


def test_unknown_fields_and_kinds_are_rejected():
    with pytest.raises(ValidationError, match="tokenizer"):
        TextDataConfig(tokenizer="gpt2")
    with pytest.raises(ValidationError, match="kind"):
        TextDataConfig(kind="csv")
