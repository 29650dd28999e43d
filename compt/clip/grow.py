"""Parameter-space growth for open_clip CLIP: how a student tensor is initialised
from the previous (smaller) model of the chain.

The rule is stated per tensor because under ZeRO-3 the trainer gathers one
student parameter at a time: ``source_name`` says which teacher tensor feeds a
student tensor, ``grow_tensor`` computes its new value, and ``grow_state_dict``
is the dense convenience built from those two (there is no second copy of the
rule).

Modes
-----
``official``
    Reproduces the paper's reference code (docs/METHOD.md, "What the reference
    code does"); it is deliberately *not* function-preserving. Every tensor
    present in both models gets its leading block overwritten by the teacher
    tensor (``big[:a, :b, ...] = small``: 1-d prefix, 2-d top-left block
    including the packed attention in_proj, 4-d first output/input channels and
    top-left kernel); the rest keeps the student's init. 0-d and 1-element
    tensors (``logit_scale``) are copied by value.

    Depth: student vision block ``j`` takes teacher vision block
    ``floor(j * L_small / L_big)``. When depth doubles this is exactly the
    reference's "teacher block i -> student blocks 2i and 2i+1"; for equal depth
    it is the identity; for other ratios it generalises the same
    nearest-earlier-block duplication. Text blocks are copied index to index;
    student text blocks beyond the teacher's depth keep their init.
``none``
    Every tensor keeps the student's init.
"""
from __future__ import annotations

import re
from typing import Callable, Mapping

import torch

MODES = ("official", "none")

_VISION_BLOCK = re.compile(r"^(visual\.transformer\.resblocks\.)(\d+)(\..+)$")
_TEXT_BLOCK = re.compile(r"^(transformer\.resblocks\.)(\d+)(\..+)$")

# open_clip's CLIPVisionCfg / CLIPTextCfg default depth.
_DEFAULT_LAYERS = 12


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown growth mode {mode!r}; expected one of {MODES}")


def _layers(cfg: dict, tower: str) -> int:
    tower_cfg = cfg.get(tower, {}) or {}
    layers = tower_cfg.get("layers", _DEFAULT_LAYERS)
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 0:
        raise ValueError(
            f"{tower}.layers must be a non-negative int for a ViT CLIP, got {layers!r} "
            "(ResNet towers are not supported by compt.clip.grow)"
        )
    return layers


def vision_block_source(j: int, small_layers: int, big_layers: int) -> int:
    """Teacher vision block that feeds student vision block ``j``."""
    return (j * small_layers) // big_layers


def _source_official(name: str, small_cfg: dict, big_cfg: dict) -> str | None:
    m = _VISION_BLOCK.match(name)
    if m:
        small_l, big_l = _layers(small_cfg, "vision_cfg"), _layers(big_cfg, "vision_cfg")
        j = int(m.group(2))
        if small_l == 0 or j >= big_l:
            return None
        return f"{m.group(1)}{vision_block_source(j, small_l, big_l)}{m.group(3)}"
    m = _TEXT_BLOCK.match(name)
    if m:
        j = int(m.group(2))
        return name if j < _layers(small_cfg, "text_cfg") else None
    return name


def _source_none(name: str, small_cfg: dict, big_cfg: dict) -> str | None:
    return None


def _is_scalar(t: torch.Tensor) -> bool:
    # compt stores logit_scale as [1] (ZeRO-3 cannot hold 0-d params); stock
    # open_clip stores it 0-d. Both mean "one number".
    return t.ndim <= 1 and t.numel() == 1


def _grow_official(name: str, big_init: torch.Tensor, small: torch.Tensor) -> torch.Tensor:
    if _is_scalar(big_init) and _is_scalar(small):
        return small.detach().reshape(big_init.shape).to(dtype=big_init.dtype, device=big_init.device).clone()
    if small.ndim != big_init.ndim:
        raise ValueError(
            f"cannot grow {name}: teacher shape {tuple(small.shape)} and student shape "
            f"{tuple(big_init.shape)} have different ranks"
        )
    if any(s > b for s, b in zip(small.shape, big_init.shape)):
        raise ValueError(
            f"cannot grow {name}: teacher shape {tuple(small.shape)} is larger than student "
            f"shape {tuple(big_init.shape)} in some dimension (growth never shrinks)"
        )
    out = big_init.detach().clone()
    block = tuple(slice(0, s) for s in small.shape)
    out[block] = small.detach().to(dtype=out.dtype, device=out.device)
    return out


def _grow_none(name: str, big_init: torch.Tensor, small: torch.Tensor) -> torch.Tensor:
    return big_init.detach().clone()


# One entry per mode; a new mode adds a row here and its name to MODES.
_RULES: dict[str, tuple[Callable[..., str | None], Callable[..., torch.Tensor]]] = {
    "official": (_source_official, _grow_official),
    "none": (_source_none, _grow_none),
}


def source_name(name: str, small_cfg: dict, big_cfg: dict, mode: str) -> str | None:
    """Name of the teacher tensor that feeds student tensor ``name``, or None to
    keep the student's init.

    The answer is derived from the configs only and assumes the standard
    open_clip CLIP layout; a returned name the teacher does not actually have
    (a tensor present only in the student) must also be treated as "keep init",
    as ``grow_state_dict`` does.
    """
    _check_mode(mode)
    return _RULES[mode][0](name, small_cfg, big_cfg)


def grow_tensor(name: str, big_init: torch.Tensor, small: torch.Tensor, mode: str) -> torch.Tensor:
    """New value for student tensor ``name`` (same shape, dtype and device as
    ``big_init``) given its teacher tensor ``small``. Inputs are not modified.

    Raises ValueError naming the tensor when ``small`` does not fit inside
    ``big_init``.
    """
    _check_mode(mode)
    return _RULES[mode][1](name, big_init, small)


def grow_state_dict(
    small_sd: Mapping[str, torch.Tensor],
    big_init_sd: Mapping[str, torch.Tensor],
    small_cfg: dict,
    big_cfg: dict,
    mode: str,
) -> dict[str, torch.Tensor]:
    """Grown student state dict: one entry per ``big_init_sd`` key, in its order.
    Teacher tensors that feed nothing are ignored."""
    _check_mode(mode)
    out: dict[str, torch.Tensor] = {}
    for name, big_init in big_init_sd.items():
        src = source_name(name, small_cfg, big_cfg, mode)
        if src is None or src not in small_sd:
            out[name] = big_init.detach().clone()
        else:
            out[name] = grow_tensor(name, big_init, small_sd[src], mode)
    return out
