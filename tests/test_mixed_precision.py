"""Mixed precision through the ds_config, per-stage engine settings and device placement (issue 15):
bf16 chains of both families trained on CPU through the real launcher (DeepSpeed's CPU accelerator
supports bf16), fp32 exports from the optimizer's master weights, SIGKILL + resume in bf16, and the
shipped "auto" configs staying fp32 on CPU."""
from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from compt.config import ChainConfigError, TrainSettings, load_chain
from compt.engine import merge_ds_config, read_ds_config, resolve_precision, stage_ds_config, train_dtype
from conftest import DS, REPO, TINY_CHAIN, deepspeed_launch, write_chain
from test_llama_chain import LLAMA_CHAIN

BF16 = {"bf16": {"enabled": True}, "zero_optimization": {"stage": 3, "overlap_comm": False,
        "contiguous_gradients": True, "stage3_param_persistence_threshold": 0},
        "gradient_accumulation_steps": 1, "steps_per_print": 1000000000}


def clip_chain() -> dict:
    """Two stages: a ZeRO-2 first stage (its own `deepspeed:`), exact growth into a ZeRO-3 stage that
    recomputes activations."""
    chain = copy.deepcopy(TINY_CHAIN)
    chain["name"] = "tiny-bf16"
    chain["stages"] = chain["stages"][:1] + chain["stages"][2:]
    chain["stages"][0]["deepspeed"] = {"zero_optimization": {"stage": 2}}
    chain["stages"][1]["activation_checkpointing"] = True
    return chain


def llama_chain() -> dict:
    chain = copy.deepcopy(LLAMA_CHAIN)
    chain["name"] = "tiny-llama-bf16"
    chain["stages"] = chain["stages"][:2]
    return chain


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16")
    ds = root / "bf16.json"
    ds.write_text(json.dumps(BF16))
    out = {"ds": ds, "clip": write_chain(root / "clip.yaml", clip_chain()),
           "llama": write_chain(root / "llama.yaml", llama_chain())}
    for key, ranks, port in (("clip", 1, 29701), ("clip", 2, 29702), ("llama", 1, 29703), ("llama", 2, 29704)):
        run_dir = root / f"{key}{ranks}"
        proc = deepspeed_launch(["--num_gpus", str(ranks), "launch/chain.py", "--chain", str(out[key]),
                                 "--ds_config", str(ds), "--output", str(run_dir)], port)
        out[key, ranks] = (run_dir, proc.stdout + proc.stderr)
    return out


def test_bf16_chains_train_on_one_and_two_ranks_and_export_fp32_master_weights(runs):
    for key, stages in (("clip", ["0-a", "1-c"]), ("llama", ["0-a", "1-b"])):
        for ranks in (1, 2):
            run_dir, log = runs[key, ranks]
            manifest = json.loads((run_dir / "manifest.json").read_text())
            assert [s["status"] for s in manifest["stages"]] == ["done", "done"], log[-3000:]
            assert manifest["ds_config"]["bf16"] == {"enabled": True}
            for stage in stages:
                weights = load_file(str(run_dir / "stages" / stage / "model.safetensors"))
                assert all(t.dtype == torch.float32 for t in weights.values())
                # From the fp32 master copy: most trained values are not bf16-representable (embedding rows of
                # tokens never seen keep their bf16-rounded init, so embeddings are left out).
                trained = torch.cat([t.flatten() for n, t in weights.items() if "embed" not in n])
                assert (trained != trained.to(torch.bfloat16).float()).float().mean() > 0.5, (key, ranks, stage)


def test_bf16_exports_load_in_stock_open_clip_and_transformers(runs):
    import open_clip
    from transformers import AutoModelForCausalLM

    stage = runs["clip", 2][0] / "stages" / "1-c"
    model = open_clip.CLIP(**json.loads((stage / "config.json").read_text()))
    model.load_state_dict(load_file(str(stage / "model.safetensors")))
    lm = AutoModelForCausalLM.from_pretrained(runs["llama", 2][0] / "stages" / "1-b")
    assert lm.dtype == torch.float32


def test_exact_growth_in_bf16_starts_near_the_teachers_perplexity(runs):
    metrics = json.loads((runs["llama", 1][0] / "stages" / "1-b" / "metrics.json").read_text())
    assert metrics["init_val_ppl"] == pytest.approx(metrics["teacher_val_ppl"], rel=0.02)


def test_sigkill_and_resume_in_bf16_is_bit_identical(runs, tmp_path):
    run_dir = tmp_path / "killed"
    cmd = ["deepspeed", "--master_port", "29705", "launch/chain.py", "--chain", str(runs["clip"]),
           "--ds_config", str(runs["ds"]), "--output", str(run_dir)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    latest = run_dir / "stages" / "1-c" / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    log = deepspeed_launch(cmd[3:], 29706)
    assert "stage 1 c: resuming from checkpoint at step" in log.stdout + log.stderr
    for stage in ("0-a", "1-c"):
        got = load_file(str(run_dir / "stages" / stage / "model.safetensors"))
        want = load_file(str(runs["clip", 1][0] / "stages" / stage / "model.safetensors"))
        assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want), stage


def test_shipped_configs_say_auto_and_stay_fp32_on_cpu():
    for name in ("zero2.json", "zero3.json", "zero3_offload.json"):
        raw = json.loads((REPO / "ds_configs" / name).read_text())
        assert raw["bf16"] == {"enabled": "auto"}, name
        resolved = read_ds_config(REPO / "ds_configs" / name)
        assert "bf16" not in resolved and train_dtype(resolved) == torch.float32, name
        assert {k: v for k, v in raw.items() if k != "bf16"} == resolved  # otherwise the file as written


def test_auto_turns_bf16_on_where_the_accelerator_supports_it(monkeypatch):
    import compt.engine

    monkeypatch.setattr(compt.engine, "on_accelerator", lambda: True)
    resolved = resolve_precision({"bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto", "loss_scale": 0}})
    assert resolved == {"bf16": {"enabled": True}}  # bf16 preferred; fp16's auto resolves off beside it
    assert train_dtype(resolved) == torch.bfloat16
    assert train_dtype(resolve_precision({"fp16": {"enabled": "auto"}})) in (torch.float16, torch.float32)


def test_a_stages_deepspeed_section_merges_and_the_users_scheduler_and_clipping_win():
    base = read_ds_config(DS)
    merged = merge_ds_config(base, {"zero_optimization": {"stage": 2}, "bf16": {"enabled": "auto"}})
    assert merged["zero_optimization"]["stage"] == 2
    assert merged["zero_optimization"]["contiguous_gradients"] is True  # merged key by key
    assert "bf16" not in merged and merge_ds_config(base, None) is base
    own = {**base, "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 5}}, "gradient_clipping": 0.5}
    cfg = stage_ds_config(own, TrainSettings(batch_size=8, grad_clip=2.0), 10, 1)
    assert cfg["scheduler"] == own["scheduler"] and cfg["gradient_clipping"] == 0.5
    cfg = stage_ds_config(base, TrainSettings(batch_size=8, grad_clip=2.0), 10, 1)
    assert cfg["scheduler"]["type"] == "WarmupCosineLR" and cfg["gradient_clipping"] == 2.0


def test_bad_precision_and_stage_deepspeed_sections_are_reported_before_compute(tmp_path):
    chain = clip_chain()
    chain["stages"][1]["deepspeed"] = {"bf16": {"enabled": "yes"}, "train_batch_size": 4,
                                       "zero_optimization": {"stage": 5}}
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"bf16": {"enabled": True}, "fp16": {"enabled": True}}))
    with pytest.raises(ChainConfigError) as e:
        load_chain(str(write_chain(tmp_path / "c.yaml", chain)), ds)
    text = "\n".join(e.value.problems)
    assert "bf16 and fp16 are both enabled" in text
    for wanted in ("stages.1.deepspeed: 'bf16' must be a mapping", "stages.1.deepspeed: 'train_batch_size'",
                   "stages.1.deepspeed: zero_optimization.stage must be 0-3"):
        assert wanted in text, text


@pytest.mark.parametrize("family", ["clip", "llama"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(family):
    from compt.families import family_of
    from conftest import tiny_model
    from test_llama_chain import llama

    fam = family_of(family)
    cfg = tiny_model(32, 2) if family == "clip" else fam.stage_model_cfg(llama(32, 2, 2, 1, 64), None, None)
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = fam.build(cfg, None).train()
        if checkpointing:
            fam.enable_activation_checkpointing(model)
        torch.manual_seed(1)
        if family == "clip":
            out = model(torch.randn(4, 3, 16, 16), torch.randint(0, 49408, (4, 12)))
            loss = out[0].square().sum() + out[1].square().sum()
        else:
            loss = model(torch.randint(0, 512, (2, 17)))[0]
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (l0, g0), (l1, g1) = results
    assert torch.allclose(l0, l1, rtol=1e-6) and len(g0) == len(g1)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(g0, g1))
