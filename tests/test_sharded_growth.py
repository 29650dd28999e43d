"""ZeRO-3 without a full model on any rank: the student built into partitions keeps its library's init,
bit for bit (fp32) the plain build's; growth computes each rank's own partition; a sharded teacher reads
its own slices and runs like a full copy. 1 rank, 2 ranks and the dense references agree bit for bit
(real `deepspeed` launcher, CPU ranks)."""
from __future__ import annotations

import json
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from compt.clip.grow import grow_state_dict
from compt.clip.model import build_clip, export_name_and_tensor, load_into
from compt.weights import save_zero3_module
from conftest import REPO, tiny_model


def _grow_sharded(tmp_path, small_path, port: int) -> None:
    """tests/_sharded_growth_job.py with 1 and 2 ranks: writes tmp_path/grown<ranks>-<mode>.safetensors and
    grown<ranks>-teacher.{safetensors,pt}."""
    for ranks in (1, 2):
        cmd = ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(port + ranks),
               "tests/_sharded_growth_job.py", str(small_path), str(tmp_path / "small.json"),
               str(tmp_path / "big.json"), "none,exact,official", str(tmp_path / f"grown{ranks}")]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def _check_init_and_teacher(tmp_path, small_path, init: dict, rename, teacher_outputs) -> None:
    """The ungrown partitioned student equals the plain build ``init``; the sharded teacher saved back equals
    its file, and its outputs equal ``teacher_outputs`` (a full copy's), on 1 and 2 ranks."""
    small = load_file(str(small_path))
    for ranks in (1, 2):
        built = load_file(str(tmp_path / f"grown{ranks}-none.safetensors"))
        assert built.keys() == {rename(n, t)[0] for n, t in init.items()}
        for name, t in init.items():
            stored, want = rename(name, t)
            assert torch.equal(built[stored], want), f"{ranks} rank(s): {stored} is not the plain build's init"
        saved = load_file(str(tmp_path / f"grown{ranks}-teacher.safetensors"))
        assert saved.keys() == small.keys() and all(torch.equal(saved[n], small[n]) for n in small)
        got = torch.load(tmp_path / f"grown{ranks}-teacher.pt")
        for a, b in zip(got, teacher_outputs, strict=True):
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), f"{ranks} rank(s): teacher outputs differ"


def test_sharded_growth_matches_dense_for_any_rank_count(tmp_path):
    small_cfg, big_cfg = tiny_model(32, 1, embed=32), tiny_model(64, 3, embed=48)
    torch.manual_seed(0)
    small = build_clip(small_cfg)
    with torch.no_grad():
        for p in small.parameters():
            p.add_(0.1 * torch.randn_like(p))  # a "trained" teacher, not its init
    small_path = tmp_path / "small.safetensors"
    save_zero3_module(small, small_path, rename=export_name_and_tensor)
    (tmp_path / "small.json").write_text(json.dumps(small_cfg))
    (tmp_path / "big.json").write_text(json.dumps(big_cfg))

    _grow_sharded(tmp_path, small_path, port=29620)

    torch.manual_seed(7)
    init = {k: v.detach() for k, v in build_clip(big_cfg).named_parameters()}
    full = build_clip(small_cfg).eval()
    load_into(full, load_file(str(small_path)))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        outputs = full(torch.randn(2, 3, 16, 16, generator=g), torch.randint(0, 400, (2, 12), generator=g))[:2]
    _check_init_and_teacher(tmp_path, small_path, init, export_name_and_tensor, outputs)
    for mode in ("exact", "official"):
        dense = grow_state_dict(load_file(str(small_path)), init, small_cfg, big_cfg, mode, noise=0.05, seed=3)
        one = load_file(str(tmp_path / f"grown1-{mode}.safetensors"))
        two = load_file(str(tmp_path / f"grown2-{mode}.safetensors"))
        assert one.keys() == two.keys() == set(dense)
        for name in dense:
            want = dense[name].to(torch.float32).reshape(one[name].shape)
            assert torch.equal(one[name], two[name]), f"{mode} {name}: 1 vs 2 ranks"
            assert torch.equal(one[name], want), f"{mode} {name}: sharded vs dense"
        if mode == "official":  # the kept init really is the student's own (ZeRO-3 partitions of it)
            assert torch.equal(one["visual.transformer.resblocks.2.mlp.c_fc.weight"][128:],
                               init["visual.transformer.resblocks.2.mlp.c_fc.weight"][128:])


def test_sharded_llama_growth_matches_dense_for_any_rank_count(tmp_path):
    from compt.llama.grow import exact_config
    from compt.llama.grow import grow_state_dict as grow_llama
    from compt.llama.model import build_llama, resolve_llama_config
    from compt.llama.train import PREFIX, ChainCausalLM, export_name, load_state, teacher_outputs

    def cfg(hidden, layers, heads, kv, mlp, tied):
        return resolve_llama_config({"model_type": "llama", "vocab_size": 96, "hidden_size": hidden,
                                     "intermediate_size": mlp, "num_hidden_layers": layers,
                                     "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": 8,
                                     "max_position_embeddings": 32, "tie_word_embeddings": tied})

    small_cfg = cfg(24, 1, 3, 1, 40, False)
    big_cfg = exact_config(small_cfg, cfg(40, 2, 5, 5, 72, False))  # width x5/3, heads, KV heads, MLP, depth
    torch.manual_seed(0)
    small = build_llama(small_cfg)
    with torch.no_grad():
        for p in small.parameters():
            p.add_(0.1 * torch.randn_like(p))
    small_path = tmp_path / "small.safetensors"
    save_zero3_module(small, small_path)
    (tmp_path / "small.json").write_text(json.dumps(small_cfg))
    (tmp_path / "big.json").write_text(json.dumps(big_cfg))
    _grow_sharded(tmp_path, small_path, port=29630)

    torch.manual_seed(7)
    init = {k: v.detach() for k, v in build_llama(big_cfg).named_parameters()}
    full = ChainCausalLM(small_cfg).eval()
    load_state(full, load_file(str(small_path)))
    blocks = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    _check_init_and_teacher(tmp_path, small_path, {f"{PREFIX}{k}": v for k, v in init.items()}, export_name,
                            teacher_outputs(full, blocks))
    for mode in ("exact", "official"):
        dense = grow_llama(load_file(str(small_path)), init, small_cfg, big_cfg, mode, noise=0.05, seed=3)
        one = load_file(str(tmp_path / f"grown1-{mode}.safetensors"))
        two = load_file(str(tmp_path / f"grown2-{mode}.safetensors"))
        assert one.keys() == two.keys() == set(dense)
        for name in dense:
            assert torch.equal(one[name], two[name]), f"{mode} {name}: 1 vs 2 ranks"
            assert torch.equal(one[name], dense[name].to(torch.float32)), f"{mode} {name}: sharded vs dense"


def test_sharded_teacher_needs_zero3(tmp_path, chain_dict):
    """transfer.teacher: sharded under a ZeRO-2 ds_config is refused before anything runs, naming the field;
    replicate (or leaving it out) is fine there, and the choice leaves the stage's fingerprint alone."""
    from compt.config import ChainConfigError, load_chain
    from compt.rundir import stage_fingerprints
    from conftest import REPO, write_chain

    zero2 = REPO / "ds_configs" / "zero2.json"
    chain_dict["stages"][1]["transfer"]["teacher"] = "sharded"
    with pytest.raises(ChainConfigError, match=r"stages\.1\.transfer\.teacher: sharded needs ZeRO stage 3.*stage 2"):
        load_chain(str(write_chain(tmp_path / "bad.yaml", chain_dict)), zero2)
    chain_dict["stages"][1]["transfer"]["teacher"] = "replicate"
    replicate = load_chain(str(write_chain(tmp_path / "ok.yaml", chain_dict)), zero2)
    del chain_dict["stages"][1]["transfer"]["teacher"]
    default = load_chain(str(write_chain(tmp_path / "default.yaml", chain_dict)), zero2)
    assert stage_fingerprints(replicate, {}) == stage_fingerprints(default, {})
