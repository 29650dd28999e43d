"""A LLaMA chain end to end through the same launcher: 1 and 2 CPU ranks, exact growth,
KL distillation, perplexity, files a user can load with transformers."""
from __future__ import annotations

import copy
import json
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from compt.config import ChainConfigError, load_chain
from conftest import DS, REPO, run_chain_with_ranks, stage_metrics, write_chain


def llama(hidden: int, layers: int, heads: int, kv: int, mlp: int) -> dict:
    return {"vocab_size": 512, "hidden_size": hidden, "intermediate_size": mlp, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": 16,
            "max_position_embeddings": 32, "tie_word_embeddings": True}


LLAMA_CHAIN = {
    "name": "tiny-llama",
    "family": "llama",
    "seed": 0,
    "data": {"kind": "pydoc", "seq_len": 32, "vocab_size": 512},
    "eval": {"batch_size": 64},
    "defaults": {"lr": 3.0e-3, "warmup_steps": 2, "batch_size": 16, "log_every": 2, "checkpoint_every_steps": 3},
    "stages": [
        {"name": "a", "model": llama(32, 1, 2, 1, 64), "budget": {"steps": 8}},
        {"name": "b", "model": llama(48, 1, 3, 3, 96), "budget": {"steps": 6},  # width x1.5: exact, non-integer
         "transfer": {"init": "exact", "noise": 0.01, "alpha": 1.0, "temperature": 2.0}},
        {"name": "c", "model": {**llama(48, 2, 3, 3, 128), "tie_word_embeddings": False}, "budget": {"steps": 6},
         "transfer": {"init": "official", "alpha": 0.5}},
    ],
}


@pytest.fixture(scope="module")
def llama_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    return run_chain_with_ranks(root, write_chain(root / "chain.yaml", LLAMA_CHAIN), {1: 29661, 2: 29662})


def test_exact_growth_starts_at_the_teachers_perplexity(llama_runs):
    run_dir, log = llama_runs[1]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert [s["status"] for s in manifest["stages"]] == ["done"] * 3
    a, b, c = (stage_metrics(run_dir, k, n) for k, n in enumerate("abc"))
    assert b["init_val_ppl"] == pytest.approx(b["teacher_val_ppl"], rel=1e-5)
    assert b["teacher_val_ppl"] == pytest.approx(a["val_ppl"], rel=1e-5)
    assert abs(c["init_val_ppl"] / c["teacher_val_ppl"] - 1) > 1e-3  # official growth does not keep the function
    for m in (a, b, c):
        assert m["family"] == "llama" and m["val_ppl"] < 512 and m["flops"]["total"] > 0
    assert b["flops"]["teacher_forward"] > 0 and a["flops"]["teacher_forward"] == 0
    assert "val ppl" in (run_dir / "results.md").read_text()
    header = (run_dir / "stages" / "1-b" / "loss.csv").read_text().splitlines()[0]
    assert header == "step,loss,lm,distill,lr"


def test_stage_folders_load_with_transformers(llama_runs):
    from transformers import AutoModelForCausalLM

    from compt.llama.model import build_llama
    from compt.text import as_transformers

    run_dir, _ = llama_runs[1]
    tok = as_transformers(run_dir / "tokenizer" / "tokenizer.json")
    ids = torch.tensor([tok("def f(x): return x + 1")["input_ids"]])
    for k, name in enumerate("abc"):
        folder = run_dir / "stages" / f"{k}-{name}"
        hf = AutoModelForCausalLM.from_pretrained(folder).eval()
        cfg = json.loads((folder / "config.json").read_text())
        assert cfg["architectures"] == ["LlamaForCausalLM"]
        ours = build_llama({k2: v for k2, v in cfg.items() if k2 != "architectures"}).eval()
        state = load_file(str(folder / "model.safetensors"))
        assert ("lm_head.weight" in state) == (name == "c")  # stage c unties the head
        ours.load_state_dict(state, strict=False)
        ours.tie_weights()
        with torch.no_grad():
            assert torch.equal(hf(ids).logits, ours(ids).logits)
    assert json.loads((run_dir / "stages" / "1-b" / "config.json").read_text())["rms_norm_eps"] == \
        pytest.approx(1e-6 * 32 / 48)  # exact growth at width x1.5 rescales the norm's eps


def test_one_and_two_ranks_agree(llama_runs):
    for k, name in enumerate("abc"):
        one = load_file(str(llama_runs[1][0] / "stages" / f"{k}-{name}" / "model.safetensors"))
        two = load_file(str(llama_runs[2][0] / "stages" / f"{k}-{name}" / "model.safetensors"))
        assert one.keys() == two.keys()
        for n in one:
            torch.testing.assert_close(one[n], two[n], atol=2e-3, rtol=0)
    assert stage_metrics(llama_runs[2][0], 1, "b")["ranks"] == 2


def test_llama_config_problems_are_reported_together(tmp_path):
    bad = copy.deepcopy(LLAMA_CHAIN)
    bad["stages"][0]["model"]["vocab_size"] = 100
    bad["stages"][1]["model"]["head_dim"] = 8
    bad["stages"][1]["model"]["num_attention_heads"] = 6
    bad["data"]["seq_len"] = 64
    with pytest.raises(ChainConfigError) as e:
        load_chain(str(write_chain(tmp_path / "bad.yaml", bad)))
    text = str(e.value)
    assert "stages.0.model.vocab_size: 100 is below data.vocab_size 512" in text
    assert "max_position_embeddings: 32 is below data.seq_len 64" in text
    assert "stages.1.transfer.init: exact growth is impossible here" in text and "head_dim" in text


def test_llama_demo_preset_is_valid():
    cfg = load_chain("llama-demo", DS)
    assert cfg.family == "llama" and len(cfg.stages) == 3 and cfg.transfer(1).alpha == 1.0
    assert cfg.model_cfg(2)["rms_norm_eps"] == pytest.approx(1e-6 * 128 / 192)


def test_compt_flops_counts_a_llama_chain(tmp_path):
    proc = subprocess.run(["compt", "flops", "--chain", "llama-demo", "--json"], capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert [m["name"] for m in out["per_model"]] == ["tiny", "small", "base"]
    assert out["acceleration"] > 1.5 and out["analytic_agrees"] is True
    base = out["per_model"][2]
    assert base["chain_flops"] == base["chain_samples"] * (base["train_per_sample"] + base["teacher_forward_per_sample"])


def test_reference_and_fused_distillation_agree():
    from compt.llama.train import ChainCausalLM

    torch.manual_seed(0)
    student, teacher = ChainCausalLM(llama(48, 1, 3, 3, 96)), ChainCausalLM(llama(32, 1, 2, 1, 64))
    blocks = torch.randint(0, 512, (3, 17))
    with torch.no_grad():
        t_out = (teacher.lm.model(input_ids=blocks[:, :-1]).last_hidden_state, teacher.lm.lm_head.weight)
    losses = {}
    for backend in ("reference", "torch"):
        student.zero_grad()
        total, ce, kl = student(blocks, t_out, 0.5, 2.0, backend)
        total.backward()
        losses[backend] = (kl.detach(), student.lm.model.embed_tokens.weight.grad.clone())
    torch.testing.assert_close(losses["torch"][0], losses["reference"][0], rtol=1e-5, atol=0)
    torch.testing.assert_close(losses["torch"][1], losses["reference"][1], rtol=1e-4, atol=1e-7)
    assert losses["torch"][0] > 0


def test_compt_eval_reproduces_llama_metrics(llama_runs):
    run_dir, _ = llama_runs[1]
    proc = subprocess.run(["compt", "eval", str(run_dir / "stages" / "2-c"), "--json"], capture_output=True,
                          text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout)
    assert got["val_ppl"] == pytest.approx(stage_metrics(run_dir, 2, "c")["val_ppl"], rel=1e-5)
