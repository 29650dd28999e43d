"""Streamed safetensors writing and lazy reading (compt.weights)."""
import hashlib
import os

import open_clip
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from compt.weights import SafetensorsStreamWriter, open_lazy, save_zero3_module, sha256_file


def sample_tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "w.f32": torch.randn(3, 5, generator=g),
        "w.bf16": torch.randn(4, 2, generator=g).to(torch.bfloat16),
        "w.f16": torch.randn(7, generator=g).to(torch.float16),
        "w.f64": torch.randn(2, 2, 2, generator=g, dtype=torch.float64),
        "idx.i64": torch.arange(5, dtype=torch.int64),
        "mask.bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(4.6052),
        "empty": torch.zeros(0, 3),
    }


def specs_of(tensors):
    return [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]


def write_all(path, tensors, metadata=None):
    with SafetensorsStreamWriter(path, specs_of(tensors), metadata) as w:
        for k, v in tensors.items():
            w.write(k, v)
        return w.close()


@pytest.mark.parametrize("metadata", [None, {}, {"stage": "B-16", "step": "100"}])
def test_streamed_file_loads_identically(tmp_path, metadata):
    path = str(tmp_path / "m.safetensors")
    tensors = sample_tensors()
    digest = write_all(path, tensors, metadata)
    loaded = load_file(path)
    assert loaded.keys() == tensors.keys()
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype and loaded[k].shape == v.shape and torch.equal(loaded[k], v), k
    with safe_open(path, framework="pt") as f:
        assert (f.metadata() or {}) == (metadata or {})
    assert digest == sha256_file(path) == hashlib.sha256(open(path, "rb").read()).hexdigest()
    assert not os.path.exists(path + ".tmp")
    header_len = int.from_bytes(open(path, "rb").read(8), "little")
    assert header_len % 8 == 0


def test_non_contiguous_and_grad_tensors(tmp_path):
    path = str(tmp_path / "m.safetensors")
    t = torch.randn(4, 6, requires_grad=True)
    tensors = {"t": t.t(), "s": t[:, ::2]}
    write_all(path, tensors)
    loaded = load_file(path)
    assert torch.equal(loaded["t"], t.t().detach()) and torch.equal(loaded["s"], t[:, ::2].detach())


@pytest.mark.parametrize("bad_write", [
    lambda w, ts: w.write("w.bf16", ts["w.bf16"]),  # out of order
    lambda w, ts: w.write("w.f32", ts["w.f32"].t()),  # wrong shape
    lambda w, ts: w.write("w.f32", ts["w.f32"].double()),  # wrong dtype
])
def test_bad_write_raises_and_keeps_previous_file(tmp_path, bad_write):
    path = str(tmp_path / "m.safetensors")
    previous = {"old": torch.ones(2)}
    old_digest = write_all(path, previous)
    tensors = sample_tensors()
    with pytest.raises(ValueError, match="w.f32|w.bf16"):
        with SafetensorsStreamWriter(path, specs_of(tensors)) as w:
            bad_write(w, tensors)
    assert not os.path.exists(path + ".tmp")
    assert sha256_file(path) == old_digest and torch.equal(load_file(path)["old"], previous["old"])


def test_bad_write_outside_context_manager_removes_tmp(tmp_path):
    path = str(tmp_path / "m.safetensors")
    w = SafetensorsStreamWriter(path, [("a", (2,), torch.float32)])
    with pytest.raises(ValueError, match="'a'"):
        w.write("a", torch.zeros(3))
    assert not os.path.exists(path + ".tmp") and not os.path.exists(path)


def test_exception_in_body_and_incomplete_close_leave_nothing(tmp_path):
    path = str(tmp_path / "m.safetensors")
    with pytest.raises(RuntimeError):
        with SafetensorsStreamWriter(path, [("a", (2,), torch.float32)]) as w:
            raise RuntimeError("boom")
    assert not os.path.exists(path + ".tmp") and not os.path.exists(path)
    w = SafetensorsStreamWriter(path, [("a", (2,), torch.float32), ("b", (1,), torch.float32)])
    w.write("a", torch.zeros(2))
    with pytest.raises(ValueError, match="'b'"):
        w.close()
    assert not os.path.exists(path + ".tmp") and not os.path.exists(path)


def test_open_lazy_reads_single_tensors(tmp_path):
    path = str(tmp_path / "m.safetensors")
    tensors = sample_tensors()
    write_all(path, tensors, {"k": "v"})
    with open_lazy(path) as f:
        assert sorted(f.keys()) == sorted(tensors)
        assert "scalar" in f and "nope" not in f
        assert f.shape("w.f32") == (3, 5) and f.shape("scalar") == ()
        assert torch.equal(f.get("w.bf16"), tensors["w.bf16"])
        assert f.metadata() == {"k": "v"}



def test_flat_range_reads_a_rank_share_of_any_tensor(tmp_path):
    path = str(tmp_path / "m.safetensors")
    tensors = {"w": torch.randn(7, 5), "cube": torch.randn(3, 4, 6), "v": torch.randn(11), "s": torch.tensor(2.5)}
    write_all(path, tensors)
    with open_lazy(path) as f:
        for name, t in tensors.items():
            flat = t.reshape(-1)
            assert f.numel(name) == flat.numel()
            for start, end in [(0, flat.numel()), (0, 1), (3, 9), (5, 10), (flat.numel() - 1, flat.numel())]:
                if end <= flat.numel():
                    assert torch.equal(f.flat_range(name, start, end), flat[start:end]), (name, start, end)

def tiny_clip():
    return open_clip.CLIP(embed_dim=32, vision_cfg=dict(image_size=16, patch_size=8, width=32, layers=2, head_width=16),
                          text_cfg=dict(context_length=8, vocab_size=100, width=32, heads=2, layers=2))


def test_save_zero3_module_round_trips_plain_clip(tmp_path):
    path = str(tmp_path / "clip.safetensors")
    torch.manual_seed(0)
    model = tiny_clip()
    model.logit_scale = torch.nn.Parameter(model.logit_scale.detach().reshape(1))  # compt's ZeRO-3 shape

    def rename(name, t):
        return (name, t.reshape(())) if name == "logit_scale" else (name, t)

    digest = save_zero3_module(model, path, metadata={"model": "tiny"}, rename=rename)
    assert digest == sha256_file(path)
    sd = load_file(path)
    assert sd["logit_scale"].shape == ()
    assert all(v.dtype == torch.float32 for v in sd.values())

    torch.manual_seed(1)
    fresh = tiny_clip()  # stock open_clip: 0-d logit_scale
    fresh.load_state_dict(sd, strict=True)
    image, text = torch.randn(2, 3, 16, 16), torch.randint(0, 100, (2, 8))
    model.eval(), fresh.eval()
    with torch.no_grad():
        out_a, out_b = model(image, text), fresh(image, text)
    for a, b in zip(out_a, out_b):
        assert torch.equal(a.reshape(-1), b.reshape(-1))


ZERO3_SCRIPT = r"""
import os, sys, torch, deepspeed, open_clip
from safetensors.torch import load_file
from compt.weights import save_zero3_module
deepspeed.init_distributed(dist_backend="gloo")
torch.manual_seed(0)
model = open_clip.CLIP(embed_dim=32, vision_cfg=dict(image_size=16, patch_size=8, width=32, layers=2, head_width=16),
                       text_cfg=dict(context_length=8, vocab_size=100, width=32, heads=2, layers=2))
model.logit_scale = torch.nn.Parameter(model.logit_scale.detach().reshape(1))
expected = {k: v.clone() for k, v in model.state_dict().items()}
deepspeed.zero.Init(module=model, config_dict_or_path={"train_batch_size": 1, "zero_optimization": {"stage": 3}})
assert hasattr(model.visual.proj, "ds_shape") and model.visual.proj.numel() == 0
path = sys.argv[1]
digest = save_zero3_module(model, path, rename=lambda n, t: (n, t.reshape(())) if n == "logit_scale" else (n, t))
sd = load_file(path)
assert sd.keys() == expected.keys()
assert sd["logit_scale"].shape == ()
for k, v in expected.items():
    assert torch.equal(sd[k], v.reshape(sd[k].shape)), k
print("OK", digest)
"""


def test_save_zero3_module_gathers_partitioned_params(tmp_path):
    """A real ZeRO-3 partitioned model (one gloo rank, CPU) in a subprocess, so the
    process group does not leak into other tests."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
               LOCAL_RANK="0")
    path = str(tmp_path / "z3.safetensors")
    proc = subprocess.run([sys.executable, "-c", ZERO3_SCRIPT, path], env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"OK {sha256_file(path)}" in proc.stdout
