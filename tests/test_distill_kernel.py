"""The fused linear KL-distillation loss agrees with its PyTorch reference, on both of its
engines (the Triton kernel, run on CPU by Triton's interpreter, and the chunked PyTorch path),
and fused_linear_kl picks, checks and errors as documented.
"""
import os

# Set before any triton import where possible; compt's kernels are decorated at first
# launch, so a triton imported earlier by another test module is fine too (see
# test_alignment_kernel.py and test_gpu_compile_and_interpreter_set_after_triton_import).
os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compt.kernels import NonFiniteInputError, distill_kl_reference, fused_linear_kl
from compt.kernels import distill_triton
from conftest import run_fresh_triton

FP32_TOL = 1e-5
BF16_TOL = 1e-2
BACKENDS = ("triton", "torch")
# The interpreter's vocab block (INTERPRET_LAUNCH) is 128: vocabularies below span
# one partial block (50), several with a partial last one (300, 1000, 257, 129) and
# whole blocks only (512).
FAST = settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|, in float64."""
    got, want = got.detach().double(), want.detach().double()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-300)).item()


def make_inputs(tokens, student_dim, teacher_dim, vocab, *, dtype=torch.float32, masked=False, seed=0,
                leading=None):
    """Hidden states ~ N(0, 1), lm_heads ~ N(0, 1/D): logits of std ~1, as in a trained LM."""
    gen = torch.Generator().manual_seed(seed)
    lead = leading or (tokens,)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype)

    student_hidden = rand(*lead, student_dim).requires_grad_()
    student_weight = rand(vocab, student_dim, scale=student_dim ** -0.5).requires_grad_()
    teacher_hidden = rand(*lead, teacher_dim)
    teacher_weight = rand(vocab, teacher_dim, scale=teacher_dim ** -0.5)
    mask = None
    if masked:
        mask = torch.rand(lead, generator=gen) < 0.7
        mask.view(-1)[0] = True  # at least one valid token
    return student_hidden, student_weight, teacher_hidden, teacher_weight, mask


def loss_and_grads(backend, student_hidden, student_weight, teacher_hidden, teacher_weight, mask, *,
                   temperature=1.0, chunk_size=None):
    student_hidden.grad = student_weight.grad = None
    if backend == "reference":
        loss = distill_kl_reference(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                    temperature=temperature, mask=mask)
    else:
        loss = fused_linear_kl(student_hidden, student_weight, teacher_hidden, teacher_weight,
                               temperature=temperature, mask=mask, chunk_size=chunk_size, backend=backend)
    loss.backward()
    return [loss.detach(), student_hidden.grad.clone(), student_weight.grad.clone()]


def compare(backend, inputs, tol, **kwargs):
    fused = loss_and_grads(backend, *inputs, **kwargs)
    reference = loss_and_grads("reference", *inputs, temperature=kwargs.get("temperature", 1.0))
    errors = [rel_err(f, r) for f, r in zip(fused, reference)]
    assert max(errors) <= tol, f"{backend}: relative errors (loss, d hidden, d weight) {errors} > {tol}"
    return fused, errors


# (tokens, student dim, teacher dim, vocab, temperature, masked, chunk_size, leading dims)
SHAPES = [
    pytest.param(1, 8, 8, 50, 1.0, False, None, None, id="one-token"),
    pytest.param(10, 24, 40, 1000, 1.0, False, 3, None, id="chunks-3-3-3-1"),
    pytest.param(37, 33, 17, 300, 0.7, True, 8, None, id="mask-T0.7"),
    pytest.param(64, 64, 96, 512, 2.0, False, None, None, id="pow2-T2"),
    pytest.param(14, 48, 20, 257, 1.5, True, 5, (2, 7), id="batch-seq-mask"),
    pytest.param(20, 16, 16, 129, 4.0, False, 16, None, id="vocab-block+1-T4"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tokens,student_dim,teacher_dim,vocab,temperature,masked,chunk_size,leading", SHAPES)
def test_matches_reference_fp32(backend, tokens, student_dim, teacher_dim, vocab, temperature, masked,
                                chunk_size, leading):
    inputs = make_inputs(tokens, student_dim, teacher_dim, vocab, masked=masked, seed=tokens + vocab,
                         leading=leading)
    (loss, grad_hidden, grad_weight), _ = compare(backend, inputs, FP32_TOL, temperature=temperature,
                                                  chunk_size=chunk_size)
    assert loss.dtype == torch.float32 and loss.dim() == 0 and loss.item() > 0
    assert grad_hidden.shape == inputs[0].shape and grad_weight.shape == inputs[1].shape


@FAST
@given(tokens=st.integers(1, 40), student_dim=st.integers(1, 70), teacher_dim=st.integers(1, 70),
       vocab=st.integers(2, 700), temperature=st.sampled_from([0.5, 1.0, 3.0]), masked=st.booleans(),
       chunk_size=st.one_of(st.none(), st.integers(1, 16)), seed=st.integers(0, 2**31 - 1))
def test_triton_matches_reference_fp32_random(tokens, student_dim, teacher_dim, vocab, temperature, masked,
                                               chunk_size, seed):
    inputs = make_inputs(tokens, student_dim, teacher_dim, vocab, masked=masked, seed=seed)
    compare("triton", inputs, FP32_TOL, temperature=temperature, chunk_size=chunk_size)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tokens,student_dim,teacher_dim,vocab,temperature,masked,chunk_size,leading", SHAPES)
def test_matches_reference_bf16(backend, tokens, student_dim, teacher_dim, vocab, temperature, masked,
                                chunk_size, leading):
    inputs = make_inputs(tokens, student_dim, teacher_dim, vocab, dtype=torch.bfloat16, masked=masked,
                         seed=tokens + vocab, leading=leading)
    (loss, grad_hidden, grad_weight), _ = compare(backend, inputs, BF16_TOL, temperature=temperature,
                                                  chunk_size=chunk_size)
    assert loss.dtype == torch.float32  # accumulated and returned in float32
    assert grad_hidden.dtype == grad_weight.dtype == torch.bfloat16  # gradients in the inputs' dtype


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_teacher_and_strided_student(backend):
    # A bf16 student distilled from a float32 teacher; a column-major student hidden.
    student_hidden, student_weight, _, _, _ = make_inputs(11, 24, 24, 140, dtype=torch.bfloat16, seed=2)
    _, _, teacher_hidden, teacher_weight, mask = make_inputs(11, 24, 40, 140, masked=True, seed=2)
    student_hidden = student_hidden.detach().t().contiguous().t().requires_grad_()
    assert student_hidden.stride() == (1, 11)
    compare(backend, (student_hidden, student_weight, teacher_hidden, teacher_weight, mask), BF16_TOL,
            chunk_size=4)


def test_bf16_weight_gradient_sums_in_float32():
    # Many chunks: a bf16 running sum of d weight would drift; the float32 one stays as
    # close to the float64 truth (same bf16 inputs) as the one-GEMM reference is.
    inputs = make_inputs(96, 32, 32, 200, dtype=torch.bfloat16, seed=3)
    fused = loss_and_grads("triton", *inputs, chunk_size=2)[2]
    reference = loss_and_grads("reference", *inputs)[2]
    wide = [x.detach().double().requires_grad_(i < 2) for i, x in enumerate(inputs[:4])]
    truth = loss_and_grads("reference", *wide, None)[2]
    assert rel_err(fused, truth) <= max(2 * rel_err(reference, truth), 4e-3)


def test_teacher_gets_no_gradient():
    student_hidden, student_weight, teacher_hidden, teacher_weight, _ = make_inputs(6, 16, 24, 100, seed=4)
    teacher_hidden.requires_grad_()
    teacher_weight.requires_grad_()
    for backend in (*BACKENDS, "reference"):
        student_hidden.grad = student_weight.grad = None
        if backend == "reference":
            loss = distill_kl_reference(student_hidden, student_weight, teacher_hidden, teacher_weight)
        else:
            loss = fused_linear_kl(student_hidden, student_weight, teacher_hidden, teacher_weight, backend=backend)
        loss.backward()
        assert teacher_hidden.grad is None and teacher_weight.grad is None, backend
        assert student_hidden.grad is not None and student_weight.grad is not None, backend


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_requested_gradients(backend):
    # A frozen (e.g. tied, updated elsewhere) lm_head: no weight gradient is computed or kept.
    student_hidden, student_weight, teacher_hidden, teacher_weight, _ = make_inputs(5, 12, 12, 90, seed=5)
    student_weight.requires_grad_(False)
    loss = fused_linear_kl(student_hidden, student_weight, teacher_hidden, teacher_weight, backend=backend)
    loss.backward()
    want = distill_kl_reference(student_hidden.detach().requires_grad_(), student_weight, teacher_hidden,
                                teacher_weight)
    assert rel_err(loss, want) <= FP32_TOL and student_weight.grad is None
    hidden = student_hidden.detach()
    student_weight.requires_grad_(True)
    fused_linear_kl(hidden, student_weight, teacher_hidden, teacher_weight, backend=backend).backward()
    assert student_weight.grad is not None and hidden.grad is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_upstream_gradient_scales_gradients(backend):
    inputs = make_inputs(7, 20, 20, 150, seed=6)
    loss = fused_linear_kl(*inputs[:4], backend=backend, chunk_size=3)
    (-2.5 * loss).backward()
    got = [inputs[0].grad.clone(), inputs[1].grad.clone()]
    want = loss_and_grads("reference", *inputs)
    assert rel_err(got[0], -2.5 * want[1]) <= FP32_TOL and rel_err(got[1], -2.5 * want[2]) <= FP32_TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_student_equal_to_teacher_gives_zero(backend):
    student_hidden, student_weight, _, _, _ = make_inputs(9, 16, 16, 200, seed=7)
    loss, grad_hidden, grad_weight = loss_and_grads(
        backend, student_hidden, student_weight, student_hidden.detach().clone(), student_weight.detach().clone(),
        None)
    assert abs(loss.item()) <= 1e-6  # sum p (log p - log p): exactly 0 term by term
    assert grad_hidden.abs().max().item() == 0.0 and grad_weight.abs().max().item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_tokens_are_not_read(backend):
    # A NaN in a masked-out (e.g. padding) token changes nothing, as in the reference.
    student_hidden, student_weight, teacher_hidden, teacher_weight, mask = make_inputs(12, 16, 16, 100,
                                                                                       masked=True, seed=8)
    mask[3] = False
    with torch.no_grad():
        student_hidden[3, 0] = float("nan")
        teacher_hidden[3, 1] = float("inf")
    fused, _ = compare(backend, (student_hidden, student_weight, teacher_hidden, teacher_weight, mask), FP32_TOL)
    assert torch.isfinite(fused[1]).all() and fused[1][3].abs().max().item() == 0.0


@pytest.mark.parametrize("backend", (*BACKENDS, "reference"))
def test_no_valid_token_gives_zero(backend):
    inputs = list(make_inputs(4, 8, 8, 60, seed=9))
    inputs[4] = torch.zeros(4, dtype=torch.bool)
    loss, grad_hidden, grad_weight = loss_and_grads(backend, *inputs)
    assert loss.item() == 0.0 and grad_hidden.abs().max().item() == 0.0 and grad_weight.abs().max().item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_exist_one_chunk_at_a_time(backend, monkeypatch):
    seen = []
    step = distill_triton._ROW_STEPS[backend]

    def spy(s_logits, t_logits, *args):
        seen.append((tuple(s_logits.shape), tuple(t_logits.shape)))
        step(s_logits, t_logits, *args)

    monkeypatch.setitem(distill_triton._ROW_STEPS, backend, spy)
    inputs = make_inputs(23, 8, 12, 70, seed=10)
    compare(backend, inputs, FP32_TOL, chunk_size=5)
    assert seen == [((5, 70), (5, 70))] * 4 + [((3, 70), (3, 70))]


def test_default_chunk_size():
    assert distill_triton.default_chunk_size(8192, 32000) == 2048  # 64M logits per chunk, 128-row multiple
    assert distill_triton.default_chunk_size(8192, 32000, "torch") == 512  # its float32 copies: a quarter
    assert distill_triton.default_chunk_size(8192, 256000) == 256  # at least 256 rows
    assert distill_triton.default_chunk_size(100, 32000) == 100  # never more than there are
    assert distill_triton.default_chunk_size(0, 32000) == 1


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, inside the interpreter
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["student_hidden", "student_weight", "teacher_hidden", "teacher_weight"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_input_raises_naming_it(backend, name, bad):
    names = ["student_hidden", "student_weight", "teacher_hidden", "teacher_weight"]
    inputs = list(make_inputs(6, 10, 14, 80, seed=11)[:4])
    i = names.index(name)
    inputs[i] = inputs[i].detach().clone()
    inputs[i].view(-1)[17] = bad
    with pytest.raises(NonFiniteInputError, match=f"non-finite values \\(NaN or Inf\\) in {name}$"):
        fused_linear_kl(*inputs, backend=backend)


def test_bad_arguments_raise_clearly():
    s_h, s_w, t_h, t_w, _ = make_inputs(4, 8, 12, 30, seed=12)
    with pytest.raises(ValueError, match="backend must be one of"):
        fused_linear_kl(s_h, s_w, t_h, t_w, backend="cuda")
    with pytest.raises(ValueError, match="temperature must be finite and > 0"):
        fused_linear_kl(s_h, s_w, t_h, t_w, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        fused_linear_kl(s_h, s_w, t_h, t_w, chunk_size=0)
    with pytest.raises(ValueError, match="vocabularies differ"):
        fused_linear_kl(s_h, s_w, t_h, t_w[:20])
    with pytest.raises(ValueError, match="student_hidden dim 8 != student_weight dim 12"):
        fused_linear_kl(s_h, t_w, t_h, t_w)
    with pytest.raises(ValueError, match="do not hold the same tokens"):
        fused_linear_kl(s_h, s_w, t_h[:3], t_w)
    with pytest.raises(ValueError, match="student_hidden is torch.bfloat16 but student_weight is torch.float32"):
        fused_linear_kl(s_h.bfloat16(), s_w, t_h, t_w)
    with pytest.raises(ValueError, match="mask must be bool"):
        fused_linear_kl(s_h, s_w, t_h, t_w, mask=torch.ones(4))
    with pytest.raises(ValueError, match="several devices"):
        fused_linear_kl(s_h, s_w, t_h, t_w.to("meta"))


def test_auto_picks_torch_on_cpu(monkeypatch):
    used = []
    for name in BACKENDS:
        step = distill_triton._ROW_STEPS[name]
        monkeypatch.setitem(distill_triton._ROW_STEPS, name,
                            lambda *args, _name=name, _step=step: used.append(_name) or _step(*args))
    inputs = make_inputs(3, 8, 8, 40, seed=13)[:4]
    fused_linear_kl(*inputs)  # CPU tensors: torch, even under the interpreter
    fused_linear_kl(*inputs, backend="triton")
    assert used == ["torch", "triton"]


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        fused_linear_kl(*make_inputs(2, 8, 8, 40, seed=14)[:4], backend="triton")


GPU_COMPILE_AND_LATE_INTERPRET = """
import os, torch, triton
from compt.kernels import distill_triton as D, distill_kl_reference as reference

# 1. TRITON_INTERPRET unset: the kernel compiles to an sm_90 cubin, as on an H100, with
#    the GPU launch configuration, for bf16 and fp32 logits.
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError:
    print("compile: skipped (triton's compiler API moved)")
else:
    block_m, block_v, warps = D.GPU_LAUNCH
    for dtype in ("bf16", "fp32"):
        signature = {"s_ptr": f"*{dtype}", "t_ptr": f"*{dtype}", "kl_ptr": "*fp32", "n_rows": "i32",
                     "n_cols": "i32", "s_stride": "i32", "t_stride": "i32", "inv_temp": "fp32",
                     "grad_scale": "fp32", "BLOCK_M": "constexpr", "BLOCK_V": "constexpr",
                     "BF16_RTNE_BY_HAND": "constexpr"}
        source = ASTSource(fn=triton.jit(D._distill_kl_rows), signature=signature,
                           constexprs={"BLOCK_M": block_m, "BLOCK_V": block_v, "BF16_RTNE_BY_HAND": False})
        kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
        assert kernel.asm["cubin"], dtype
    print("compile: ok")

# 2. TRITON_INTERPRET=1 set after triton was imported: the interpreter still runs it.
os.environ["TRITON_INTERPRET"] = "1"
h = torch.randn(5, 16, requires_grad=True); w = torch.randn(300, 16) / 4
t, v = torch.randn(5, 24), torch.randn(300, 24) / 5
a = D.fused_linear_kl(h, w, t, v, temperature=2.0, backend="triton")
b = reference(h, w, t, v, temperature=2.0)
assert abs(a.item() - b.item()) <= 1e-5 * abs(b.item()), (a, b)
a.backward()
print("late interpret: ok")
"""


def test_gpu_compile_and_interpreter_set_after_triton_import():
    # Needs a fresh process: this one imported triton under TRITON_INTERPRET=1 (above).
    # Compiling checks what the lenient interpreter does not (loop-carried types, no
    # host-only ops), since this machine has no GPU to run the kernel on.
    run_fresh_triton(GPU_COMPILE_AND_LATE_INTERPRET)
