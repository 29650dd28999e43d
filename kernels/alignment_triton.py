"""Fused Triton kernels for the CoM-PT feature-alignment loss, and its entry point.

One forward and one backward launch cover image and text rows together; the
PyTorch reference beside it (``alignment.py``) defines what they must compute.
"""
from __future__ import annotations  # kernel annotations stay strings: importable without triton

import functools
import math
import os

import torch
from torch.autograd.function import once_differentiable

from compt.kernels.alignment import feature_alignment_loss_reference

try:
    import triton
    import triton.language as tl
except ImportError:  # e.g. macOS: the reference still works
    triton = None
    tl = None

__all__ = ["feature_alignment_loss", "FusedFeatureAlignmentLoss", "NonFiniteInputError", "MAX_FUSED_DIM"]

# A row is held in registers whole (BLOCK_D = next power of two >= D): the loss
# needs both row norms before any squared error. Embedding dims are 256-1280.
MAX_FUSED_DIM = 16384
_NORM_EPS = 1e-12  # F.normalize's default, so rows of norm < eps behave as in the reference
_BACKENDS = ("auto", "triton", "reference")


# tl.sum is itself a @triton.jit function, fixed to interpreter or compiler when
# triton is imported; tl.reduce is a builtin that the interpreter patches at each
# launch (and runs as np.sum for this combine function). Summing through it keeps
# the kernels runnable when TRITON_INTERPRET=1 is set after triton was imported.
_add = tl.standard._sum_combine if tl is not None else None

# ---------------------------------------------------------------------------
# Kernels. Grid: one program per block of BLOCK_M rows; the first n_img_blocks
# programs take image rows, the rest text rows (same code, other pointers), so
# image and text go through one launch. Per row, with s_hat = s / max(|s|, eps):
#   loss_row = w * sum_d (s_hat - t_hat)^2,   w = alpha / (rows * D) of its tensor.
# A NaN or Inf element makes its own (s_hat - t_hat) NaN (Inf / Inf, NaN / x), so
# the tile's partial loss is NaN: the NaN/Inf check costs no extra pass or flag.
# ---------------------------------------------------------------------------
def _alignment_fwd(
    si_ptr, ti_ptr, st_ptr, tt_ptr,  # student/teacher image, student/teacher text
    partial_ptr,  # one fp32 partial loss per program
    n_img, n_txt, d_img, d_txt,
    si_stride, ti_stride, st_stride, tt_stride,
    w_img, w_txt, n_img_blocks, eps,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid < n_img_blocks:
        s_ptr, t_ptr, n_rows, d = si_ptr, ti_ptr, n_img, d_img
        s_stride, t_stride, w, block = si_stride, ti_stride, w_img, pid
    else:
        s_ptr, t_ptr, n_rows, d = st_ptr, tt_ptr, n_txt, d_txt
        s_stride, t_stride, w, block = st_stride, tt_stride, w_txt, pid - n_img_blocks

    rows = (block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < d)
    s = tl.load(s_ptr + rows[:, None] * s_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + rows[:, None] * t_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)

    # Per-row reciprocals in IEEE precision, then one multiply per element.
    s_inv = tl.div_rn(1.0, tl.maximum(tl.sqrt_rn(tl.reduce(s * s, 1, _add)), eps))
    t_inv = tl.div_rn(1.0, tl.maximum(tl.sqrt_rn(tl.reduce(t * t, 1, _add)), eps))
    diff = s * s_inv[:, None] - t * t_inv[:, None]  # squared as is, not 2 - 2 cos: exact 0 when s == t
    tl.store(partial_ptr + pid, tl.reduce(tl.reduce(diff * diff, 1, _add), 0, _add) * w)


def _alignment_bwd(
    si_ptr, ti_ptr, st_ptr, tt_ptr,
    gi_ptr, gt_ptr,  # d loss / d student image, d loss / d student text (contiguous)
    grad_loss_ptr,  # upstream gradient of the scalar loss, read here: no host sync
    n_img, n_txt, d_img, d_txt,
    si_stride, ti_stride, st_stride, tt_stride,
    w_img, w_txt, n_img_blocks, eps,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BF16_RTNE_BY_HAND: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid < n_img_blocks:
        s_ptr, t_ptr, g_ptr, n_rows, d = si_ptr, ti_ptr, gi_ptr, n_img, d_img
        s_stride, t_stride, w, block = si_stride, ti_stride, w_img, pid
    else:
        s_ptr, t_ptr, g_ptr, n_rows, d = st_ptr, tt_ptr, gt_ptr, n_txt, d_txt
        s_stride, t_stride, w, block = st_stride, tt_stride, w_txt, pid - n_img_blocks

    rows = (block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < d)
    s = tl.load(s_ptr + rows[:, None] * s_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + rows[:, None] * t_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)

    s_norm = tl.sqrt_rn(tl.reduce(s * s, 1, _add))
    s_inv = tl.div_rn(1.0, tl.maximum(s_norm, eps))
    t_inv = tl.div_rn(1.0, tl.maximum(tl.sqrt_rn(tl.reduce(t * t, 1, _add)), eps))
    s_hat = s * s_inv[:, None]
    diff = s_hat - t * t_inv[:, None]
    # d/ds of s / max(|s|, eps) applied to dL/ds_hat = c * diff:
    #   (c / |s|) * (diff - s_hat * <s_hat, diff>)   where |s| >= eps,
    #   (c / eps) * diff                              below (clamp_min passes no grad).
    radial = tl.where(s_norm >= eps, tl.reduce(s_hat * diff, 1, _add), 0.0)
    c = 2.0 * w * tl.load(grad_loss_ptr).to(tl.float32)
    grad = (diff - s_hat * radial[:, None]) * (c * s_inv)[:, None]
    if BF16_RTNE_BY_HAND:
        # Triton's CPU interpreter truncates fp32 -> bf16 (the GPU rounds to nearest
        # even); round by hand there so the tests see what a GPU writes.
        bits = grad.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        out = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        out = grad.to(g_ptr.dtype.element_ty)
    tl.store(g_ptr + rows[:, None] * d + cols[None, :], out, mask=mask)


def _interpret_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def _kernel(fn):
    return _jit(fn, _interpret_enabled())


@functools.cache
def _jit(fn, interpret: bool):
    # triton.jit reads TRITON_INTERPRET when it decorates a function, not when the
    # kernel launches. Decorating here, once per mode, lets the variable be set
    # after this module (or triton) was imported, e.g. by a test.
    return triton.jit(fn)


def _launch_config(n_rows: int, block_d: int, interpret: bool) -> tuple[int, int]:
    # GPU: ~4k fp32 per tensor per program keeps s, t in registers. The CPU
    # interpreter pays per program, so it takes bigger tiles.
    target = 16384 if interpret else 4096
    block_m = max(1, min(target // block_d, triton.next_power_of_2(max(n_rows, 1)), 128))
    num_warps = min(16, max(4, block_m * block_d // 1024))
    return block_m, num_warps


# ---------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------
class _Launch:
    """Grid, tile sizes and scalar kernel arguments for one loss call (no tensors held)."""

    def __init__(self, s_img: torch.Tensor, s_txt: torch.Tensor, t_img: torch.Tensor, t_txt: torch.Tensor,
                 alpha: float):
        self.n_img, self.d_img = s_img.shape
        self.n_txt, self.d_txt = s_txt.shape
        self.strides = (s_img.stride(0), t_img.stride(0), s_txt.stride(0), t_txt.stride(0))
        self.block_d = triton.next_power_of_2(max(self.d_img, self.d_txt))
        self.block_m, self.num_warps = _launch_config(max(self.n_img, self.n_txt), self.block_d,
                                                      _interpret_enabled())
        self.n_img_blocks = triton.cdiv(self.n_img, self.block_m)
        self.grid = (self.n_img_blocks + triton.cdiv(self.n_txt, self.block_m),)
        self.w_img = alpha / (self.n_img * self.d_img)
        self.w_txt = alpha / (self.n_txt * self.d_txt)

    def args(self) -> tuple:
        return (self.n_img, self.n_txt, self.d_img, self.d_txt, *self.strides,
                self.w_img, self.w_txt, self.n_img_blocks, _NORM_EPS)

    def run(self, fn, *tensors, **constexprs) -> None:
        _kernel(fn)[self.grid](*tensors, *self.args(), BLOCK_M=self.block_m, BLOCK_D=self.block_d,
                               num_warps=self.num_warps, **constexprs)


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(-1, x.shape[-1])
    return x if x.stride(-1) == 1 else x.contiguous()


def _common_dtype(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if a.dtype == b.dtype:
        return a, b
    dtype = torch.promote_types(a.dtype, b.dtype)
    return a.to(dtype), b.to(dtype)


class FusedFeatureAlignmentLoss(torch.autograd.Function):
    """alpha * (mse(n(s_img), n(t_img)) + mse(n(s_txt), n(t_txt))), n = L2-normalise rows.

    Inputs are the (already projected) student embeddings and the teacher's; the
    teacher's get no gradient. Loss in float32; gradients in the student's dtype.
    """

    @staticmethod
    def forward(ctx, student_image, student_text, teacher_image, teacher_text, alpha):
        s_img, s_txt = _common_dtype(_as_rows(student_image), _as_rows(student_text))
        t_img, t_txt = _common_dtype(_as_rows(teacher_image.detach()), _as_rows(teacher_text.detach()))
        launch = _Launch(s_img, s_txt, t_img, t_txt, float(alpha))
        partial = torch.empty(launch.grid[0], dtype=torch.float32, device=s_img.device)
        launch.run(_alignment_fwd, s_img, t_img, s_txt, t_txt, partial)
        loss = partial.sum()
        if not torch.isfinite(loss):  # the one host sync; a NaN/Inf input makes its tile NaN
            raise NonFiniteInputError("feature_alignment_loss: non-finite values (NaN or Inf) in the inputs")
        ctx.launch = launch
        ctx.student_meta = (student_image.shape, student_image.dtype, student_text.shape, student_text.dtype)
        ctx.save_for_backward(s_img, s_txt, t_img, t_txt)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        s_img, s_txt, t_img, t_txt = ctx.saved_tensors
        # Written contiguous [rows, D] (the kernel's store uses row stride D).
        grad_img = torch.empty(s_img.shape, dtype=s_img.dtype, device=s_img.device)
        grad_txt = torch.empty(s_txt.shape, dtype=s_txt.dtype, device=s_txt.device)
        ctx.launch.run(_alignment_bwd, s_img, t_img, s_txt, t_txt, grad_img, grad_txt,
                       grad_loss.reshape(1).contiguous(),
                       BF16_RTNE_BY_HAND=grad_img.dtype == torch.bfloat16 and _interpret_enabled())
        img_shape, img_dtype, txt_shape, txt_dtype = ctx.student_meta
        return grad_img.view(img_shape).to(img_dtype), grad_txt.view(txt_shape).to(txt_dtype), None, None, None


class NonFiniteInputError(ValueError):
    """An input of the alignment loss holds NaN or Inf (the message names it)."""


def _nonfinite_error(names: list[str]) -> NonFiniteInputError:
    if not names:
        return NonFiniteInputError("feature_alignment_loss: the loss is not finite although every input is")
    return NonFiniteInputError(f"feature_alignment_loss: non-finite values (NaN or Inf) in {', '.join(names)}")


def _nonfinite_names(inputs: dict[str, torch.Tensor], proj: torch.nn.Module | None) -> list[str]:
    # Error path only: one isfinite pass per input to name the culprit.
    named = dict(inputs)
    if proj is not None:
        named.update({f"proj.{name}": p for name, p in proj.named_parameters()})
    return [name for name, x in named.items() if not bool(torch.isfinite(x.detach()).all())]


def _check_args(alpha, tensors: dict[str, torch.Tensor]) -> None:
    if not math.isfinite(float(alpha)):
        raise ValueError(f"feature_alignment_loss: alpha must be finite, got {alpha}")
    for name, x in tensors.items():
        if x.dim() < 2 or x.numel() == 0:
            raise ValueError(f"feature_alignment_loss: {name} must be a non-empty [rows, D] or [B, C, D] "
                             f"tensor, got shape {tuple(x.shape)}")


def _check_shapes(student_image, student_text, teacher_image, teacher_text) -> None:
    devices = {x.device for x in (student_image, student_text, teacher_image, teacher_text)}
    if len(devices) > 1:
        raise ValueError(f"feature_alignment_loss: inputs are on several devices {sorted(map(str, devices))}")
    if student_image.shape != teacher_image.shape or student_text.shape != teacher_text.shape:
        raise ValueError(
            f"alignment loss: student/teacher embedding shapes differ "
            f"(image {tuple(student_image.shape)} vs {tuple(teacher_image.shape)}, text "
            f"{tuple(student_text.shape)} vs {tuple(teacher_text.shape)}); "
            f"pass proj=Linear(student_dim, teacher_dim) when dims differ")


def _pick_backend(backend: str, student_image: torch.Tensor) -> str:
    if backend not in _BACKENDS:
        raise ValueError(f"feature_alignment_loss: backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if (student_image.is_cuda and triton is not None) else "reference"
    if backend == "triton":
        if triton is None:
            raise RuntimeError("feature_alignment_loss(backend='triton'): triton is not importable here")
        if not student_image.is_cuda and not _interpret_enabled():
            raise RuntimeError(
                "feature_alignment_loss(backend='triton') got CPU tensors: Triton runs on CPU only in its "
                "interpreter; set TRITON_INTERPRET=1, move the tensors to a GPU, or use backend='reference'")
    return backend


def feature_alignment_loss(
    student_image: torch.Tensor,
    student_text: torch.Tensor,
    teacher_image: torch.Tensor,
    teacher_text: torch.Tensor,
    alpha: float,
    proj: torch.nn.Module | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """alpha * (mean_i mean_d (n(s_img) - n(t_img))^2 + mean_i mean_d (n(s_txt) - n(t_txt))^2).

    Same semantics as ``feature_alignment_loss_reference`` (n = L2-normalise rows):
    ``student_text``/``teacher_text`` may be [B*C, D] or [B, C, D] (C captions per
    image; the mean runs over all caption rows); ``proj`` (Linear(student_dim,
    teacher_dim)) maps the student embeddings first. Teacher inputs never get
    gradients. Returns a float32 scalar; raises ValueError naming the input that
    holds NaN/Inf.

    backend: "auto" (Triton for CUDA tensors when triton imports and D <=
    MAX_FUSED_DIM, else the reference), "triton" (on CPU only under
    TRITON_INTERPRET=1), "reference". Both check for NaN/Inf through the loss
    itself (one host sync); only on that error are the inputs scanned to name one.
    """
    auto = backend == "auto"
    backend = _pick_backend(backend, student_image)
    teacher_image, teacher_text = teacher_image.detach(), teacher_text.detach()
    inputs = {"student_image": student_image, "teacher_image": teacher_image,
              "student_text": student_text, "teacher_text": teacher_text}
    _check_args(alpha, inputs)

    if proj is not None:
        # The projection is a GEMM: torch (cuBLAS) runs it, and autograd turns the
        # fused kernel's d/d(projected student) into d/d student and d/d proj.weight.
        student_image, student_text = proj(student_image), proj(student_text)
    if backend == "triton" and max(student_image.shape[-1], student_text.shape[-1]) > MAX_FUSED_DIM:
        if auto:
            backend = "reference"
        else:
            raise ValueError(f"feature_alignment_loss(backend='triton'): embedding dims above {MAX_FUSED_DIM} "
                             f"do not fit the fused kernel; use backend='reference'")
    _check_shapes(student_image, student_text, teacher_image, teacher_text)

    if backend == "reference":
        loss = feature_alignment_loss_reference(student_image, student_text, teacher_image, teacher_text, alpha)
        if not torch.isfinite(loss):  # the loss is the one fused reduction: any NaN/Inf reaches it
            raise _nonfinite_error(_nonfinite_names(inputs, proj))
        return loss
    try:
        return FusedFeatureAlignmentLoss.apply(student_image, student_text, teacher_image, teacher_text,
                                               float(alpha))
    except NonFiniteInputError:
        # Error path only: name the input (or proj's weight) that holds it.
        raise _nonfinite_error(_nonfinite_names(inputs, proj)) from None
