"""Text data for language-model chains: a typed TextDataConfig, a byte-level BPE tokenizer trained
and cached per run (or an existing one), map-style datasets of packed token blocks read whole, and
streamed corpora packed in the loader processes (compt.text.stream).

Kinds: built-in pydoc documentation text, text files, JSON lines, Hugging Face datasets (offline).
"""
from compt.text.config import TextDataConfig
from compt.text.corpus import Split, load_documents, pydoc_documents, split_documents
from compt.text.dataset import (PackedTextDataset, TextData, build_text_datasets, inputs_and_targets,
                                token_stream)
from compt.text.stream import TextStream, loader_shares, stream_size
from compt.text.tokenizer import (BOS, EOS, PAD, SPECIAL_TOKENS, UNK, as_transformers, existing_tokenizer,
                                  install_tokenizer, load_or_train_tokenizer, train_tokenizer)

__all__ = [
    "BOS", "EOS", "PAD", "SPECIAL_TOKENS", "UNK", "PackedTextDataset", "Split", "TextData",
    "TextDataConfig", "TextStream", "as_transformers", "build_text_datasets", "existing_tokenizer",
    "inputs_and_targets", "install_tokenizer", "load_documents", "load_or_train_tokenizer", "loader_shares",
    "pydoc_documents", "split_documents", "stream_size", "token_stream", "train_tokenizer",
]
