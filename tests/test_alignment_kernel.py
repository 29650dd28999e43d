"""The fused Triton alignment loss agrees with its PyTorch reference (run on CPU by
Triton's interpreter), and feature_alignment_loss picks, checks and errors as documented.
"""
import os

# Set before any triton import where possible. Triton reads TRITON_INTERPRET when it
# decorates a function (triton.jit), not at launch: its own tl.sum & co. are decorated
# at `import triton`. compt's kernels are decorated at first launch and sum through
# the builtin tl.reduce, so a triton imported earlier by another test module is fine
# too (test_gpu_compile_and_interpreter_set_after_triton_import checks that).
os.environ["TRITON_INTERPRET"] = "1"


import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compt.kernels import NonFiniteInputError, feature_alignment_loss, feature_alignment_loss_reference
from compt.kernels import alignment_triton
from conftest import run_fresh_triton

ALPHA = 500.0
FP32_TOL = 1e-5
BF16_TOL = 1e-2
# The gradient is the part of (s_hat - t_hat) tangent to s_hat, over |s|. In a tiny
# D (or through a projection from 2-3 dims) it can be a small remainder of larger
# terms: there both implementations show float32 cancellation (1e-4 when the
# remainder is ~1e-3), which is conditioning, not disagreement. Random draws
# avoid it from D = 8 up; D = 1 (exact gradient 0) has its own test.
DIMS = st.one_of(st.sampled_from([8, 64, 500, 512, 768, 1024]), st.integers(8, 700))
# The interpreter runs a kernel in numpy (10-100 ms a call here): no deadline.
FAST = settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|, in float64."""
    got, want = got.detach().double(), want.detach().double()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-300)).item()


def make_inputs(batch, captions, dim, *, dtype=torch.float32, student_dim=None, text_3d=False, scale=1.0,
                seed=0, teacher_dtype=None):
    gen = torch.Generator().manual_seed(seed)
    sdim = student_dim or dim
    text_shape = (batch, captions) if text_3d else (batch * captions,)

    def rand(*shape, dt=dtype):
        return (torch.randn(*shape, generator=gen, dtype=torch.float32) * scale).to(dt)

    student_image = rand(batch, sdim).requires_grad_()
    student_text = rand(*text_shape, sdim).requires_grad_()
    teacher_image = rand(batch, dim, dt=teacher_dtype or dtype)
    teacher_text = rand(*text_shape, dim, dt=teacher_dtype or dtype)
    proj = None
    if student_dim is not None:
        proj = torch.nn.Linear(sdim, dim, bias=False).to(dtype)
        with torch.no_grad():
            proj.weight.copy_(torch.randn(dim, sdim, generator=gen) / sdim ** 0.5)
    return student_image, student_text, teacher_image, teacher_text, proj


def loss_and_grads(backend, student_image, student_text, teacher_image, teacher_text, proj, alpha=ALPHA):
    student_image.grad = student_text.grad = None
    params = [] if proj is None else [proj.weight]
    for p in params:
        p.grad = None
    loss = feature_alignment_loss(student_image, student_text, teacher_image, teacher_text, alpha,
                                  proj=proj, backend=backend)
    loss.backward()
    return [loss.detach(), student_image.grad.clone(), student_text.grad.clone(), *[p.grad.clone() for p in params]]


def compare(inputs, tol):
    fused = loss_and_grads("triton", *inputs)
    reference = loss_and_grads("reference", *inputs)
    errors = [rel_err(f, r) for f, r in zip(fused, reference)]
    assert max(errors) <= tol, f"relative errors (loss, d img, d txt[, d proj]) {errors} > {tol}"
    return fused, errors


@FAST
@given(batch=st.integers(1, 9), captions=st.integers(1, 7), dim=DIMS, text_3d=st.booleans(),
       scale=st.sampled_from([1e-3, 1.0, 30.0]), seed=st.integers(0, 2**31 - 1))
def test_fused_matches_reference_fp32(batch, captions, dim, text_3d, scale, seed):
    inputs = make_inputs(batch, captions, dim, text_3d=text_3d, scale=scale, seed=seed)
    (loss, grad_image, grad_text), _ = compare(inputs, FP32_TOL)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert grad_image.shape == inputs[0].shape and grad_text.shape == inputs[1].shape


@pytest.mark.parametrize("batch,captions,dim", [(1, 1, 500), (3, 7, 500), (1, 7, 1024), (2, 1, 512), (5, 3, 2)])
def test_fused_matches_reference_named_shapes(batch, captions, dim):
    compare(make_inputs(batch, captions, dim, seed=batch * 100 + dim), FP32_TOL)


def test_dim_one_has_zero_gradient():
    # A 1-d embedding normalises to +-1 whatever its size: the gradient is exactly 0
    # (the reference leaves float noise there, ~1e-6 of the gradient scale 2 alpha / (rows D |s|)).
    inputs = make_inputs(5, 3, 1, seed=13)
    fused, reference = loss_and_grads("triton", *inputs), loss_and_grads("reference", *inputs)
    assert rel_err(fused[0], reference[0]) <= FP32_TOL
    for got, want, student in zip(fused[1:], reference[1:], inputs[:2]):
        scale = (2 * ALPHA / student.numel() / student.detach().abs().min()).item()
        assert got.abs().max().item() <= FP32_TOL * scale and want.abs().max().item() <= FP32_TOL * scale


@settings(FAST, max_examples=30)
@given(batch=st.integers(1, 5), captions=st.sampled_from([1, 7]), student_dim=st.integers(16, 80),
       dim=st.integers(8, 80), seed=st.integers(0, 2**31 - 1))
def test_projection_gradient_matches_reference(batch, captions, student_dim, dim, seed):
    inputs = make_inputs(batch, captions, dim, student_dim=student_dim, seed=seed)
    fused, _ = compare(inputs, FP32_TOL)
    assert len(fused) == 4 and fused[3].shape == (dim, student_dim)  # d proj.weight came back


@settings(FAST, max_examples=50)
@given(batch=st.integers(1, 8), captions=st.integers(1, 7), dim=DIMS, seed=st.integers(0, 2**31 - 1))
def test_fused_matches_reference_bf16(batch, captions, dim, seed):
    inputs = make_inputs(batch, captions, dim, dtype=torch.bfloat16, seed=seed)
    (loss, grad_image, grad_text), _ = compare(inputs, BF16_TOL)
    assert loss.dtype == torch.float32  # accumulated and returned in float32
    assert grad_image.dtype == grad_text.dtype == torch.bfloat16  # gradients in the input dtype


def test_half_precision_variants():
    compare(make_inputs(3, 7, 500, dtype=torch.float16, seed=1), BF16_TOL)
    compare(make_inputs(2, 3, 96, dtype=torch.bfloat16, teacher_dtype=torch.float32, seed=2), BF16_TOL)
    compare(make_inputs(2, 7, 64, dtype=torch.bfloat16, student_dim=48, seed=3), BF16_TOL)


def test_strided_inputs_and_degenerate_rows():
    student_image, student_text, teacher_image, teacher_text, _ = make_inputs(4, 7, 100, seed=4)
    wide = torch.randn(4, 300)
    student_image = wide[:, 50:150].clone().requires_grad_()  # leaf for .grad
    teacher_image = wide[:, 100:200]  # row stride 300: read in place
    teacher_text = teacher_text.t().contiguous().t()  # column stride != 1: copied
    with torch.no_grad():
        student_text[3].zero_()  # norm below eps: F.normalize's clamp, no radial gradient
        teacher_text[5].zero_()
    compare((student_image, student_text, teacher_image, teacher_text, None), FP32_TOL)


def test_student_equal_to_teacher_gives_zero():
    # Exact growth starts a stage with student == teacher: no cancellation noise.
    student_image, student_text, _, _, _ = make_inputs(3, 7, 500, seed=5)
    loss, grad_image, grad_text = loss_and_grads(
        "triton", student_image, student_text, student_image.detach().clone(), student_text.detach().clone(), None)
    assert loss.item() == 0.0
    assert grad_image.abs().max().item() == 0.0 and grad_text.abs().max().item() == 0.0


def test_upstream_gradient_scales_gradients():
    inputs = make_inputs(3, 2, 40, seed=6)
    loss = feature_alignment_loss(*inputs[:4], ALPHA, backend="triton")
    (-2.5 * loss).backward()
    got = inputs[0].grad.clone()
    want = loss_and_grads("reference", *inputs)
    assert rel_err(got, -2.5 * want[1]) <= FP32_TOL


def test_teacher_inputs_get_no_gradient():
    student_image, student_text, teacher_image, teacher_text, _ = make_inputs(2, 7, 32, seed=7)
    teacher_image.requires_grad_()
    teacher_text.requires_grad_()
    for backend in ("triton", "reference"):
        feature_alignment_loss(student_image, student_text, teacher_image, teacher_text, ALPHA,
                               backend=backend).backward()
        assert teacher_image.grad is None and teacher_text.grad is None
        assert student_image.grad is not None and student_text.grad is not None


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, inside the interpreter
@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("name", ["student_image", "student_text", "teacher_image", "teacher_text"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_input_raises_naming_it(backend, name, bad):
    names = ["student_image", "student_text", "teacher_image", "teacher_text"]
    inputs = list(make_inputs(3, 7, 33, seed=8)[:4])
    i = names.index(name)
    inputs[i] = inputs[i].detach().clone()
    inputs[i].view(-1)[17] = bad
    with pytest.raises(ValueError, match=f"non-finite values \\(NaN or Inf\\) in {name}$"):
        feature_alignment_loss(*inputs, ALPHA, backend=backend)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_nonfinite_projection_raises_naming_it(backend):
    inputs = make_inputs(2, 3, 24, student_dim=16, seed=9)
    with torch.no_grad():
        inputs[4].weight[3, 5] = float("nan")
    with pytest.raises(NonFiniteInputError, match="in proj.weight$"):
        feature_alignment_loss(*inputs[:4], ALPHA, proj=inputs[4], backend=backend)


def test_bad_arguments_raise_clearly(monkeypatch):
    inputs = make_inputs(2, 3, 24, seed=10)[:4]
    with pytest.raises(ValueError, match="backend must be one of"):
        feature_alignment_loss(*inputs, ALPHA, backend="cuda")
    with pytest.raises(ValueError, match="alpha must be finite"):
        feature_alignment_loss(*inputs, float("inf"), backend="triton")
    with pytest.raises(ValueError, match="shapes differ"):
        feature_alignment_loss(inputs[0], inputs[1], inputs[2][:, :20], inputs[3], ALPHA, backend="triton")
    with pytest.raises(ValueError, match="non-empty"):
        feature_alignment_loss(inputs[0][:0], inputs[1], inputs[2][:0], inputs[3], ALPHA, backend="triton")
    with pytest.raises(ValueError, match="several devices"):
        feature_alignment_loss(*inputs[:3], inputs[3].to("meta"), ALPHA, backend="triton")
    monkeypatch.setattr(alignment_triton, "MAX_FUSED_DIM", 16)
    with pytest.raises(ValueError, match="do not fit the fused kernel"):
        feature_alignment_loss(*inputs, ALPHA, backend="triton")


def test_auto_picks_reference_on_cpu(monkeypatch):
    calls = []
    monkeypatch.setattr(alignment_triton.FusedFeatureAlignmentLoss, "apply",
                        staticmethod(lambda *args: calls.append(args) or torch.zeros(())))
    inputs = make_inputs(2, 3, 24, seed=11)[:4]
    auto = feature_alignment_loss(*inputs, ALPHA)  # CPU tensors: reference, even under the interpreter
    assert calls == []
    assert torch.equal(auto, feature_alignment_loss_reference(*inputs, ALPHA))
    feature_alignment_loss(*inputs, ALPHA, backend="triton")
    assert len(calls) == 1


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        feature_alignment_loss(*make_inputs(2, 3, 24, seed=12)[:4], ALPHA, backend="triton")


GPU_COMPILE_AND_LATE_INTERPRET = """
import os, torch, triton
from compt.kernels import alignment_triton as A, feature_alignment_loss_reference as reference

# 1. TRITON_INTERPRET unset: the kernels compile to an sm_90 cubin, as on an H100.
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError:
    print("compile: skipped (triton's compiler API moved)")
else:
    scalars = dict.fromkeys(["n_img", "n_txt", "d_img", "d_txt", "si_stride", "ti_stride", "st_stride",
                             "tt_stride", "n_img_blocks"], "i32")
    scalars.update(w_img="fp32", w_txt="fp32", eps="fp32", BLOCK_M="constexpr", BLOCK_D="constexpr")
    constexprs = {A._alignment_fwd: {}, A._alignment_bwd: {"BF16_RTNE_BY_HAND": False}}  # as on a GPU
    inputs = {"si_ptr": "*bf16", "ti_ptr": "*fp32", "st_ptr": "*bf16", "tt_ptr": "*fp32"}
    outputs = {A._alignment_fwd: {"partial_ptr": "*fp32"},
               A._alignment_bwd: {"gi_ptr": "*bf16", "gt_ptr": "*bf16", "grad_loss_ptr": "*fp32"}}
    for fn, out in outputs.items():
        extra = dict.fromkeys(constexprs[fn], "constexpr")
        source = ASTSource(fn=triton.jit(fn), signature={**inputs, **out, **scalars, **extra},
                           constexprs={"BLOCK_M": 4, "BLOCK_D": 1024, **constexprs[fn]})
        kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
        assert kernel.asm["cubin"], fn
    print("compile: ok")

# 2. TRITON_INTERPRET=1 set after triton was imported: the interpreter still runs them.
os.environ["TRITON_INTERPRET"] = "1"
x = torch.randn(3, 50, requires_grad=True); t = torch.randn(3, 50); y = torch.randn(21, 50)
a = A.feature_alignment_loss(x, y, t, y.flip(0), 500.0, backend="triton")
b = reference(x, y, t, y.flip(0), 500.0)
assert abs(a.item() - b.item()) <= 1e-5 * abs(b.item()), (a, b)
a.backward()
print("late interpret: ok")
"""


def test_gpu_compile_and_interpreter_set_after_triton_import():
    # Needs a fresh process: this one imported triton under TRITON_INTERPRET=1 (above).
    # Compiling checks what the lenient interpreter does not (types across the
    # image/text branch, no host-only ops); the late variable mimics another test
    # module (or deepspeed) importing triton first.
    run_fresh_triton(GPU_COMPILE_AND_LATE_INTERPRET)
