"""LLaMA FLOPs per training sequence: FlopCounterMode on the meta device agrees with the
closed-form matmul formula (GQA, tied and untied heads, biases, odd head_dim), a real-size
model costs nothing to count, and bad input is a clear error."""
from __future__ import annotations

import pytest

from compt.llama.flops import SequenceFlops, analytic_sequence_flops, count_sequence_flops

TOLERANCE = 0.05  # METHOD.md: counted and analytic figures must agree this closely


def _cfg(**over) -> dict:
    return {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2,
            "num_attention_heads": 4, **over}


CONFIGS = {
    "mha-untied": _cfg(),
    "gqa-tied": _cfg(num_key_value_heads=2, tie_word_embeddings=True),
    "mqa-untied": _cfg(hidden_size=96, num_attention_heads=6, num_key_value_heads=1, num_hidden_layers=3),
    "head-dim-not-width-over-heads": _cfg(head_dim=32, num_key_value_heads=2),
    "biases": _cfg(attention_bias=True, mlp_bias=True, num_key_value_heads=4),
    # TinyLlama-1.1B: GQA 32/4 at its training length; meta tensors make it free to count.
    "tinyllama-1.1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4),
}


def _rel(a: float, b: float) -> float:
    return abs(a - b) / b


CASES = [(name, t) for name in CONFIGS if name != "tinyllama-1.1b" for t in (1, 37, 256)] + [
    ("tinyllama-1.1b", 2048)]


@pytest.mark.parametrize("name,seq_len", CASES)
def test_counted_flops_agree_with_the_formula(name, seq_len):
    cfg = CONFIGS[name]
    counted, analytic = count_sequence_flops(cfg, seq_len), analytic_sequence_flops(cfg, seq_len)
    assert counted.seq_len == analytic.seq_len == seq_len
    assert _rel(counted.forward, analytic.forward) <= TOLERANCE, (counted, analytic)
    assert _rel(counted.train, analytic.train) <= TOLERANCE, (counted, analytic)
    # Backward is every matmul twice more: an input gradient (the embedding trains) and a weight gradient.
    assert counted.train == 3 * counted.forward


def test_the_formula_by_hand_and_per_token_figures():
    # d=64, 4 heads of 16, 2 KV heads, MLP 176, vocab 512, 2 layers, tied; 10 tokens.
    t, d, m, v = 10, 64, 176, 512
    per_layer = 2 * t * d * (64 + 32 + 32 + 64) + 2 * 2 * t * t * 64 + 3 * 2 * t * d * m
    want = 2 * per_layer + 2 * t * d * v
    got = analytic_sequence_flops(CONFIGS["gqa-tied"], t)
    assert got == SequenceFlops(forward=want, train=3 * want, seq_len=t)
    assert got.forward_per_token == want / t and got.train_per_token == 3 * want / t
    # Tying the head saves parameters, not FLOPs.
    assert analytic_sequence_flops({**CONFIGS["gqa-tied"], "tie_word_embeddings": False}, t) == got
    assert count_sequence_flops(CONFIGS["gqa-tied"], t) == count_sequence_flops(
        {**CONFIGS["gqa-tied"], "tie_word_embeddings": False}, t)


def test_attention_is_dense_and_quadratic_in_length():
    cfg = _cfg(num_key_value_heads=2)
    short, long = count_sequence_flops(cfg, 64), count_sequence_flops(cfg, 128)
    # Doubling the length doubles everything but attention, which quadruples: the difference
    # is exactly the extra attention (2 layers x 2 matmuls x 2*T*T*width, dense despite the mask).
    extra_attention = 2 * 2 * 2 * (128 ** 2 - 2 * 64 ** 2) * 64
    assert long.forward - 2 * short.forward == extra_attention


def test_counting_is_memoised_and_accepts_an_hf_config(tmp_path):
    import json

    from transformers import LlamaConfig

    cfg = CONFIGS["gqa-tied"]
    assert count_sequence_flops(cfg, 37) is count_sequence_flops(dict(cfg), 37)
    LlamaConfig(**cfg).to_json_file(tmp_path / "config.json")
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "llama"
    assert count_sequence_flops(str(tmp_path), 37) == count_sequence_flops(cfg, 37)


@pytest.mark.parametrize("seq_len", [0, -3, 2.5, True, "128"])
def test_bad_seq_len_is_a_clear_error(seq_len):
    for fn in (count_sequence_flops, analytic_sequence_flops):
        with pytest.raises(ValueError, match="seq_len must be a positive int"):
            fn(CONFIGS["mha-untied"], seq_len)


def test_bad_config_names_the_field():
    bad = _cfg(num_key_value_heads=3)
    for fn in (count_sequence_flops, analytic_sequence_flops):
        with pytest.raises(ValueError, match="num_key_value_heads"):
            fn(bad, 16)
