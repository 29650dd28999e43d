"""One DeepSpeed engine per stage: the user's ds_config plus the stage's optimiser,
warmup+cosine schedule, batch sizes, ZeRO buffers sized to the stage's model, and
weight-decay groups (the family says which parameters are not decayed).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Callable

import torch

from compt.config import TrainSettings


PRECISIONS = ("bf16", "fp16")


def read_ds_config(path: str | Path) -> dict[str, Any]:
    """The user's ds_config with ``"enabled": "auto"`` precision sections resolved for this machine."""
    return resolve_precision(json.loads(Path(path).read_text()))


def on_accelerator() -> bool:
    """Whether DeepSpeed's accelerator is a device (CUDA, XPU, HPU, ...) rather than the CPU."""
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() != "cpu"


def resolve_precision(ds_config: dict[str, Any]) -> dict[str, Any]:
    """``"bf16"/"fp16": {"enabled": "auto"}`` (Hugging Face's convention): on where the accelerator supports it,
    off on CPU; bf16 is preferred when both say auto. A section resolved to off is dropped, so the shipped
    configs give CPU runs exactly the engine config (and run fingerprints) they had before "auto" existed."""
    from deepspeed.accelerator import get_accelerator

    cfg = copy.deepcopy(ds_config)
    accel = get_accelerator()
    for key in PRECISIONS:
        section = cfg.get(key)
        if not isinstance(section, dict) or section.get("enabled") != "auto":
            continue
        supported = accel.is_bf16_supported() if key == "bf16" else accel.is_fp16_supported()
        taken = key == "fp16" and (cfg.get("bf16") or {}).get("enabled") is True
        if on_accelerator() and supported and not taken:
            cfg[key] = {**section, "enabled": True}
        else:
            del cfg[key]
    return cfg


def train_dtype(ds_config: dict[str, Any]) -> torch.dtype:
    """The dtype DeepSpeed trains (and holds ZeRO partitions) in: bf16, fp16 or fp32."""
    if (ds_config.get("bf16") or {}).get("enabled") is True:
        return torch.bfloat16
    if (ds_config.get("fp16") or {}).get("enabled") is True:
        return torch.float16
    return torch.float32


def merge_ds_config(base: dict[str, Any], override: dict[str, Any] | None) -> dict[str, Any]:
    """``base`` with a stage's ``deepspeed:`` mapping merged in (nested mappings merge key by key), precision
    "auto" resolved again."""
    def merge(a: dict, b: dict) -> dict:
        out = copy.deepcopy(a)
        for key, value in b.items():
            out[key] = merge(out[key], value) if isinstance(out.get(key), dict) and isinstance(value, dict) \
                else copy.deepcopy(value)
        return out
    return resolve_precision(merge(base, override)) if override else base


def ds_config_notes(ds_config: dict[str, Any], chain_sets_grad_clip: bool) -> list[str]:
    """Where the user's ds_config takes over from the chain's settings, said before any compute."""
    notes = []
    if "scheduler" in ds_config:
        notes.append(f"the ds_config's scheduler ({ds_config['scheduler'].get('type', '?')}) is used; the chain's "
                     "warmup_steps / min_lr_ratio (compt's warmup+cosine) are ignored")
    if "gradient_clipping" in ds_config:
        notes.append(f"the ds_config's gradient_clipping {ds_config['gradient_clipping']} is used"
                     + ("; the chain's grad_clip is ignored" if chain_sets_grad_clip else ""))
    return notes


def zero_stage(ds_config: dict[str, Any]) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


# transformers' DeepSpeed integration fills these "auto" values from the model's hidden size h (its
# trainer_config_finalize); each with the lowest ZeRO stage that uses it. DeepSpeed's own defaults (a 500M-element
# reduce bucket, 50M prefetch, 100k persistence threshold) are the same for a 32-wide test model and a 70B one.
# (lowest ZeRO stage, rule, also filled when the ds_config leaves it out). stage3_prefetch_bucket_size follows its
# rule only where the ds_config says "auto": it bounds what is fetched ahead rather than reserving memory, and
# DeepSpeed 0.19.8 fails a save with "Cannot partition a param in flight" when it is as small as 0.9 h*h for a
# tiny model and the LLaMA wrapper's lm_head is an external parameter (reproduced on 83c6ef6 with only that key set).
ZERO_BUFFERS: dict[str, tuple[int, Callable[[int], int], bool]] = {
    "reduce_bucket_size": (1, lambda h: h * h, True),
    "stage3_prefetch_bucket_size": (3, lambda h: int(0.9 * h * h), False),
    "stage3_param_persistence_threshold": (3, lambda h: 10 * h, True),
}


def zero_buffers(ds_config: dict[str, Any], hidden_size: int | None) -> dict[str, dict[str, Any]]:
    """Each ZeRO buffer the engine uses: ``{"value": n, "from": "ds_config" | "hidden size h"}``. A value the
    ds_config sets wins; one it sets to "auto" (or leaves out, for those ZERO_BUFFERS fills then) follows ZERO_BUFFERS (left to DeepSpeed's default
    without ``hidden_size``; "auto" then is an error naming the field)."""
    zero = ds_config.get("zero_optimization") or {}
    out = {}
    for key, (lowest, rule, when_absent) in ZERO_BUFFERS.items():
        if zero_stage(ds_config) < lowest:
            continue
        value = zero.get(key)
        if value is not None and value != "auto":
            out[key] = {"value": value, "from": "ds_config"}
        elif value is None and not when_absent:
            continue
        elif hidden_size is not None:
            out[key] = {"value": rule(hidden_size), "from": f"hidden size {hidden_size}"}
        elif value == "auto":
            raise ValueError(f"zero_optimization.{key} is \"auto\" but no model size was given to resolve it; "
                             "set a number in the ds_config")
    return out


def stage_ds_config(base: dict[str, Any], settings: TrainSettings, total_steps: int, world_size: int,
                    hidden_size: int | None = None) -> dict[str, Any]:
    """The engine config for one stage: the user's file with compt's per-stage fields filled in;
    ``hidden_size`` (the family's, for the stage's model) sizes the ZeRO buffers the file leaves open."""
    cfg = copy.deepcopy(base)
    buffers = zero_buffers(cfg, hidden_size)
    if buffers:
        cfg["zero_optimization"].update({key: b["value"] for key, b in buffers.items()})
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
    if opt["type"].lower() in ("adam", "adamw") and not on_accelerator():
        # DeepSpeed's fused Adam needs CUDA; torch's AdamW is the CPU path.
        params.setdefault("torch_adam", True)
    warmup = min(settings.warmup_steps, max(total_steps - 1, 0))
    if "scheduler" in base:  # the user's own schedule wins (said before compute: ds_config_notes)
        return _clipping(cfg, base, settings)
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
    return _clipping(cfg, base, settings)


def _clipping(cfg: dict[str, Any], base: dict[str, Any], settings: TrainSettings) -> dict[str, Any]:
    if settings.grad_clip is not None and "gradient_clipping" not in base:  # the ds_config's own value wins
        cfg["gradient_clipping"] = settings.grad_clip
    return cfg


def no_decay_by_name(name: str, p: torch.nn.Parameter) -> bool:
    """open_clip's rule, read from parameter names: no weight decay on norms ("ln_"), biases, embeddings
    ("embedding") and the logit scale, nor on any parameter of fewer than 2 dimensions."""
    ndim = len(getattr(p, "ds_shape", p.shape))  # under ZeRO-3 .shape is a flat stub; ds_shape the real one
    return ndim < 2 or "ln_" in name or name.endswith(".bias") or "embedding" in name or "logit_scale" in name


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


def batch_problems(cfg, ds_base: dict[str, Any], world: int, dataset_size: int | None = None) -> list[str]:
    """Each stage's global batch against the rank count x gradient accumulation (known once ranks exist) and,
    given, the training set's size: said before any stage starts instead of failing inside one."""
    problems = []
    for k, stage in enumerate(cfg.stages):
        batch = stage.settings(cfg.defaults).batch_size
        gas = int(merge_ds_config(ds_base, stage.deepspeed).get("gradient_accumulation_steps", 1))
        if batch % (world * gas):
            problems.append(f"stages.{k} ({stage.name}): batch_size {batch} is not divisible by ranks x "
                            f"gradient_accumulation_steps ({world} x {gas}); pick a multiple of {world * gas}")
        if dataset_size is not None and batch > dataset_size:
            problems.append(f"stages.{k} ({stage.name}): batch_size {batch} is larger than the training set "
                            f"({dataset_size} samples); lower batch_size")
    return problems
