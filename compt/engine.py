"""One DeepSpeed engine per stage: the user's ds_config plus the stage's optimiser,
warmup+cosine schedule, batch sizes and CLIP-style weight-decay groups.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from compt.config import TrainSettings


def read_ds_config(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def zero_stage(ds_config: dict[str, Any]) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def stage_ds_config(base: dict[str, Any], settings: TrainSettings, total_steps: int, world_size: int) -> dict[str, Any]:
    """The engine config for one stage: the user's file with compt's per-stage fields filled in."""
    cfg = copy.deepcopy(base)
    gas = int(cfg.get("gradient_accumulation_steps", 1))
    if settings.batch_size % (world_size * gas):
        raise ValueError(
            f"batch_size {settings.batch_size} is not divisible by ranks x gradient_accumulation_steps "
            f"({world_size} x {gas}); pick a multiple of {world_size * gas}"
        )
    cfg["train_batch_size"] = settings.batch_size
    cfg["train_micro_batch_size_per_gpu"] = settings.batch_size // (world_size * gas)
    cfg["gradient_accumulation_steps"] = gas
    opt = cfg.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = opt.setdefault("params", {})
    params.update(lr=settings.lr, betas=list(settings.betas), eps=settings.eps, weight_decay=settings.weight_decay)
    if opt["type"].lower() in ("adam", "adamw") and not torch.cuda.is_available():
        # DeepSpeed's fused Adam needs CUDA; torch's AdamW is the CPU path.
        params.setdefault("torch_adam", True)
    warmup = min(settings.warmup_steps, max(total_steps - 1, 0))
    cfg["scheduler"] = {
        "type": "WarmupCosineLR",
        "params": {
            "total_num_steps": max(total_steps, 1),
            "warmup_num_steps": warmup,
            "warmup_min_ratio": 0.0,
            "cos_min_ratio": settings.min_lr_ratio,
            "warmup_type": "linear",
        },
    }
    if settings.grad_clip is not None:
        cfg["gradient_clipping"] = settings.grad_clip
    return cfg


def _ds_ndim(p: torch.nn.Parameter) -> int:
    # Under ZeRO-3 a partitioned parameter's .shape is a flat stub; ds_shape is the real one.
    return len(getattr(p, "ds_shape", p.shape))


def no_decay(name: str, p: torch.nn.Parameter) -> bool:
    """CLIP convention: no weight decay on norms, biases, embeddings and the logit scale."""
    return (_ds_ndim(p) < 2 or "ln_" in name or name.endswith(".bias") or "embedding" in name
            or "logit_scale" in name)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, plain = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (plain if no_decay(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def build_engine(model: torch.nn.Module, ds_config: dict[str, Any], weight_decay: float):
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, weight_decay), config=ds_config
    )
    return engine
