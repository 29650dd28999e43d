"""Text data for language-model chains: a typed TextDataConfig, a byte-level BPE tokenizer trained
and cached per run, and map-style datasets of packed token blocks.

Kinds: built-in pydoc documentation text, text files, JSON lines, Hugging Face datasets (offline).
"""
from compt.text.config import TextDataConfig
from compt.text.corpus import Split, load_documents, pydoc_documents, split_documents
from compt.text.dataset import (PackedTextDataset, TextData, build_text_datasets, inputs_and_targets,
                                token_stream)
from compt.text.tokenizer import (BOS, EOS, PAD, SPECIAL_TOKENS, UNK, as_transformers,
                                  load_or_train_tokenizer, train_tokenizer)

__all__ = [
    "BOS", "EOS", "PAD", "SPECIAL_TOKENS", "UNK", "PackedTextDataset", "Split", "TextData",
    "TextDataConfig", "as_transformers", "build_text_datasets", "inputs_and_targets",
    "load_documents", "load_or_train_tokenizer", "pydoc_documents", "split_documents",
    "token_stream", "train_tokenizer",
]
