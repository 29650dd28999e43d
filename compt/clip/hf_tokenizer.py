"""open_clip's CLIP tokenizer as a transformers CLIPTokenizer, built offline from the BPE
file bundled with open_clip (no download): same vocabulary, merges and token ids.

Known difference: open_clip cleans text with ftfy and html.unescape before tokenizing;
transformers' CLIPTokenizer does not, so text with curly quotes, HTML entities or
mojibake can tokenize differently (as with openai/clip-vit-* on the Hub).
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# open_clip keeps the first 49152 - 256 - 2 merges of its BPE file (SimpleTokenizer).
N_MERGES = 49152 - 256 - 2


def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """The vocabulary (token -> id) and merges ("a b") open_clip's SimpleTokenizer uses.

    Ids follow SimpleTokenizer: 256 byte symbols, the same with '</w>', one token per
    merge, then start/end of text (49406, 49407), under transformers' special-token names.
    """
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = lines[1:N_MERGES + 1]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def clip_tokenizer(context_length: int):
    """A transformers CLIPTokenizer giving open_clip's ids up to and including the end token.

    Padding uses the end token (transformers' CLIP default) where open_clip pads with 0:
    with the causal text mask and pooling at the first end token the embeddings are the same.
    """
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges],
                         bos_token=BOS, eos_token=EOS, unk_token=EOS, pad_token=EOS,
                         model_max_length=context_length)


def write_bpe_files(out: Path) -> None:
    """vocab.json and merges.txt, for loaders that build the tokenizer from those rather than
    tokenizer.json (older transformers' slow CLIPTokenizer)."""
    vocab, merges = clip_vocab_and_merges()
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
