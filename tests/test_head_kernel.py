"""The fused LM-head loss (cross-entropy, plus KL to a teacher) agrees with its PyTorch reference
and with the naive full-logits definition, on both engines (the Triton kernel in Triton's CPU
interpreter, and the chunked PyTorch path), never holds full logits, and is what the LLaMA
student computes its loss with.
"""
import os

# As in test_distill_kernel.py: compt's kernels are decorated at first launch.
os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compt.kernels import distill_kl_reference, fused_lm_head_loss, head_triton, lm_head_loss_reference
from conftest import run_fresh_triton

FP32_TOL = 1e-5
BF16_TOL = 1e-2
BACKENDS = ("triton", "torch")
FAST = settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

pytestmark = pytest.mark.usefixtures("one_thread")


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|, in float64."""
    got, want = got.detach().double(), want.detach().double()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-300)).item()


def make_inputs(lead, dim, teacher_dim, vocab, *, dtype=torch.float32, ignored=0.0, seed=0):
    """Hidden states ~ N(0, 1), lm_heads ~ N(0, 1/D) (logits of std ~1); a share ``ignored`` of
    the targets is -100 (padding), the first one never; teacher_dim None: no teacher."""
    gen = torch.Generator().manual_seed(seed)
    lead = (lead,) if isinstance(lead, int) else tuple(lead)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype)

    hidden = rand(*lead, dim).requires_grad_()
    weight = rand(vocab, dim, scale=dim ** -0.5).requires_grad_()
    targets = torch.randint(0, vocab, lead, generator=gen)
    drop = torch.rand(lead, generator=gen) < ignored
    drop.view(-1)[0] = False
    targets[drop] = -100
    teacher = (None, None)
    if teacher_dim is not None:
        teacher = (rand(*lead, teacher_dim), rand(vocab, teacher_dim, scale=teacher_dim ** -0.5))
    return hidden, weight, targets, *teacher


def run(backend, hidden, weight, targets, teacher_hidden, teacher_weight, **kw):
    """[total, ce, kl (or None), d total / d hidden, d total / d weight]."""
    hidden.grad = weight.grad = None
    out = fused_lm_head_loss(hidden, weight, targets, teacher_hidden, teacher_weight, backend=backend, **kw)
    out.total.backward()
    return [out.total.detach(), out.ce, out.kl, hidden.grad.clone(), weight.grad.clone()]


def naive(hidden, weight, targets, teacher_hidden, teacher_weight, *, alpha=1.0, temperature=1.0):
    """The definition, written out: F.cross_entropy (ignore_index -100) + alpha * the KL reference."""
    ce = F.cross_entropy(F.linear(hidden, weight).flatten(0, -2).float(), targets.reshape(-1))
    if teacher_hidden is None:
        return ce, ce, None
    kl = distill_kl_reference(hidden, weight, teacher_hidden, teacher_weight, temperature=temperature,
                              mask=targets != -100)
    return ce + alpha * kl, ce, kl


def assert_close(got, want, tol, what):
    errors = [None if g is None else rel_err(g, w) for g, w in zip(got, want)]
    assert (got[2] is None) == (want[2] is None), what
    assert max(e for e in errors if e is not None) <= tol, f"{what}: (total, ce, kl, d hidden, d weight) {errors}"


# (leading dims, dim, teacher dim or None, vocab, alpha, temperature, share ignored, chunk_size)
CASES = [
    pytest.param(1, 8, None, 50, 0.0, 1.0, 0.0, None, id="ce-one-token"),
    pytest.param((2, 7), 24, None, 257, 0.0, 1.0, 0.3, 5, id="ce-batch-seq-ignored"),
    pytest.param(10, 16, 16, 1000, 0.5, 1.0, 0.0, 3, id="kl-T1-chunks-3-3-3-1"),
    pytest.param(37, 33, 17, 300, 1.0, 2.0, 0.3, 8, id="kl-T2-ignored-dims-differ"),
    pytest.param((3, 5), 20, 40, 129, 2.0, 0.7, 0.0, None, id="kl-T0.7-vocab-block+1"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lead,dim,teacher_dim,vocab,alpha,temperature,ignored,chunk_size", CASES)
def test_matches_reference_and_naive_fp32(backend, lead, dim, teacher_dim, vocab, alpha, temperature, ignored,
                                          chunk_size):
    inputs = make_inputs(lead, dim, teacher_dim, vocab, ignored=ignored, seed=vocab)
    kw = {"alpha": alpha, "temperature": temperature}
    got = run(backend, *inputs, chunk_size=chunk_size, **kw)
    assert_close(got, run("reference", *inputs, **kw), FP32_TOL, "vs lm_head_loss_reference")
    hidden, weight = inputs[:2]
    hidden.grad = weight.grad = None
    want = list(naive(*inputs, **kw))
    want[0].backward()
    assert_close(got, [*(x.detach() if x is not None else None for x in want), hidden.grad, weight.grad],
                 FP32_TOL, "vs F.cross_entropy + KL on full logits")
    assert got[0].dtype == torch.float32 and got[0].dim() == 0 and got[1] > 0
    assert got[3].shape == hidden.shape and got[4].shape == weight.shape


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lead,dim,teacher_dim,vocab,alpha,temperature,ignored,chunk_size", CASES)
def test_matches_reference_bf16(backend, lead, dim, teacher_dim, vocab, alpha, temperature, ignored, chunk_size):
    # The reference rounds each term's d logits to bf16 before adding them; the fused head adds them
    # in float32 and rounds once. Both are held to the float64 truth of the same bf16 inputs.
    inputs = make_inputs(lead, dim, teacher_dim, vocab, dtype=torch.bfloat16, ignored=ignored, seed=vocab)
    kw = {"alpha": alpha, "temperature": temperature}
    got = run(backend, *inputs, chunk_size=chunk_size, **kw)
    reference = run("reference", *inputs, **kw)
    wide = [x.detach().double().requires_grad_(i < 2) if x is not None and x.is_floating_point() else x
            for i, x in enumerate(inputs)]
    truth = run("reference", *wide, **kw)
    assert got[0].dtype == got[1].dtype == torch.float32  # losses in float32
    assert got[3].dtype == got[4].dtype == torch.bfloat16  # gradients in the inputs' dtype
    for i, what in enumerate(("total", "ce", "kl", "d hidden", "d weight")):
        if got[i] is None:
            continue
        assert rel_err(got[i], truth[i]) <= max(2 * rel_err(reference[i], truth[i]), BF16_TOL / 2), what
        assert rel_err(got[i], reference[i]) <= BF16_TOL, what


@FAST
@given(tokens=st.integers(1, 30), dim=st.integers(1, 40), teacher_dim=st.one_of(st.none(), st.integers(1, 40)),
       vocab=st.integers(2, 400), alpha=st.sampled_from([0.0, 0.5, 3.0]), temperature=st.sampled_from([0.5, 1.0, 3.0]),
       ignored=st.sampled_from([0.0, 0.4]), chunk_size=st.one_of(st.none(), st.integers(1, 12)),
       seed=st.integers(0, 2**31 - 1))
def test_triton_matches_reference_fp32_random(tokens, dim, teacher_dim, vocab, alpha, temperature, ignored,
                                               chunk_size, seed):
    inputs = make_inputs(tokens, dim, teacher_dim, vocab, ignored=ignored, seed=seed)
    kw = {"alpha": alpha, "temperature": temperature}
    assert_close(run("triton", *inputs, chunk_size=chunk_size, **kw), run("reference", *inputs, **kw), FP32_TOL,
                 "triton vs reference")


@pytest.mark.parametrize("backend", (*BACKENDS, "reference"))
def test_ignored_tokens_are_not_read_and_all_ignored_gives_zero(backend):
    hidden, weight, targets, t_hidden, t_weight = make_inputs(12, 16, 16, 100, ignored=0.4, seed=1)
    targets[3] = -100
    with torch.no_grad():
        hidden[3, 0] = float("nan")  # a padding token's garbage changes nothing
        t_hidden[3, 1] = float("inf")
    got = run(backend, hidden, weight, targets, t_hidden, t_weight, alpha=0.5)
    assert all(torch.isfinite(x).all() for x in got) and got[3][3].abs().max() == 0
    assert got[3][targets == -100].abs().max() == 0
    none = torch.full_like(targets, -100)
    total, ce, kl, grad_hidden, grad_weight = run(backend, hidden.detach().nan_to_num().requires_grad_(), weight,
                                                  none, t_hidden, t_weight, alpha=0.5)
    assert total.item() == ce.item() == kl.item() == 0.0
    assert grad_hidden.abs().max() == 0 and grad_weight.abs().max() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_ignore_index_and_int32_targets(backend):
    hidden, weight, targets, _, _ = make_inputs(9, 12, None, 60, seed=2)
    targets[[2, 5]] = 7  # token 7 is the padding token here
    got = run(backend, hidden, weight, targets.int(), None, None, ignore_index=7)
    want = F.cross_entropy(F.linear(hidden, weight).float(), targets, ignore_index=7)
    assert rel_err(got[1], want) <= FP32_TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_total_carries_gradients_and_the_teacher_gets_none(backend):
    hidden, weight, targets, t_hidden, t_weight = make_inputs(6, 16, 24, 100, seed=3)
    t_hidden.requires_grad_()
    t_weight.requires_grad_()
    out = fused_lm_head_loss(hidden, weight, targets, t_hidden, t_weight, alpha=0.5, backend=backend)
    assert out.total.requires_grad and not out.ce.requires_grad and not out.kl.requires_grad
    out.total.backward()
    assert t_hidden.grad is None and t_weight.grad is None and hidden.grad is not None
    no_teacher = fused_lm_head_loss(hidden, weight, targets, backend=backend)
    assert no_teacher.kl is None and no_teacher.total.item() == no_teacher.ce.item()


@pytest.mark.parametrize("backend", BACKENDS)
def test_upstream_gradient_scales_gradients(backend):
    inputs = make_inputs(7, 20, 20, 150, seed=4)
    out = fused_lm_head_loss(*inputs, alpha=0.5, temperature=2.0, backend=backend, chunk_size=3)
    (-2.5 * out.total).backward()
    got = [inputs[0].grad.clone(), inputs[1].grad.clone()]
    want = run("reference", *inputs, alpha=0.5, temperature=2.0)
    assert rel_err(got[0], -2.5 * want[3]) <= FP32_TOL and rel_err(got[1], -2.5 * want[4]) <= FP32_TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_head_and_no_grad_mode_make_no_gradients(backend, monkeypatch):
    writes = []
    step = head_triton._ROW_STEPS[backend]
    monkeypatch.setitem(head_triton._ROW_STEPS, backend, lambda *a: writes.append(a[-1]) or step(*a))
    hidden, weight, targets, t_hidden, t_weight = make_inputs(5, 12, 12, 90, seed=5)
    want = lm_head_loss_reference(hidden, weight, targets, t_hidden, t_weight, alpha=0.5)
    with torch.no_grad():  # evaluation: the losses, no gradient made
        out = fused_lm_head_loss(hidden, weight, targets, t_hidden, t_weight, alpha=0.5, backend=backend)
    assert rel_err(out.total, want.total) <= FP32_TOL and rel_err(out.kl, want.kl) <= FP32_TOL
    assert writes == [False] and not out.total.requires_grad
    weight.requires_grad_(False)  # a frozen lm_head: only d hidden
    fused_lm_head_loss(hidden, weight, targets, t_hidden, t_weight, alpha=0.5, backend=backend).total.backward()
    assert weight.grad is None and rel_err(hidden.grad, torch.autograd.grad(
        lm_head_loss_reference(hidden, weight, targets, t_hidden, t_weight, alpha=0.5).total, hidden)[0]) <= FP32_TOL


class FullLogitsSpy(torch.overrides.TorchFunctionMode):
    """Fails on any torch call (forward or the Python backward) that returns a tensor with as
    many elements as one model's full logits."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit, self.largest = limit, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(x, torch.Tensor):
                self.largest = max(self.largest, x.numel())
        return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_exist_one_chunk_at_a_time_forward_and_backward(backend, monkeypatch):
    seen = []
    step = head_triton._ROW_STEPS[backend]
    monkeypatch.setitem(head_triton._ROW_STEPS, backend,
                        lambda s, t, *a: seen.append((tuple(s.shape), tuple(t.shape))) or step(s, t, *a))
    tokens, vocab = 23, 700  # logits (16100) are larger than every input (d weight: 700 x 8)
    inputs = make_inputs(tokens, 8, 8, vocab, seed=6)
    with FullLogitsSpy(tokens * vocab) as spy:
        out = fused_lm_head_loss(*inputs, alpha=0.5, chunk_size=5, backend=backend)
        out.total.backward()
    assert seen == [((5, vocab), (5, vocab))] * 4 + [((3, vocab), (3, vocab))]
    assert spy.largest < tokens * vocab // 2
    with FullLogitsSpy(tokens * vocab) as naive_spy:  # the spy sees the naive head's logits
        lm_head_loss_reference(*inputs, alpha=0.5).total.backward()
    assert naive_spy.largest >= tokens * vocab


def test_auto_picks_torch_on_cpu_and_reference_is_naive(monkeypatch):
    used = []
    for name in BACKENDS:
        step = head_triton._ROW_STEPS[name]
        monkeypatch.setitem(head_triton._ROW_STEPS, name,
                            lambda *args, _name=name, _step=step: used.append(_name) or _step(*args))
    inputs = make_inputs(3, 8, 8, 40, seed=7)
    fused_lm_head_loss(*inputs)  # CPU tensors: torch, even under the interpreter
    fused_lm_head_loss(*inputs, backend="triton")
    assert used == ["torch", "triton"]
    assert fused_lm_head_loss(*inputs, backend="reference").total.grad_fn.name() == "AddBackward0"
    assert used == ["torch", "triton"]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, inside the interpreter
@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_input_gives_a_nonfinite_loss(backend):
    # As F.cross_entropy: the stage loop sees the NaN and skips the step (no exception, no extra sync).
    hidden, weight, targets, t_hidden, t_weight = make_inputs(6, 10, 14, 80, seed=8)
    with torch.no_grad():
        t_weight[5, 3] = float("nan")
    out = fused_lm_head_loss(hidden, weight, targets, t_hidden, t_weight, backend=backend)
    assert not torch.isfinite(out.total) and torch.isfinite(out.ce)


def test_bad_arguments_raise_clearly():
    h, w, y, t_h, t_w = make_inputs(4, 8, 12, 30, seed=9)
    cases = [
        (dict(backend="cuda"), "backend must be one of"),
        (dict(temperature=0.0), "temperature must be finite and > 0"),
        (dict(alpha=float("nan")), "alpha must be finite"),
        (dict(chunk_size=0), "chunk_size must be a positive int"),
        (dict(teacher_weight=t_w[:20]), "vocabularies differ"),
        (dict(teacher_hidden=t_h[:3]), "do not hold the same tokens"),
        (dict(teacher_weight=None), "pass both teacher_hidden and teacher_weight, or neither"),
        (dict(hidden=h.bfloat16()), "hidden is torch.bfloat16 but weight is torch.float32"),
        (dict(weight=t_w), "hidden dim 8 != weight dim 12"),
        (dict(targets=y.float()), "targets must be integer token ids"),
        (dict(targets=y[:3]), "targets must be integer token ids shaped as"),
        (dict(teacher_weight=t_w.to("meta"), teacher_hidden=t_h.to("meta")), "several devices"),
    ]
    base = dict(hidden=h, weight=w, targets=y, teacher_hidden=t_h, teacher_weight=t_w)
    for change, message in cases:
        args = {**base, **change}
        with pytest.raises(ValueError, match=message):
            fused_lm_head_loss(args.pop("hidden"), args.pop("weight"), args.pop("targets"), **args)
    y_bad = y.clone()
    y_bad[1] = 30
    for backend in BACKENDS:
        with pytest.raises(ValueError, match=r"target 30 is outside the vocabulary \[0, 30\)"):
            fused_lm_head_loss(h, w, y_bad, backend=backend)


def test_llama_student_loss_is_the_fused_head():
    # ChainCausalLM's forward: fused (auto = torch here) vs reference (full logits), with and
    # without a teacher, and under no_grad as evaluation calls it; every parameter's gradient.
    from compt.llama.train import ChainCausalLM

    def llama(hidden, layers, heads, kv, mlp, tied=True):
        return {"vocab_size": 512, "hidden_size": hidden, "intermediate_size": mlp, "num_hidden_layers": layers,
                "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": 16,
                "max_position_embeddings": 32, "tie_word_embeddings": tied}

    torch.manual_seed(0)
    student = ChainCausalLM(llama(48, 1, 3, 3, 96, tied=False))
    teacher = ChainCausalLM(llama(32, 1, 2, 1, 64))
    blocks = torch.randint(0, 512, (3, 17))
    with torch.no_grad():
        t_out = (teacher.lm.model(input_ids=blocks[:, :-1]).last_hidden_state, teacher.lm.lm_head.weight)
    for teacher_out, alpha in ((None, 0.0), (t_out, 0.0), (t_out, 0.5)):
        results = {}
        for backend in ("reference", "auto"):
            student.zero_grad()
            out = student(blocks, teacher_out, alpha, 2.0, backend)
            out[0].backward()
            grads = {n: p.grad.clone() for n, p in student.named_parameters()}
            with torch.no_grad():
                evaluated = student(blocks)[1]
            results[backend] = (out, grads, evaluated)
        (ref, ref_grads, ref_eval), (got, got_grads, got_eval) = results["reference"], results["auto"]
        assert len(got) == len(ref) == (3 if alpha else 2)
        for g, r in zip(got, ref):
            torch.testing.assert_close(g.detach(), r.detach(), rtol=1e-5, atol=0)
        torch.testing.assert_close(got_eval, ref_eval, rtol=1e-5, atol=0)
        assert ref_grads.keys() == got_grads.keys() and "lm.lm_head.weight" in got_grads
        for name in ref_grads:
            torch.testing.assert_close(got_grads[name], ref_grads[name], rtol=1e-4, atol=1e-7, msg=name)


GPU_COMPILE_AND_LATE_INTERPRET = """
import os, torch, triton
from compt.kernels import distill_triton as D, head_triton as H, lm_head_loss_reference as reference

# 1. TRITON_INTERPRET unset: each specialisation the host launches compiles to an sm_90 cubin,
#    as on an H100, with the GPU launch configuration, for bf16 and fp32 logits.
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError:
    print("compile: skipped (triton's compiler API moved)")
else:
    block_m, block_v, warps = D.GPU_LAUNCH
    for dtype, teacher, tempered, write in (("bf16", True, True, True), ("fp32", True, False, True),
                                            ("bf16", False, False, True), ("fp32", False, False, False)):
        signature = {"s_ptr": f"*{dtype}", "t_ptr": f"*{dtype}", "y_ptr": "*i64", "ce_ptr": "*fp32",
                     "kl_ptr": "*fp32", "n_rows": "i32", "n_cols": "i32", "s_stride": "i32", "t_stride": "i32",
                     "inv_temp": "fp32", "ce_scale": "fp32", "kl_scale": "fp32"}
        constexprs = {"HAS_TEACHER": teacher, "TEMPERED": tempered, "WRITE_GRAD": write, "BLOCK_M": block_m,
                      "BLOCK_V": block_v, "BF16_RTNE_BY_HAND": False}
        signature.update({k: "constexpr" for k in constexprs})
        source = ASTSource(fn=triton.jit(H._lm_head_rows), signature=signature, constexprs=constexprs)
        kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
        assert kernel.asm["cubin"], (dtype, teacher, tempered, write)
    print("compile: ok")

# 2. TRITON_INTERPRET=1 set after triton was imported: the interpreter still runs it.
os.environ["TRITON_INTERPRET"] = "1"
h = torch.randn(5, 16, requires_grad=True); w = torch.randn(300, 16) / 4
t, v = torch.randn(5, 24), torch.randn(300, 24) / 5
y = torch.randint(0, 300, (5,))
a = H.fused_lm_head_loss(h, w, y, t, v, alpha=0.5, temperature=2.0, backend="triton")
b = reference(h, w, y, t, v, alpha=0.5, temperature=2.0)
assert abs(a.total.item() - b.total.item()) <= 1e-5 * abs(b.total.item()), (a, b)
a.total.backward()
print("late interpret: ok")
"""


def test_gpu_compile_and_interpreter_set_after_triton_import():
    # A fresh process: this one imported triton under TRITON_INTERPRET=1. Compiling checks what
    # the lenient interpreter does not (static branches, loop-carried types, no host-only ops).
    run_fresh_triton(GPU_COMPILE_AND_LATE_INTERPRET)
