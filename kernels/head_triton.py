"""Fused LM-head loss: next-token cross-entropy and (with a teacher) KL distillation computed
together, tokens in chunks, so neither model's full [tokens x vocab] logits ever exist.

The PyTorch reference beside it (``head.py``) defines what it must compute. Per chunk, torch
matmuls make the student's (and the teacher's) logits, one row step (a Triton kernel, or the
same maths in PyTorch) turns them into per-token cross-entropy and KL and writes
d total / d student logits over the student's logits, and two more matmuls fold that into
d total / d hidden and d total / d weight. As in Liger-Kernel's fused linear cross-entropy
and distillation losses, the gradients are made in the forward and backward only scales
them, so backward builds no logits either.
"""
from __future__ import annotations  # kernel annotations stay strings: importable without triton

import math

import torch
from torch.autograd.function import once_differentiable

from compt.kernels.distill_triton import (GPU_LAUNCH, INTERPRET_LAUNCH, add_weight_grad, default_chunk_size,
                                          interpret_enabled, jit_once, next_power_of_2, pick_backend)
from compt.kernels.head import IGNORE_INDEX, HeadLoss, lm_head_loss_reference

try:
    import triton
    import triton.language as tl
except ImportError:  # e.g. macOS: the torch backend still works
    triton = None
    tl = None

__all__ = ["fused_lm_head_loss", "FusedLMHead"]

BACKENDS = ("auto", "triton", "torch", "reference")

# See distill_triton: tl.reduce with these combine functions keeps the kernel runnable when
# TRITON_INTERPRET=1 is set after triton was imported.
_add = tl.standard._sum_combine if tl is not None else None
_max = tl.standard._elementwise_max if tl is not None else None


# ---------------------------------------------------------------------------
# Kernel. Grid: one program per BLOCK_M token rows of a chunk. With z the student's
# logits, y the target, z_t the teacher's, T the temperature:
#   pass 1, online over vocab blocks: lse(z); with a teacher lse(z_t / T), and lse(z / T)
#           when T != 1 (at T = 1 the cross-entropy's lse serves the KL too);
#   ce_row = lse(z) - z[y];
#   pass 2: kl_row = sum_v p_t (log p_t - log p_s) (F.kl_div's terms: no cancellation when
#           the models agree) and d total / d z = ce_scale (softmax(z) - onehot(y))
#           + kl_scale (softmax(z / T) - p_t), written over the logits it was read from.
# Without a teacher and without gradients (evaluation) pass 2 is skipped.
# ---------------------------------------------------------------------------
def _lm_head_rows(
    s_ptr, t_ptr,  # [rows, vocab] student logits (read, then overwritten by their gradient), teacher logits
    y_ptr,  # [rows] int64 targets, all in [0, vocab)
    ce_ptr, kl_ptr,  # [rows] float32 out: cross-entropy and KL(p_t || p_s) per row, unscaled
    n_rows, n_cols, s_stride, t_stride,
    inv_temp, ce_scale, kl_scale,
    HAS_TEACHER: tl.constexpr, TEMPERED: tl.constexpr, WRITE_GRAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BF16_RTNE_BY_HAND: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = rows < n_rows
    s_rows = s_ptr + rows[:, None] * s_stride
    t_rows = t_ptr + rows[:, None] * t_stride
    y = tl.load(y_ptr + rows, mask=row_ok, other=0)
    z_y = tl.load(s_ptr + rows * s_stride + y, mask=row_ok, other=0.0).to(tl.float32)

    # Pass 1. Rows past n_rows read 0 (finite, never stored); only vocab padding is -inf,
    # and every block has a real column.
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    acc = tl.full([BLOCK_M], 0.0, tl.float32)
    m_st = tl.full([BLOCK_M], float("-inf"), tl.float32)
    acc_st = tl.full([BLOCK_M], 0.0, tl.float32)
    m_t = tl.full([BLOCK_M], float("-inf"), tl.float32)
    acc_t = tl.full([BLOCK_M], 0.0, tl.float32)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        col_ok = cols < n_cols
        ok = row_ok[:, None] & col_ok[None, :]
        z = tl.load(s_rows + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        z = tl.where(col_ok[None, :], z, float("-inf"))
        new = tl.maximum(m, tl.reduce(z, 1, _max))
        acc = acc * tl.exp(m - new) + tl.reduce(tl.exp(z - new[:, None]), 1, _add)
        m = new
        if HAS_TEACHER:
            z_t = tl.load(t_rows + cols[None, :], mask=ok, other=0.0).to(tl.float32) * inv_temp
            z_t = tl.where(col_ok[None, :], z_t, float("-inf"))
            new_t = tl.maximum(m_t, tl.reduce(z_t, 1, _max))
            acc_t = acc_t * tl.exp(m_t - new_t) + tl.reduce(tl.exp(z_t - new_t[:, None]), 1, _add)
            m_t = new_t
            if TEMPERED:
                z_st = z * inv_temp
                new_st = tl.maximum(m_st, tl.reduce(z_st, 1, _max))
                acc_st = acc_st * tl.exp(m_st - new_st) + tl.reduce(tl.exp(z_st - new_st[:, None]), 1, _add)
                m_st = new_st
    lse = m + tl.log(acc)
    if HAS_TEACHER:  # (only then: the others' sums are 0)
        lse_t = m_t + tl.log(acc_t)
        if TEMPERED:
            lse_st = m_st + tl.log(acc_st)
    tl.store(ce_ptr + rows, lse - z_y, mask=row_ok)

    # Pass 2: the KL terms and the gradient.
    if HAS_TEACHER or WRITE_GRAD:
        kl = tl.full([BLOCK_M], 0.0, tl.float32)
        for start in range(0, n_cols, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            ok = row_ok[:, None] & (cols < n_cols)[None, :]
            z = tl.load(s_rows + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            p = tl.exp(z - lse[:, None])
            grad = (p - tl.where(cols[None, :] == y[:, None], 1.0, 0.0)) * ce_scale
            if HAS_TEACHER:
                log_p_t = tl.load(t_rows + cols[None, :], mask=ok, other=0.0).to(tl.float32) * inv_temp - lse_t[:, None]
                if TEMPERED:
                    log_p_s = z * inv_temp - lse_st[:, None]
                    p_s = tl.exp(log_p_s)
                else:
                    log_p_s = z - lse[:, None]
                    p_s = p
                p_t = tl.exp(log_p_t)
                kl += tl.reduce(tl.where(ok, p_t * (log_p_t - log_p_s), 0.0), 1, _add)
                grad += (p_s - p_t) * kl_scale
            if WRITE_GRAD:
                if BF16_RTNE_BY_HAND:
                    # Triton's CPU interpreter truncates fp32 -> bf16 (a GPU rounds to nearest
                    # even); round by hand there so the tests see what a GPU writes.
                    bits = grad.to(tl.uint32, bitcast=True)
                    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
                    out = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
                else:
                    out = grad.to(s_ptr.dtype.element_ty)
                tl.store(s_rows + cols[None, :], out, mask=ok)
        if HAS_TEACHER:
            tl.store(kl_ptr + rows, kl, mask=row_ok)


# ---------------------------------------------------------------------------
# Row steps: (student logits, teacher logits or None, targets, ce out, kl out or None,
# temperature, ce scale, kl scale, write grad) -> None; with write grad the student logits
# are overwritten by d total / d student logits. Same maths, two engines.
# ---------------------------------------------------------------------------

def _row_step_triton(s_logits, t_logits, targets, ce_out, kl_out, temperature, ce_scale, kl_scale,
                     write_grad) -> None:
    rows, vocab = s_logits.shape
    interpret = interpret_enabled()
    block_m, block_v, num_warps = INTERPRET_LAUNCH if interpret else GPU_LAUNCH
    block_m = min(block_m, next_power_of_2(rows))
    block_v = min(block_v, next_power_of_2(vocab))
    teacher = t_logits is not None
    jit_once(_lm_head_rows, interpret)[(triton.cdiv(rows, block_m),)](
        s_logits, t_logits if teacher else s_logits, targets, ce_out, kl_out if teacher else ce_out,
        rows, vocab, s_logits.stride(0), t_logits.stride(0) if teacher else 0,
        1.0 / temperature, ce_scale, kl_scale,
        HAS_TEACHER=teacher, TEMPERED=teacher and temperature != 1.0, WRITE_GRAD=write_grad,
        BLOCK_M=block_m, BLOCK_V=block_v,
        BF16_RTNE_BY_HAND=s_logits.dtype == torch.bfloat16 and interpret, num_warps=num_warps)


def _row_step_torch(s_logits, t_logits, targets, ce_out, kl_out, temperature, ce_scale, kl_scale,
                    write_grad) -> None:
    # float32 temporaries of the chunk's size only, in place where the buffer is ours.
    log_p = torch.log_softmax(s_logits.float(), dim=-1)
    ce_out.copy_(log_p.gather(1, targets[:, None]).squeeze(1).neg_())
    kl_grad = None
    if t_logits is not None:
        log_p_s = log_p if temperature == 1.0 else torch.log_softmax(s_logits.float() / temperature, dim=-1)
        log_p_t = torch.log_softmax(t_logits.float().div_(temperature), dim=-1)
        p_t = log_p_t.exp()
        kl_out.copy_(log_p_t.sub_(log_p_s).mul_(p_t).sum(dim=-1))
        del log_p_t
        if write_grad:
            kl_grad = log_p_s.exp().sub_(p_t).mul_(kl_scale)
        del log_p_s, p_t
    if not write_grad:
        return
    grad = log_p.exp_().mul_(ce_scale)
    grad.scatter_add_(1, targets[:, None], grad.new_full((grad.shape[0], 1), -ce_scale))
    if kl_grad is not None:
        grad.add_(kl_grad)
    s_logits.copy_(grad)


_ROW_STEPS = {"triton": _row_step_triton, "torch": _row_step_torch}


# ---------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------

def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


class FusedLMHead(torch.autograd.Function):
    """(total, ce, kl) of ``lm_head_loss_reference``; only ``total`` is differentiable.

    Forward runs the whole computation chunk by chunk and keeps d total / d hidden and
    d total / d weight (those autograd asks for, and none when grad mode is off); backward
    multiplies them by the upstream gradient. The teacher gets no gradient.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, teacher_hidden, teacher_weight, alpha, temperature, ignore_index,
                chunk_size, row_step, grad_enabled):
        h, w = _rows(hidden), weight
        teacher = teacher_hidden is not None
        h_t = _rows(teacher_hidden.detach()) if teacher else None
        w_t = teacher_weight.detach() if teacher else None
        y = targets.reshape(-1)
        tokens = h.shape[0]
        keep = (y != ignore_index).nonzero().squeeze(1)  # one host sync: the valid tokens are the only ones read
        if keep.numel() == tokens:
            keep = None
        else:
            h, y = h.index_select(0, keep), y.index_select(0, keep)
            h_t = h_t.index_select(0, keep) if teacher else None
        y = y.to(torch.int64).contiguous()
        rows = h.shape[0]
        if rows:
            lo, hi = torch.stack([y.min(), y.max()]).tolist()  # a bad target would be read out of bounds
            if lo < 0 or hi >= w.shape[0]:
                bad = lo if lo < 0 else hi
                raise ValueError(f"fused_lm_head_loss: target {bad} is outside the vocabulary [0, {w.shape[0]}) "
                                 f"and is not ignore_index {ignore_index}")
        need_hidden = grad_enabled and ctx.needs_input_grad[0]
        need_weight = grad_enabled and ctx.needs_input_grad[1]

        ce_rows = torch.zeros(rows, dtype=torch.float32, device=h.device)
        kl_rows = torch.zeros(rows if teacher else 0, dtype=torch.float32, device=h.device)
        grad_h = torch.empty(h.shape, dtype=h.dtype, device=h.device) if need_hidden else None  # contiguous
        # d total / d weight sums over every chunk: in float32 for half-precision weights.
        acc_dtype = torch.float32 if w.dtype in (torch.bfloat16, torch.float16) else w.dtype
        grad_w = torch.zeros(w.shape, dtype=acc_dtype, device=w.device) if need_weight else None
        n = max(rows, 1)
        ce_scale = 1.0 / n
        kl_scale = alpha * temperature / n  # d (alpha T^2 KL / n) / d logit = alpha T / n (p_s - p_t)
        for start in range(0, rows, chunk_size):
            end = min(start + chunk_size, rows)
            hs = h[start:end]
            s_logits = hs @ w.t()
            t_logits = h_t[start:end] @ w_t.t() if teacher else None
            row_step(s_logits, t_logits, y[start:end], ce_rows[start:end], kl_rows[start:end] if teacher else None,
                     temperature, ce_scale, kl_scale, need_hidden or need_weight)
            del t_logits
            if need_hidden:
                torch.mm(s_logits, w, out=grad_h[start:end])
            if need_weight:
                add_weight_grad(grad_w, s_logits, hs)
            del s_logits

        ce = ce_rows.sum() / n
        kl = kl_rows.sum() * (temperature * temperature / n)
        total = ce + alpha * kl if teacher else ce.clone()
        if need_hidden:
            if keep is not None:
                grad_h = torch.zeros((tokens, h.shape[1]), dtype=h.dtype, device=h.device).index_copy_(0, keep, grad_h)
            grad_h = grad_h.view(hidden.shape)
        if need_weight:
            grad_w = grad_w.to(w.dtype)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.mark_non_differentiable(ce, kl)
        return total, ce, kl

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total, _grad_ce, _grad_kl):
        grad_h, grad_w = ctx.saved_tensors
        grad_h = grad_h * grad_total if grad_h is not None else None
        grad_w = grad_w * grad_total if grad_w is not None else None
        return grad_h, grad_w, None, None, None, None, None, None, None, None, None


def _check_args(hidden, weight, targets, teacher_hidden, teacher_weight, alpha, temperature, chunk_size) -> None:
    name = "fused_lm_head_loss"
    if (teacher_hidden is None) != (teacher_weight is None):
        raise ValueError(f"{name}: pass both teacher_hidden and teacher_weight, or neither")
    if not math.isfinite(float(alpha)):
        raise ValueError(f"{name}: alpha must be finite, got {alpha}")
    if not (math.isfinite(float(temperature)) and float(temperature) > 0):
        raise ValueError(f"{name}: temperature must be finite and > 0, got {temperature}")
    if chunk_size is not None and (int(chunk_size) != chunk_size or chunk_size < 1):
        raise ValueError(f"{name}: chunk_size must be a positive int or None, got {chunk_size!r}")
    named = {"hidden": hidden, "weight": weight, "targets": targets}
    pairs = [("", hidden, weight)]
    if teacher_hidden is not None:
        named.update(teacher_hidden=teacher_hidden, teacher_weight=teacher_weight)
        pairs.append(("teacher_", teacher_hidden, teacher_weight))
    for who, h, w in pairs:
        if h.dim() < 2 or h.shape[-1] == 0:
            raise ValueError(f"{name}: {who}hidden must be [..., D] with D > 0, got shape {tuple(h.shape)}")
        if w.dim() != 2:
            raise ValueError(f"{name}: {who}weight must be [vocab, D], got shape {tuple(w.shape)}")
        if h.shape[-1] != w.shape[1]:
            raise ValueError(f"{name}: {who}hidden dim {h.shape[-1]} != {who}weight dim {w.shape[1]} "
                             f"({who}weight is [vocab, D], as nn.Linear.weight)")
        if h.dtype != w.dtype:
            raise ValueError(f"{name}: {who}hidden is {h.dtype} but {who}weight is {w.dtype}; cast one so the "
                             "lm_head matmul has one dtype")
    if teacher_hidden is not None:
        if teacher_weight.shape[0] != weight.shape[0]:
            raise ValueError(f"{name}: student and teacher vocabularies differ (weight {tuple(weight.shape)}, "
                             f"teacher_weight {tuple(teacher_weight.shape)})")
        if teacher_hidden.shape[:-1] != hidden.shape[:-1]:
            raise ValueError(f"{name}: hidden {tuple(hidden.shape)} and teacher_hidden {tuple(teacher_hidden.shape)} "
                             "do not hold the same tokens (leading dims differ)")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool \
            or targets.shape != hidden.shape[:-1]:
        raise ValueError(f"{name}: targets must be integer token ids shaped as the hidden states' leading dims "
                         f"{tuple(hidden.shape[:-1])}, got {targets.dtype} {tuple(targets.shape)}")
    devices = {x.device for x in named.values()}
    if len(devices) > 1:
        raise ValueError(f"{name}: inputs are on several devices {sorted(map(str, devices))}")


def fused_lm_head_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    *,
    alpha: float = 1.0,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> HeadLoss:
    """HeadLoss(total, ce, kl) as ``lm_head_loss_reference``, without full logits.

    ce = mean next-token cross-entropy of softmax(hidden @ weight.T) at ``targets``; with a
    teacher, kl = T^2 * mean KL(softmax(z_t / T) || softmax(z_s / T)) over the same tokens and
    total = ce + alpha * kl, else total = ce and kl is None. Targets equal to ``ignore_index``
    drop their token from both (its hidden state is not read); with no token left both are 0.
    Only ``total`` carries gradients, to ``hidden`` and ``weight`` (in their dtype); ``ce`` and
    ``kl`` are float32 values to log. Logits are made in the inputs' dtype (fp32 or bf16), the
    softmaxes, losses and the weight-gradient sum in float32. A NaN/Inf input gives a
    non-finite loss, as F.cross_entropy does (the stage loop skips such steps); a target
    outside [0, vocab) raises.

    Memory: the logits exist one chunk of ``chunk_size`` tokens at a time (default
    ``default_chunk_size``). With grad mode on, the forward stores d total / d hidden and
    d total / d weight (the size of those inputs); backward only scales them. With grad mode
    off (evaluation) no gradient is made.

    backend: "auto" (Triton for CUDA tensors when triton imports, else torch), "triton" (on
    CPU only under TRITON_INTERPRET=1), "torch" (the same chunked algorithm in PyTorch, e.g.
    for CPU training), "reference" (``lm_head_loss_reference``: the naive full-logits loss).
    """
    _check_args(hidden, weight, targets, teacher_hidden, teacher_weight, alpha, temperature, chunk_size)
    backend = pick_backend(backend, hidden, "fused_lm_head_loss", BACKENDS)
    if backend == "reference":
        return lm_head_loss_reference(hidden, weight, targets, teacher_hidden, teacher_weight, alpha=alpha,
                                      temperature=temperature, ignore_index=ignore_index)
    if chunk_size is None:
        chunk_size = default_chunk_size(hidden.numel() // hidden.shape[-1], weight.shape[0], backend)
    total, ce, kl = FusedLMHead.apply(
        hidden, weight, targets, teacher_hidden.detach() if teacher_hidden is not None else None,
        teacher_weight.detach() if teacher_weight is not None else None, float(alpha), float(temperature),
        int(ignore_index), int(chunk_size), _ROW_STEPS[backend], torch.is_grad_enabled())
    return HeadLoss(total, ce, kl if teacher_hidden is not None else None)
