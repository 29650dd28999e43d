"""LLaMA growth: exact growth keeps the logits, plans slice like ZeRO-3 needs, official copies
leading blocks, impossible growths say why, and ``compt grow`` works on HF config.json files."""
from __future__ import annotations

import contextlib
import json
import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM
from transformers.models.llama import modeling_llama

from compt.cli import main
from compt.llama import build_llama, llama_config_problem, llama_state_shapes, resolve_llama_config
from compt.llama.grow import exact_config, grow_state_dict, growth_problem, layer_source, plan_tensor

pytestmark = pytest.mark.usefixtures("one_thread")


def llama(**kw) -> dict:
    base = dict(vocab_size=24, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=4, rms_norm_eps=1e-6, tie_word_embeddings=False)
    return resolve_llama_config({**base, **kw})


@contextlib.contextmanager
def float64_norm():
    """transformers' LlamaRMSNorm normalises in float32 even in a float64 model, which caps any
    float64 comparison at float32 rounding; the exactness property is about the math, so these
    checks let the norm compute in its input's precision (at least float32, as stock)."""
    stock = modeling_llama.LlamaRMSNorm.forward

    def forward(self, x):
        h = x.to(torch.promote_types(x.dtype, torch.float32))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(x.dtype)

    modeling_llama.LlamaRMSNorm.forward = forward
    try:
        yield
    finally:
        modeling_llama.LlamaRMSNorm.forward = stock


def trained_small(cfg: dict, seed: int = 0) -> LlamaForCausalLM:
    """A float64 model with weights far from init (norm gains around 1, not exactly 1)."""
    torch.manual_seed(seed)
    model = build_llama(cfg, torch.float64).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.2 if p.ndim == 1 else 0.4) + (1.0 if p.ndim == 1 else 0.0))
    return model


def grown(small: LlamaForCausalLM, small_cfg: dict, big_cfg: dict, mode: str = "exact", noise: float = 0.0,
          seed: int = 0, student_cfg: dict | None = None) -> LlamaForCausalLM:
    if student_cfg is None:
        student_cfg = exact_config(small_cfg, big_cfg) if mode == "exact" else big_cfg
    torch.manual_seed(seed + 1)
    big = build_llama(student_cfg, torch.float64).eval()
    sd = grow_state_dict(small.state_dict(), big.state_dict(), small_cfg, big_cfg, mode, noise=noise, seed=seed)
    big.load_state_dict(sd, strict=True)
    return big


def logit_diff(small, big, vocab: int, seed: int = 0) -> float:
    ids = torch.randint(0, vocab, (2, 7), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        a, b = small(ids).logits, big(ids).logits
    return (a - b[..., :vocab]).abs().max().item()


@st.composite
def growths(draw):
    """(small config, big config, noise): random widths (integer and not), heads, KV groups,
    MLP, depth, vocab, tying, biases; equal head_dim, activation and RoPE."""
    hd = draw(st.sampled_from([2, 4]))
    g, r = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    h = g * r
    d = h * draw(st.integers(1, 4))
    r2 = draw(st.integers(1, 3))
    G = max(g * draw(st.integers(1, 2)) + draw(st.integers(0, 1)), g * -(-r // r2))
    H = G * r2
    D = draw(st.sampled_from([x for x in range(d, 3 * d + H + 1) if x % H == 0]))
    m, L, V = draw(st.integers(3, 10)), draw(st.integers(1, 2)), draw(st.integers(8, 20))
    small_tied = draw(st.booleans())
    common = dict(head_dim=hd, rms_norm_eps=draw(st.sampled_from([1e-6, 0.05])),
                  attention_bias=draw(st.booleans()), mlp_bias=draw(st.booleans()))
    small = llama(hidden_size=d, num_attention_heads=h, num_key_value_heads=g, intermediate_size=m,
                  num_hidden_layers=L, vocab_size=V, tie_word_embeddings=small_tied, **common)
    big = llama(hidden_size=D, num_attention_heads=H, num_key_value_heads=G,
                intermediate_size=m * draw(st.integers(1, 2)) + draw(st.integers(0, 4)),
                num_hidden_layers=L + draw(st.integers(0, 2)), vocab_size=V + draw(st.integers(0, 3)),
                tie_word_embeddings=small_tied and draw(st.booleans()), **common)
    return small, big, draw(st.sampled_from([0.0, 0.3]))


@settings(max_examples=60)
@given(growths())
def test_exact_growth_keeps_the_logits(case):
    small_cfg, big_cfg, noise = case
    assert growth_problem(small_cfg, big_cfg, "exact") is None
    with float64_norm():
        small = trained_small(small_cfg)
        big = grown(small, small_cfg, big_cfg, noise=noise, seed=3)
        assert logit_diff(small, big, small_cfg["vocab_size"]) <= 1e-10


def test_noise_breaks_symmetry_but_not_the_function():
    small_cfg = llama()
    big_cfg = llama(hidden_size=32, num_attention_heads=8, intermediate_size=48, num_hidden_layers=3)
    with float64_norm():
        small = trained_small(small_cfg)
        quiet, noisy = grown(small, small_cfg, big_cfg, noise=0.0), grown(small, small_cfg, big_cfg, noise=0.5)
        assert logit_diff(small, quiet, 24) <= 1e-10 and logit_diff(small, noisy, 24) <= 1e-10
    w0 = quiet.state_dict()["model.layers.0.mlp.up_proj.weight"]
    w1 = noisy.state_dict()["model.layers.0.mlp.up_proj.weight"]
    assert torch.equal(w0[:, :16], w0[:, 16:])  # tiled copies, identical without noise
    assert not torch.equal(w1[:, :16], w1[:, 16:])
    torch.testing.assert_close(w1[:, :16] + w1[:, 16:], w0[:, :16] * 2, rtol=0, atol=1e-12)  # zero-sum noise
    # an added layer is the identity: its residual writers are zero, the rest is the teacher layer
    sd = noisy.state_dict()
    assert [layer_source(j, 2, 3) for j in range(3)] == [0, 0, 1]
    assert not sd["model.layers.1.self_attn.o_proj.weight"].any()
    assert not sd["model.layers.1.mlp.down_proj.weight"].any()
    assert sd["model.layers.0.self_attn.o_proj.weight"].any() and sd["model.layers.2.mlp.down_proj.weight"].any()


def test_rms_norm_eps_must_be_rescaled_at_non_integer_width_ratios():
    small_cfg = llama(rms_norm_eps=0.05)
    odd = llama(hidden_size=24, num_attention_heads=6, num_key_value_heads=3, rms_norm_eps=0.05)  # 16 -> 24
    assert exact_config(small_cfg, odd)["rms_norm_eps"] == pytest.approx(0.05 * 16 / 24, rel=1e-15)
    double = llama(hidden_size=32, num_attention_heads=8, rms_norm_eps=1e-3)  # integer ratio: the teacher's eps
    assert exact_config(small_cfg, double)["rms_norm_eps"] == 0.05
    with float64_norm():
        small = trained_small(small_cfg)
        assert logit_diff(small, grown(small, small_cfg, odd), 24) <= 1e-10
        nominal = logit_diff(small, grown(small, small_cfg, odd, student_cfg=odd), 24)
    assert nominal > 1e-6, nominal  # the config's own eps is not exact


def test_with_transformers_stock_float32_norm_the_logits_agree_to_float32_rounding():
    small_cfg = llama()
    for big_cfg in (llama(hidden_size=24, num_attention_heads=6, num_key_value_heads=3, intermediate_size=40),
                    llama(hidden_size=32, num_attention_heads=8, num_hidden_layers=3, vocab_size=30)):
        small = trained_small(small_cfg)
        diff = logit_diff(small, grown(small, small_cfg, big_cfg, noise=0.1), 24)
        assert diff <= 1e-4, diff


def test_gqa_keeps_each_query_head_with_its_own_kv_head():
    # 4 query heads on 1 KV head -> 8 query heads in groups of 2: the teacher group is split over
    # two student KV heads that both copy the teacher's K/V.
    small_cfg, big_cfg = llama(num_key_value_heads=1), llama(hidden_size=32, num_attention_heads=8,
                                                             num_key_value_heads=4)
    with float64_norm():
        small = trained_small(small_cfg)
        big = grown(small, small_cfg, big_cfg)
        assert logit_diff(small, big, 24) <= 1e-10
    k = big.state_dict()["model.layers.0.self_attn.k_proj.weight"]
    assert torch.equal(k[0:4], k[4:8])  # KV heads 0 and 1 copy teacher KV head 0
    o = big.state_dict()["model.layers.0.self_attn.o_proj.weight"]
    assert not o[:, 16:].any()  # query heads 4..7 are new: zero output columns


def test_tied_student_head_is_the_embedding_and_not_stored():
    cfg = llama(tie_word_embeddings=True)
    assert "lm_head.weight" not in llama_state_shapes(cfg)
    assert "lm_head.weight" in llama_state_shapes(llama())
    big = llama(hidden_size=32, num_attention_heads=8, tie_word_embeddings=True)
    head, embed = (plan_tensor(n, cfg, big, "exact", 0.3, 1) for n in ("lm_head.weight", "model.embed_tokens.weight"))
    small = {"model.embed_tokens.weight": torch.randn(24, 16, dtype=torch.float64)}
    assert torch.equal(head.dense(small), embed.dense(small))


@settings(max_examples=12)
@given(growths(), st.lists(st.floats(0, 1), min_size=1, max_size=5))
def test_flat_slices_concatenate_to_dense_bit_for_bit(case, cuts):
    small_cfg, big_cfg, noise = case
    small = {k: v for k, v in trained_small(small_cfg).state_dict().items()}
    init = build_llama(big_cfg, torch.float64).state_dict()
    for mode in ("exact", "official"):
        for name in llama_state_shapes(big_cfg):
            plan = plan_tensor(name, small_cfg, big_cfg, mode, noise, seed=7)
            if plan is None:
                continue
            flat_init = init[name].reshape(-1) if plan.needs_init() else None
            dense = plan.dense(small, init=init[name] if flat_init is not None else None).reshape(-1)
            points = sorted({0, plan.numel, *(int(c * plan.numel) for c in cuts)})
            parts = [plan.flat_slice(small, a, b, flat_init[a:b] if flat_init is not None else None)
                     for a, b in zip(points, points[1:])]
            assert torch.equal(torch.cat(parts), dense), (mode, name)


def test_official_copies_leading_slices_and_keeps_the_rest_of_the_init():
    small_cfg = llama(tie_word_embeddings=True)
    big_cfg = llama(hidden_size=32, num_attention_heads=8, num_key_value_heads=2, intermediate_size=40,
                    num_hidden_layers=4, vocab_size=30, head_dim=8)
    assert growth_problem(small_cfg, big_cfg, "official") is None
    small = trained_small(small_cfg).state_dict()
    torch.manual_seed(5)
    big_init = build_llama(big_cfg, torch.float64).state_dict()
    out = grow_state_dict(small, big_init, small_cfg, big_cfg, "official", noise=0.5)
    for name, value in out.items():
        src = name
        m = re.match(r"model\.layers\.(\d+)\.(.+)", name)
        if m:
            src = f"model.layers.{layer_source(int(m.group(1)), 2, 4)}.{m.group(2)}"  # 0,0,1,1
        if name == "lm_head.weight":
            src = "model.embed_tokens.weight"  # a tied teacher's head is its embedding
        t = small[src]
        block = tuple(slice(0, n) for n in t.shape)
        assert torch.equal(value[block], t), name
        rest = torch.ones_like(value, dtype=torch.bool)
        rest[block] = False
        assert torch.equal(value[rest], big_init[name][rest]), name
    q0, q1 = out["model.layers.0.self_attn.q_proj.weight"], out["model.layers.1.self_attn.q_proj.weight"]
    assert torch.equal(q0[:16, :16], q1[:16, :16]) and not torch.equal(q0, q1)  # same teacher layer, own init


@pytest.mark.parametrize("mode, big, message", [
    ("exact", dict(head_dim=8, num_attention_heads=4, hidden_size=32),
     r"head_dim changes \(4 -> 8\).*keeps head_dim fixed"),
    ("exact", dict(hidden_size=12, num_attention_heads=4), r"hidden_size shrinks \(16 -> 12\)"),
    ("exact", dict(num_hidden_layers=1), r"num_hidden_layers shrinks"),
    ("exact", dict(vocab_size=20), r"vocab_size shrinks"),
    ("exact", dict(num_key_value_heads=1), r"num_key_value_heads shrinks \(2 -> 1\)"),
    ("exact", dict(hidden_act="gelu"), r"hidden_act differs"),
    ("exact", dict(rope_parameters={"rope_type": "default", "rope_theta": 500.0}), r"rope_parameters differs"),
    ("exact", dict(attention_bias=True), r"attention_bias differs"),
    ("exact", dict(tie_word_embeddings=True), r"student is tied but the teacher is not.*tie_word_embeddings false"),
    ("official", dict(hidden_size=12, num_attention_heads=4), r"cannot grow .* larger than student shape"),
    ("official", dict(intermediate_size=20),
     r"cannot grow model\.layers\.0\.mlp\.gate_proj\.weight: teacher shape \(24, 16\) is larger"),
])
def test_growth_problem_says_why(mode, big, message):
    problem = growth_problem(llama(), llama(**big), mode)
    assert problem is not None and re.search(message, problem), problem
    with pytest.raises(ValueError, match=message):
        for name in llama_state_shapes(llama(**big)):
            plan_tensor(name, llama(), llama(**big), mode)


def test_kv_groups_that_cannot_host_the_teacher_heads_are_refused():
    # teacher: 4 KV heads of 1 query head; student: 2 KV heads of 4 -> the 4 distinct K/V cannot fit
    problem = growth_problem(llama(num_key_value_heads=4), llama(hidden_size=32, num_attention_heads=8,
                                                                num_key_value_heads=2), "exact")
    assert problem and "num_key_value_heads shrinks (4 -> 2)" in problem
    # teacher: 2 KV heads of 3; student: 3 KV heads of 2 -> needs 2 * ceil(3/2) = 4 groups
    problem = growth_problem(llama(hidden_size=24, num_attention_heads=6, num_key_value_heads=2),
                             llama(hidden_size=24, num_attention_heads=6, num_key_value_heads=3), "exact")
    assert problem and "num_key_value_heads 3 is too few" in problem and "raise num_key_value_heads to 4" in problem
    assert growth_problem(llama(), llama(), "none") is None
    with pytest.raises(ValueError, match="unknown growth mode"):
        growth_problem(llama(), llama(), "bogus")


def test_config_problems_name_the_field(tmp_path):
    assert llama_config_problem(llama()) is None
    cases = [
        (dict(hidden_size=30, num_attention_heads=4), "hidden size (30) is not a multiple"),
        (dict(num_attention_heads=4, num_key_value_heads=3), "not a multiple of num_key_value_heads (3)"),
        (dict(hidden_size=0), "hidden_size must be a positive int"),
        (dict(hidden_act="nope"), "hidden_act 'nope' is unknown"),
        (dict(model_type="gpt2"), "model_type must be 'llama'"),
        (dict(rms_norm_eps=-1.0), "rms_norm_eps must be a finite number >= 0"),
    ]
    for raw, message in cases:
        assert message in (llama_config_problem(raw) or ""), raw
    assert "no such file" in llama_config_problem(str(tmp_path / "absent.json"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8,
                                                      "num_attention_heads": 2}))
    cfg = resolve_llama_config(tmp_path)  # a folder holding config.json
    assert cfg["num_key_value_heads"] == 2 and cfg["head_dim"] == 4 and cfg["rope_parameters"]["rope_type"] == "default"
    with pytest.raises(ValueError, match="num_key_value_heads"):
        resolve_llama_config({"num_attention_heads": 4, "num_key_value_heads": 3})


# ---- compt grow on HF config.json files ------------------------------------------------------
def save_hf(model: LlamaForCausalLM, folder) -> None:
    model.to(torch.float32).save_pretrained(folder)  # config.json + model.safetensors (tied head dropped)


def run_grow(tmp_path, *extra, ckpt="small/model.safetensors", small="small/config.json", large="big.json",
             out="big/model.safetensors"):
    (tmp_path / "big").mkdir(exist_ok=True)
    return main(["grow", "--from-checkpoint", str(tmp_path / ckpt), "--from-config", str(tmp_path / small),
                 "--to-config", str(tmp_path / large), "--out", str(tmp_path / out), *extra])


@pytest.mark.parametrize("tied", [True, False])
def test_compt_grow_writes_a_llama_that_from_pretrained_loads_with_the_same_logits(tmp_path, capsys, tied):
    small_cfg = llama(tie_word_embeddings=tied, rms_norm_eps=0.01)
    big_raw = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 28, "hidden_size": 24,
               "intermediate_size": 40, "num_hidden_layers": 3, "num_attention_heads": 6, "num_key_value_heads": 3,
               "head_dim": 4, "rms_norm_eps": 0.01, "tie_word_embeddings": tied}
    small = trained_small(small_cfg)
    save_hf(small, tmp_path / "small")
    assert ("lm_head.weight" in load_file(str(tmp_path / "small/model.safetensors"))) == (not tied)
    (tmp_path / "big.json").write_text(json.dumps(big_raw))
    assert run_grow(tmp_path, "--noise", "0.1", "--seed", "2", "--out-config", str(tmp_path / "big/config.json")) == 0
    printed = capsys.readouterr().out
    assert "grew" in printed and "rms_norm_eps of the grown model is" in printed  # 16 -> 24: eps * 2/3
    written = json.loads((tmp_path / "big/config.json").read_text())
    assert written["rms_norm_eps"] == pytest.approx(0.01 * 16 / 24, rel=1e-15)
    assert ("lm_head.weight" in load_file(str(tmp_path / "big/model.safetensors"))) == (not tied)
    big = LlamaForCausalLM.from_pretrained(tmp_path / "big").eval()
    small32 = LlamaForCausalLM.from_pretrained(tmp_path / "small").eval()
    assert big.config.tie_word_embeddings == tied
    assert logit_diff(small32, big, 24) <= 1e-4  # float32 weights and transformers' float32 norm
    with float64_norm():
        assert logit_diff(small32.to(torch.float64), big.to(torch.float64), 24) <= 1e-5


def test_compt_grow_official_and_its_default_config_path(tmp_path, capsys):
    small_cfg = llama()
    save_hf(trained_small(small_cfg), tmp_path / "small")
    big_cfg = {**llama(hidden_size=32, num_attention_heads=8), "rms_norm_eps": 1e-5}
    (tmp_path / "big.json").write_text(json.dumps(big_cfg))
    assert run_grow(tmp_path, "--mode", "official", "--seed", "1") == 0
    out = tmp_path / "big/model.safetensors"
    cfg = json.loads((tmp_path / "big/model.config.json").read_text())
    assert cfg["rms_norm_eps"] == 1e-5  # official keeps --to-config as is
    sd = load_file(str(out))
    small = load_file(str(tmp_path / "small/model.safetensors"))
    down = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(sd[down][:16, :24], small[down])
    model = build_llama(cfg)
    model.load_state_dict(sd, strict=True)


@pytest.mark.parametrize("case, message", [
    ("mixed", r"is a clip config but --to-config .* is a llama config"),
    ("head_dim", r"head_dim changes \(4 -> 8\)"),
    ("bad_field", r"--to-config .*big\.json: num_attention_heads \(4\) is not a multiple of num_key_value_heads \(3\)"),
    ("wrong_shape", r"does not match .*config\.json: model\.norm\.weight is \(8,\), config says \(16,\)"),
])
def test_compt_grow_refuses_bad_llama_input(tmp_path, capsys, case, message):
    save_hf(trained_small(llama()), tmp_path / "small")
    big = llama(hidden_size=32, num_attention_heads=8)
    kwargs = {}
    if case == "mixed":
        (tmp_path / "clip.json").write_text(json.dumps({"embed_dim": 8, "vision_cfg": {}, "text_cfg": {}}))
        kwargs["small"] = "clip.json"
    elif case == "head_dim":
        big = llama(hidden_size=32, num_attention_heads=4, head_dim=8)
    elif case == "bad_field":
        big = {"model_type": "llama", "hidden_size": 16, "num_attention_heads": 4, "num_key_value_heads": 3}
    elif case == "wrong_shape":
        sd = load_file(str(tmp_path / "small/model.safetensors"))
        sd["model.norm.weight"] = torch.ones(8)
        save_file(sd, str(tmp_path / "small/model.safetensors"))
    (tmp_path / "big.json").write_text(json.dumps(big))
    capsys.readouterr()  # save_pretrained's progress bar
    assert run_grow(tmp_path, **kwargs) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and re.search(message, err), err
    assert not any((tmp_path / "big").iterdir())


def test_logits_diffs_are_reported(capsys):
    # Not a check: prints the measured max abs logit differences for the record.
    small_cfg = llama(rms_norm_eps=0.05)
    big_cfg = llama(hidden_size=40, num_attention_heads=8, num_key_value_heads=4, intermediate_size=50,
                    num_hidden_layers=3, vocab_size=27, rms_norm_eps=0.05)
    small = trained_small(small_cfg)
    stock = logit_diff(small, grown(small, small_cfg, big_cfg, noise=0.3), 24)
    with float64_norm():
        exact = logit_diff(small, grown(small, small_cfg, big_cfg, noise=0.3), 24)
        nominal = logit_diff(small, grown(small, small_cfg, big_cfg, noise=0.3, student_cfg=big_cfg), 24)
    with capsys.disabled():
        print(f"\n16->40 wide, 2->3 layers: float64 norm {exact:.2e}; stock float32 norm {stock:.2e}; "
              f"un-rescaled eps {nominal:.2e}")
    assert exact <= 1e-10 and math.isfinite(stock)
