"""Parameter-space growth for open_clip CLIP: how a student tensor is initialised
from the previous (smaller) model of the chain.

Every rule is a per-tensor :class:`~compt.growth.TensorPlan` (index map +
scale + fill, see compt/growth.py): ``plan_tensor`` builds it from the two model configs,
``TensorPlan.dense`` computes the whole tensor and ``TensorPlan.flat_slice`` any flat
slice of it (a ZeRO-3 rank's partition) with the same per-element code.
``source_name``, ``grow_tensor`` and ``grow_state_dict`` are thin wrappers over plans.

Modes
-----
``exact`` (function-preserving; docs/METHOD.md "Doing better than the reference")
    The grown model computes the small model's image and text embeddings (padded with
    zeros when embed_dim grows) for every valid input: tokens below the teacher's vocab,
    EOT (argmax) within the teacher's context. Per tower, with residual width d -> d',
    ``q = d' // d`` and head width fixed:

    * Residual stream: the student stream is the teacher stream tiled ``q`` times
      (channel ``c`` of copy ``k`` is at ``k*d + c``). Writers (conv1 output channels,
      class/positional embeddings, token embedding columns, ln_pre, attn.out_proj and
      mlp.c_proj rows and biases) are tiled. LayerNorms that read the stream (ln_1, ln_2,
      ln_post, ln_final) are tiled: a tiled vector has the same mean and variance.
      Readers (attn.in_proj and mlp.c_fc columns, visual.proj and text_projection rows)
      take ``W/q`` per copy.
    * Heads: the head width must not change (else ValueError). The student's heads are
      ``q`` duplicates of every teacher head, respecting the packed in_proj layout (q, k,
      v blocks; heads contiguous in each), so the concatenated attention output is the
      teacher's tiled ``q`` times; out_proj columns take ``W/q`` per copy. Heads beyond
      ``q * heads`` (only with a non-integer ratio) are new: random Q/K/V rows, zero bias,
      zero out_proj columns.
    * MLP hidden width m -> m': ``q_m = m' // m`` duplicates of every teacher unit with
      c_proj columns split ``1/q_m``; the remaining ``m' - q_m*m`` units are new: random
      c_fc rows, zero c_fc bias, zero c_proj columns.
    * Depth L -> L' (any L' >= L, each tower): student block ``j`` copies teacher block
      ``floor(j * L / L')`` (the ``official`` vision map). The first student block of each
      group is the grown teacher block; the ones after it are copies whose attn.out_proj
      and mlp.c_proj (weights and biases) are zero, so each is the identity on the stream
      while its LayerNorms, in_proj and c_fc are the teacher block's (nothing is a zero
      LayerNorm gain, and gradients flow to every tensor).
    * embed_dim e -> e': visual.proj / text_projection columns beyond e are zero, so the
      embeddings are the teacher's "up to zero padding": ``[emb, 0...]``, and the
      normalised ones ``[emb/|emb|, 0...]``.
    * Vocab and context may grow: extra token / text-position rows are the mean of the
      teacher rows (never read by valid inputs: EOT pooling takes the argmax token, which
      is below the teacher vocab, and the causal mask keeps later positions from touching
      earlier ones). Image and patch size must be equal. logit_scale (and logit_bias) are
      copied.
    * Symmetry breaking (``noise``, relative std, and ``seed``): reader weights of tiled
      copies get zero-sum noise across the copies (``W/q + z_k`` with ``sum_k z_k = 0``,
      std ``noise * rms(W) / q``); new units' and heads' input rows are always random with
      std ``rms(W) * sqrt(fan_in / fan_in')`` (their outputs start at zero, and random
      inputs keep them from being dead). Duplicated heads and units are told apart only
      by the paired noise, so ``noise=0`` leaves them symmetric.

    Non-integer width ratio (e.g. ViT-B 768 -> ViT-L 1024): the closest construction.
    Channels ``[0, q*d)`` are tiled as above; the ``r = d' - q*d`` extra channels carry the
    mean of the teacher's channels (every writer gets extra rows = the mean of its rows,
    which is linear). A reading LayerNorm then sees the same mean and a variance scaled by
    ``s = q*d/d'``, so its gain is scaled by ``sqrt(s)``; its extra outputs are zero (bias
    0), so the readers' extra columns are free (``noise``-scaled random, 0 when noise is
    0). Exactness fails in two places: (1) LayerNorm eps is a module constant, not a
    parameter, so the grown LN computes ``(x-mu)/sqrt(var + eps/s)`` instead of
    ``sqrt(var + eps)`` (negligible when var >> eps); (2) the vision tower's ``ln_pre``
    *writes* the stream: its extra output channels should be the mean of its outputs,
    ``mean_i(g_i * xhat_i) + mean(b)``, but an LN's extra channels can only output a
    constant (their normalised input is 0), so they get ``mean(b)`` and the invariant is
    off by ``mean_i(g_i * xhat_i)`` from the first block on. The text tower has no ln_pre,
    so there only the eps term remains. tests/test_grow_exact.py measures the deviation.

    Unsupported in exact mode (ValueError): attentional pooling, layer scale, custom
    attention blocks, timm/HF towers, text projection types other than a plain matrix,
    and configs differing in activation, norm settings or pooling.

``official``
    Reproduces the paper's reference code (docs/METHOD.md, "What the reference
    code does"); it is deliberately *not* function-preserving. Every tensor
    present in both models gets its leading block overwritten by the teacher
    tensor (``big[:a, :b, ...] = small``: 1-d prefix, 2-d top-left block
    including the packed attention in_proj, 4-d first output/input channels and
    top-left kernel); the rest keeps the student's init. 0-d and 1-element
    tensors (``logit_scale``) are copied by value. ``noise``/``seed`` are ignored.

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

import functools
import json
import math
import re
from dataclasses import dataclass
from typing import Callable, Mapping

import open_clip
import torch

from compt.growth import MODES, Axis, GrowthJob, GrowthRefused, TensorPlan, check_mode, grow_with_plans, tile_axis


__all__ = ["MODES", "TensorPlan", "plan_tensor", "state_shapes", "growth_problem", "source_name",
           "grow_tensor", "grow_state_dict", "vision_block_source", "is_model_config", "config_hint", "grow_job"]

_VISION_BLOCK = re.compile(r"^(visual\.transformer\.resblocks\.)(\d+)(\..+)$")
_TEXT_BLOCK = re.compile(r"^(transformer\.resblocks\.)(\d+)(\..+)$")
_SCALARS = ("logit_scale", "logit_bias")

# open_clip's CLIPVisionCfg / CLIPTextCfg default depth.
_DEFAULT_LAYERS = 12


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


def _cfg_key(cfg: dict) -> str:
    return json.dumps(cfg, sort_keys=True, default=str)


@functools.lru_cache(maxsize=32)
def _state_shapes(cfg_key: str) -> dict[str, tuple[int, ...]]:
    try:
        with torch.device("meta"):
            model = open_clip.CLIP(**json.loads(cfg_key))
    except Exception as e:  # noqa: BLE001 - any construction failure is a config problem
        raise ValueError(f"open_clip cannot build this model config: {type(e).__name__}: {e}") from e
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def state_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Stock open_clip state-dict names and shapes (0-d logit_scale) of model config ``cfg``,
    in state-dict order. Built on the meta device, so free; cached."""
    return dict(_state_shapes(_cfg_key(cfg)))


# ---- official -----------------------------------------------------------------------------------
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


def _is_scalar_shape(shape: tuple[int, ...]) -> bool:
    # compt stores logit_scale as [1] (ZeRO-3 cannot hold 0-d params); stock
    # open_clip stores it 0-d. Both mean "one number".
    return len(shape) <= 1 and math.prod(shape) == 1


def _official_plan(name: str, src: str, small_shape: tuple[int, ...], big_shape: tuple[int, ...]) -> TensorPlan:
    small_shape, big_shape = tuple(small_shape), tuple(big_shape)
    if _is_scalar_shape(small_shape) and _is_scalar_shape(big_shape):
        return TensorPlan(name, (src,), big_shape, small_shape, ())
    if len(small_shape) != len(big_shape):
        raise ValueError(f"cannot grow {name}: teacher shape {small_shape} and student shape "
                         f"{big_shape} have different ranks")
    if any(s > b for s, b in zip(small_shape, big_shape)):
        raise ValueError(f"cannot grow {name}: teacher shape {small_shape} is larger than student "
                         f"shape {big_shape} in some dimension (growth never shrinks)")
    axes = tuple(tile_axis(s, b, copies=1, rest="init") for s, b in zip(small_shape, big_shape))
    return TensorPlan(name, (src,), big_shape, small_shape, axes)


# ---- exact --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Tower:
    width: int
    layers: int
    head_width: int
    mlp: int
    rows: int  # positional-embedding rows: patches + 1 (vision) or context length (text)
    vocab: int = 0


# Settings that change the function without changing any shape: exact growth needs them equal.
_SAME_VISION = ("patch_size", "image_size", "pool_type", "final_ln_after_pool", "no_ln_pre", "pos_embed_type",
                "act_kwargs", "norm_kwargs")
_SAME_TEXT = ("pool_type", "final_ln_after_pool", "act_kwargs", "norm_kwargs", "no_causal_mask", "eos_id",
              "pad_id")
_UNSUPPORTED_VISION = ("ls_init_value", "attentional_pool", "timm_model_name", "block_type", "qk_norm",
                       "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc")
_UNSUPPORTED_TEXT = ("ls_init_value", "hf_model_name", "block_type", "qk_norm", "embed_cls", "proj_bias",
                     "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc")


def _tower_cfgs(cfg: dict):
    vcfg, tcfg = cfg.get("vision_cfg", {}) or {}, cfg.get("text_cfg", {}) or {}
    if not isinstance(vcfg, dict) or not isinstance(tcfg, dict):
        raise ValueError("vision_cfg and text_cfg must be dicts")
    try:
        return open_clip.model.CLIPVisionCfg(**vcfg), open_clip.model.CLIPTextCfg(**tcfg)
    except TypeError as e:
        raise ValueError(f"invalid tower config: {e}") from e


@functools.lru_cache(maxsize=32)
def _exact_towers(small_key: str, big_key: str) -> dict[str, tuple[_Tower, _Tower, int, int]]:
    small_cfg, big_cfg = json.loads(small_key), json.loads(big_key)
    problems: list[str] = []
    towers: dict[str, tuple[_Tower, _Tower, int, int]] = {}
    sv, st = _tower_cfgs(small_cfg)
    bv, bt = _tower_cfgs(big_cfg)
    for label, s, b, unsupported, same in (("vision_cfg", sv, bv, _UNSUPPORTED_VISION, _SAME_VISION),
                                           ("text_cfg", st, bt, _UNSUPPORTED_TEXT, _SAME_TEXT)):
        default = type(s)()
        for key in unsupported:
            for which, c in (("teacher", s), ("student", b)):
                if getattr(c, key) != getattr(default, key):
                    problems.append(f"{label}.{key}={getattr(c, key)!r} ({which}) is not supported by exact growth")
        for key in same:
            if getattr(s, key) != getattr(b, key):
                problems.append(f"{label}.{key} differs (teacher {getattr(s, key)!r}, student {getattr(b, key)!r}); "
                                "exact growth needs it equal")
        if not isinstance(s.layers, int) or not isinstance(b.layers, int):
            problems.append(f"{label}.layers must be an int (ResNet towers are not supported)")
    if problems:
        raise ValueError("; ".join(problems))
    if (small_cfg.get("quick_gelu", False)) != (big_cfg.get("quick_gelu", False)):
        problems.append("quick_gelu differs between teacher and student; exact growth needs the same activation")
    if st.proj_type != "linear" or bt.proj_type != "linear":
        problems.append("text_cfg.proj_type must be 'linear' for exact growth")

    def heads_of(v) -> int:
        return v.width // v.head_width

    def tower(label, c, text: bool) -> _Tower:
        heads = c.heads if text else heads_of(c)
        if heads <= 0 or c.width % heads:
            problems.append(f"{label}.width {c.width} is not a multiple of its head count {heads}")
            heads = max(heads, 1)
        if text:
            rows = c.context_length
        else:
            img = c.image_size if isinstance(c.image_size, (tuple, list)) else (c.image_size, c.image_size)
            pat = c.patch_size if isinstance(c.patch_size, (tuple, list)) else (c.patch_size, c.patch_size)
            rows = (img[0] // pat[0]) * (img[1] // pat[1]) + 1
        return _Tower(width=c.width, layers=c.layers, head_width=c.width // heads, mlp=int(c.width * c.mlp_ratio),
                      rows=rows, vocab=c.vocab_size if text else 0)

    e_s, e_b = small_cfg["embed_dim"], big_cfg["embed_dim"]
    if e_b < e_s:
        problems.append(f"embed_dim shrinks ({e_s} -> {e_b}); growth never shrinks")
    for label, s, b, text in (("vision_cfg", sv, bv, False), ("text_cfg", st, bt, True)):
        ts, tb = tower(label, s, text), tower(label, b, text)
        tower_name = "text" if text else "vision"
        if tb.head_width != ts.head_width:
            problems.append(f"{tower_name} tower head width changes ({ts.head_width} -> {tb.head_width}): exact "
                            "growth keeps the head width fixed (add heads instead) because a different head "
                            "width changes the attention function")
        fields = [("width", "width"), ("layers", "layers"), ("mlp", "MLP hidden width (width * mlp_ratio)")]
        fields += [("rows", "context_length"), ("vocab", "vocab_size")] if text else []
        for attr, what in fields:
            if getattr(tb, attr) < getattr(ts, attr):
                problems.append(f"{label} {what} shrinks ({getattr(ts, attr)} -> {getattr(tb, attr)}); "
                                "growth never shrinks")
        if ts.layers < 1:
            problems.append(f"{label}.layers of the teacher must be >= 1")
        if text and tb.rows > ts.rows and (b.pool_type == "last" or b.no_causal_mask):
            problems.append("text context_length grows but the text tower pools the last token or has no causal "
                            "mask, so the new positions would change the embedding")
        towers[tower_name] = (ts, tb, e_s, e_b)
    if problems:
        raise ValueError("; ".join(problems))
    return towers


def _exact_block(j: int, small_layers: int, big_layers: int) -> tuple[int, bool]:
    """(teacher block, is an added identity block) for student block ``j``."""
    i = vision_block_source(j, small_layers, big_layers)
    first = -(-i * big_layers // small_layers)  # ceil(i * L' / L): the first student block of teacher block i
    return i, j != first


def _exact_axes(suffix: str, ts: _Tower, tb: _Tower, e_s: int, e_b: int, shape: tuple[int, ...],
                small_shape: tuple[int, ...]) -> tuple[tuple[Axis, ...], float] | None:
    """Axes and random gain for a non-block (tower-level) or in-block tensor suffix."""
    d, D = ts.width, tb.width
    q = D // d
    g = math.sqrt(q * d / D)  # LayerNorm gain factor for the mean-filled extra channels (1 for integer ratios)

    def writer():
        return tile_axis(d, D, rest="mean")

    def reader():
        return tile_axis(d, D, scale=1.0 / q, rest="free", paired=True)

    def same(n):
        return tile_axis(n, n, copies=1, rest="zero")

    fan_in_gain = math.sqrt(small_shape[-1] / shape[-1]) if len(shape) == 2 else 0.0
    ln_gain = (tile_axis(d, D, scale=g, rest="mean", rest_scale=g),)
    ln_bias_reader = (tile_axis(d, D, rest="zero"),)
    heads_in = tile_axis(3 * d, 3 * D, blocks=3, rest="random")
    heads_out = tile_axis(d, D, scale=1.0 / q, rest="zero", paired=True)
    m, M = ts.mlp, tb.mlp
    qm = M // m if m else 0
    rules: dict[str, Callable[[], tuple[Axis, ...]]] = {
        # in-block tensors
        "ln_1.weight": lambda: ln_gain, "ln_1.bias": lambda: ln_bias_reader,
        "ln_2.weight": lambda: ln_gain, "ln_2.bias": lambda: ln_bias_reader,
        "attn.in_proj_weight": lambda: (heads_in, reader()),
        "attn.in_proj_bias": lambda: (tile_axis(3 * d, 3 * D, blocks=3, rest="zero"),),
        "attn.out_proj.weight": lambda: (writer(), heads_out),
        "attn.out_proj.bias": lambda: (writer(),),
        "mlp.c_fc.weight": lambda: (tile_axis(m, M, rest="random"), reader()),
        "mlp.c_fc.bias": lambda: (tile_axis(m, M, rest="zero"),),
        "mlp.c_proj.weight": lambda: (writer(), tile_axis(m, M, scale=1.0 / max(qm, 1), rest="zero", paired=True)),
        "mlp.c_proj.bias": lambda: (writer(),),
        # vision tower
        "visual.conv1.weight": lambda: (writer(), *(same(n) for n in shape[1:])),
        "visual.class_embedding": lambda: (writer(),),
        "visual.positional_embedding": lambda: (same(tb.rows), writer()),
        "visual.ln_pre.weight": lambda: ln_gain,
        "visual.ln_pre.bias": lambda: (writer(),),  # ln_pre's output is the stream
        "visual.ln_post.weight": lambda: ln_gain, "visual.ln_post.bias": lambda: ln_bias_reader,
        "visual.proj": lambda: (reader(), tile_axis(e_s, e_b, copies=1, rest="zero")),
        # text tower
        "token_embedding.weight": lambda: (tile_axis(ts.vocab, tb.vocab, copies=1, rest="mean"), writer()),
        "positional_embedding": lambda: (tile_axis(ts.rows, tb.rows, copies=1, rest="mean"), writer()),
        "ln_final.weight": lambda: ln_gain, "ln_final.bias": lambda: ln_bias_reader,
        "text_projection": lambda: (reader(), tile_axis(e_s, e_b, copies=1, rest="zero")),
    }
    if suffix not in rules:
        return None
    return rules[suffix](), fan_in_gain


def _exact_plan(name: str, small_cfg: dict, big_cfg: dict, noise: float, seed: int) -> TensorPlan | None:
    towers = _exact_towers(_cfg_key(small_cfg), _cfg_key(big_cfg))
    big_shapes, small_shapes = _state_shapes(_cfg_key(big_cfg)), _state_shapes(_cfg_key(small_cfg))
    if name not in big_shapes:
        return None
    shape = big_shapes[name]
    if name in _SCALARS:
        return TensorPlan(name, (name,), shape, small_shapes[name], ()) if name in small_shapes else None

    identity = False
    src, suffix = name, name
    for pattern, tower in ((_VISION_BLOCK, "vision"), (_TEXT_BLOCK, "text")):
        m = pattern.match(name)
        if m:
            ts, tb, _, _ = towers[tower]
            i, identity = _exact_block(int(m.group(2)), ts.layers, tb.layers)
            src, suffix = f"{m.group(1)}{i}{m.group(3)}", m.group(3)[1:]
            break
    else:
        tower = "vision" if name.startswith("visual.") else "text"
    ts, tb, e_s, e_b = towers[tower]
    if src not in small_shapes:
        raise ValueError(f"exact growth of {name} needs teacher tensor {src}, which the teacher config lacks")
    small_shape = small_shapes[src]
    rule = _exact_axes(suffix, ts, tb, e_s, e_b, shape, small_shape)
    if rule is None:
        raise ValueError(f"exact growth has no rule for tensor {name} (shape {shape})")
    axes, gain = rule
    if identity and suffix.startswith(("attn.out_proj.", "mlp.c_proj.")):
        # An added block: its two residual-writing projections are zero, so it is the identity.
        axes = tuple(tile_axis(s, b, copies=0, rest="zero") for s, b in zip(small_shape, shape))
    return TensorPlan(name, (src,), shape, small_shape, axes, noise=float(noise), seed=int(seed), random_gain=gain)


# ---- public API ---------------------------------------------------------------------------------
def plan_tensor(name: str, small_cfg: dict, big_cfg: dict, mode: str, noise: float = 0.0,
                seed: int = 0) -> TensorPlan | None:
    """The plan for student tensor ``name`` (a stock open_clip state-dict name of the
    ``big_cfg`` model), or None when the student tensor keeps its own init (mode
    ``none``; a name the student model does not have; in ``official`` a tensor without a
    teacher counterpart). Raises ValueError when ``exact`` growth is impossible for these
    configs (head width or image/patch size change, shrinking, unsupported features) or
    when ``official`` would shrink a tensor."""
    check_mode(mode)
    if not (isinstance(noise, (int, float)) and math.isfinite(noise) and noise >= 0):
        raise ValueError(f"noise must be a finite number >= 0, got {noise!r}")
    if mode == "none":
        return None
    if mode == "exact":
        return _exact_plan(name, small_cfg, big_cfg, noise, seed)
    big_shapes, small_shapes = _state_shapes(_cfg_key(big_cfg)), _state_shapes(_cfg_key(small_cfg))
    src = _source_official(name, small_cfg, big_cfg)
    if name not in big_shapes or src is None or src not in small_shapes:
        return None
    return _official_plan(name, src, small_shapes[src], big_shapes[name])


def growth_problem(small_cfg: dict, big_cfg: dict, mode: str) -> str | None:
    """Why ``big_cfg`` cannot be grown from ``small_cfg`` in ``mode``, or None. Plans every
    student tensor, so every per-tensor error (shrinking, rank changes) is found."""
    check_mode(mode)
    try:
        big_shapes = _state_shapes(_cfg_key(big_cfg))
        _state_shapes(_cfg_key(small_cfg))
        if mode == "official":
            sv, st = _tower_cfgs(small_cfg)
            bv, bt = _tower_cfgs(big_cfg)
            if sv.patch_size != bv.patch_size:
                return f"vision_cfg.patch_size differs (teacher {sv.patch_size}, student {bv.patch_size})"
            if bt.context_length < st.context_length:
                return (f"text_cfg.context_length shrinks ({st.context_length} -> {bt.context_length}); "
                        "growth never shrinks")
        for name in big_shapes:
            plan_tensor(name, small_cfg, big_cfg, mode)
    except ValueError as e:
        return str(e)
    return None


def source_name(name: str, small_cfg: dict, big_cfg: dict, mode: str) -> str | None:
    """Name of the teacher tensor that feeds student tensor ``name``, or None to
    keep the student's init.

    For ``official`` the answer is derived from the names only and assumes the
    standard open_clip CLIP layout; a returned name the teacher does not actually
    have (a tensor present only in the student) must also be treated as "keep
    init", as ``grow_state_dict`` does. For ``exact`` it is the plan's source
    (every student tensor of an exact plan reads one teacher tensor, even an added
    block's zeroed projections).
    """
    check_mode(mode)
    if mode == "official":
        return _source_official(name, small_cfg, big_cfg)
    plan = plan_tensor(name, small_cfg, big_cfg, mode)
    return plan.sources[0] if plan is not None and plan.sources else None


def grow_tensor(name: str, big_init: torch.Tensor, small: torch.Tensor, mode: str, *,
                small_cfg: dict | None = None, big_cfg: dict | None = None,
                noise: float = 0.0, seed: int = 0) -> torch.Tensor:
    """New value for student tensor ``name`` (same shape, dtype and device as
    ``big_init``) given its teacher tensor ``small``. Inputs are not modified.

    ``official`` works from the two shapes alone when no configs are given; ``exact``
    needs ``small_cfg`` and ``big_cfg``. Raises ValueError naming the tensor when
    ``small`` does not fit inside ``big_init``.
    """
    check_mode(mode)
    if mode == "none":
        return big_init.detach().clone()
    if small_cfg is None or big_cfg is None:
        if mode == "exact":
            raise ValueError(f"exact growth of {name} needs small_cfg and big_cfg")
        plan = _official_plan(name, name, tuple(small.shape), tuple(big_init.shape))
    else:
        plan = plan_tensor(name, small_cfg, big_cfg, mode, noise, seed)
        if plan is None:
            return big_init.detach().clone()
    return plan.dense({plan.sources[0]: small}, init=big_init).to(big_init.device)


def grow_state_dict(
    small_sd: Mapping[str, torch.Tensor],
    big_init_sd: Mapping[str, torch.Tensor],
    small_cfg: dict,
    big_cfg: dict,
    mode: str,
    *,
    noise: float = 0.0,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Grown student state dict: one entry per ``big_init_sd`` key, in its order, each
    with that entry's shape, dtype and device. Teacher tensors that feed nothing are
    ignored. In ``exact`` mode ``big_init_sd`` only supplies names, shapes and dtypes
    (and the values of tensors no rule covers, e.g. a student-only logit_bias); a
    teacher tensor missing from ``small_sd`` is an error there, while ``official``
    keeps the student's init."""
    check_mode(mode)
    return grow_with_plans(small_sd, big_init_sd, lambda name: plan_tensor(name, small_cfg, big_cfg, mode, noise, seed),
                           mode)


# ---- compt grow ---------------------------------------------------------------------------------
_CONFIG_KEYS = ("embed_dim", "vision_cfg", "text_cfg")


def _missing_keys(raw: object) -> list[str]:
    return [k for k in _CONFIG_KEYS if not isinstance(raw, dict) or k not in raw]


def is_model_config(raw: object) -> bool:
    """Whether ``raw`` (a parsed JSON file) is an open_clip model config: it holds embed_dim,
    vision_cfg and text_cfg (whether open_clip can build it is ``growth_problem``'s question)."""
    return not _missing_keys(raw)


def config_hint(raw: object) -> str:
    """What an open_clip model config needs that ``raw`` lacks, for an error about a config no
    family recognises."""
    return f"an open_clip model config needs {', '.join(_missing_keys(raw))}"


def grow_job(small_raw: dict, big_raw: dict, *, mode: str, noise: float, seed: int, from_label: str,
             to_label: str, out_config_given: bool) -> GrowthJob:
    """What ``compt grow`` writes for open_clip model configs ``small_raw`` -> ``big_raw``: every
    tensor of ``open_clip.CLIP(**big_raw)`` in state-dict order (stock 0-d logit_scale). The
    labels name the two configs in messages. GrowthRefused when the growth is impossible, or for
    ``--out-config`` (the grown model's config is ``big_raw`` itself)."""
    if out_config_given:
        raise GrowthRefused("--out-config is not for CLIP configs; a CLIP model's config is --to-config itself")
    small_cfg, big_cfg = small_raw, big_raw
    problem = growth_problem(small_cfg, big_cfg, mode)
    if problem:
        raise GrowthRefused(f"cannot grow {from_label} into {to_label} ({mode}): {problem}")

    def make_init() -> dict:
        with torch.random.fork_rng(devices=[]):  # the student's own init, where the rule keeps it
            torch.manual_seed(seed)
            return open_clip.CLIP(**big_cfg).state_dict()

    shapes = state_shapes(big_cfg)
    plans = {name: plan_tensor(name, small_cfg, big_cfg, mode, noise, seed) for name in shapes}
    meta = {"compt.grow": json.dumps({"mode": mode, "noise": noise, "seed": seed,
                                      "from_config": small_cfg, "to_config": big_cfg})}
    return GrowthJob(shapes, state_shapes(small_cfg), plans, make_init, meta)
