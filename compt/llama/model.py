"""LLaMA model configs and models: resolve a config (an inline dict of LlamaConfig fields or an
HF ``config.json``), say what is wrong with one, build transformers' LlamaForCausalLM offline.

A resolved config is a plain dict of every LlamaConfig field with its defaults filled in
(``num_key_value_heads``, ``head_dim``, ``rope_parameters``...), so two configs compare field by
field. With ``tie_word_embeddings`` the LM head *is* the token embedding: the model's
``state_dict()`` lists ``lm_head.weight`` as a second name of that tensor, while safetensors files
(and :func:`llama_state_shapes`) hold it once, as ``model.embed_tokens.weight``.
"""
from __future__ import annotations

import copy
import functools
import json
import math
import os
from pathlib import Path
from typing import Any

import torch

TIED_HEAD = "lm_head.weight"
EMBED = "model.embed_tokens.weight"

# LlamaConfig.to_dict() entries that describe the file, not the model.
_NOT_MODEL = ("transformers_version", "_name_or_path")
_POSITIVE = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim")


def _load_spec(spec: str | os.PathLike | dict[str, Any]) -> dict[str, Any]:
    """The raw dict of ``spec`` (a dict, a config.json, or a folder holding one); ValueError if unreadable."""
    if isinstance(spec, dict):
        return copy.deepcopy(spec)
    if not isinstance(spec, (str, os.PathLike)):
        raise ValueError(f"a LLaMA model config is a dict of LlamaConfig fields or a path to config.json, "
                         f"got {type(spec).__name__}")
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(f"{path}: no such file (give an HF config.json or the folder holding it)")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable JSON config ({e})") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a config.json holds a JSON object, got {type(raw).__name__}")
    return raw


def is_llama_config(raw: dict[str, Any]) -> bool:
    """Whether a raw config dict describes a LLaMA model (``model_type`` or ``architectures`` say so)."""
    if raw.get("model_type") == "llama":
        return True
    archs = raw.get("architectures") or []
    return isinstance(archs, list) and any(isinstance(a, str) and a.startswith("Llama") for a in archs)


def _problem(raw: dict[str, Any]) -> str | None:
    from transformers import LlamaConfig

    model_type = raw.get("model_type")
    if model_type is not None and model_type != "llama":
        return (f"model_type is {model_type!r}; compt.llama builds LlamaForCausalLM, so model_type must be "
                "'llama' (or left out)")
    for key in _POSITIVE:
        v = raw.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            return f"{key} must be a positive int, got {v!r}"
    try:
        cfg = LlamaConfig(**raw)
    except Exception as e:  # noqa: BLE001 - transformers' strict validation raises several types
        msg = " ".join(str(e).split())
        return f"transformers rejects this LlamaConfig: {msg}; fix the field it names"
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        return (f"num_attention_heads ({cfg.num_attention_heads}) is not a multiple of num_key_value_heads "
                f"({cfg.num_key_value_heads}); grouped-query attention needs whole groups: pick a divisor")
    if cfg.head_dim % 2:
        return f"head_dim {cfg.head_dim} is odd; RoPE rotates pairs of channels: use an even head_dim"
    from transformers.activations import ACT2FN

    if cfg.hidden_act not in ACT2FN:
        return f"hidden_act {cfg.hidden_act!r} is unknown; use one of transformers' activations (LLaMA: 'silu')"
    eps = cfg.rms_norm_eps
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        return f"rms_norm_eps must be a finite number >= 0, got {eps!r}"
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope_type = (cfg.rope_parameters or {}).get("rope_type", "default")
    if rope_type != "default" and rope_type not in ROPE_INIT_FUNCTIONS:
        return (f"rope_parameters.rope_type {rope_type!r} is unknown; use 'default' or one of "
                f"{sorted(ROPE_INIT_FUNCTIONS)}")
    if getattr(cfg, "quantization_config", None):
        return "quantization_config is set; compt grows and trains unquantized weights: remove it"
    return None


def llama_config_problem(spec: str | os.PathLike | dict[str, Any]) -> str | None:
    """Why ``spec`` (a dict of LlamaConfig fields or a path to an HF config.json) is not a
    buildable LLaMA config, naming the field and the fix; None when it is fine."""
    try:
        raw = _load_spec(spec)
    except ValueError as e:
        return str(e)
    problem = _problem(raw)
    if problem:
        return problem
    try:
        llama_state_shapes(_canonical(raw))
    except Exception as e:  # noqa: BLE001 - any construction failure is a config problem
        return f"transformers cannot build LlamaForCausalLM from this config: {type(e).__name__}: {e}"
    return None


def _canonical(raw: dict[str, Any]) -> dict[str, Any]:
    from transformers import LlamaConfig

    cfg = LlamaConfig(**raw).to_dict()
    for key in _NOT_MODEL:
        cfg.pop(key, None)
    cfg["architectures"] = ["LlamaForCausalLM"]
    cfg["model_type"] = "llama"
    return cfg


def resolve_llama_config(spec: str | os.PathLike | dict[str, Any]) -> dict[str, Any]:
    """Every LlamaConfig field of ``spec`` (a dict of LlamaConfig fields, a path to an HF
    config.json or the folder holding one), defaults filled in. ValueError naming the bad
    field when it is not a buildable LLaMA config."""
    raw = _load_spec(spec)
    problem = _problem(raw)
    if problem:
        raise ValueError(problem)
    return _canonical(raw)


def _config(cfg: dict[str, Any]):
    from transformers import LlamaConfig

    return LlamaConfig(**{k: v for k, v in cfg.items() if k not in _NOT_MODEL})


def build_llama(cfg: dict[str, Any], dtype: torch.dtype | None = None):
    """transformers' LlamaForCausalLM for config ``cfg`` (a dict of LlamaConfig fields), with
    its own random init (seed it with ``torch.manual_seed``), in ``dtype`` when given. Offline:
    nothing is fetched from the Hub."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(_config(cfg))
    return model.to(dtype) if dtype is not None else model


@functools.lru_cache(maxsize=64)
def _state_shapes(cfg_key: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    with torch.device("meta"):
        model = build_llama(json.loads(cfg_key))
    tied = bool(model.config.tie_word_embeddings)
    return tuple((k, tuple(v.shape)) for k, v in model.state_dict().items() if not (tied and k == TIED_HEAD))


def config_key(cfg: dict[str, Any]) -> str:
    return json.dumps(cfg, sort_keys=True, default=str)


def llama_state_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every stored tensor of LlamaForCausalLM(cfg), in state-dict order, as a
    safetensors file holds them: with tied embeddings there is no separate ``lm_head.weight``.
    Built on the meta device (free); cached."""
    return dict(_state_shapes(config_key(cfg)))
