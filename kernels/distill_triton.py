"""Fused linear KL-distillation loss: tokens go through in chunks, so neither model's full
[tokens x vocab] logits ever exist; the forward also computes the student's gradients.

The PyTorch reference beside it (``distill.py``) defines what it must compute. Per chunk,
torch matmuls make both models' logits, one row step (a Triton kernel, or the same maths
in PyTorch) turns them into per-token KL and d loss / d student logits (in place), and two
more matmuls fold that into d loss / d student hidden and d loss / d student weight. As in
Liger-Kernel's fused linear losses, backward then only scales the stored gradients.
"""
from __future__ import annotations  # kernel annotations stay strings: importable without triton

import functools
import math
import os
from typing import Callable

import torch
from torch.autograd.function import once_differentiable

from compt.kernels.alignment_triton import NonFiniteInputError

try:
    import triton
    import triton.language as tl
except ImportError:  # e.g. macOS: the torch backend still works
    triton = None
    tl = None

__all__ = ["fused_linear_kl", "FusedLinearKL", "default_chunk_size", "CHUNK_LOGITS", "GPU_LAUNCH",
           "INTERPRET_LAUNCH", "add_weight_grad", "interpret_enabled", "jit_once", "next_power_of_2",
           "pick_backend"]

_BACKENDS = ("auto", "triton", "torch")
# (rows per program, vocab block, warps). GPU: one token row per program, the vocab in
# blocks of 4096 (two passes over both models' logits). The CPU interpreter pays per
# program and per op, so it takes several rows at once; its small vocab block makes
# test-sized vocabularies span several blocks, the last one partial.
GPU_LAUNCH = (1, 4096, 16)
INTERPRET_LAUNCH = (16, 128, 1)

# tl.sum / tl.max are @triton.jit functions fixed to interpreter or compiler when triton
# is imported; tl.reduce is a builtin the interpreter patches at each launch (numpy's
# sum / nanmax for these combine functions). Reducing through it keeps the kernel
# runnable when TRITON_INTERPRET=1 is set after triton was imported.
_add = tl.standard._sum_combine if tl is not None else None
_max = tl.standard._elementwise_max if tl is not None else None


# ---------------------------------------------------------------------------
# Kernel. Grid: one program per BLOCK_M token rows of a chunk. With z = logits / T,
#   lse = logsumexp(z)            pass 1, online over vocab blocks, both models;
#   kl_row = sum_v p_t (log p_t - log p_s)                      pass 2, and
#   d loss / d student logit = (T / n_valid) (p_s - p_t)        pass 2, written over
# the student logits it was computed from. kl_row is summed exactly as F.kl_div's
# p_t * (log p_t - log p_s), not as a difference of logsumexps: no cancellation when
# the two models agree. A NaN/Inf input makes its rows' logsumexp or KL NaN/Inf, so
# the host's one finiteness check on the loss catches it.
# ---------------------------------------------------------------------------
def _distill_kl_rows(
    s_ptr, t_ptr,  # [rows, vocab] student logits (read, then overwritten by their gradient), teacher logits
    kl_ptr,  # [rows] float32 out: KL(p_t || p_s) per row, unscaled
    n_rows, n_cols, s_stride, t_stride,
    inv_temp, grad_scale,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BF16_RTNE_BY_HAND: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = rows < n_rows
    s_rows = s_ptr + rows[:, None] * s_stride
    t_rows = t_ptr + rows[:, None] * t_stride

    # Pass 1: running max and rescaled sum of exp. Rows past n_rows read 0 (finite,
    # never stored); only vocab padding is -inf, and every block has a real column.
    m_s = tl.full([BLOCK_M], float("-inf"), tl.float32)
    m_t = tl.full([BLOCK_M], float("-inf"), tl.float32)
    sum_s = tl.full([BLOCK_M], 0.0, tl.float32)
    sum_t = tl.full([BLOCK_M], 0.0, tl.float32)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        col_ok = cols < n_cols
        ok = row_ok[:, None] & col_ok[None, :]
        z_s = tl.load(s_rows + cols[None, :], mask=ok, other=0.0).to(tl.float32) * inv_temp
        z_t = tl.load(t_rows + cols[None, :], mask=ok, other=0.0).to(tl.float32) * inv_temp
        z_s = tl.where(col_ok[None, :], z_s, float("-inf"))
        z_t = tl.where(col_ok[None, :], z_t, float("-inf"))
        new_s = tl.maximum(m_s, tl.reduce(z_s, 1, _max))
        new_t = tl.maximum(m_t, tl.reduce(z_t, 1, _max))
        sum_s = sum_s * tl.exp(m_s - new_s) + tl.reduce(tl.exp(z_s - new_s[:, None]), 1, _add)
        sum_t = sum_t * tl.exp(m_t - new_t) + tl.reduce(tl.exp(z_t - new_t[:, None]), 1, _add)
        m_s = new_s
        m_t = new_t
    lse_s = m_s + tl.log(sum_s)
    lse_t = m_t + tl.log(sum_t)

    # Pass 2: log-probabilities, the KL terms and the student's logit gradient.
    kl = tl.full([BLOCK_M], 0.0, tl.float32)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        ok = row_ok[:, None] & (cols < n_cols)[None, :]
        z_s = tl.load(s_rows + cols[None, :], mask=ok, other=0.0).to(tl.float32) * inv_temp
        z_t = tl.load(t_rows + cols[None, :], mask=ok, other=0.0).to(tl.float32) * inv_temp
        log_p_s = z_s - lse_s[:, None]
        log_p_t = z_t - lse_t[:, None]
        p_t = tl.exp(log_p_t)
        kl += tl.reduce(tl.where(ok, p_t * (log_p_t - log_p_s), 0.0), 1, _add)
        grad = (tl.exp(log_p_s) - p_t) * grad_scale
        if BF16_RTNE_BY_HAND:
            # Triton's CPU interpreter truncates fp32 -> bf16 (a GPU rounds to nearest
            # even); round by hand there so the tests see what a GPU writes.
            bits = grad.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            out = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            out = grad.to(s_ptr.dtype.element_ty)
        tl.store(s_rows + cols[None, :], out, mask=ok)
    tl.store(kl_ptr + rows, kl, mask=row_ok)


def interpret_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


@functools.cache
def jit_once(fn, interpret: bool):
    # triton.jit reads TRITON_INTERPRET when it decorates a function, not when the
    # kernel launches. Decorating here, once per mode, lets the variable be set
    # after this module (or triton) was imported, e.g. by a test.
    return triton.jit(fn)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


# ---------------------------------------------------------------------------
# Row steps: (student logits, teacher logits, kl out, temperature, grad scale) -> None,
# the student logits overwritten by d loss / d student logits. Same maths, two engines.
# ---------------------------------------------------------------------------
RowStep = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float, float], None]


def _row_step_triton(s_logits, t_logits, kl_out, temperature, grad_scale) -> None:
    rows, vocab = s_logits.shape
    interpret = interpret_enabled()
    block_m, block_v, num_warps = INTERPRET_LAUNCH if interpret else GPU_LAUNCH
    block_m = min(block_m, next_power_of_2(rows))
    block_v = min(block_v, next_power_of_2(vocab))
    grid = (triton.cdiv(rows, block_m),)
    jit_once(_distill_kl_rows, interpret)[grid](
        s_logits, t_logits, kl_out, rows, vocab, s_logits.stride(0), t_logits.stride(0),
        1.0 / temperature, grad_scale,
        BLOCK_M=block_m, BLOCK_V=block_v,
        BF16_RTNE_BY_HAND=s_logits.dtype == torch.bfloat16 and interpret, num_warps=num_warps)


def _row_step_torch(s_logits, t_logits, kl_out, temperature, grad_scale) -> None:
    # float32 temporaries of the chunk's size only; in place where the buffer is ours.
    log_p_s = torch.log_softmax(s_logits.float().div_(temperature), dim=-1)
    log_p_t = torch.log_softmax(t_logits.float().div_(temperature), dim=-1)
    p_t = log_p_t.exp()
    kl_out.copy_(log_p_t.sub_(log_p_s).mul_(p_t).sum(dim=-1))
    del log_p_t
    s_logits.copy_(log_p_s.exp_().sub_(p_t).mul_(grad_scale))


_ROW_STEPS: dict[str, RowStep] = {"triton": _row_step_triton, "torch": _row_step_torch}


# ---------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------
# Logits elements per chunk and model. Each chunk adds one pass over d loss / d weight
# ([vocab, D], float32 for half-precision weights) to its GEMMs; at 64M logits (2048
# tokens of a 32k vocab) that pass is a small share of the chunk's time, and the two
# chunks of logits (256 MiB in bf16) a small share of the naive loss's memory. The
# torch row step keeps ~4 float32 copies of a chunk alive, so it takes a quarter.
CHUNK_LOGITS = {"triton": 1 << 26, "torch": 1 << 24}


def default_chunk_size(tokens: int, vocab: int, backend: str = "triton") -> int:
    """Token rows per chunk: about CHUNK_LOGITS[backend] logits, a multiple of 128 rows
    (>= 256: GEMMs that small still run at full rate), never more than there are."""
    rows = max(256, CHUNK_LOGITS[backend] // max(vocab, 1) // 128 * 128)
    return max(1, min(tokens, rows))


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _nonfinite_names(named: dict[str, torch.Tensor]) -> list[str]:
    # Error path only: one isfinite pass per input to name the culprit.
    return [name for name, x in named.items() if not bool(torch.isfinite(x).all())]


def _nonfinite_error(names: list[str]) -> NonFiniteInputError:
    if not names:
        return NonFiniteInputError("fused_linear_kl: the loss is not finite although every input is "
                                   "(logits overflow the inputs' dtype?)")
    return NonFiniteInputError(f"fused_linear_kl: non-finite values (NaN or Inf) in {', '.join(names)}")


_cuda_mm_out_dtype = [True]  # torch.mm(..., out_dtype=) works on this CUDA build (until one call fails)


def add_weight_grad(grad_w: torch.Tensor, grad_logits: torch.Tensor, hidden: torch.Tensor) -> None:
    """grad_w += grad_logits^T @ hidden, one chunk's share of d loss / d student_weight.

    Half-precision inputs sum into a float32 grad_w: on CUDA through a bf16/fp16 GEMM
    that writes float32 (no rounding per chunk; torch builds without ``out_dtype``
    round each chunk's share once to the inputs' dtype), on CPU through float32 copies
    of the chunk (CPU half-precision GEMMs are no faster there).
    """
    if grad_w.dtype == grad_logits.dtype:
        grad_w.addmm_(grad_logits.t(), hidden)
    elif not grad_logits.is_cuda:
        grad_w.addmm_(grad_logits.t().float(), hidden.float())
    else:
        if _cuda_mm_out_dtype[0]:
            try:
                grad_w += torch.mm(grad_logits.t(), hidden, out_dtype=grad_w.dtype)
                return
            except (RuntimeError, TypeError):
                _cuda_mm_out_dtype[0] = False
        grad_w += grad_logits.t() @ hidden


class FusedLinearKL(torch.autograd.Function):
    """T^2 * mean over valid tokens of KL(softmax(h_t W_t^T / T) || softmax(h_s W_s^T / T)).

    Forward runs the whole computation chunk by chunk and keeps d loss / d student_hidden
    and d loss / d student_weight (only those autograd asks for); backward multiplies them
    by the upstream gradient. Teacher tensors get no gradient.
    """

    @staticmethod
    def forward(ctx, student_hidden, student_weight, teacher_hidden, teacher_weight, mask, temperature,
                chunk_size, row_step):
        h_s, w_s = _rows(student_hidden), student_weight
        h_t, w_t = _rows(teacher_hidden.detach()), teacher_weight.detach()
        tokens = h_s.shape[0]
        keep = None
        if mask is not None:  # only valid tokens are read (one host sync to count them)
            keep = mask.reshape(-1).nonzero().squeeze(1)
            if keep.numel() == tokens:
                keep = None
            else:
                h_s, h_t = h_s.index_select(0, keep), h_t.index_select(0, keep)
        rows = h_s.shape[0]
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]

        kl_rows = torch.zeros(rows, dtype=torch.float32, device=h_s.device)
        grad_h = torch.empty(h_s.shape, dtype=h_s.dtype, device=h_s.device) if need_hidden else None  # contiguous
        # d loss / d weight sums over every chunk: in float32 for half-precision weights.
        acc_dtype = torch.float32 if w_s.dtype in (torch.bfloat16, torch.float16) else w_s.dtype
        grad_w = torch.zeros(w_s.shape, dtype=acc_dtype, device=w_s.device) if need_weight else None
        grad_scale = temperature / max(rows, 1)  # d (T^2 KL / n) / d logit = T / n (p_s - p_t)
        for start in range(0, rows, chunk_size):
            end = min(start + chunk_size, rows)
            hs = h_s[start:end]
            s_logits = hs @ w_s.t()
            t_logits = h_t[start:end] @ w_t.t()
            row_step(s_logits, t_logits, kl_rows[start:end], temperature, grad_scale)
            del t_logits
            if need_hidden:
                torch.mm(s_logits, w_s, out=grad_h[start:end])
            if need_weight:
                add_weight_grad(grad_w, s_logits, hs)
            del s_logits

        loss = kl_rows.sum() * (temperature * temperature / max(rows, 1))
        if not torch.isfinite(loss):  # the one host sync of the call (besides a mask's)
            raise _nonfinite_error(_nonfinite_names(
                {"student_hidden": h_s, "student_weight": w_s, "teacher_hidden": h_t, "teacher_weight": w_t}))
        if need_hidden:
            if keep is not None:
                grad_h = torch.zeros((tokens, h_s.shape[1]), dtype=h_s.dtype, device=h_s.device).index_copy_(
                    0, keep, grad_h)
            grad_h = grad_h.view(student_hidden.shape)
        if need_weight:
            grad_w = grad_w.to(w_s.dtype)
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        grad_h = grad_h * grad_loss if grad_h is not None else None
        grad_w = grad_w * grad_loss if grad_w is not None else None
        return grad_h, grad_w, None, None, None, None, None, None


def _check_args(student_hidden, student_weight, teacher_hidden, teacher_weight, temperature, mask,
                chunk_size) -> None:
    named = {"student_hidden": student_hidden, "student_weight": student_weight,
             "teacher_hidden": teacher_hidden, "teacher_weight": teacher_weight}
    if not (math.isfinite(float(temperature)) and float(temperature) > 0):
        raise ValueError(f"fused_linear_kl: temperature must be finite and > 0, got {temperature}")
    if chunk_size is not None and (int(chunk_size) != chunk_size or chunk_size < 1):
        raise ValueError(f"fused_linear_kl: chunk_size must be a positive int or None, got {chunk_size!r}")
    for name, x in named.items():
        if x.dim() < 2 or x.shape[-1] == 0:
            raise ValueError(f"fused_linear_kl: {name} must be [..., D] with D > 0, got shape {tuple(x.shape)}")
    for name in ("student_weight", "teacher_weight"):
        if named[name].dim() != 2:
            raise ValueError(f"fused_linear_kl: {name} must be [vocab, D], got shape {tuple(named[name].shape)}")
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(f"fused_linear_kl: student and teacher vocabularies differ (student_weight "
                         f"{tuple(student_weight.shape)}, teacher_weight {tuple(teacher_weight.shape)})")
    for who, hidden, weight in (("student", student_hidden, student_weight),
                                ("teacher", teacher_hidden, teacher_weight)):
        if hidden.shape[-1] != weight.shape[1]:
            raise ValueError(f"fused_linear_kl: {who}_hidden dim {hidden.shape[-1]} != {who}_weight dim "
                             f"{weight.shape[1]} ({who}_weight is [vocab, D], as nn.Linear.weight)")
        if hidden.dtype != weight.dtype:
            raise ValueError(f"fused_linear_kl: {who}_hidden is {hidden.dtype} but {who}_weight is "
                             f"{weight.dtype}; cast one so the lm_head matmul has one dtype")
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(f"fused_linear_kl: student_hidden {tuple(student_hidden.shape)} and teacher_hidden "
                         f"{tuple(teacher_hidden.shape)} do not hold the same tokens (leading dims differ)")
    if mask is not None:
        if mask.dtype != torch.bool or mask.shape != student_hidden.shape[:-1]:
            raise ValueError(f"fused_linear_kl: mask must be bool shaped as the hidden states' leading dims "
                             f"{tuple(student_hidden.shape[:-1])} (True = valid token), got {mask.dtype} "
                             f"{tuple(mask.shape)}; for labels use mask=labels != ignore_index")
        named["mask"] = mask
    devices = {x.device for x in named.values()}
    if len(devices) > 1:
        raise ValueError(f"fused_linear_kl: inputs are on several devices {sorted(map(str, devices))}")


def pick_backend(backend: str, tensor: torch.Tensor, caller: str = "fused_linear_kl",
                 allowed: tuple[str, ...] = _BACKENDS) -> str:
    """``backend`` checked against ``allowed``, "auto" resolved: Triton for CUDA tensors when it
    imports, else the chunked torch path; "triton" on CPU only under TRITON_INTERPRET=1."""
    if backend not in allowed:
        raise ValueError(f"{caller}: backend must be one of {allowed}, got {backend!r}")
    if backend == "auto":
        return "triton" if (tensor.is_cuda and triton is not None) else "torch"
    if backend == "triton":
        if triton is None:
            raise RuntimeError(f"{caller}(backend='triton'): triton is not importable here")
        if not tensor.is_cuda and not interpret_enabled():
            raise RuntimeError(
                f"{caller}(backend='triton') got CPU tensors: Triton runs on CPU only in its "
                "interpreter; set TRITON_INTERPRET=1, move the tensors to a GPU, or use backend='torch'")
    return backend


def fused_linear_kl(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """T^2 * mean over valid tokens of KL(p_teacher || p_student), p = softmax(logits / T).

    Same semantics as ``distill_kl_reference``: hidden states [..., D] (student and
    teacher dims may differ), lm_head weights [vocab, D] (as ``nn.Linear.weight``), an
    optional bool ``mask`` over the tokens (True = counts; masked tokens are not read),
    loss 0 when no token is valid. The T^2 factor (Hinton et al.) keeps gradient
    magnitudes independent of T. Gradients reach student_hidden and student_weight
    only, in their dtype; logits are made in the inputs' dtype (fp32 or bf16), softmax,
    KL and the weight-gradient sum are float32. Returns a float32 scalar; a NaN/Inf in
    an input raises NonFiniteInputError (a ValueError) naming it.

    Memory: the logits exist one chunk of ``chunk_size`` tokens at a time (default
    ``default_chunk_size``). Forward stores d loss / d student_hidden and d loss /
    d student_weight (the size of those inputs); backward only scales them.

    backend: "auto" (Triton for CUDA tensors when triton imports, else torch),
    "triton" (on CPU only under TRITON_INTERPRET=1), "torch" (the same chunked
    algorithm in PyTorch, e.g. for CPU training).
    """
    _check_args(student_hidden, student_weight, teacher_hidden, teacher_weight, temperature, mask, chunk_size)
    backend = pick_backend(backend, student_hidden)
    if chunk_size is None:
        chunk_size = default_chunk_size(student_hidden.numel() // student_hidden.shape[-1],
                                        student_weight.shape[0], backend)
    return FusedLinearKL.apply(student_hidden, student_weight, teacher_hidden.detach(), teacher_weight.detach(),
                               mask, float(temperature), int(chunk_size), _ROW_STEPS[backend])
