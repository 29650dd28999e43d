"""A stage's weights round-trip: compt's ChainCLIP -> streamed safetensors -> stock open_clip; a
checkpoint counts as verified only when its index lists every file of it."""
from __future__ import annotations

import json

import open_clip
import pytest
import torch
from safetensors.torch import load_file

from compt.checkpoint import HASHES, StageCheckpointer
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


# -- the checkpoint index (compt-sha256.json) ---------------------------------------------------

TAG = "step00000002"
FILES = {"mp_rank_00_model_states.pt": b"model", "zero_pp_rank_0_mp_rank_00_optim_states.pt": b"optim"}


def _checkpoint(root, index) -> StageCheckpointer:
    """A checkpoint tag holding FILES, with ``index`` (a callable of the tag folder) as its hash list."""
    tag = root / TAG
    for name, data in FILES.items():
        (tag / name).parent.mkdir(parents=True, exist_ok=True)
        (tag / name).write_bytes(data)
    value = index(tag)
    (tag / HASHES).write_text(value if isinstance(value, str) else json.dumps(value))
    return StageCheckpointer(None, root, 0, 0, keep=2, rank=0)


def _hashes(tag, names=tuple(FILES)) -> dict:
    return {n: sha256_file(tag / n) for n in names}


def test_a_complete_index_verifies(tmp_path):
    assert _checkpoint(tmp_path, _hashes).verify(TAG) is None


def _outside(tag):
    (tag.parent / "elsewhere.pt").write_bytes(b"x")
    return {**_hashes(tag), "../elsewhere.pt": sha256_file(tag.parent / "elsewhere.pt")}


@pytest.mark.parametrize("index, expected", [
    (lambda tag: "{}", "lists no files"),
    (lambda tag: "[]", "lists no files"),
    (lambda tag: list(FILES), "lists no files"),
    (lambda tag: {n: 5 for n in FILES}, "lists no files"),
    (lambda tag: _hashes(tag, ["mp_rank_00_model_states.pt"]),
     "does not list (added after the save): zero_pp_rank_0_mp_rank_00_optim_states.pt"),
    (_outside, "names files outside"),
], ids=["empty-dict", "empty-list", "list", "not-hashes", "partial", "outside"])
def test_an_empty_partial_or_escaping_index_is_not_a_verified_checkpoint(tmp_path, index, expected):
    """A compt-sha256.json of {} or [] used to pass every check (a flipped byte in the optimizer state
    then loaded silently); one that leaves a file out, or names one outside the tag, must not pass."""
    problem = _checkpoint(tmp_path, index).verify(TAG)
    assert problem is not None and expected in problem, problem


def test_extra_files_in_a_checkpoint_are_named(tmp_path):
    ck = _checkpoint(tmp_path, _hashes)
    (tmp_path / TAG / "sub").mkdir()
    (tmp_path / TAG / "sub" / "planted.pt").write_bytes(b"not hashed at save time")
    problem = ck.verify(TAG)
    assert problem is not None and "sub/planted.pt" in problem, problem
