"""Growth plans: one student tensor described as an index map into one teacher tensor,
a scale and a fill, evaluated by a single per-element function on flat indices.

Because every output element is computed from its own global flat index only, the
dense tensor and any flat slice of it (a ZeRO-3 rank's partition) come from the same
code and agree bit for bit, whatever the cut points, thread count or chunking.

How a plan reads
----------------
A plan has one :class:`Axis` per student dimension. For each student index along an
axis the axis gives a teacher index (``src``), a factor (``scale``) and a status.
An element's status is the highest of its axes' statuses (``ZERO`` beats ``INIT``
beats ``RANDOM`` beats ``FREE`` beats ``SRC``):

``SRC``     teacher value at the combined index, times the product of the scales.
            ``src == teacher size`` along an axis points at an appended "mean slot":
            the mean of the teacher tensor along that axis (so "mean of the rows" is
            just one more row).
``FREE``    ``noise * rms(teacher) * N(0, 1)`` (0 when noise is 0): an input weight
            whose input is zero, so any value keeps the function.
``RANDOM``  ``random_gain * rms(teacher) * N(0, 1)``, drawn whatever ``noise`` is:
            input weights of a new unit whose output weights are zero.
``INIT``    the student's own initial value (``init_slice``).
``ZERO``    0.

One axis may be *paired*: its indices ``[0, copies * period)`` are ``copies`` tiled
copies of the same teacher index (a reader of a tiled input). With ``noise > 0`` the
copies get zero-sum noise of std ``noise * rms(teacher) / copies``: ``+z, -z`` for two
copies, ``g_c - g_{c+1 mod q}`` (scaled to unit variance) for ``q > 2``, so the copies
still sum to the teacher value.

Determinism
-----------
Everything is computed in float64 and cast at the end. Randomness is counter-based:
a 32-bit integer hash of (seed, tensor name, purpose, global flat index) built from
integer ops that never overflow int64, then Box-Muller with our own polynomial
``log``/``cos`` (only +, -, *, /, sqrt and frexp, which are exactly rounded everywhere,
so results do not depend on SIMD tails or the device). Reductions (mean slots, rms)
use a fixed pairwise tree of elementwise adds, which does not depend on the number of
threads either.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F

# How a stage starts from its predecessor, for every family: exact (function-preserving growth),
# official (the reference code's slice copy), none (the student's own init).
MODES = ("exact", "official", "none")

SRC, FREE, RANDOM, INIT, ZERO = 0, 1, 2, 3, 4
_REST = {"mean": SRC, "free": FREE, "random": RANDOM, "init": INIT, "zero": ZERO}

# Elements computed per vectorised step; bounds temporary memory (~20 float64/int64 temporaries).
_CHUNK = 1 << 20


@dataclass(frozen=True, eq=False)
class Axis:
    """How one student dimension reads the teacher dimension (see the module docstring)."""

    src: torch.Tensor  # int64 [n]
    scale: torch.Tensor  # float64 [n]
    status: torch.Tensor  # int64 [n]
    n_small: int  # the teacher's size along this axis; src == n_small is the mean slot
    copies: int = 1  # >1: a paired axis, indices [0, copies*period) are tiled copies
    period: int = 0

    def __post_init__(self):
        # Whole-axis facts that let the per-element code skip work; they never change a result.
        object.__setattr__(self, "all_src", bool((self.status == SRC).all()))
        object.__setattr__(self, "unit_scale", bool((self.scale == 1.0).all()))
        object.__setattr__(self, "uses_mean", bool(((self.src == self.n_small) & (self.status == SRC)).any()))

    @property
    def size(self) -> int:
        return self.src.numel()


def tile_axis(n_small: int, n_big: int, *, copies: int | None = None, scale: float = 1.0, rest: str = "mean",
              rest_scale: float = 1.0, blocks: int = 1, paired: bool = False) -> Axis:
    """Student index ``i < copies * n_small`` reads teacher index ``i mod n_small`` times
    ``scale``; the remainder is filled as ``rest`` ("mean" = the teacher's mean slot times
    ``rest_scale``, or "free"/"random"/"init"/"zero"). ``copies`` defaults to as many whole
    copies as fit (``copies=1`` is a prefix copy, ``copies=0`` fills everything).

    ``blocks`` splits both sides into that many equal consecutive blocks and tiles block
    by block (the packed q/k/v rows of an attention in_proj). ``paired`` makes the copies
    share zero-sum noise (readers of a tiled input).
    """
    if n_small % blocks or n_big % blocks:
        raise ValueError(f"sizes {n_small} -> {n_big} do not split into {blocks} blocks")
    if rest == "mean" and blocks != 1:
        raise ValueError("a mean fill needs blocks=1")
    ps, pb = n_small // blocks, n_big // blocks
    fit = pb // ps if ps else 0
    q = fit if copies is None else min(copies, fit)
    i = torch.arange(n_big, dtype=torch.int64)
    b, j = i // pb, i % pb
    inside = j < q * ps
    rest_src = n_small if rest == "mean" else 0
    src = torch.where(inside, b * ps + (j % ps if ps else j), torch.full_like(i, rest_src))
    status = torch.where(inside, torch.full_like(i, SRC), torch.full_like(i, _REST[rest]))
    scale_t = torch.where(inside, torch.full((n_big,), float(scale), dtype=torch.float64),
                          torch.full((n_big,), float(rest_scale), dtype=torch.float64))
    if paired and blocks != 1:
        raise ValueError("a paired axis needs blocks=1")
    pair = paired and q >= 2
    return Axis(src=src, scale=scale_t, status=status, n_small=n_small, copies=q if pair else 1,
                period=ps if pair else 0)


def _tree_sum(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum along ``dim`` by a fixed pairwise tree of elementwise adds (keepdim)."""
    x = x.movedim(dim, -1)
    n = x.shape[-1]
    width = 1 << max(n - 1, 0).bit_length()
    if width != n:
        x = F.pad(x, (0, width - n))
    while x.shape[-1] > 1:
        half = x.shape[-1] // 2
        x = x[..., :half] + x[..., half:]
    return x.movedim(-1, dim)


def _rms(x: torch.Tensor) -> float:
    flat = x.reshape(-1)
    if flat.numel() == 0:
        return 0.0
    return math.sqrt(_tree_sum(flat * flat, 0).item() / flat.numel())


# ---- counter-based normal draws --------------------------------------------------------
_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    # (x * c) mod 2**32 for 0 <= x < 2**32 without int64 overflow: split c into 16-bit halves.
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    # "triple32" (C. Wellons, public domain): a bijection on 32-bit ints with low bias.
    x = x ^ (x >> 17)
    x = _mul32(x, 0xED5AD4BB)
    x = x ^ (x >> 11)
    x = _mul32(x, 0xAC4C1B51)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x31848BAB)
    return x ^ (x >> 14)


def stream_key(seed: int, name: str, purpose: str) -> tuple[int, int, int, int]:
    digest = hashlib.blake2b(f"{seed}\x00{name}\x00{purpose}".encode(), digest_size=16).digest()
    return tuple(int.from_bytes(digest[k:k + 4], "little") for k in range(0, 16, 4))  # type: ignore[return-value]


LN2 = math.log(2.0)
SQRT_HALF = math.sqrt(0.5)
LOG_COEF = [1.0 / (2 * k + 1) for k in range(10)]  # 2*atanh(s) = 2s * sum s^2k / (2k+1)
COS_COEF = [(-1.0) ** k / math.factorial(2 * k) for k in range(15)]  # |x| <= pi: error < 1e-15


def _log(u: torch.Tensor) -> torch.Tensor:
    """Natural log of u > 0 (float64) from frexp and a series; ~1e-15 relative error."""
    m, e = torch.frexp(u)
    low = m < SQRT_HALF
    m = torch.where(low, m * 2.0, m)  # now in [sqrt(1/2), sqrt(2))
    e = (e - low.to(e.dtype)).to(torch.float64)
    s = (m - 1.0) / (m + 1.0)
    s2 = s * s
    p = torch.full_like(s, LOG_COEF[-1])
    for c in reversed(LOG_COEF[:-1]):
        p = p * s2 + c
    return e * LN2 + 2.0 * s * p


def _cos_2pi(u: torch.Tensor) -> torch.Tensor:
    """cos(2*pi*u) for u in [0, 1) (float64), by a Taylor polynomial around pi."""
    x = (u - 0.5) * (2.0 * math.pi)  # cos(2 pi u) = -cos(x), |x| <= pi
    x2 = x * x
    p = torch.full_like(x, COS_COEF[-1])
    for c in reversed(COS_COEF[:-1]):
        p = p * x2 + c
    return -p


def mix32_int(x: int) -> int:
    return int(_mix32(torch.tensor([x], dtype=torch.int64))[0])


def counter_normal(seed: int, name: str, purpose: str, index: torch.Tensor) -> torch.Tensor:
    """Standard normal draws (float64), a pure function of (seed, name, purpose, index)
    for int64 ``index >= 0``."""
    k0, k1, k2, k3 = stream_key(seed, name, purpose)
    hi = (index >> 32) & _M32
    # The high word enters through mix32(hi ^ k1); below 2**32 elements it is one constant.
    hi_mix = mix32_int(k1) if not bool(hi.any()) else _mix32(hi ^ k1)
    h = _mix32((index & _M32) ^ k0 ^ hi_mix)
    a = _mix32(h ^ k2)
    b = _mix32(h ^ k3)
    u1 = (a.to(torch.float64) + 1.0) * 2.0 ** -32  # (0, 1]
    u2 = b.to(torch.float64) * 2.0 ** -32  # [0, 1)
    return _sqrt(-2.0 * _log(u1)) * _cos_2pi(u2)


def _sqrt(x: torch.Tensor) -> torch.Tensor:
    # torch's CPU sqrt (2.14) is not correctly rounded (~1.4% of float64 inputs are 1 ulp
    # off); numpy's is, as is CUDA's, so draws agree across devices and with the Triton kernel.
    if x.device.type == "cpu":
        return torch.from_numpy(np.sqrt(x.contiguous().numpy()))
    return torch.sqrt(x)


# ---- plans ---------------------------------------------------------------------------------
def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def row_major_strides(shape: tuple[int, ...]) -> list[int]:
    out, acc = [], 1
    for s in reversed(shape):
        out.append(acc)
        acc *= s
    return out[::-1]


@dataclass(frozen=True, eq=False)
class _Prepared:
    ext: torch.Tensor  # flat float64 teacher tensor with mean slots appended where used
    ext_strides: list[int]
    rms: float


@dataclass(frozen=True, eq=False)
class TensorPlan:
    """How to compute one student tensor from (at most) one teacher tensor.

    ``sources``: teacher tensor names needed (empty: nothing is read). ``shape``: the
    student tensor's shape (stock open_clip shapes; only the element count matters to
    ``flat_slice``). ``source_shape``: the teacher tensor's expected shape.
    """

    name: str
    sources: tuple[str, ...]
    shape: tuple[int, ...]
    source_shape: tuple[int, ...]
    axes: tuple[Axis, ...]
    noise: float = 0.0
    seed: int = 0
    random_gain: float = 0.0

    def __post_init__(self):
        if len(self.axes) not in (0, len(self.shape)):
            raise ValueError(f"{self.name}: {len(self.axes)} axes for shape {self.shape}")
        if self.axes and len(self.source_shape) != len(self.shape):
            raise ValueError(f"{self.name}: teacher shape {self.source_shape} and student shape {self.shape} "
                             "have different ranks")
        if sum(a.copies > 1 for a in self.axes) > 1:
            raise ValueError(f"{self.name}: at most one paired axis")
        if not self.sources and any(bool((a.status == SRC).any()) for a in self.axes):
            raise ValueError(f"{self.name}: a plan without a source must fill every element")

    @property
    def numel(self) -> int:
        return _numel(self.shape)

    def needs_init(self) -> bool:
        """Whether some element keeps the student's init (so ``init``/``init_slice`` is required)."""
        return any(bool((a.status == INIT).any()) for a in self.axes)

    # -- teacher side, computed once per call from the whole teacher tensor
    def _prepare(self, small: Mapping[str, torch.Tensor]) -> _Prepared | None:
        if not self.sources:
            return None
        src_name = self.sources[0]
        if src_name not in small:
            raise KeyError(f"growing {self.name} needs teacher tensor {src_name!r}, which is missing")
        t = small[src_name].detach()
        scalar = _numel(self.source_shape) == 1 and t.numel() == 1 and len(self.source_shape) <= 1 and t.ndim <= 1
        if tuple(t.shape) != tuple(self.source_shape) and not scalar:
            raise ValueError(f"growing {self.name}: teacher tensor {src_name} has shape {tuple(t.shape)}, "
                             f"the configs say {tuple(self.source_shape)}")
        x = t.to(torch.float64).reshape(self.source_shape if self.axes else (t.numel(),))
        for d, axis in enumerate(self.axes):
            if axis.uses_mean:  # append the mean slot along this axis
                x = torch.cat([x, _tree_sum(x, d) / axis.n_small], dim=d)
        need_rms = self.random_gain > 0 and any(bool((a.status == RANDOM).any()) for a in self.axes) or (
            self.noise > 0 and any(a.copies > 1 or bool((a.status == FREE).any()) for a in self.axes))
        return _Prepared(ext=x.reshape(-1).contiguous(), ext_strides=row_major_strides(tuple(x.shape)),
                         rms=_rms(t.to(torch.float64)) if need_rms else 0.0)

    # -- per element: the one definition of the rule
    def _values(self, prep: _Prepared | None, f: torch.Tensor, init: torch.Tensor | None) -> torch.Tensor:
        """Grown values (float64) at global flat indices ``f``. Purely elementwise in ``f``;
        the shortcuts below depend only on whole-axis facts, never on which elements are
        in the chunk, except for skipping work on elements that are absent."""
        n = f.numel()
        if not self.axes:  # a single value copied (logit_scale, 0-d or [1])
            return torch.full((n,), float(prep.ext[0]) if prep is not None else 0.0, dtype=torch.float64,
                              device=f.device)
        strides = row_major_strides(self.shape)
        last = len(self.axes) - 1
        status = src = scale = None
        pair = None
        for d, axis in enumerate(self.axes):
            if d == 0:
                idx = f // strides[0]
            elif d == last:
                idx = f % axis.size
            else:
                idx = (f // strides[d]) % axis.size
            a_src, a_scale, a_status = (t.to(f.device) for t in (axis.src, axis.scale, axis.status))
            if not axis.all_src:
                st = a_status[idx]
                status = st if status is None else torch.maximum(status, st)
            if prep is not None:
                s_d = a_src[idx]
                if prep.ext_strides[d] != 1:
                    s_d = s_d * prep.ext_strides[d]
                src = s_d if src is None else src + s_d
            if not axis.unit_scale:
                sc = a_scale[idx]
                scale = sc if scale is None else scale * sc
            if axis.copies > 1:
                pair = (d, axis, idx)

        if status is None:  # every element reads the teacher: no masks
            vals = prep.ext[src]
            if scale is not None:
                vals = vals * scale
            if pair is not None and self.noise > 0:
                vals = self._pair_noise(vals, prep, f, *pair, strides[pair[0]])
            return vals

        out = torch.zeros(n, dtype=torch.float64, device=f.device)
        take = status == SRC
        if prep is not None and bool(take.any()):
            vals = prep.ext[src[take]]
            if scale is not None:
                vals = vals * scale[take]
            if pair is not None and self.noise > 0:
                d, axis, idx = pair
                vals = self._pair_noise(vals, prep, f[take], d, axis, idx[take], strides[d])
            out[take] = vals
        for code, purpose, std in ((FREE, "free", self.noise * (prep.rms if prep else 0.0)),
                                   (RANDOM, "random", self.random_gain * (prep.rms if prep else 0.0))):
            if std > 0:
                sel = status == code
                if bool(sel.any()):
                    out[sel] = counter_normal(self.seed, self.name, purpose, f[sel]) * std
        sel = status == INIT
        if bool(sel.any()):
            if init is None:
                raise ValueError(f"growing {self.name} keeps part of the student's init: pass init / init_slice")
            out[sel] = init[sel].to(device=out.device, dtype=torch.float64)
        return out

    def _pair_noise(self, vals: torch.Tensor, prep: _Prepared, f: torch.Tensor, d: int, axis: Axis,
                    idx: torch.Tensor, stride: int) -> torch.Tensor:
        """Add zero-sum noise across the ``axis.copies`` tiled copies (elements of ``vals``
        at flat indices ``f`` with index ``idx`` along the paired axis ``d``)."""
        span = axis.copies * axis.period
        noisy = None if axis.size == span else idx < span
        if noisy is not None:
            f, idx = f[noisy], idx[noisy]
        copy = idx // axis.period
        std = self.noise * prep.rms / axis.copies
        if axis.copies == 2:  # +z on copy 0, -z on copy 1, keyed by copy 0's flat index
            z = counter_normal(self.seed, self.name, "pair", f - copy * (axis.period * stride))
            z = torch.where(copy == 0, z, -z)
        else:  # g_c - g_{c+1 mod q}: sums to zero over the copies; scaled to unit variance
            nxt = f + (((copy + 1) % axis.copies) - copy) * (axis.period * stride)
            z = (counter_normal(self.seed, self.name, "pair", f)
                 - counter_normal(self.seed, self.name, "pair", nxt)) * SQRT_HALF
        z = z * std
        if noisy is None:
            return vals + z
        vals = vals.clone()
        vals[noisy] = vals[noisy] + z
        return vals

    def flat_slice(self, small: Mapping[str, torch.Tensor], start: int, end: int,
                   init_slice: torch.Tensor | None = None, *, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Elements ``[start, end)`` of the flattened (row-major) grown tensor, without
        materialising the whole of it. ``init_slice`` is the same flat slice of the
        student's own init (only read where the rule keeps init, e.g. ``official``).
        Result dtype: ``dtype``, else ``init_slice``'s, else float64; device: ``init_slice``'s,
        else the teacher tensor's."""
        if not (0 <= start <= end <= self.numel):
            raise ValueError(f"{self.name}: slice [{start}, {end}) outside [0, {self.numel})")
        if init_slice is not None and init_slice.numel() != end - start:
            raise ValueError(f"{self.name}: init_slice has {init_slice.numel()} elements, slice has {end - start}")
        prep = self._prepare(small)
        device = prep.ext.device if prep is not None else (
            init_slice.device if init_slice is not None else torch.device("cpu"))
        init_flat = init_slice.detach().reshape(-1) if init_slice is not None else None
        out = torch.empty(end - start, dtype=torch.float64, device=device)
        for lo in range(start, end, _CHUNK):
            hi = min(lo + _CHUNK, end)
            f = torch.arange(lo, hi, dtype=torch.int64, device=device)
            chunk_init = init_flat[lo - start:hi - start] if init_flat is not None else None
            out[lo - start:hi - start] = self._values(prep, f, chunk_init)
        dtype = dtype or (init_slice.dtype if init_slice is not None else torch.float64)
        return out.to(device=init_slice.device if init_slice is not None else device, dtype=dtype)

    def dense(self, small: Mapping[str, torch.Tensor], init: torch.Tensor | None = None, *,
              dtype: torch.dtype | None = None) -> torch.Tensor:
        """The whole grown tensor: ``flat_slice(small, 0, numel, init.flatten())`` reshaped
        to ``init``'s shape (a [1] logit_scale stays [1]) or ``shape``."""
        if init is not None and init.numel() != self.numel:
            raise ValueError(f"cannot grow {self.name}: student tensor has shape {tuple(init.shape)}, "
                             f"the configs say {self.shape}")
        flat = self.flat_slice(small, 0, self.numel, init.reshape(-1) if init is not None else None, dtype=dtype)
        return flat.reshape(tuple(init.shape) if init is not None else self.shape)


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown growth mode {mode!r}; expected one of {MODES}")


def grow_with_plans(small_sd: Mapping[str, torch.Tensor], big_init_sd: Mapping[str, torch.Tensor],
                    plan_of, mode: str) -> dict[str, torch.Tensor]:
    """A grown state dict: one entry per ``big_init_sd`` key, in its order, with that entry's
    shape, dtype and device, each from ``plan_of(name) -> TensorPlan | None``. Tensors no plan
    covers keep their init; a plan whose teacher tensor is missing from ``small_sd`` is an
    error in ``exact`` mode and keeps the init otherwise."""
    out: dict[str, torch.Tensor] = {}
    for name, big_init in big_init_sd.items():
        plan = plan_of(name)
        if plan is not None and any(s not in small_sd for s in plan.sources):
            if mode == "exact":
                missing = [s for s in plan.sources if s not in small_sd]
                raise ValueError(f"exact growth of {name} needs teacher tensor(s) {missing}, missing from small_sd")
            plan = None
        if plan is None:
            out[name] = big_init.detach().clone()
            continue
        if plan.numel != big_init.numel():
            raise ValueError(f"cannot grow {name}: student tensor has shape {tuple(big_init.shape)}, "
                             f"the configs say {plan.shape}")
        grown = plan.dense({s: small_sd[s] for s in plan.sources},
                           init=big_init if plan.needs_init() else None, dtype=big_init.dtype)
        out[name] = grown.reshape(big_init.shape).to(big_init.device)
    return out


# ---- a growth job: what `compt grow` writes, as a family describes it --------------------------


class GrowthRefused(ValueError):
    """Bad input to ``compt grow`` (a config, a flag): the command prints ``error: ...`` and exits 2."""


@dataclass
class GrowthJob:
    """What ``compt grow`` writes: the student tensors in order, their plans, and what checks
    the checkpoint. A family's ``grow_job`` builds it; the command streams it to disk."""

    shapes: dict[str, tuple[int, ...]]  # student tensors, in output order
    small_shapes: dict[str, tuple[int, ...]]  # teacher tensors as the checkpoint stores them
    plans: dict[str, TensorPlan | None]  # None: the tensor keeps the student's own init
    make_init: Callable[[], dict]  # the student's own init (only called when some tensor keeps it)
    meta: dict[str, str]  # the safetensors header's metadata
    config: dict[str, Any] | None = None  # the grown model's config, written to --out-config; None: --to-config is it
    notes: list[str] = field(default_factory=list)  # printed as "note: ..." after a successful write
