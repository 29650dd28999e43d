"""One DeepSpeed engine per stage: the user's ds_config plus the stage's optimiser,
warmup+cosine schedule, batch sizes and weight-decay groups (the family says which
parameters are not decayed).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Callable

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


def param_groups(model: torch.nn.Module, weight_decay: float,
                 no_decay: Callable[[str, torch.nn.Parameter], bool]) -> list[dict[str, Any]]:
    """Two AdamW groups: decayed, and what the family's ``no_decay(name, param)`` exempts."""
    decay, plain = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (plain if no_decay(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def build_engine(model: torch.nn.Module, ds_config: dict[str, Any], weight_decay: float,
                 no_decay: Callable[[str, torch.nn.Parameter], bool]):
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, weight_decay, no_decay), config=ds_config
    )
    return engine
