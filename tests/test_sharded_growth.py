"""Growth under ZeRO-3: each rank computes its own partition; 1 rank, 2 ranks and the dense
reference give bit-identical weights (real `deepspeed` launcher, CPU ranks)."""
from __future__ import annotations

import json
import subprocess

import torch
from safetensors.torch import load_file

from compt.clip.grow import grow_state_dict
from compt.clip.model import build_clip, export_name_and_tensor
from compt.weights import save_zero3_module
from conftest import REPO, tiny_model


def _grow_sharded(tmp_path, small_path, port: int) -> None:
    """tests/_sharded_growth_job.py with 1 and 2 ranks: writes tmp_path/grown<ranks>-<mode>.safetensors."""
    for ranks in (1, 2):
        cmd = ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(port + ranks),
               "tests/_sharded_growth_job.py", str(small_path), str(tmp_path / "small.json"),
               str(tmp_path / "big.json"), "exact,official", str(tmp_path / f"grown{ranks}")]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


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
    for mode in ("exact", "official"):
        dense = grow_llama(load_file(str(small_path)), init, small_cfg, big_cfg, mode, noise=0.05, seed=3)
        one = load_file(str(tmp_path / f"grown1-{mode}.safetensors"))
        two = load_file(str(tmp_path / f"grown2-{mode}.safetensors"))
        assert one.keys() == two.keys() == set(dense)
        for name in dense:
            assert torch.equal(one[name], two[name]), f"{mode} {name}: 1 vs 2 ranks"
            assert torch.equal(one[name], dense[name].to(torch.float32)), f"{mode} {name}: sharded vs dense"
