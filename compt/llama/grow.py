"""Parameter-space growth for LLaMA (transformers' LlamaForCausalLM): how a student tensor is
initialised from the previous (smaller) model of the chain.

Every rule is a per-tensor :class:`~compt.growth.TensorPlan` (index map + scale +
fill), so ``TensorPlan.dense`` gives the whole tensor and ``TensorPlan.flat_slice`` any flat
slice of it (a ZeRO-3 rank's partition), bit for bit the same. ``grow_state_dict`` is a thin
wrapper over the plans. Names are LlamaForCausalLM state-dict names; with tied embeddings
the student's ``lm_head.weight`` is ``model.embed_tokens.weight`` (same plan, same values).

Modes
-----
``exact`` (function-preserving)
    The grown model's logits over the teacher's vocabulary equal the teacher's, for every
    input of teacher-vocabulary tokens, *when the student is built from*
    ``exact_config(small_cfg, big_cfg)`` (see "RMSNorm eps" below). Teacher sizes: width d,
    heads h, KV heads g, head_dim hd, MLP width m, layers L, vocab V; student: D, H, G, hd,
    M, L', V'. Let ``q = D // d`` and ``s = q*d / D`` (s = 1 for integer ratios).

    * Residual stream: the student stream is the teacher stream tiled ``q`` times (channel
      ``c`` of copy ``k`` at ``k*d + c``) followed by ``D - q*d`` channels that are **zero**.
      Writers (embedding columns, o_proj and down_proj rows and biases) are tiled, their extra
      rows are 0. RMSNorm has no mean subtraction, so zero channels are exact at any ratio
      (a mean-filled channel, CLIP's trick, would change the mean square): a norm reading
      the stream sees ``mean_sq' = s * mean_sq``; its gain is scaled by ``sqrt(s)``, and its
      outputs on the zero channels are 0 whatever the gain (the extra gains are the mean
      gain, so nothing is a zero gain).
    * Readers (q/k/v, gate/up columns) take ``W/q`` per tiled copy; with ``noise > 0`` the
      copies get zero-sum noise (they still sum to ``W``). Their columns for the zero
      channels read 0, so they are random (``rms(W) * sqrt(d/D)``, drawn whatever ``noise``
      is: zero there would leave the new channels without gradient for good).
    * LM head: the final norm's gain is scaled by ``sqrt(s)/q`` and lm_head columns are
      tiled *unscaled* (plus zero-sum noise when untied), so a tied head (which is the
      embedding, a writer, and cannot take ``W/q``) works the same way as an untied one.
    * Attention heads: head_dim is fixed (a change is an error: it changes RoPE and the
      1/sqrt(hd) scaling). Every teacher query head is copied once, unscaled, and keeps its
      o_proj columns; the other student heads are new (random Q rows, zero o_proj columns).
      GQA: student KV head ``j`` (group of ``r' = H/G`` query heads) copies teacher KV head
      ``j // c`` for ``j < g*c``, ``c = ceil(r / r')``, ``r = h/g``, and hosts teacher query
      heads ``(j % c)*r' + p`` (``p < r'``) of that teacher group, so every teacher query
      head sits in a group whose K/V are its own teacher K/V. KV heads beyond ``g*c`` are
      new (random K/V rows) and serve only new query heads. Needs ``G >= g*c``.
    * MLP (SwiGLU) m -> M: ``M // m`` duplicates of every unit (gate and up rows copied,
      down_proj columns split ``1/(M//m)`` with zero-sum noise), the remaining units are new:
      random gate/up rows, zero down_proj columns.
    * Depth L -> L': student layer ``j`` copies teacher layer ``floor(j*L/L')``; the first
      student layer of each group is the grown teacher layer, the others are the same but
      with zero o_proj and down_proj (and biases), i.e. the identity on the stream.
    * Vocab V -> V' (same tokenizer, new tokens appended): new embedding and lm_head rows
      are the mean of the teacher's rows. The logits of the old tokens are unchanged; the
      new tokens get extra logits (the mean logit), so the softmax over V' is not the
      teacher's over V: no linear head can give a new token probability 0.
    * Must be equal: head_dim, hidden_act, rope_parameters (and max_position_embeddings for
      RoPE types that read it), attention_bias, mlp_bias. A tied student needs a tied
      teacher (an untied teacher's lm_head and embedding differ).
    * Symmetry breaking: ``noise`` (relative std) is zero-sum across tiled copies of a
      reader (copies of residual channels and of MLP units); new heads, units, KV heads and
      zero-channel columns are always random. None of it changes the function.

    RMSNorm eps (why ``exact_config``)
        LlamaRMSNorm computes ``w * x / sqrt(mean(x^2) + eps)`` with eps a config constant,
        not a parameter. On the grown stream ``mean' = s * mean``, and
        ``sqrt(s*mean + eps') = sqrt(s) * sqrt(mean + eps)`` holds for every input only when
        ``eps' = s * eps``. So the student's ``rms_norm_eps`` is not a free choice in exact
        mode: :func:`exact_config` returns the student config with
        ``rms_norm_eps = teacher_eps * s`` (the teacher's eps unchanged for integer width
        ratios; the student config's own rms_norm_eps is ignored). Build the student from that
        config; in a chain, the next growth's teacher config is that config too. With the
        nominal eps the error is ``O(eps * |1 - s| / mean_sq)`` per norm, not zero.

    Precision: plans compute in float64 and cast at the end. transformers' LlamaRMSNorm
    normalises in float32 even for a float64 model, so a float64 check of exactness only
    reaches float32 rounding unless the norm computes in float64 (tests/test_llama_grow.py
    does both and says how close each is).

``official``
    The reference code's rule (docs/METHOD.md): every student tensor with a teacher
    counterpart gets the teacher tensor in its leading block (``big[:a, :b] = small``); the
    rest keeps the student's own init. Student layer ``j`` takes teacher layer
    ``floor(j*L/L')`` (teacher layer i -> student layers 2i and 2i+1 when depth doubles). A
    tied student's head is its embedding; an untied student of a tied teacher gets the
    teacher's embedding in its lm_head. Not function-preserving; ``noise`` is ignored.
``none``
    Every tensor keeps the student's init.
"""
from __future__ import annotations

import copy
import functools
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from compt.growth import (MODES, RANDOM, SRC, ZERO, Axis, GrowthJob, GrowthRefused, TensorPlan, check_mode,
                          grow_with_plans, tile_axis)
from compt.llama.model import EMBED, TIED_HEAD, config_key, is_llama_config, llama_state_shapes, resolve_llama_config


__all__ = ["MODES", "TensorPlan", "plan_tensor", "growth_problem", "exact_config", "grow_state_dict",
           "layer_source", "is_model_config", "config_hint", "grow_job"]

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# RoPE types whose frequencies do not depend on max_position_embeddings.
_ROPE_WITHOUT_MAX_POS = ("default", "linear", "llama3", "proportional")


@functools.lru_cache(maxsize=64)
def _resolved(key: str) -> dict[str, Any]:
    return resolve_llama_config(json.loads(key))


def _resolve(cfg: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(cfg, dict):
        raise ValueError(f"a LLaMA model config here is a dict of LlamaConfig fields, got {type(cfg).__name__} "
                         "(resolve a config.json with compt.llama.resolve_llama_config first)")
    return _resolved(config_key(cfg))


def layer_source(j: int, small_layers: int, big_layers: int) -> int:
    """Teacher layer that feeds student layer ``j`` (both modes)."""
    return (j * small_layers) // big_layers


@dataclass(frozen=True)
class _Dims:
    hidden: int
    inter: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    eps: float

    @classmethod
    def of(cls, cfg: dict[str, Any]) -> "_Dims":
        return cls(hidden=cfg["hidden_size"], inter=cfg["intermediate_size"], layers=cfg["num_hidden_layers"],
                   heads=cfg["num_attention_heads"], kv_heads=cfg["num_key_value_heads"], head_dim=cfg["head_dim"],
                   vocab=cfg["vocab_size"], tied=bool(cfg["tie_word_embeddings"]), eps=float(cfg["rms_norm_eps"]))


# ---- sources (both modes) -------------------------------------------------------------------
def _source(name: str, s: _Dims, b: _Dims) -> tuple[str, bool]:
    """(teacher tensor name, is an added identity layer) for student tensor ``name``."""
    m = _LAYER.match(name)
    if m:
        j = int(m.group(1))
        i = layer_source(j, s.layers, b.layers)
        first = -(-i * b.layers // s.layers)  # ceil(i * L' / L): the first student layer of teacher layer i
        return f"model.layers.{i}.{m.group(2)}", j != first
    if name == TIED_HEAD and s.tied:
        return EMBED, False
    return name, False


# ---- official -------------------------------------------------------------------------------
def _official_plan(name: str, src: str, small_shape: tuple[int, ...], big_shape: tuple[int, ...]) -> TensorPlan:
    if len(small_shape) != len(big_shape):
        raise ValueError(f"cannot grow {name}: teacher shape {small_shape} and student shape {big_shape} "
                         "have different ranks")
    if any(a > c for a, c in zip(small_shape, big_shape)):
        raise ValueError(f"cannot grow {name}: teacher shape {small_shape} is larger than student shape "
                         f"{big_shape} in some dimension (growth never shrinks)")
    axes = tuple(tile_axis(a, c, copies=1, rest="init") for a, c in zip(small_shape, big_shape))
    return TensorPlan(name, (src,), big_shape, small_shape, axes)


# ---- exact ----------------------------------------------------------------------------------
def _head_layout(s: _Dims, b: _Dims) -> tuple[list[int | None], list[int | None]]:
    """(teacher query head of each student query head, teacher KV head of each student KV head);
    None = a new head. See the module docstring (GQA)."""
    r, r2 = s.heads // s.kv_heads, b.heads // b.kv_heads
    c = -(-r // r2)
    q_src: list[int | None] = [None] * b.heads
    kv_src: list[int | None] = [None] * b.kv_heads
    for j in range(min(b.kv_heads, s.kv_heads * c)):
        t = j // c
        kv_src[j] = t
        for p in range(r2):
            u = (j % c) * r2 + p
            if u < r:
                q_src[j * r2 + p] = t * r + u
    return q_src, kv_src


def _exact_problems(sc: dict[str, Any], bc: dict[str, Any]) -> list[str]:
    s, b = _Dims.of(sc), _Dims.of(bc)
    problems = []
    if b.head_dim != s.head_dim:
        problems.append(f"head_dim changes ({s.head_dim} -> {b.head_dim}): exact growth keeps head_dim fixed "
                        "(grow num_attention_heads instead) because head_dim sets RoPE's frequencies and the "
                        "attention scale 1/sqrt(head_dim); use mode 'official' to change it anyway")
    for attr, field in (("hidden", "hidden_size"), ("inter", "intermediate_size"), ("layers", "num_hidden_layers"),
                        ("heads", "num_attention_heads"), ("kv_heads", "num_key_value_heads"),
                        ("vocab", "vocab_size")):
        if getattr(b, attr) < getattr(s, attr):
            problems.append(f"{field} shrinks ({getattr(s, attr)} -> {getattr(b, attr)}); growth never shrinks")
    for field in ("hidden_act", "rope_parameters", "attention_bias", "mlp_bias"):
        if sc.get(field) != bc.get(field):
            problems.append(f"{field} differs (teacher {sc.get(field)!r}, student {bc.get(field)!r}); exact "
                            "growth needs it equal")
    rope_type = (sc.get("rope_parameters") or {}).get("rope_type", "default")
    if rope_type not in _ROPE_WITHOUT_MAX_POS and sc["max_position_embeddings"] != bc["max_position_embeddings"]:
        problems.append(f"max_position_embeddings differs ({sc['max_position_embeddings']} -> "
                        f"{bc['max_position_embeddings']}) and RoPE type {rope_type!r} depends on it; exact growth "
                        "needs it equal")
    if b.tied and not s.tied:
        problems.append("tie_word_embeddings: the student is tied but the teacher is not; a tied student cannot "
                        "keep both the teacher's embedding and its different lm_head: set tie_word_embeddings "
                        "false for the student")
    if not problems and b.heads >= s.heads and b.kv_heads >= s.kv_heads:
        r, r2 = s.heads // s.kv_heads, b.heads // b.kv_heads
        c = -(-r // r2)
        if s.kv_heads * c > b.kv_heads:
            problems.append(f"num_key_value_heads {b.kv_heads} is too few: the teacher's {s.kv_heads} KV groups of "
                            f"{r} query heads need {s.kv_heads * c} student groups of {r2} "
                            f"(num_attention_heads/num_key_value_heads); raise num_key_value_heads to "
                            f"{s.kv_heads * c} or the group size to {r}")
    return problems


@dataclass(frozen=True, eq=False)
class _Layout:
    s: _Dims
    b: _Dims
    q: int  # tiled copies of the residual stream
    norm_scale: float  # s = q*d/D: mean_sq' = s * mean_sq
    q_rows: tuple[Axis, Axis]  # (weight, bias) axes over q_proj's rows
    kv_rows: tuple[Axis, Axis]
    o_cols: Axis


def _head_axis(src_heads: list[int | None], hd: int, n_small_heads: int, new: int, scale_new: float = 0.0) -> Axis:
    n = len(src_heads) * hd
    src = torch.zeros(n, dtype=torch.int64)
    status = torch.full((n,), new, dtype=torch.int64)
    for k, t in enumerate(src_heads):
        if t is not None:
            src[k * hd:(k + 1) * hd] = torch.arange(t * hd, (t + 1) * hd)
            status[k * hd:(k + 1) * hd] = SRC
    return Axis(src=src, scale=torch.ones(n, dtype=torch.float64), status=status, n_small=n_small_heads * hd)


@functools.lru_cache(maxsize=32)
def _exact_layout(small_key: str, big_key: str) -> _Layout:
    sc, bc = _resolved(small_key), _resolved(big_key)
    problems = _exact_problems(sc, bc)
    if problems:
        raise ValueError("; ".join(problems))
    s, b = _Dims.of(sc), _Dims.of(bc)
    q = b.hidden // s.hidden
    q_src, kv_src = _head_layout(s, b)
    hd = s.head_dim
    return _Layout(
        s=s, b=b, q=q, norm_scale=q * s.hidden / b.hidden,
        q_rows=(_head_axis(q_src, hd, s.heads, RANDOM), _head_axis(q_src, hd, s.heads, ZERO)),
        kv_rows=(_head_axis(kv_src, hd, s.kv_heads, RANDOM), _head_axis(kv_src, hd, s.kv_heads, ZERO)),
        o_cols=_head_axis(q_src, hd, s.heads, ZERO),
    )


def _exact_axes(suffix: str, lay: _Layout) -> tuple[Axis, ...] | None:
    s, b, q = lay.s, lay.b, lay.q
    d, D, m, M = s.hidden, b.hidden, s.inter, b.inter
    qm = M // m
    g = math.sqrt(lay.norm_scale)

    def writer() -> Axis:
        return tile_axis(d, D, rest="zero")

    def reader(scale: float) -> Axis:
        return tile_axis(d, D, scale=scale, rest="random", paired=True)

    def norm(scale: float) -> tuple[Axis]:
        return (tile_axis(d, D, scale=scale, rest="mean", rest_scale=scale),)

    units = tile_axis(m, M, rest="random")
    vocab = tile_axis(s.vocab, b.vocab, copies=1, rest="mean")
    rules = {
        "self_attn.q_proj.weight": lambda: (lay.q_rows[0], reader(1.0 / q)),
        "self_attn.k_proj.weight": lambda: (lay.kv_rows[0], reader(1.0 / q)),
        "self_attn.v_proj.weight": lambda: (lay.kv_rows[0], reader(1.0 / q)),
        "self_attn.q_proj.bias": lambda: (lay.q_rows[1],),
        "self_attn.k_proj.bias": lambda: (lay.kv_rows[1],),
        "self_attn.v_proj.bias": lambda: (lay.kv_rows[1],),
        "self_attn.o_proj.weight": lambda: (writer(), lay.o_cols),
        "self_attn.o_proj.bias": lambda: (writer(),),
        "mlp.gate_proj.weight": lambda: (units, reader(1.0 / q)),
        "mlp.up_proj.weight": lambda: (units, reader(1.0 / q)),
        "mlp.gate_proj.bias": lambda: (tile_axis(m, M, rest="zero"),),
        "mlp.up_proj.bias": lambda: (tile_axis(m, M, rest="zero"),),
        "mlp.down_proj.weight": lambda: (writer(), tile_axis(m, M, scale=1.0 / qm, rest="zero", paired=True)),
        "mlp.down_proj.bias": lambda: (writer(),),
        "input_layernorm.weight": lambda: norm(g),
        "post_attention_layernorm.weight": lambda: norm(g),
        "model.norm.weight": lambda: norm(g / q),
        EMBED: lambda: (vocab, writer()),
        TIED_HEAD: lambda: (vocab, reader(1.0)),
    }
    rule = rules.get(suffix)
    return rule() if rule is not None else None


_IDENTITY_ZERO = ("self_attn.o_proj.", "mlp.down_proj.")


def _exact_plan(name: str, sc: dict, bc: dict, noise: float, seed: int) -> TensorPlan | None:
    lay = _exact_layout(config_key(sc), config_key(bc))
    big_shapes, small_shapes = llama_state_shapes(bc), llama_state_shapes(sc)
    if name not in big_shapes:
        return None
    shape = big_shapes[name]
    src, identity = _source(name, lay.s, lay.b)
    if src not in small_shapes:
        raise ValueError(f"exact growth of {name} needs teacher tensor {src}, which the teacher config lacks")
    small_shape = small_shapes[src]
    m = _LAYER.match(name)
    suffix = m.group(2) if m else name
    axes = _exact_axes(suffix, lay)
    if axes is None:
        raise ValueError(f"exact growth has no rule for tensor {name} (shape {shape})")
    if identity and suffix.startswith(_IDENTITY_ZERO):
        # An added layer: its two residual-writing projections are zero, so it is the identity.
        axes = tuple(tile_axis(a, c, copies=0, rest="zero") for a, c in zip(small_shape, shape))
    gain = math.sqrt(small_shape[-1] / shape[-1]) if len(shape) == 2 else 0.0
    return TensorPlan(name, (src,), shape, small_shape, axes, noise=float(noise), seed=int(seed), random_gain=gain)


# ---- public API -----------------------------------------------------------------------------
def exact_config(small_cfg: dict[str, Any], big_cfg: dict[str, Any]) -> dict[str, Any]:
    """The student config that exact growth preserves the function for: ``big_cfg`` resolved,
    with ``rms_norm_eps = small eps * s``, ``s = (D // d) * d / D`` (d, D: hidden sizes), i.e.
    the teacher's eps for integer width ratios. ValueError when exact growth is impossible."""
    sc, bc = _resolve(small_cfg), _resolve(big_cfg)
    lay = _exact_layout(config_key(sc), config_key(bc))
    out = copy.deepcopy(bc)
    out["rms_norm_eps"] = lay.s.eps * lay.norm_scale if lay.norm_scale != 1.0 else lay.s.eps
    return out


def plan_tensor(name: str, small_cfg: dict[str, Any], big_cfg: dict[str, Any], mode: str, noise: float = 0.0,
                seed: int = 0) -> TensorPlan | None:
    """The plan for student tensor ``name`` (a LlamaForCausalLM state-dict name of the
    ``big_cfg`` model), or None when it keeps its own init (mode ``none``, a name the student
    does not have, in ``official`` a tensor without a teacher counterpart). For a tied student
    ``lm_head.weight`` gets the plan of ``model.embed_tokens.weight`` (the same tensor).
    ``exact`` plans compute the teacher's function in the model built from
    ``exact_config(small_cfg, big_cfg)`` (its rms_norm_eps; the shapes are ``big_cfg``'s).
    Raises ValueError when the growth is impossible (see ``growth_problem``)."""
    check_mode(mode)
    if isinstance(noise, bool) or not (isinstance(noise, (int, float)) and math.isfinite(noise) and noise >= 0):
        raise ValueError(f"noise must be a finite number >= 0, got {noise!r}")
    if mode == "none":
        return None
    sc, bc = _resolve(small_cfg), _resolve(big_cfg)
    if name == TIED_HEAD and bc["tie_word_embeddings"]:
        name = EMBED
    if mode == "exact":
        return _exact_plan(name, sc, bc, noise, seed)
    big_shapes, small_shapes = llama_state_shapes(bc), llama_state_shapes(sc)
    if name not in big_shapes:
        return None
    src, _ = _source(name, _Dims.of(sc), _Dims.of(bc))
    if src not in small_shapes:
        return None
    return _official_plan(name, src, small_shapes[src], big_shapes[name])


def growth_problem(small_cfg: dict[str, Any], big_cfg: dict[str, Any], mode: str) -> str | None:
    """Why ``big_cfg`` cannot be grown from ``small_cfg`` in ``mode``, or None. Checks both
    configs, then plans every student tensor, so every per-tensor error is found. The
    student's rms_norm_eps is never a problem in ``exact``: ``exact_config`` replaces it."""
    check_mode(mode)
    from compt.llama.model import llama_config_problem

    for who, cfg in (("teacher", small_cfg), ("student", big_cfg)):
        problem = llama_config_problem(cfg)
        if problem:
            return f"{who} config: {problem}"
    if mode == "none":
        return None
    try:
        for name in llama_state_shapes(_resolve(big_cfg)):
            plan_tensor(name, small_cfg, big_cfg, mode)
    except ValueError as e:
        return str(e)
    return None


def grow_state_dict(small_sd: Mapping[str, torch.Tensor], big_init_sd: Mapping[str, torch.Tensor],
                    small_cfg: dict[str, Any], big_cfg: dict[str, Any], mode: str, *, noise: float = 0.0,
                    seed: int = 0) -> dict[str, torch.Tensor]:
    """Grown student state dict: one entry per ``big_init_sd`` key (e.g. ``model.state_dict()``,
    which lists a tied ``lm_head.weight`` too), with that entry's shape, dtype and device. In
    ``exact`` mode ``big_init_sd`` only supplies names, shapes and dtypes, and a teacher
    tensor missing from ``small_sd`` is an error; ``official`` keeps the init there. A tied
    teacher's checkpoint needs no ``lm_head.weight``."""
    check_mode(mode)
    return grow_with_plans(small_sd, big_init_sd, lambda name: plan_tensor(name, small_cfg, big_cfg, mode, noise, seed),
                           mode)


# ---- compt grow ---------------------------------------------------------------------------------
def is_model_config(raw: object) -> bool:
    """Whether ``raw`` (a parsed JSON file) is an HF LLaMA config.json: its ``model_type`` or
    ``architectures`` say so (whether it is buildable is ``llama_config_problem``'s question)."""
    return isinstance(raw, dict) and is_llama_config(raw)


def config_hint(raw: object) -> str:
    """What to give for a LLaMA model, for an error about a config no family recognises."""
    return "give an HF LLaMA config.json, with model_type 'llama'"


def grow_job(small_raw: dict, big_raw: dict, *, mode: str, noise: float, seed: int, from_label: str,
             to_label: str, out_config_given: bool) -> GrowthJob:
    """What ``compt grow`` writes for HF LLaMA configs ``small_raw`` -> ``big_raw``: every stored
    tensor of LlamaForCausalLM, as ``save_pretrained`` writes them, and the grown model's config
    (in ``exact`` mode ``exact_config``'s, whose rms_norm_eps may differ from ``big_raw``'s: a
    note says so). The labels name the two configs in messages; ``--out-config`` is welcome.
    GrowthRefused naming the config and field when a config is not buildable or the growth is
    impossible."""
    from compt.llama.model import build_llama, llama_config_problem

    for flag, label, raw in (("--from-config", from_label, small_raw), ("--to-config", to_label, big_raw)):
        problem = llama_config_problem(raw)
        if problem:
            raise GrowthRefused(f"{flag} {label}: {problem}")
    small_cfg, big_cfg = resolve_llama_config(small_raw), resolve_llama_config(big_raw)
    problem = growth_problem(small_cfg, big_cfg, mode)
    if problem:
        raise GrowthRefused(f"cannot grow {from_label} into {to_label} ({mode}): {problem}")
    notes = []
    student_cfg = big_cfg
    if mode == "exact":
        student_cfg = exact_config(small_cfg, big_cfg)
        if student_cfg["rms_norm_eps"] != big_cfg["rms_norm_eps"]:
            notes.append(f"rms_norm_eps of the grown model is {student_cfg['rms_norm_eps']!r}, not the "
                         f"{big_cfg['rms_norm_eps']!r} of {to_label}: exact growth sets it from the teacher's; "
                         "build the model from the written config")

    def make_init() -> dict:
        with torch.random.fork_rng(devices=[]):  # the student's own init, where the rule keeps it
            torch.manual_seed(seed)
            return build_llama(student_cfg, torch.float32).state_dict()

    shapes = llama_state_shapes(student_cfg)
    plans = {name: plan_tensor(name, small_cfg, student_cfg, mode, noise, seed) for name in shapes}
    meta = {"format": "pt",
            "compt.grow": json.dumps({"mode": mode, "noise": noise, "seed": seed,
                                      "from_config": small_cfg, "to_config": student_cfg})}
    return GrowthJob(shapes, llama_state_shapes(small_cfg), plans, make_init, meta, config=student_cfg, notes=notes)
