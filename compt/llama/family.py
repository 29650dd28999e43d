"""What a chain stage needs to know about LLaMA models (the same methods as compt/clip/family.py).

A stage trains next-token prediction on packed token blocks; a grown stage adds
``alpha * T^2 * KL(teacher || student)`` over next-token distributions from the frozen
predecessor. Quality is validation loss / perplexity.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from compt.llama.grow import plan_tensor
from compt.llama.train import (ChainCausalLM, evaluate_lm, export_name, load_state, loss_parts, plan_name,
                               teacher_outputs, train_loader)
from compt.losses import LossParts


class LlamaFamily:
    name = "llama"
    curve_names = ("lm", "distill")
    # transformers initialises and ties weights after construction; build in full, then partition.
    partitioned_build_ok = False

    def build(self, model_cfg: dict, teacher_cfg: dict | None) -> torch.nn.Module:
        return ChainCausalLM(model_cfg)

    def plan(self, name: str, prev_cfg: dict, model_cfg: dict, mode: str, noise: float, seed: int):
        return plan_tensor(plan_name(name), prev_cfg, model_cfg, mode, noise, seed)

    def load_teacher(self, model_cfg: dict, weights: Path) -> torch.nn.Module:
        teacher = ChainCausalLM(model_cfg)
        load_state(teacher, load_file(str(weights)))
        return teacher.eval().requires_grad_(False)

    def loss(self, alpha: float | None, transfer, rank: int, world: int, kernels: str):
        temperature = transfer.temperature if transfer is not None else 1.0

        def step(engine, batch, teacher) -> LossParts:
            t_out = teacher_outputs(teacher, batch.blocks) if teacher is not None and alpha else None
            return loss_parts(engine(batch.blocks, t_out, alpha or 0.0, temperature, kernels))
        return step

    def train_loader(self, train_ds, model_cfg: dict, teacher_cfg: dict | None, **kw):
        return train_loader(train_ds, **kw)

    def init_metrics(self, engine, prev_cfg: dict, probe, model_cfg: dict, val_ds, cfg) -> dict[str, Any]:
        """Where the grown student starts: its validation perplexity next to its teacher's."""
        student = evaluate_lm(engine, val_ds, cfg.eval.batch_size)
        teacher = evaluate_lm(probe, val_ds, cfg.eval.batch_size)
        return {"init_val_loss": student["val_loss"], "init_val_ppl": student["val_ppl"],
                "teacher_val_ppl": teacher["val_ppl"]}

    def evaluate(self, engine, val_ds, model_cfg: dict, cfg) -> dict[str, Any]:
        return evaluate_lm(engine, val_ds, cfg.eval.batch_size)

    def sample_flops(self, model_cfg: dict, data) -> tuple[int, int]:
        """(student train, teacher forward) FLOPs per training sequence of ``data.seq_len`` tokens."""
        from compt.llama.flops import count_sequence_flops

        f = count_sequence_flops(model_cfg, data.seq_len)
        return f.train, f.forward

    def export_name(self, name: str, tensor: torch.Tensor):
        return export_name(name, tensor)

    def is_exported(self, name: str) -> bool:
        return True

    def write_config(self, path: Path, model_cfg: dict) -> None:
        from transformers import LlamaConfig

        config = LlamaConfig(**model_cfg)
        config.architectures = ["LlamaForCausalLM"]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")
        tmp.replace(path)

    def summary(self, metrics: dict[str, Any]) -> dict[str, Any]:
        return {key: metrics.get(key) for key in ("val_loss", "val_ppl", "init_val_ppl", "teacher_val_ppl")}
