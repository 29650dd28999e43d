"""Per-stage DeepSpeed config and weight-decay groups (each family says what is not decayed)."""
from __future__ import annotations

import json

import pytest

from compt.clip.model import build_clip
from compt.config import TrainSettings
from compt.clip.family import ClipFamily
from compt.engine import param_groups, stage_ds_config
from conftest import REPO, tiny_model


def test_stage_ds_config_fills_batch_optimizer_schedule():
    base = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    s = TrainSettings(lr=3e-4, batch_size=64, warmup_steps=50, weight_decay=0.2, min_lr_ratio=0.1)
    cfg = stage_ds_config(base, s, total_steps=200, world_size=2)
    assert cfg["train_batch_size"] == 64 and cfg["train_micro_batch_size_per_gpu"] == 32
    assert cfg["optimizer"]["type"] == "AdamW"
    p = cfg["optimizer"]["params"]
    assert p["lr"] == 3e-4 and p["weight_decay"] == 0.2 and p["betas"] == [0.9, 0.98] and p["eps"] == 1e-6
    sch = cfg["scheduler"]
    assert sch["type"] == "WarmupCosineLR"
    assert sch["params"]["total_num_steps"] == 200 and sch["params"]["warmup_num_steps"] == 50
    assert sch["params"]["cos_min_ratio"] == 0.1
    assert cfg["zero_optimization"]["stage"] == 3 and "train_batch_size" not in base  # base untouched
    with pytest.raises(ValueError, match="not divisible"):
        stage_ds_config(base, TrainSettings(batch_size=63), 10, 2)


def test_no_decay_on_norms_biases_embeddings_logit_scale():
    model = build_clip(tiny_model())
    no_decay = ClipFamily().no_decay
    groups = param_groups(model, 0.1, no_decay)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in groups[0]["params"]}
    plain = {names[id(p)] for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert "logit_scale" in plain and "token_embedding.weight" in plain and "positional_embedding" in plain
    assert "visual.positional_embedding" in plain and "visual.class_embedding" in plain
    assert "visual.ln_pre.weight" in plain and "transformer.resblocks.0.attn.in_proj_bias" in plain
    assert "visual.conv1.weight" in decayed and "transformer.resblocks.0.mlp.c_fc.weight" in decayed
    assert "text_projection" in decayed and "visual.proj" in decayed
    assert len(decayed) + len(plain) == len(names)
    assert model.logit_scale.shape == (1,)  # 1-element: ZeRO-3 cannot hold 0-d parameters
    assert no_decay("x.ln_1.weight", model.visual.ln_pre.weight)
