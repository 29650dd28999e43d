"""The fused Triton weight expansion (run on CPU by Triton's interpreter) computes every
flat slice of every grown CLIP tensor bit for bit as its PyTorch reference,
``TensorPlan.flat_slice``, and expand_flat_slice picks, checks and errors as documented.
"""
import os

# compt's kernels are decorated at first launch, so this only has to be set before that.
os.environ["TRITON_INTERPRET"] = "1"

import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compt.clip.grow import plan_tensor, state_shapes
from compt.kernels import expand_flat_slice, expansion_triton, prepare_expansion
from conftest import run_fresh_triton

SEED = 11


pytestmark = pytest.mark.usefixtures("one_thread")


def clip_cfg(width, layers=1, embed=32, ctx=12, vocab=100, text_width=None, text_layers=None):
    tw = text_width or width
    return {
        "embed_dim": embed,
        "vision_cfg": {"image_size": 16, "patch_size": 8, "width": width, "layers": layers, "head_width": 16},
        "text_cfg": {"context_length": ctx, "vocab_size": vocab, "width": tw, "heads": tw // 16,
                     "layers": text_layers or layers},
    }


SMALL = clip_cfg(32)
# (id, student config, mode, noise): integer and non-integer width ratios, depth, embed,
# context and vocab growth; two and three paired copies; official keeps init.
CASES = [
    ("exact-x2-deeper-noise", clip_cfg(64, 2, embed=48, ctx=16, vocab=120), "exact", 0.05),
    ("exact-x1.5-deeper", clip_cfg(48, 2, embed=48, ctx=16, vocab=120), "exact", 0.0),
    ("exact-x1.5-noise", clip_cfg(48, 1, text_width=64, text_layers=3), "exact", 0.05),
    ("exact-x3-noise", clip_cfg(96, 1), "exact", 0.05),
    ("official-deeper", clip_cfg(48, 2, embed=48, ctx=16), "official", 0.0),
]


def teacher(cfg, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=gen) for name, shape in state_shapes(cfg).items()}


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.view({8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[x.element_size()])


def same_bits(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Bit for bit (stricter than torch.equal: -0.0 != 0.0 here)."""
    return got.dtype == want.dtype and got.device == want.device and got.shape == want.shape and (
        torch.equal(bits(got), bits(want)))


def slices(numel: int, row: int, rng: random.Random):
    """A whole tensor, a slice shorter than a block, one crossing row boundaries, a random one."""
    out = [(0, numel)]
    a = rng.randrange(numel)
    out.append((a, min(numel, a + rng.randint(1, 7))))
    if numel > row:
        cut = row * rng.randrange(1, numel // row) if numel // row > 1 else row
        out.append((max(0, cut - rng.randint(1, row)), min(numel, cut + row + rng.randint(1, row))))
    a, b = sorted(rng.sample(range(numel + 1), 2))
    out.append((a, b))
    return out


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_every_tensor_every_slice_matches_reference(case):
    _, big, mode, noise = case
    small = teacher(SMALL)
    gen = torch.Generator().manual_seed(1)
    rng = random.Random(case[0])
    checked, wrong = 0, []
    for name, shape in state_shapes(big).items():
        plan = plan_tensor(name, SMALL, big, mode, noise, SEED)
        if plan is None:
            continue
        init = torch.randn(shape, generator=gen).reshape(-1) if plan.needs_init() else None
        prepared = prepare_expansion(plan, small) if plan.axes else None
        for start, end in slices(plan.numel, shape[-1] if shape else 1, rng):
            init_slice = init[start:end] if init is not None else None
            want = plan.flat_slice(small, start, end, init_slice)
            got = expand_flat_slice(plan, small, start, end, init_slice, backend="triton")
            checked += 1
            if not same_bits(got, want):
                wrong.append((name, start, end, int((got != want).sum())))
            if prepared is not None and start == 0 and end == plan.numel:  # a prepared plan, reused
                assert same_bits(prepared.flat_slice(start, end, init_slice), want), name
    assert not wrong, f"{len(wrong)}/{checked} slices differ (name, start, end, elements): {wrong}"
    assert checked > 100


@st.composite
def config_pairs(draw):
    """A random teacher/student pair that exact growth accepts (head width 16 fixed)."""
    w = draw(st.sampled_from([16, 32]))
    tw = draw(st.sampled_from([16, 32]))
    small = clip_cfg(w, draw(st.integers(1, 2)), embed=draw(st.sampled_from([16, 24])), ctx=8, vocab=50,
                     text_width=tw, text_layers=draw(st.integers(1, 2)))
    grow = lambda n, k: n + 16 * draw(st.integers(0, k))  # noqa: E731
    big = clip_cfg(grow(w, 3), small["vision_cfg"]["layers"] + draw(st.integers(0, 2)),
                   embed=small["embed_dim"] + draw(st.sampled_from([0, 8])), ctx=8 + draw(st.integers(0, 3)),
                   vocab=50 + draw(st.integers(0, 5)), text_width=grow(tw, 2),
                   text_layers=small["text_cfg"]["layers"] + draw(st.integers(0, 1)))
    return small, big


@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(pair=config_pairs(), mode=st.sampled_from(["exact", "official"]), noise=st.sampled_from([0.0, 0.03]),
       seed=st.integers(0, 2**31 - 1), data=st.data())
def test_random_config_pairs_match_reference(pair, mode, noise, seed, data):
    small_cfg, big = pair
    small = teacher(small_cfg, seed=seed % 97)
    names = [n for n in state_shapes(big) if n != "logit_scale"]
    for name in data.draw(st.lists(st.sampled_from(names), min_size=6, max_size=6, unique=True), label="tensors"):
        plan = plan_tensor(name, small_cfg, big, mode, noise, seed)
        if plan is None:
            continue
        start = data.draw(st.integers(0, plan.numel - 1), label="start")
        end = data.draw(st.integers(start, plan.numel), label="end")
        init = torch.randn(end - start, dtype=torch.bfloat16) if plan.needs_init() else None
        want = plan.flat_slice(small, start, end, init)
        assert same_bits(expand_flat_slice(plan, small, start, end, init, backend="triton"), want), (name, start, end)


# Tensors that exercise each fill, and the outputs the kernel casts itself.
MIXED = [("exact-x2-deeper-noise", "transformer.resblocks.0.attn.in_proj_weight"),  # pair q=2 + random heads
         ("exact-x1.5-noise", "visual.transformer.resblocks.0.mlp.c_fc.weight"),  # random rows, free columns
         ("exact-x3-noise", "visual.proj"),  # pair q=3
         ("exact-x1.5-deeper", "token_embedding.weight"),  # mean slots along both axes
         ("official-deeper", "visual.conv1.weight")]  # 4-d, init


@pytest.mark.parametrize("case_id,name", MIXED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int32])
def test_output_dtypes_match_reference(case_id, name, dtype):
    _, big, mode, noise = next(c for c in CASES if c[0] == case_id)
    small = teacher(SMALL, seed=3)
    plan = plan_tensor(name, SMALL, big, mode, noise, SEED)
    init = torch.randn(plan.numel, dtype=torch.bfloat16) if plan.needs_init() else None
    for start, end in ((0, plan.numel), (5, plan.numel - 9)):
        init_slice = init[start:end] if init is not None else None
        want = plan.flat_slice(small, start, end, init_slice, dtype=dtype)
        got = expand_flat_slice(plan, small, start, end, init_slice, dtype=dtype, backend="triton")
        assert same_bits(got, want), (name, dtype, start, end)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # 3e38 -> fp16 inf
def test_bf16_rounding_ties_and_nan_like_torch():
    # Values on float32 -> bf16 halfway points, ones that round differently from
    # float64 directly (torch rounds through float32), zeros, infinities and NaN.
    from compt.growth import TensorPlan, tile_axis

    specials = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-40, -(1 + 2**-8 + 2**-30), 0.0, -0.0,
                             float("inf"), float("-inf"), float("nan"), 3.0e38, -1e-40, 65504.5, 1e-8],
                            dtype=torch.float64)
    plan = TensorPlan("w", ("w",), (specials.numel(),), (specials.numel(),),
                      (tile_axis(specials.numel(), specials.numel(), copies=1),))
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        want = plan.flat_slice({"w": specials}, 0, specials.numel(), dtype=dtype)
        got = expand_flat_slice(plan, {"w": specials}, 0, specials.numel(), dtype=dtype, backend="triton")
        assert same_bits(got, want), (dtype, got, want)


def test_indices_past_32_bits_take_the_per_element_hash(monkeypatch):
    # Tensors of 2**32+ elements cannot be built here: force the per-element high-word
    # hash that they take and check it draws the same numbers.
    _, big, mode, noise = CASES[2]
    small = teacher(SMALL)
    plan = plan_tensor("visual.transformer.resblocks.0.mlp.c_fc.weight", SMALL, big, mode, noise, SEED)
    monkeypatch.setattr(expansion_triton, "_BIG_INDEX", 0)
    got = expand_flat_slice(plan, small, 3, plan.numel, backend="triton")
    assert same_bits(got, plan.flat_slice(small, 3, plan.numel))


def test_slice_without_init_elements_needs_no_init():
    _, big, mode, noise = CASES[4]
    small = teacher(SMALL)
    plan = plan_tensor("visual.transformer.resblocks.1.mlp.c_fc.weight", SMALL, big, mode, noise, SEED)
    cols = plan.shape[1]
    # Rows [0, 128) x columns [0, 32) are the teacher's; the rest keeps the student's init.
    for start, end in ((2, 30), (cols * 5 + 3, cols * 5 + 32), (0, 0)):
        assert same_bits(expand_flat_slice(plan, small, start, end, backend="triton"),
                         plan.flat_slice(small, start, end))
    for start, end in ((2, 41), (cols - 1, cols + 1), (cols * 150, cols * 150 + 1), (20, cols * 3)):
        with pytest.raises(ValueError, match="keeps part of the student's init"):
            plan.flat_slice(small, start, end)
        with pytest.raises(ValueError, match="keeps part of the student's init"):
            expand_flat_slice(plan, small, start, end, backend="triton")


def test_errors_match_reference():
    _, big, mode, noise = CASES[0]
    small = teacher(SMALL)
    plan = plan_tensor("visual.proj", SMALL, big, mode, noise, SEED)
    for backend in ("triton", "reference"):
        with pytest.raises(ValueError, match="outside"):
            expand_flat_slice(plan, small, 5, plan.numel + 1, backend=backend)
        with pytest.raises(ValueError, match="outside"):
            expand_flat_slice(plan, small, 5, 4, backend=backend)
        with pytest.raises(ValueError, match="init_slice has 3 elements"):
            expand_flat_slice(plan, small, 0, 4, torch.zeros(3), backend=backend)
        with pytest.raises(KeyError, match="visual.proj"):
            expand_flat_slice(plan, {}, 0, 4, backend=backend)
        with pytest.raises(ValueError, match="has shape"):
            expand_flat_slice(plan, {"visual.proj": torch.zeros(3, 3)}, 0, 4, backend=backend)
        empty = expand_flat_slice(plan, small, 7, 7, backend=backend)
        assert empty.shape == (0,) and empty.dtype == torch.float64
    with pytest.raises(ValueError, match="backend must be one of"):
        expand_flat_slice(plan, small, 0, 4, backend="cuda")


def test_auto_picks_reference_on_cpu(monkeypatch):
    _, big, mode, noise = CASES[0]
    small = teacher(SMALL)
    plan = plan_tensor("visual.proj", SMALL, big, mode, noise, SEED)

    def no_kernel(*args, **kwargs):
        raise AssertionError("auto must not launch the Triton kernel on CPU tensors")

    monkeypatch.setattr(expansion_triton, "PreparedExpansion", no_kernel)
    for backend in ("auto", "reference"):
        assert same_bits(expand_flat_slice(plan, small, 3, 50, backend=backend), plan.flat_slice(small, 3, 50))


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    _, big, mode, noise = CASES[0]
    small = teacher(SMALL)
    plan = plan_tensor("visual.proj", SMALL, big, mode, noise, SEED)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        expand_flat_slice(plan, small, 0, 4, backend="triton")
    assert same_bits(expand_flat_slice(plan, small, 0, 4), plan.flat_slice(small, 0, 4))  # auto still works


def test_one_value_plans_go_through_the_reference():
    _, big, mode, noise = CASES[0]
    small = teacher(SMALL)
    plan = plan_tensor("logit_scale", SMALL, big, mode, noise, SEED)
    assert not plan.axes
    for backend in ("auto", "triton"):
        assert same_bits(expand_flat_slice(plan, small, 0, 1, backend=backend), plan.flat_slice(small, 0, 1))
    with pytest.raises(ValueError, match="one-value fill"):
        prepare_expansion(plan, small)


GPU_COMPILE_AND_LATE_INTERPRET = """
import os, re, torch, triton
from compt.kernels import expansion_triton as E

# 1. TRITON_INTERPRET unset: the kernel compiles to sm_90 PTX/cubin, as on an H100, with
#    no fused multiply-add and IEEE float64 division and square root.
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError:
    print("compile: skipped (triton's compiler API moved)")
else:
    signature = {"out_ptr": "*fp32", "ext_ptr": "*fp64", "init_ptr": "*bf16", "lead_i_ptr": "*i64",
                 "lead_s_ptr": "*fp64", "last_i_ptr": "*i64", "last_s_ptr": "*fp64", "consts_ptr": "*fp64",
                 "keys_ptr": "*i64", **dict.fromkeys(["start", "end", "row0", "n_rows", "n_lead", "C", "n_col_tiles"],
                                                     "i64")}
    base = dict(HAS_SRC=True, HAS_INIT=True, HAS_SCALE=True, MIXED=True, DO_FREE=True, DO_RANDOM=True, PAIR=1,
                BIG=False, OUT_KIND=1, BLOCK_R=4, BLOCK_C=256)
    for variant in ({}, {"PAIR": 2, "BIG": True, "OUT_KIND": 2}, {"PAIR": 0, "OUT_KIND": 3}):
        constexprs = {**base, **variant}
        source = ASTSource(fn=E._compiled(False), signature={**signature, **dict.fromkeys(constexprs, "constexpr")},
                           constexprs=constexprs)
        kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                options={"num_warps": 8, "enable_fp_fusion": False})
        ptx = kernel.asm["ptx"]
        assert kernel.asm["cubin"] and not re.search(r"\\bfma\\.", ptx), variant
        assert re.search(r"div\\.rn\\.f64", ptx) and re.search(r"sqrt\\.rn\\.f64", ptx), variant
        assert not re.search(r"(mul|add|sub)\\.f64", ptx), variant  # every float64 op rounds on its own
    print("compile: ok")

# 2. TRITON_INTERPRET=1 set after triton was imported: the interpreter still runs it.
os.environ["TRITON_INTERPRET"] = "1"
from compt.growth import TensorPlan, tile_axis
w = torch.randn(6, 4)
plan = TensorPlan("w", ("w",), (10, 9), (6, 4), (tile_axis(6, 10, rest="random"), tile_axis(4, 9, scale=0.5,
                  rest="free", paired=True)), noise=0.1, seed=3, random_gain=0.7)
got = E.expand_flat_slice(plan, {"w": w}, 7, 80, backend="triton")
assert torch.equal(got, plan.flat_slice({"w": w}, 7, 80))
print("late interpret: ok")
"""


def test_gpu_compile_and_interpreter_set_after_triton_import():
    # A fresh process: this one imported triton under TRITON_INTERPRET=1. Compiling checks
    # what the lenient interpreter does not (types, no host-only ops) and what bit-identity
    # on a GPU rests on: no FMA contraction, IEEE float64 division and square root.
    run_fresh_triton(GPU_COMPILE_AND_LATE_INTERPRET)
