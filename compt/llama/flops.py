"""Training cost of one LLaMA (LlamaForCausalLM) sequence, in FLOPs: counted with FlopCounterMode
on the meta device, with the closed-form matmul formula beside it as a cross-check.

Conventions are compt.clip.flops' (a matmul [m,k] x [k,n] is 2*m*n*k FLOPs; only matmuls count;
attention is dense, causal mask or not), plus, for a language model:
- One sample is one training sequence of ``seq_len`` tokens, batch 1.
- ``forward`` includes the LM head's logits at *every* position (2 * seq_len * hidden * vocab):
  distillation compares the teacher's and the student's full distributions at every token.
  The distillation loss (``kernels.fused_linear_kl``) computes both models' logits itself, a
  chunk at a time, from the last hidden states and the lm_head weights, not in the model's
  forward; the matmuls are the same, so counting them in the model's forward counts them once.
  Softmax, log-softmax and the KL are elementwise and not counted.
- ``train`` is the student's forward + backward: 3x the forward's matmuls, since every linear
  layer computes an input gradient (the token embedding is trained) and a weight gradient. The
  fused loss computes the lm_head's two gradient matmuls in its forward pass and only scales
  them in backward: the same three matmuls, so the same count.
- Tied embeddings cost the same FLOPs as an untied head (the lookup is free, the head is a matmul).
- Grouped-query attention shares K/V projections (fewer FLOPs there), but attention scores
  and values are computed per *query* head.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

import torch

from compt.flops import count_flops
from compt.llama.model import build_llama, resolve_llama_config


@dataclass(frozen=True)
class SequenceFlops:
    """FLOPs for one training sequence of ``seq_len`` tokens."""

    forward: int  # eval forward incl. lm_head logits at every position (what a teacher pays)
    train: int  # forward + backward of the same, in train mode (what the student pays)
    seq_len: int

    @property
    def forward_per_token(self) -> float:
        return self.forward / self.seq_len

    @property
    def train_per_token(self) -> float:
        return self.train / self.seq_len


def _check_seq_len(seq_len: Any) -> int:
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int (tokens per training sequence, data.seq_len), "
                         f"got {seq_len!r}")
    return seq_len


# ---------------------------------------------------------------------------
# Counted: FlopCounterMode on the meta device.
# ---------------------------------------------------------------------------

def count_sequence_flops(cfg: dict[str, Any], seq_len: int) -> SequenceFlops:
    """FLOPs for one sequence, counted by running LlamaForCausalLM(cfg) on meta tensors (free
    even for 70B). ``cfg``: LlamaConfig fields (resolved or not). ValueError names a bad field."""
    seq_len = _check_seq_len(seq_len)
    # Memoised on the resolved config's JSON: cost tables ask again for every stage and model.
    return _count_cached(json.dumps(resolve_llama_config(cfg), sort_keys=True, default=str), seq_len)


@functools.lru_cache(maxsize=None)
def _count_cached(cfg_json: str, seq_len: int) -> SequenceFlops:
    cfg = json.loads(cfg_json)
    with torch.device("meta"):
        model = build_llama(cfg)
    # Token ids only feed the embedding lookup, so uninitialised meta ids are fine.
    ids = torch.zeros(1, seq_len, dtype=torch.long, device="meta")

    model.eval()
    with torch.no_grad():
        forward = count_flops(lambda: model(input_ids=ids))

    # The backward really runs on meta (sdpa and every other op LLaMA uses has meta kernels).
    model.train()
    train = count_flops(lambda: model(input_ids=ids).logits.sum().backward())
    return SequenceFlops(forward=forward, train=train, seq_len=seq_len)


# ---------------------------------------------------------------------------
# Analytic: closed-form matmul FLOPs.
# ---------------------------------------------------------------------------

def analytic_sequence_flops(cfg: dict[str, Any], seq_len: int) -> SequenceFlops:
    """FLOPs for one sequence from the config alone: 2*m*n*k per matmul, backward = 2x forward.

    Per layer: q/o projections (hidden x heads*head_dim), k/v projections (hidden x
    kv_heads*head_dim), dense attention scores and values per query head, SwiGLU's gate/up/down;
    then the LM head over the whole vocabulary. Biases, norms, RoPE and the activation are not
    matmuls and are left out, as FlopCounterMode leaves them out."""
    seq_len = _check_seq_len(seq_len)
    c = resolve_llama_config(cfg)
    t, d, m, v = seq_len, c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    q_width = c["num_attention_heads"] * c["head_dim"]
    kv_width = c["num_key_value_heads"] * c["head_dim"]
    projections = 2 * t * d * (2 * q_width + 2 * kv_width)  # q, o; k, v
    attention = 2 * 2 * t * t * q_width  # QK^T and AV, summed over query heads
    mlp = 3 * 2 * t * d * m  # gate, up, down
    forward = c["num_hidden_layers"] * (projections + attention + mlp) + 2 * t * d * v
    return SequenceFlops(forward=forward, train=3 * forward, seq_len=seq_len)
