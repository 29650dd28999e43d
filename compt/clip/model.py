"""The CLIP family: model configs, building models (ZeRO-3-safe), and their preprocessing.

open_clip builds the model; compt only keeps ``logit_scale`` as a 1-element tensor
(DeepSpeed 0.19.8 cannot hold 0-d parameters under ZeRO-3) and converts on export.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import open_clip
import torch
from torch import nn

# Stage weights are stored for stock open_clip: logit_scale is 0-d there.
SCALAR_PARAMS = ("logit_scale",)


def resolve_model_config(model: str | dict[str, Any]) -> dict[str, Any]:
    """An open_clip model config dict from a built-in name or an inline dict."""
    if isinstance(model, dict):
        return copy.deepcopy(model)
    cfg = open_clip.get_model_config(model)
    if cfg is None:
        raise ValueError(f"unknown open_clip model '{model}'")
    return copy.deepcopy(cfg)


def model_config_problem(model: str | dict[str, Any]) -> str | None:
    """Why ``model`` cannot be a chain stage, or None. Builds it on the meta device (free)."""
    if isinstance(model, str) and open_clip.get_model_config(model) is None:
        close = [m for m in open_clip.list_models() if m.lower().startswith(model.lower()[:5])][:5]
        return (f"unknown open_clip model '{model}'; use a built-in name (e.g. {', '.join(close) or 'ViT-B-16'}) "
                "or an inline model config dict")
    cfg = resolve_model_config(model)
    unsupported = [k for k in ("custom_text", "multimodal_cfg") if cfg.get(k)]
    if unsupported or cfg.get("text_cfg", {}).get("hf_model_name") or cfg.get("vision_cfg", {}).get("timm_model_name"):
        return "only open_clip's standard CLIP (ViT image tower + transformer text tower) is supported for now"
    try:
        with torch.device("meta"):
            build_clip(cfg)
    except Exception as e:  # noqa: BLE001 - any construction failure is a config problem
        return f"open_clip cannot build this config: {type(e).__name__}: {e}"
    return None


def count_params(cfg: dict[str, Any]) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build_clip(cfg).parameters())


def _dims(cfg: dict[str, Any]) -> dict[str, int]:
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    v_head = v.get("head_width", 64)
    return {
        "embed_dim": cfg["embed_dim"],
        "vision_cfg.width": v["width"],
        "vision_cfg.layers": v["layers"],
        "vision_cfg.heads": v["width"] // v_head,
        "vision_cfg.mlp_width": int(v["width"] * v.get("mlp_ratio", 4.0)),
        "vision_cfg.image_size": v["image_size"],
        "text_cfg.width": t["width"],
        "text_cfg.layers": t["layers"],
        "text_cfg.heads": t["heads"],
        "text_cfg.mlp_width": int(t["width"] * t.get("mlp_ratio", 4.0)),
        "text_cfg.context_length": t.get("context_length", 77),
        "text_cfg.vocab_size": t.get("vocab_size", 49408),
    }


def size_problem(small: dict[str, Any], big: dict[str, Any]) -> str | None:
    """Why ``big`` cannot grow from ``small`` (must be no smaller anywhere and larger overall)."""
    if small["vision_cfg"]["patch_size"] != big["vision_cfg"]["patch_size"]:
        return (f"patch_size {big['vision_cfg']['patch_size']} differs from the predecessor's "
                f"{small['vision_cfg']['patch_size']}; chain models must share the patch size")
    ds, db = _dims(small), _dims(big)
    smaller = [f"{k} {db[k]} < {ds[k]}" for k in ds if db[k] < ds[k]]
    if smaller:
        return f"not larger than its predecessor ({', '.join(smaller)}); order stages smallest first"
    if count_params(big) <= count_params(small):
        return "has no more parameters than its predecessor; every stage must be strictly larger"
    return None


class ChainCLIP(open_clip.CLIP):
    """open_clip's CLIP with a 1-element logit_scale (ZeRO-3-safe) and an optional
    alignment projection (student embed_dim -> teacher embed_dim), which is not exported."""

    def __init__(self, model_cfg: dict[str, Any], align_to_dim: int | None = None):
        super().__init__(**model_cfg, nonscalar_logit_scale=True)
        self.align_proj = None
        if align_to_dim is not None and align_to_dim != model_cfg["embed_dim"]:
            self.align_proj = nn.Linear(model_cfg["embed_dim"], align_to_dim, bias=False)

    def forward(self, image=None, text=None):
        # The projection runs inside forward so ZeRO-3 gathers its weight with the rest.
        out = super().forward(image, text)
        if self.align_proj is None:
            return out
        proj = [self.align_proj(x) if x is not None else None for x in out[:2]]
        return (*out, *proj)


def build_clip(model_cfg: dict[str, Any], align_to_dim: int | None = None) -> ChainCLIP:
    return ChainCLIP(model_cfg, align_to_dim)


def export_name_and_tensor(name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor] | None:
    """Map a compt parameter to stock open_clip (None = not exported)."""
    if name.startswith("align_proj."):
        return None
    if name in SCALAR_PARAMS:
        return name, tensor.reshape(())
    return name, tensor


def load_into(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load stock open_clip weights (0-d logit_scale) into a ChainCLIP."""
    own = dict(model.named_parameters())
    fixed = {k: (v.reshape(own[k].shape) if k in own and k in SCALAR_PARAMS else v) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(fixed, strict=False)
    missing = [m for m in missing if not m.startswith("align_proj.")]
    if missing or unexpected:
        raise ValueError(f"weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


@dataclass
class Preprocess:
    """open_clip's image transforms and tokenizer for one model config."""

    train_transform: Callable
    eval_transform: Callable
    tokenizer: Callable
    key: str  # equal keys = identical preprocessing (a teacher can reuse the student's tensors)


def preprocess_for(model_cfg: dict[str, Any]) -> Preprocess:
    v, t = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    size = v["image_size"]
    mean = model_cfg.get("preprocess_cfg", {}).get("mean")
    std = model_cfg.get("preprocess_cfg", {}).get("std")
    ctx = t.get("context_length", 77)
    if t.get("hf_tokenizer_name"):
        tok = open_clip.get_tokenizer(f"hf-hub:{t['hf_tokenizer_name']}", context_length=ctx)
    else:
        tok = open_clip.SimpleTokenizer(context_length=ctx)
    key = json.dumps([size, mean, std, ctx, t.get("hf_tokenizer_name")])
    return Preprocess(
        train_transform=open_clip.image_transform(size, is_train=True, mean=mean, std=std),
        eval_transform=open_clip.image_transform(size, is_train=False, mean=mean, std=std),
        tokenizer=tok,
        key=key,
    )


def write_model_config(path: Path, model_cfg: dict[str, Any]) -> None:
    path.write_text(json.dumps(model_cfg, indent=2) + "\n")
