"""Training a LLaMA chain stage: the student module (next-token loss + distillation from
the frozen predecessor, in one forward), batches of packed token blocks, and validation
loss / perplexity.

``ChainCausalLM`` wraps transformers' LlamaForCausalLM as ``self.lm`` and computes the
whole loss in its own ``forward``: the token-level KL to the teacher needs the student's
output-embedding weight outside ``lm_head``'s forward, so the weight is registered as an
external parameter of the wrapper and ZeRO-3 gathers it for the wrapper's forward and
backward. Cross-entropy and KL go through ``compt.kernels.fused_lm_head_loss`` together, which
never builds the full [tokens x vocab] logits of either model (at a large vocabulary the largest
tensors of the step otherwise).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch.utils.data import DataLoader

from compt.devices import placement
from compt.kernels import fused_lm_head_loss
from compt.llama.model import TIED_HEAD, build_llama
from compt.partition import full_tensor
from compt.sampler import GlobalBatchSampler
from compt.text.stream import TextStream, stream_loader
from compt.loss import LossParts

PREFIX = "lm."


class ChainCausalLM(torch.nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.lm = build_llama(cfg)
        self.tied = bool(cfg.get("tie_word_embeddings"))
        deepspeed = sys.modules.get("deepspeed")  # only ZeRO-3 needs this, and it has imported deepspeed already
        if deepspeed is not None:
            deepspeed.zero.register_external_parameter(self, self.lm.lm_head.weight)

    def forward(self, blocks: torch.Tensor, teacher: tuple[torch.Tensor, torch.Tensor] | None = None,
                alpha: float = 0.0, temperature: float = 1.0, backend: str = "auto") -> tuple[torch.Tensor, ...]:
        """``blocks`` [B, T+1] token ids; ``teacher`` = (its final hidden states [B, T, d], its lm_head weight).
        Returns (total, next-token cross-entropy) or, distilling, (total, cross-entropy, KL): plain tensors,
        so ZeRO-3's backward hooks can find them; only ``total`` carries gradients. ``backend`` as the
        config's ``kernels`` ("reference": the naive full-logits loss)."""
        inputs, targets = blocks[:, :-1], blocks[:, 1:]
        hidden = self.lm.model(input_ids=inputs).last_hidden_state
        distill = teacher is not None and bool(alpha)
        head = fused_lm_head_loss(hidden, self.lm.lm_head.weight, targets, *(teacher if distill else (None, None)),
                                  alpha=alpha, temperature=temperature, backend=backend)
        return (head.total, head.ce, head.kl) if distill else (head.total, head.ce)


def loss_parts(out: tuple[torch.Tensor, ...]) -> LossParts:
    """LossParts from ChainCausalLM's output: the cross-entropy fills the task slot, the KL the transfer slot."""
    return LossParts(out[0], out[1], out[2] if len(out) > 2 else None)


def teacher_outputs(teacher: ChainCausalLM, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():  # a sharded (ZeRO-3) teacher's head is read outside lm_head's forward: a gathered copy
        return teacher.lm.model(input_ids=blocks[:, :-1]).last_hidden_state, full_tensor(teacher.lm.lm_head.weight)


def export_name(name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor] | None:
    """Wrapper parameter name -> LlamaForCausalLM state-dict name. A tied head is one parameter with the
    embedding, so ``named_parameters`` lists it once, as ``lm.model.embed_tokens.weight``."""
    return name.removeprefix(PREFIX), tensor


def load_state(module: ChainCausalLM, state: dict[str, torch.Tensor]) -> None:
    missing, unexpected = module.lm.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (module.tied and m == TIED_HEAD)]
    if missing or unexpected:
        raise ValueError(f"weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def plan_name(name: str) -> str:
    """The growth plans speak LlamaForCausalLM names."""
    return name.removeprefix(PREFIX)


@dataclass
class TokenBatch:
    blocks: torch.Tensor
    bad: list[str] = field(default_factory=list)  # the token data has no unreadable samples

    def to(self, device, dtype: torch.dtype | None = None, non_blocking: bool = False) -> "TokenBatch":
        return TokenBatch(self.blocks.to(device, non_blocking=non_blocking), self.bad)  # token ids keep their dtype

    def pin_memory(self) -> "TokenBatch":
        """Page-locked blocks (DataLoader's pin_memory thread calls this) for non-blocking copies to a device."""
        return TokenBatch(self.blocks.pin_memory(), self.bad)


def _collate(items: list[torch.Tensor]) -> TokenBatch:
    return TokenBatch(torch.stack(items))


class _Blocks(torch.utils.data.Dataset):
    def __init__(self, ds):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, key):
        return self.ds[key[1] if isinstance(key, tuple) else key]


def train_loader(ds, *, global_batch: int, steps: int, rank: int, world: int, gas: int, seed: int,
                 start_step: int = 0, **options) -> DataLoader:
    """This rank's batches of token blocks; ``options`` are DataLoader kwargs (compt.loading.loader_options).
    Blocks are read, not sampled: no randomness for the worker count to change."""
    if isinstance(ds, TextStream):  # packed in the loader processes; resumed from the step (compt.text.stream)
        return stream_loader(ds, global_batch=global_batch, steps=steps, rank=rank, world=world, gas=gas, seed=seed,
                             start_step=start_step, collate_fn=_collate, **options)
    sampler = GlobalBatchSampler(len(ds), global_batch, steps, rank, world, gas, seed, start_step)
    return DataLoader(_Blocks(ds), batch_sampler=sampler, collate_fn=_collate, **options)


def _val_batches(ds, batch_size: int) -> Iterator[torch.Tensor]:
    for i in range(0, len(ds), batch_size):
        yield torch.stack([ds[j] for j in range(i, min(i + batch_size, len(ds)))])


@torch.no_grad()
def evaluate_lm(model, val_ds, batch_size: int) -> dict:
    """Mean next-token loss over every validation token, and its perplexity."""
    was_training = model.training
    model.eval()
    try:
        total, count = 0.0, 0
        device = placement(model)[0]
        for blocks in _val_batches(val_ds, batch_size):
            ce = model(blocks.to(device))[1]
            n = blocks[:, 1:].numel()
            total += ce.item() * n
            count += n
        loss = total / count
        return {"val_loss": loss, "val_ppl": float(torch.tensor(loss).exp()), "val_tokens": count}
    finally:
        model.train(was_training)
