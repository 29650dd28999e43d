"""Fused weight expansion: one Triton pass computes any flat slice [start, end) of a grown
tensor (a ZeRO-3 partition) from the teacher tensor, bit for bit as ``TensorPlan.flat_slice``.

What is fused and what is not
-----------------------------
The kernel evaluates, per output element, everything ``TensorPlan._values`` does: the
index map (teacher gather, mean slots included), the scale, the status fill (SRC / FREE /
RANDOM / INIT / ZERO), the paired zero-sum noise and the counter-based normal draws
(the same 32-bit hash and the same polynomial log/cos, in float64), then the cast to the
output dtype. Nothing of the size of the grown tensor is materialised besides the output.

Precomputed on the host, once per tensor (``prepare_expansion``):
- the "prepared" teacher (``TensorPlan._prepare``, i.e. the existing PyTorch code): the
  float64 teacher with its mean slots appended, and its rms (one host sync, only when a
  draw needs it). This is O(teacher), read by the kernel as is;
- the plan's per-axis lookup tables folded into two small tables: one over the leading
  dims (rows: teacher offset, scale product, status, pair code/offset) and one over the
  last dim (columns: the same). A row x column tile then needs no integer division;
- the noise stds (Python floats, as the reference computes them), the hash keys of each
  stream (blake2b of seed/name/purpose) and the log/cos coefficients, as small float64 /
  int64 tensors: a Python float literal in a Triton kernel is float32.

Bit-identity rests on doing the reference's float64 operations in its order with the
same rounding: +, -, * and / (IEEE everywhere), frexp by integer bit ops, no FMA
contraction (``enable_fp_fusion=False`` at launch; the PTX has none), the output cast as
torch does it (float64 -> float32 -> bf16/fp16, nearest even; bf16 by hand). sqrt is
correctly rounded on both sides: sqrt.rn.f64 on a GPU (as torch.sqrt there), numpy's in the
CPU interpreter, and the reference uses numpy's on the CPU because torch 2.14.1's CPU
float64 sqrt is *not* correctly rounded (~1.4% of inputs 1 ulp off).
Plans without axes (``logit_scale``: one value copied) go through the reference.
"""
from __future__ import annotations  # kernel annotations stay strings: importable without triton

import functools
import math
import os
import types
import weakref
from dataclasses import dataclass
from typing import Mapping

import torch

from compt.growth import (
    COS_COEF,
    LN2,
    LOG_COEF,
    SQRT_HALF,
    FREE,
    INIT,
    RANDOM,
    SRC,
    TensorPlan,
    mix32_int,
    stream_key,
    row_major_strides,
)

try:
    import triton
    import triton.language as tl
except ImportError:  # e.g. macOS: the reference still works
    triton = None
    tl = None

__all__ = ["expand_flat_slice", "prepare_expansion", "PreparedExpansion"]

_BACKENDS = ("auto", "triton", "reference")
# Only builtins in device code (tl.full, not tl.zeros; tl.reduce, not tl.sum): triton's own
# @jit helpers are fixed to interpreter or compiler when triton is imported (see alignment_triton).
_add = tl.standard._sum_combine if tl is not None else None

# Where the kernel finds its float64 constants (consts tensor) and hash keys (keys tensor:
# per stream k0, k1, k2, k3 and mix32(k1)); constexprs of the kernel's namespace.
_LAYOUT = dict(C_LN2=0, C_SQRT_HALF=1, C_TWO_PI=2, C_STD_FREE=3, C_STD_RANDOM=4, C_STD_PAIR=5, C_LOG=6,
               N_LOG=len(LOG_COEF), C_COS=6 + len(LOG_COEF), N_COS=len(COS_COEF), K_FREE=0, K_RANDOM=5,
               K_PAIR=10, ST_SRC=SRC, ST_FREE=FREE, ST_RANDOM=RANDOM, ST_INIT=INIT)
_STREAMS = ("free", "random", "pair")  # in K_* order
# output kinds written by the kernel; anything else is written as float64 and cast by torch
_OUT_KINDS = {torch.float64: 0, torch.float32: 1, torch.bfloat16: 2, torch.float16: 3}
_INIT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
_BIG_INDEX = 2**32  # slices ending past it hash the high word of each index


# ---------------------------------------------------------------------------
# Device code. Decorated lazily (``_compiled``): triton.jit reads TRITON_INTERPRET when it
# decorates, and the helpers must be decorated in the same mode as the kernel calling them.
# ---------------------------------------------------------------------------
def _mix32(x):
    # compt.growth._mix32 ("triple32") on uint32: wrapping multiplies are (x * c) mod 2**32.
    x = x ^ (x >> 17)
    x = x * 0xED5AD4BB
    x = x ^ (x >> 11)
    x = x * 0xAC4C1B51
    x = x ^ (x >> 15)
    x = x * 0x31848BAB
    return x ^ (x >> 14)


def _counter_normal(idx, k0, k1, k2, k3, hi_mix, consts_ptr, BIG: tl.constexpr):
    # compt.growth.counter_normal for int64 idx >= 0; keys are uint32 (scalars or per element).
    if BIG:  # some index >= 2**32: the high word enters through mix32(hi ^ k1)
        hi_mix = _mix32((idx >> 32).to(tl.uint32) ^ k1)
    h = _mix32(idx.to(tl.uint32) ^ k0 ^ hi_mix)
    a = _mix32(h ^ k2)
    b = _mix32(h ^ k3)
    u1 = (a.to(tl.float64) + 1.0) * 2.3283064365386963e-10  # 2**-32, exact in float32 too
    u2 = b.to(tl.float64) * 2.3283064365386963e-10
    # _log(u1): frexp by bit ops (u1 is a positive normal number), then the atanh series.
    bits = u1.to(tl.int64, bitcast=True)
    e = ((bits >> 52) & 0x7FF) - 1022
    m = ((bits & 0xFFFFFFFFFFFFF) | 0x3FE0000000000000).to(tl.float64, bitcast=True)  # in [0.5, 1)
    low = m < tl.load(consts_ptr + C_SQRT_HALF)
    m = tl.where(low, m * 2.0, m)
    ef = (e - low.to(tl.int64)).to(tl.float64)
    s = (m - 1.0) / (m + 1.0)
    s2 = s * s
    p = tl.full(s.shape, 0.0, tl.float64) + tl.load(consts_ptr + C_LOG + N_LOG - 1)
    for k in tl.static_range(N_LOG - 1):
        p = p * s2 + tl.load(consts_ptr + C_LOG + N_LOG - 2 - k)
    log_u1 = ef * tl.load(consts_ptr + C_LN2) + (2.0 * s) * p
    # _cos_2pi(u2)
    x = (u2 - 0.5) * tl.load(consts_ptr + C_TWO_PI)
    x2 = x * x
    q = tl.full(x.shape, 0.0, tl.float64) + tl.load(consts_ptr + C_COS + N_COS - 1)
    for k in tl.static_range(N_COS - 1):
        q = q * x2 + tl.load(consts_ptr + C_COS + N_COS - 2 - k)
    return _sqrt(-2.0 * log_u1) * (-q)


def _sqrt(x):
    return tl.sqrt(x)  # float64: sqrt.rn.f64 on NVIDIA GPUs (no approximate float64 sqrt exists)


def _stream_keys(keys_ptr, base):
    k0 = tl.load(keys_ptr + base).to(tl.uint32)
    k1 = tl.load(keys_ptr + base + 1).to(tl.uint32)
    k2 = tl.load(keys_ptr + base + 2).to(tl.uint32)
    k3 = tl.load(keys_ptr + base + 3).to(tl.uint32)
    hm = tl.load(keys_ptr + base + 4).to(tl.uint32)
    return k0, k1, k2, k3, hm


def _expand_kernel(
    out_ptr, ext_ptr, init_ptr,
    lead_i_ptr, lead_s_ptr,  # rows: int64 [4, n_lead] (teacher offset, status, pair code, pair offset); scale
    last_i_ptr, last_s_ptr,  # columns: int64 [4, C] (teacher index, status, pair code, pair offset); scale
    consts_ptr, keys_ptr,
    start, end, row0, n_rows, n_lead, C, n_col_tiles,
    HAS_SRC: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SCALE: tl.constexpr, MIXED: tl.constexpr,
    DO_FREE: tl.constexpr, DO_RANDOM: tl.constexpr, PAIR: tl.constexpr, BIG: tl.constexpr,
    OUT_KIND: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # One program: a BLOCK_R x BLOCK_C tile of the [rows, C] view of the grown tensor,
    # clipped to the flat range [start, end). Element (r, c) has flat index f = r * C + c.
    pid = tl.program_id(0)
    tile_r = pid // n_col_tiles
    tile_c = pid - tile_r * n_col_tiles
    r = row0 + tile_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    c = tile_c.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    r_ok = r < row0 + n_rows
    c_ok = c < C
    f = r[:, None] * C + c[None, :]
    mask = r_ok[:, None] & c_ok[None, :] & (f >= start) & (f < end)

    # status = the highest of the axes' statuses
    if MIXED:
        st = tl.maximum(tl.load(lead_i_ptr + n_lead + r, mask=r_ok, other=0)[:, None],
                        tl.load(last_i_ptr + C + c, mask=c_ok, other=0)[None, :])
    else:
        st = tl.full([BLOCK_R, BLOCK_C], 0, tl.int64)
    is_src = st == ST_SRC

    out = tl.full([BLOCK_R, BLOCK_C], 0, tl.float64)
    if HAS_SRC:
        src = (tl.load(lead_i_ptr + r, mask=r_ok, other=0)[:, None]
               + tl.load(last_i_ptr + c, mask=c_ok, other=0)[None, :])
        vals = tl.load(ext_ptr + src, mask=mask & is_src, other=0.0)
        if HAS_SCALE:  # the product of the axes' scales, in axis order (rows hold the leading product)
            vals = vals * (tl.load(lead_s_ptr + r, mask=r_ok, other=1.0)[:, None]
                           * tl.load(last_s_ptr + c, mask=c_ok, other=1.0)[None, :])
        out = tl.where(is_src, vals, 0.0)

    if PAIR > 0 or DO_FREE or DO_RANDOM:
        no = st < 0
        paired, is_free, is_random = no, no, no
        if PAIR > 0:
            pcode = (tl.load(lead_i_ptr + 2 * n_lead + r, mask=r_ok, other=0)[:, None]
                     + tl.load(last_i_ptr + 2 * C + c, mask=c_ok, other=0)[None, :])
            poff = (tl.load(lead_i_ptr + 3 * n_lead + r, mask=r_ok, other=0)[:, None]
                    + tl.load(last_i_ptr + 3 * C + c, mask=c_ok, other=0)[None, :])
            paired = (pcode > 0) & is_src
        if DO_FREE:
            is_free = st == ST_FREE
        if DO_RANDOM:
            is_random = st == ST_RANDOM
        want = mask & (is_free | is_random | paired)
        # A draw costs ~100 float64 ops: tiles without a drawn element skip them.
        if tl.reduce(want.to(tl.int32), None, _add) > 0:
            # One draw per element, from the stream of its status.
            pk0, pk1, pk2, pk3, phm = _stream_keys(keys_ptr, K_PAIR)
            k0 = tl.full([BLOCK_R, BLOCK_C], 0, tl.uint32) + pk0
            k1 = tl.full([BLOCK_R, BLOCK_C], 0, tl.uint32) + pk1
            k2 = tl.full([BLOCK_R, BLOCK_C], 0, tl.uint32) + pk2
            k3 = tl.full([BLOCK_R, BLOCK_C], 0, tl.uint32) + pk3
            hm = tl.full([BLOCK_R, BLOCK_C], 0, tl.uint32) + phm
            if DO_FREE:
                fk0, fk1, fk2, fk3, fhm = _stream_keys(keys_ptr, K_FREE)
                k0 = tl.where(is_free, fk0, k0)
                k1 = tl.where(is_free, fk1, k1)
                k2 = tl.where(is_free, fk2, k2)
                k3 = tl.where(is_free, fk3, k3)
                hm = tl.where(is_free, fhm, hm)
            if DO_RANDOM:
                rk0, rk1, rk2, rk3, rhm = _stream_keys(keys_ptr, K_RANDOM)
                k0 = tl.where(is_random, rk0, k0)
                k1 = tl.where(is_random, rk1, k1)
                k2 = tl.where(is_random, rk2, k2)
                k3 = tl.where(is_random, rk3, k3)
                hm = tl.where(is_random, rhm, hm)
            idx = f
            if PAIR == 1:  # two copies: both keyed by copy 0's flat index (poff = -copy * period * stride)
                idx = tl.where(paired, f + poff, f)
            z = _counter_normal(idx, k0, k1, k2, k3, hm, consts_ptr, BIG)
            if PAIR > 0:
                if PAIR == 1:  # +z on copy 0, -z on copy 1
                    pz = tl.where(pcode == 1, z, -z)
                else:  # q > 2 copies: (g_c - g_{c+1 mod q}) / sqrt(2); f + poff is copy c+1's index
                    z2 = _counter_normal(f + poff, pk0, pk1, pk2, pk3, phm, consts_ptr, BIG)
                    pz = (z - z2) * tl.load(consts_ptr + C_SQRT_HALF)
                pz = pz * tl.load(consts_ptr + C_STD_PAIR)
                out = tl.where(paired, out + pz, out)
            if DO_FREE:
                out = tl.where(is_free, z * tl.load(consts_ptr + C_STD_FREE), out)
            if DO_RANDOM:
                out = tl.where(is_random, z * tl.load(consts_ptr + C_STD_RANDOM), out)
    if HAS_INIT:
        init = tl.load(init_ptr + (f - start), mask=mask & (st == ST_INIT), other=0.0).to(tl.float64)
        out = tl.where(st == ST_INIT, init, out)

    o = f - start
    if OUT_KIND == 0:
        tl.store(out_ptr + o, out, mask=mask)
    else:
        out32 = out.to(tl.float32)  # float64 -> float32, nearest even (as torch, on every device)
        if OUT_KIND == 1:
            tl.store(out_ptr + o, out32, mask=mask)
        elif OUT_KIND == 2:
            # float32 -> bf16 as c10::BFloat16 does it: nearest even, NaN -> 0x7FC0. By hand on
            # every device: the CPU interpreter would truncate, a GPU keeps other NaN bits.
            bits = out32.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            bits = tl.where(out32 != out32, 0x7FC0, bits)
            tl.store(out_ptr + o, bits.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
        else:
            tl.store(out_ptr + o, out32.to(tl.float16), mask=mask)


def _interpret_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


@functools.cache
def _compiled(interpret: bool):
    # triton.jit reads TRITON_INTERPRET when it decorates. Decorate the kernel and its
    # helpers here, once per mode, in a namespace of their own so that the kernel calls
    # helpers decorated in its own mode (the variable may be set after import, e.g. by a test).
    ns = dict(globals())
    ns.update({k: tl.constexpr(v) for k, v in _LAYOUT.items()})
    for fn in (_mix32, _sqrt, _counter_normal, _stream_keys, _expand_kernel):
        ns[fn.__name__] = triton.jit(types.FunctionType(fn.__code__, ns, fn.__name__, fn.__defaults__))
    return ns["_expand_kernel"]


# Elements per program, widest column block, warps. GPU: 4 elements a thread keep the
# float64 draw code in registers (105 of them with one draw, 170 with two; no spills on
# sm_90). The CPU interpreter pays per program, so it takes bigger tiles.
GPU_LAUNCH = (1024, 256, 8)
INTERPRETER_LAUNCH = (16384, 4096, 4)


def _launch_config(n_rows: int, n_cols: int, interpret: bool) -> tuple[int, int, int]:
    tile, max_c, warps = INTERPRETER_LAUNCH if interpret else GPU_LAUNCH
    block_c = min(triton.next_power_of_2(max(n_cols, 1)), max_c)
    block_r = max(1, min(tile // block_c, triton.next_power_of_2(max(n_rows, 1))))
    return block_r, block_c, max(1, min(warps, block_r * block_c // 128))


# ---------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class _Tables:
    lead_i: torch.Tensor  # int64 [4, n_lead]
    lead_s: torch.Tensor  # float64 [n_lead]
    last_i: torch.Tensor  # int64 [4, C]
    last_s: torch.Tensor  # float64 [C]
    has_scale: bool
    mixed: bool  # some element is not SRC
    has_init: bool  # some element is INIT
    pair: int  # 0 none, 1 two copies, 2 more (before the noise > 0 condition)
    pair_std_div: int  # copies of the paired axis
    statuses: frozenset  # the statuses elements have (the highest of their axes')


_TABLES: "weakref.WeakKeyDictionary[TensorPlan, dict]" = weakref.WeakKeyDictionary()


def _ext_strides(plan: TensorPlan) -> list[int]:
    # TensorPlan._prepare appends one mean slot along every axis that uses it.
    return row_major_strides(tuple(n + int(a.uses_mean) for n, a in zip(plan.source_shape, plan.axes)))


def _axis_fields(plan: TensorPlan, d: int, ext_strides: list[int]) -> list[torch.Tensor]:
    """(teacher offset, status, pair code, pair offset) and scale along axis d."""
    axis = plan.axes[d]
    off = axis.src * ext_strides[d] if plan.sources else torch.zeros_like(axis.src)
    pcode = torch.zeros_like(axis.src)
    poff = torch.zeros_like(axis.src)
    if axis.copies > 1:
        i = torch.arange(axis.size, dtype=torch.int64)
        on = i < axis.copies * axis.period
        copy = i // axis.period
        step = axis.period * row_major_strides(plan.shape)[d]
        if axis.copies == 2:
            pcode = torch.where(on, torch.where(copy == 0, 1, 2), 0)
            poff = torch.where(on, -copy * step, 0)
        else:
            pcode = on.to(torch.int64)
            poff = torch.where(on, ((copy + 1) % axis.copies - copy) * step, 0)
    return [off, axis.status.to(torch.int64), pcode, poff, axis.scale.to(torch.float64)]


def plan_tables(plan: TensorPlan, device: torch.device) -> _Tables:
    """The plan's per-axis tables folded into a row table (leading dims) and a column
    table (last dim); cached per plan and device."""
    per_plan = _TABLES.setdefault(plan, {})
    if device in per_plan:
        return per_plan[device]
    ext_strides = _ext_strides(plan)
    nd = len(plan.axes)
    lead_shape = tuple(plan.shape[:-1])
    off, status, pcode, poff = (torch.zeros(lead_shape, dtype=torch.int64) for _ in range(4))
    scale = torch.ones(lead_shape, dtype=torch.float64)
    for d in range(nd - 1):  # broadcast each leading axis over the leading shape, in axis order
        a_off, a_status, a_pcode, a_poff, a_scale = (
            x.reshape([1] * d + [-1] + [1] * (nd - 2 - d)) for x in _axis_fields(plan, d, ext_strides))
        off, status, pcode, poff = off + a_off, torch.maximum(status, a_status), pcode + a_pcode, poff + a_poff
        scale = scale * a_scale
    lead = [x.reshape(-1) for x in (off, status, pcode, poff, scale)]
    last = _axis_fields(plan, nd - 1, ext_strides)
    pair_axes = [a for a in plan.axes if a.copies > 1]
    statuses = frozenset(torch.maximum(lead[1].unique()[:, None], last[1].unique()[None, :]).unique().tolist())
    tables = _Tables(
        lead_i=torch.stack(lead[:4]).contiguous().to(device), lead_s=lead[4].contiguous().to(device),
        last_i=torch.stack(last[:4]).contiguous().to(device), last_s=last[4].contiguous().to(device),
        has_scale=not all(a.unit_scale for a in plan.axes),
        mixed=not all(a.all_src for a in plan.axes),
        has_init=INIT in statuses,
        pair=0 if not pair_axes else (1 if pair_axes[0].copies == 2 else 2),
        pair_std_div=pair_axes[0].copies if pair_axes else 1,
        statuses=statuses,
    )
    per_plan[device] = tables
    return tables


def _slice_has_init(plan: TensorPlan, start: int, end: int) -> bool:
    """Whether some element of [start, end) keeps the student's init (host, O(rows + C))."""
    if start >= end or not plan.needs_init():
        return False
    t = plan_tables(plan, torch.device("cpu"))
    rs, cs = t.lead_i[1], t.last_i[1]
    C = cs.numel()

    def row_has(r: int, c0: int, c1: int) -> bool:
        return bool((torch.maximum(rs[r], cs[c0:c1]) == INIT).any())

    r0, r1 = start // C, (end - 1) // C
    if r0 == r1:
        return row_has(r0, start - r0 * C, end - r0 * C)
    if row_has(r0, start - r0 * C, C) or row_has(r1, 0, end - r1 * C):
        return True
    mid = rs[r0 + 1:r1]
    any_init_col, any_open_col = bool((cs == INIT).any()), bool((cs <= INIT).any())
    return bool(((mid == INIT) & any_open_col).any() or ((mid < INIT) & any_init_col).any())


class PreparedExpansion:
    """A plan bound to its teacher tensor: the prepared teacher (float64 with mean slots,
    rms) and the lookup tables, ready for any number of ``flat_slice`` calls."""

    def __init__(self, plan: TensorPlan, small: Mapping[str, torch.Tensor], device: torch.device | None = None):
        if triton is None:
            raise RuntimeError("expand_flat_slice(backend='triton'): triton is not importable here")
        if not plan.axes:
            raise ValueError(f"{plan.name}: a plan without axes is a one-value fill; use plan.flat_slice")
        self.plan = plan
        prep = plan._prepare(small)  # the reference's own teacher preparation (mean slots, rms)
        self.device = prep.ext.device if prep is not None else torch.device(device or "cpu")
        self.ext = prep.ext.to(self.device) if prep is not None else torch.zeros(1, dtype=torch.float64,
                                                                                device=self.device)
        rms = prep.rms if prep is not None else 0.0
        self.tables = plan_tables(plan, self.device)
        t = self.tables
        # The stds, computed as the reference computes them (Python floats).
        std_free = plan.noise * rms
        std_random = plan.random_gain * rms
        self.do_free = std_free > 0 and FREE in t.statuses
        self.do_random = std_random > 0 and RANDOM in t.statuses
        self.pair = t.pair if (plan.noise > 0 and prep is not None) else 0
        std_pair = plan.noise * rms / t.pair_std_div
        consts = [LN2, SQRT_HALF, 2.0 * math.pi, std_free, std_random, std_pair, *LOG_COEF, *COS_COEF]
        assert len(consts) == _LAYOUT["C_COS"] + _LAYOUT["N_COS"]  # in _LAYOUT's order
        self.consts = torch.tensor(consts, dtype=torch.float64, device=self.device)
        keys = []
        for purpose in _STREAMS:
            k = stream_key(plan.seed, plan.name, purpose)
            keys += [*k, mix32_int(k[1])]
        self.keys = torch.tensor(keys, dtype=torch.int64, device=self.device)
        self.has_src = prep is not None

    def flat_slice(self, start: int, end: int, init_slice: torch.Tensor | None = None, *,
                   dtype: torch.dtype | None = None) -> torch.Tensor:
        """Elements [start, end) of the flattened grown tensor; as ``TensorPlan.flat_slice``."""
        plan, t = self.plan, self.tables
        start, end = int(start), int(end)
        _check_slice(plan, start, end, init_slice)
        if not self.device.type == "cuda" and not _interpret_enabled():
            raise RuntimeError(
                "expand_flat_slice(backend='triton') got CPU tensors: Triton runs on CPU only in its "
                "interpreter; set TRITON_INTERPRET=1, move the tensors to a GPU, or use backend='reference'")
        out_device = init_slice.device if init_slice is not None else self.device
        dtype = dtype or (init_slice.dtype if init_slice is not None else torch.float64)
        has_init = init_slice is not None and t.has_init
        if t.has_init and init_slice is None and _slice_has_init(plan, start, end):
            raise ValueError(f"growing {plan.name} keeps part of the student's init: pass init / init_slice")
        kind = _OUT_KINDS.get(dtype, 0)  # other dtypes: written as float64, cast by torch as the reference does
        out = torch.empty(end - start, dtype=dtype if dtype in _OUT_KINDS else torch.float64, device=self.device)
        if end > start:
            init = out
            if has_init:
                init = init_slice.detach().reshape(-1).to(self.device)
                if init.dtype not in _INIT_DTYPES:
                    init = init.to(torch.float64)  # the reference's own conversion
                init = init.contiguous()
            C = t.last_s.numel()
            row0, row_last = start // C, (end - 1) // C
            n_rows = row_last - row0 + 1
            interpret = _interpret_enabled()
            block_r, block_c, num_warps = _launch_config(n_rows, C, interpret)
            n_col_tiles = triton.cdiv(C, block_c)
            grid = (triton.cdiv(n_rows, block_r) * n_col_tiles,)
            _compiled(interpret)[grid](
                out, self.ext, init, t.lead_i, t.lead_s, t.last_i, t.last_s, self.consts, self.keys,
                start, end, row0, n_rows, t.lead_s.numel(), C, n_col_tiles,
                HAS_SRC=self.has_src, HAS_INIT=has_init, HAS_SCALE=t.has_scale, MIXED=t.mixed,
                DO_FREE=self.do_free, DO_RANDOM=self.do_random, PAIR=self.pair, BIG=end > _BIG_INDEX,
                OUT_KIND=kind, BLOCK_R=block_r, BLOCK_C=block_c,
                num_warps=num_warps, enable_fp_fusion=False)
        if out.dtype != dtype:
            out = out.to(dtype)
        return out.to(out_device)


def prepare_expansion(plan: TensorPlan, small: Mapping[str, torch.Tensor]) -> PreparedExpansion:
    """Prepare ``plan`` for the Triton kernel once (teacher preparation by the PyTorch
    reference code, lookup tables), for several slices of the same tensor."""
    return PreparedExpansion(plan, small)


def _check_slice(plan: TensorPlan, start: int, end: int, init_slice: torch.Tensor | None) -> None:
    if not (0 <= start <= end <= plan.numel):
        raise ValueError(f"{plan.name}: slice [{start}, {end}) outside [0, {plan.numel})")
    if init_slice is not None and init_slice.numel() != end - start:
        raise ValueError(f"{plan.name}: init_slice has {init_slice.numel()} elements, slice has {end - start}")


def _compute_device(plan: TensorPlan, small: Mapping[str, torch.Tensor],
                    init_slice: torch.Tensor | None) -> torch.device:
    if plan.sources and plan.sources[0] in small:
        return small[plan.sources[0]].device
    return init_slice.device if init_slice is not None else torch.device("cpu")


def _pick_backend(backend: str, plan: TensorPlan, device: torch.device) -> str:
    if backend not in _BACKENDS:
        raise ValueError(f"expand_flat_slice: backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if (device.type == "cuda" and triton is not None and plan.axes) else "reference"
    if backend == "triton":
        if triton is None:
            raise RuntimeError("expand_flat_slice(backend='triton'): triton is not importable here")
        if device.type != "cuda" and not _interpret_enabled():
            raise RuntimeError(
                f"expand_flat_slice(backend='triton') got {device.type.upper()} tensors: Triton runs on CPU only "
                "in its interpreter; set TRITON_INTERPRET=1, move the tensors to a GPU, or use "
                "backend='reference'")
        if not plan.axes:  # one value copied: nothing to fuse
            return "reference"
    return backend


def expand_flat_slice(plan: TensorPlan, small: Mapping[str, torch.Tensor], start: int, end: int,
                      init_slice: torch.Tensor | None = None, dtype: torch.dtype | None = None,
                      backend: str = "auto") -> torch.Tensor:
    """Elements ``[start, end)`` of the flattened grown tensor of ``plan`` (a ZeRO-3
    partition), bit-identical to ``plan.flat_slice(small, start, end, init_slice, dtype=dtype)``:
    same result dtype (``dtype``, else ``init_slice``'s, else float64), device
    (``init_slice``'s, else the teacher's) and errors.

    backend: "auto" (Triton for CUDA tensors when triton imports, else the reference),
    "triton" (on CPU only under TRITON_INTERPRET=1), "reference" (``plan.flat_slice``).
    The teacher preparation (float64 copy with mean slots, rms) is the reference's
    PyTorch code, once per call; use ``prepare_expansion`` to reuse it across slices.
    """
    device = _compute_device(plan, small, init_slice)
    backend = _pick_backend(backend, plan, device)
    if backend == "reference":
        return plan.flat_slice(small, start, end, init_slice, dtype=dtype)
    _check_slice(plan, int(start), int(end), init_slice)
    return PreparedExpansion(plan, small, device).flat_slice(start, end, init_slice, dtype=dtype)
