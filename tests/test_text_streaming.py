"""compt.text at scale, as a user configures it: streamed JSONL/text/HF corpora tokenized in the loader
processes (disjoint shards, resumed by step), existing tokenizers, the memory budget of the in-memory path,
and one streamed chain through the launcher on a JSONL larger than that budget."""
from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from compt.config import ChainConfigError, load_chain
from compt.faults import StageFailed
from compt.text import (TextDataConfig, as_transformers, build_text_datasets, existing_tokenizer, loader_shares,
                        pydoc_documents, token_stream, train_tokenizer)
from compt.text.stream import documents, held_out, shard_texts, stream_loader
from compt.text.tokenizer import TOKENIZER_FILE
from conftest import DS, deepspeed_launch, stage_metrics, write_chain

SEQ = 16


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """60 documents, each starting with its own number (so every one is told apart by its text)."""
    root = tmp_path_factory.mktemp("corpus")
    docs = pydoc_documents()
    with open(root / "part0.jsonl", "w") as a, open(root / "part1.jsonl", "w") as b:
        for i in range(60):
            (a if i < 35 else b).write(json.dumps({"text": f"document {i}: {docs[i][:400]}"}) + "\n")
            if i == 10:
                a.write("\n")  # a blank line is no document
    return root


@pytest.fixture(scope="module")
def given_tokenizer(tmp_path_factory) -> Path:
    """A tokenizer.json trained here (no hub): compt's own recipe at a small vocabulary."""
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer(pydoc_documents()[:80], 384).save(str(path))
    return path


def stream_cfg(corpus: Path, tokenizer: Path, **fields) -> TextDataConfig:
    return TextDataConfig(**{"kind": "jsonl", "paths": [str(corpus / "*.jsonl")], "streaming": True,
                             "val_documents": 5, "seq_len": SEQ, "tokenizer_path": str(tokenizer),
                             "shuffle_blocks": 20, **fields})


def loader_batches(ds, *, steps: int, start_step: int = 0, rank: int = 0, world: int = 1, gas: int = 1,
                   workers: int = 0, data_state: dict | None = None, global_batch: int = 4) -> list[torch.Tensor]:
    loader = stream_loader(ds, global_batch=global_batch, steps=steps, rank=rank, world=world, gas=gas, seed=7,
                           start_step=start_step, data_state=data_state, num_workers=workers)
    return list(loader)


# --- which loader process serves what ---------------------------------------------------------------------------

@pytest.mark.parametrize("steps, gas, loaders, start", [(7, 1, 1, 0), (7, 1, 3, 4), (9, 2, 2, 5), (5, 3, 4, 1),
                                                       (6, 1, 4, 6)])
def test_loader_shares_serve_every_micro_batch_once(steps, gas, loaders, start):
    micro = 3
    before, after = loader_shares(steps, gas, micro, loaders, 0), loader_shares(steps, gas, micro, loaders, start)
    # Uninterrupted: micro-batch j from shard j mod loaders, each shard's blocks in order.
    served = {q: [] for q in range(loaders)}
    for j in range(steps * gas):
        served[j % loaders].append(j)
    assert [s.take for s in sorted(before)] == [micro * len(served[q]) for q in range(loaders)]
    # Resumed: worker w (asked in turn from the first batch) plays the shard that served micro-batch start x gas + w.
    for w, share in enumerate(after):
        later = list(range(start * gas + w, steps * gas, loaders))
        assert all(j % loaders == share.role for j in later)
        assert share.skip == micro * sum(1 for j in served[share.role] if j < start * gas)
        assert share.take == micro * len(later)
    assert sum(s.skip + s.take for s in after) == steps * gas * micro


@pytest.mark.parametrize("workers, gas", [(0, 1), (2, 1), (3, 2)])
def test_a_resumed_stream_continues_without_replay(corpus, given_tokenizer, tmp_path, workers, gas):
    ds = build_text_datasets(stream_cfg(corpus, given_tokenizer), tmp_path).train
    whole = loader_batches(ds, steps=6, gas=gas, workers=workers)
    assert len(whole) == 6 * gas and all(b.shape == (4 // gas, SEQ + 1) for b in whole)
    state = {"ranks": 1, "loader_processes": max(1, workers), "global_batch": 4, "gradient_accumulation_steps": gas,
             "seq_len": SEQ, "seed": 7}
    resumed = loader_batches(ds, steps=6, start_step=4, gas=gas, workers=workers, data_state=state)
    assert len(resumed) == 2 * gas
    for a, b in zip(whole[4 * gas:], resumed):
        assert torch.equal(a, b)  # the very batches the uninterrupted stage trained on, in order
    seen = {tuple(block.tolist()) for batch in whole[:4 * gas] for block in batch}
    assert not seen & {tuple(block.tolist()) for batch in resumed for block in batch}  # nothing trained twice
    with pytest.raises(StageFailed, match="rerun with the ranks and data.workers it started with"):
        loader_batches(ds, steps=6, start_step=4, gas=gas, workers=workers + 2, data_state=state)


def test_shards_are_disjoint_across_ranks_and_workers(corpus, given_tokenizer, tmp_path):
    cfg = stream_cfg(corpus, given_tokenizer, shuffle_blocks=0)
    every = [d.text for d in documents(cfg, lambda i: True)]
    assert len(every) == 60 and every[:2] == [f"document {i}: {pydoc_documents()[i][:400]}" for i in range(2)]
    train = every[held_out(cfg):]
    owned = []
    for shard in range(4):  # 2 ranks x 2 loader processes
        texts = shard_texts(cfg, shard, 4)
        owned.append([next(texts) for _ in range(len(train[shard::4]))])
        assert next(texts) == owned[-1][0]  # then the next pass, in the same order
    assert sorted(t for part in owned for t in part) == sorted(train)
    assert sum(len(set(part)) for part in owned) == len(set(train))  # no document in two shards
    # What the DataLoader processes of each rank serve is packed from their own shard's documents only.
    ds = build_text_datasets(cfg, tmp_path).train
    tok = Tokenizer.from_file(str(given_tokenizer))
    for rank in range(2):
        batches = loader_batches(ds, steps=3, rank=rank, world=2, workers=2)  # micro 2: 2 blocks a batch
        for w in range(2):
            served = torch.cat([b.flatten() for b in batches[w::2]]).numpy()
            mine = token_stream(tok, owned[rank * 2 + w], existing_tokenizer(given_tokenizer).eos_id)
            assert np.array_equal(served, mine[:len(served)])
    val = build_text_datasets(cfg, tmp_path).val
    assert val.document_ids == tuple(range(5)) and np.array_equal(
        val.tokens, token_stream(tok, every[:5], existing_tokenizer(given_tokenizer).eos_id))


def test_text_paragraphs_and_hf_datasets_stream_in_corpus_order(tmp_path):
    import datasets

    texts = [f"paragraph {i} with some words" for i in range(12)]
    (tmp_path / "book.txt").write_text("\n\n".join(texts[:7]) + "\n \n\n" + "\n\n".join(texts[7:]) + "\n")
    book = TextDataConfig(kind="text", paths=[str(tmp_path / "book.txt")], text_document="paragraph",
                          streaming=True, val_documents=2)
    assert [d.text for d in documents(book, lambda i: True)] == texts
    datasets.Dataset.from_dict({"body": texts}).save_to_disk(tmp_path / "saved")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "train.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    for where in ("saved", "folder"):  # save_to_disk, and load_dataset(streaming=True) of a local data folder
        hf = TextDataConfig(kind="hf", hf_path=str(tmp_path / where), text_key="body", streaming=True,
                            val_documents=2)
        assert hf.problems() == []
        assert [d.text for d in documents(hf, lambda i: True)] == texts
        for shard in range(3):  # train document i (after the 2 held out) is loader process i mod 3's
            assert list(itertools.islice(shard_texts(hf, shard, 3), 3)) == texts[2 + shard::3][:3]


def test_a_stream_trains_its_tokenizer_on_a_bounded_sample(corpus, tmp_path):
    cfg = TextDataConfig(kind="jsonl", paths=[str(corpus / "*.jsonl")], streaming=True, val_documents=5,
                         seq_len=SEQ, vocab_size=300, tokenizer_sample_bytes=3000)
    data = build_text_datasets(cfg, tmp_path)
    record = json.loads((tmp_path / "tokenizer.fingerprint.json").read_text())
    texts = [d.text for d in documents(cfg, lambda i: i >= 5)]
    assert record["documents"] == next(n for n in range(1, 60) if sum(len(t.encode()) for t in texts[:n]) >= 3000)
    assert len(data.tokenizer) <= 300 and len(data.val) > 0


# --- existing tokenizers ----------------------------------------------------------------------------------------

def test_an_existing_tokenizer_json_is_used_and_carried(corpus, given_tokenizer, tmp_path):
    cfg = TextDataConfig(kind="jsonl", paths=[str(corpus / "*.jsonl")], seq_len=SEQ,
                         tokenizer_path=str(given_tokenizer))
    assert cfg.problems() == [] and cfg.tokenizer_size() == 384
    train, val, tokenizer = build_text_datasets(cfg, tmp_path / "run")
    tok = Tokenizer.from_file(str(given_tokenizer))
    docs = [json.loads(line)["text"] for f in sorted(corpus.glob("*.jsonl")) for line in f.read_text().splitlines()
            if line.strip()]
    assert np.array_equal(train.tokens, token_stream(tok, [docs[i] for i in train.document_ids]))
    assert not (tmp_path / "run" / "tokenizer.fingerprint.json").exists()  # nothing trained
    carried = as_transformers(tmp_path / "run" / TOKENIZER_FILE)  # what `compt export` writes out
    assert carried("a b")["input_ids"] == tokenizer("a b")["input_ids"] == [1] + tok.encode("a b", add_special_tokens=False).ids
    assert TextDataConfig(tokenizer_path=str(given_tokenizer), vocab_size=512).problems() == [
        f"data.vocab_size: 512 differs from the 384 tokens of data.tokenizer_path '{given_tokenizer}', which "
        "decides the vocabulary; remove data.vocab_size"]


def test_a_transformers_tokenizer_folder_is_used_and_carried(corpus, tmp_path, monkeypatch):
    from tokenizers import models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.train_from_iterator(pydoc_documents()[:40], trainers.BpeTrainer(
        vocab_size=350, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>").save_pretrained(tmp_path / "gpt-like")
    eos = raw.token_to_id("<|endoftext|>")
    for streaming in (False, True):
        cfg = (stream_cfg(corpus, tmp_path / "gpt-like") if streaming else
               TextDataConfig(kind="jsonl", paths=[str(corpus / "*.jsonl")], seq_len=SEQ,
                              tokenizer_path=str(tmp_path / "gpt-like")))
        assert cfg.problems() == [] and cfg.tokenizer_size() == len(AutoTokenizer.from_pretrained(tmp_path / "gpt-like"))
        run = tmp_path / f"run-{streaming}"
        data = build_text_datasets(cfg, run)
        assert int((data.val.tokens == eos).sum()) == len(data.val.document_ids)  # its eos ends each document
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        carried = AutoTokenizer.from_pretrained(run)  # the run's copy, as an export ships it
        assert carried.eos_token == "<|endoftext|>" and carried("def f()")["input_ids"] == raw.encode("def f()").ids
    assert "data.tokenizer_path: '/no/such' does not exist" in TextDataConfig(tokenizer_path="/no/such").problems()[0]


# --- config edge ------------------------------------------------------------------------------------------------

def tiny_llama(vocab: int = 512) -> dict:
    return {"vocab_size": vocab, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "max_position_embeddings": 32,
            "tie_word_embeddings": True}


def test_config_edge_names_fields_and_fixes(corpus, given_tokenizer, tmp_path):
    base = {"name": "s", "family": "llama", "data": {"kind": "jsonl", "paths": [str(corpus / "*.jsonl")],
                                                     "streaming": True, "seq_len": SEQ, "val_fraction": 0.1,
                                                     "tokenizer_path": str(given_tokenizer)},
            "stages": [{"name": "a", "model": tiny_llama(256), "budget": {"epochs": 1}}]}
    with pytest.raises(ChainConfigError) as error:
        load_chain(str(write_chain(tmp_path / "bad.yaml", base)), DS)
    text = str(error.value)
    for expected in ("stages.0.budget.epochs: the training data is streamed and its size is not declared",
                     "data.val_documents: a stream needs a held-out part", "data.val_fraction: not read with "
                     "data.streaming: true", "stages.0.model.vocab_size: 256 is below the 384 tokens of "
                     "data.tokenizer_path"):
        assert expected in text, text
    assert TextDataConfig(kind="pydoc", streaming=True, val_documents=3).problems()[0].startswith("data.streaming:")
    with pytest.raises(ValueError, match="data.val_documents: the corpus has no document after the 60 held out"):
        build_text_datasets(stream_cfg(corpus, given_tokenizer, val_documents=60), tmp_path / "run")


def test_the_in_memory_path_refuses_a_corpus_over_its_memory_budget(corpus):
    size = sum(f.stat().st_size for f in corpus.glob("*.jsonl"))
    cfg = TextDataConfig(kind="jsonl", paths=[str(corpus / "*.jsonl")], max_memory_bytes=size)
    (problem,) = cfg.problems()
    assert problem.startswith(f"data.max_memory_bytes: the corpus holds {size:,} bytes") and \
        "set data.streaming: true" in problem
    assert TextDataConfig(kind="jsonl", paths=[str(corpus / "*.jsonl")], max_memory_bytes=100 * size).problems() == []


# --- a streamed chain through the launcher ------------------------------------------------------------------------

def test_a_streamed_chain_trains_from_a_jsonl_over_the_memory_budget(corpus, tmp_path):
    """One rank with a loader process, a given transformers tokenizer folder, a checkpoint mid-stage (the
    stream's layout goes into it); then the export carries that tokenizer. Disjoint shards across ranks and
    resuming are the unit tests above: a second launch would cost CI another ~40 s."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from compt.llama.export import export, read_run

    raw = train_tokenizer(pydoc_documents()[:40], 320)
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>", bos_token="<s>").save_pretrained(tmp_path / "tok")
    budget = sum(f.stat().st_size for f in corpus.glob("*.jsonl")) // 2
    data = {"kind": "jsonl", "paths": [str(corpus / "*.jsonl")], "seq_len": SEQ, "tokenizer_path": str(tmp_path / "tok"),
            "max_memory_bytes": budget, "workers": 1}
    chain = {"name": "streamed", "family": "llama", "seed": 0, "data": data, "eval": {"batch_size": 16},
             "defaults": {"lr": 3.0e-3, "warmup_steps": 1, "batch_size": 8, "log_every": 1, "checkpoint_every_steps": 2},
             "stages": [{"name": "a", "model": tiny_llama(), "budget": {"steps": 4}}]}
    with pytest.raises(ChainConfigError, match="data.max_memory_bytes: the corpus holds"):
        load_chain(str(write_chain(tmp_path / "in-memory.yaml", chain)), DS)
    streamed = copy.deepcopy(chain)
    streamed["data"] = {**{k: v for k, v in data.items() if k != "max_memory_bytes"}, "streaming": True,
                        "val_documents": 4, "shuffle_blocks": 8}
    run = tmp_path / "run"
    deepspeed_launch(["--num_gpus", "1", "launch/chain.py", "--chain", str(write_chain(tmp_path / "s.yaml", streamed)),
                      "--ds_config", DS, "--output", str(run)], 29811)
    metrics = stage_metrics(run, 0, "a")
    assert metrics["ranks"] == 1 and metrics["samples_seen"] == 32 and metrics["val_ppl"] < 512
    out = export(read_run(run), tmp_path / "export")
    assert out is not None
    shipped = AutoTokenizer.from_pretrained(tmp_path / "export")
    assert shipped("def f(x)")["input_ids"][1:] == raw.encode("def f(x)", add_special_tokens=False).ids
    assert len(shipped) == raw.get_vocab_size()
