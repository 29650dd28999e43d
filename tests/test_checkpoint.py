"""A stage's weights round-trip: compt's ChainCLIP -> streamed safetensors -> stock open_clip."""
from __future__ import annotations

import open_clip
import torch
from safetensors.torch import load_file

from compt.clip.model import build_clip, export_name_and_tensor, load_into
from compt.weights import save_zero3_module, sha256_file
from conftest import tiny_model


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 3, 16, 16, generator=g), torch.randint(0, 49408, (3, 12), generator=g)


def test_stage_weights_load_into_stock_open_clip(tmp_path):
    cfg = tiny_model(64, 2, embed=48)
    torch.manual_seed(1)
    model = build_clip(cfg, align_to_dim=32)  # alignment projection must not be exported
    with torch.no_grad():
        model.logit_scale.fill_(2.5)
    path = tmp_path / "model.safetensors"
    sha = save_zero3_module(model, path, metadata={"format": "pt"}, rename=export_name_and_tensor)
    assert sha == sha256_file(path)
    state = load_file(str(path))
    assert "align_proj.weight" not in state and state["logit_scale"].shape == ()

    stock = open_clip.CLIP(**cfg)
    stock.load_state_dict(state, strict=True)
    stock.eval(), model.eval()
    img, txt = _inputs()
    with torch.no_grad():
        ours, theirs = model(img, txt), stock(img, txt)
    assert len(ours) == 5  # image, text, scale, and the two projected embeddings
    for a, b in zip(ours[:3], theirs):
        assert torch.equal(a.reshape(b.shape), b)

    again = build_clip(cfg)
    load_into(again, state)
    with torch.no_grad():
        assert torch.equal(again.eval()(img, txt)[0], ours[0])
