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


# -- ZeRO buffers sized to the stage's model ---------------------------------------------------------------

def _zero3(**zero) -> dict:
    base = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    base["zero_optimization"].update(zero)
    return base


def test_zero_buffers_the_ds_config_leaves_open_follow_the_hidden_size():
    """transformers' "auto" rules (h*h, 0.9*h*h, 10*h) for what the ds_config leaves out or sets to "auto";
    what it sets wins (the shipped zero3.json keeps every parameter partitioned: threshold 0)."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    h = 64
    cfg = stage_ds_config(_zero3(), TrainSettings(batch_size=8), 10, 1, hidden_size=h)
    zero = cfg["zero_optimization"]
    assert zero["reduce_bucket_size"] == 4096
    assert "stage3_prefetch_bucket_size" not in zero  # sized only when "auto" (see compt.engine.ZERO_BUFFERS)
    assert zero["stage3_param_persistence_threshold"] == 0  # the file's own value
    assert "stage3_max_live_parameters" not in zero  # no rule: DeepSpeed's default
    parsed = DeepSpeedZeroConfig(**zero)  # what DeepSpeed reads: "auto" would not parse
    assert parsed.reduce_bucket_size == 4096

    auto = stage_ds_config(_zero3(reduce_bucket_size="auto", stage3_param_persistence_threshold="auto",
                                  stage3_prefetch_bucket_size=1000), TrainSettings(batch_size=8), 10, 1, hidden_size=h)
    assert auto["zero_optimization"]["reduce_bucket_size"] == 4096
    assert auto["zero_optimization"]["stage3_param_persistence_threshold"] == 640
    assert auto["zero_optimization"]["stage3_prefetch_bucket_size"] == 1000
    fetch = stage_ds_config(_zero3(stage3_prefetch_bucket_size="auto"), TrainSettings(batch_size=8), 10, 1,
                            hidden_size=h)["zero_optimization"]
    assert DeepSpeedZeroConfig(**fetch).prefetch_bucket_size == 3686


def test_zero_buffers_say_where_each_value_came_from():
    from compt.engine import zero_buffers

    h = 256
    assert zero_buffers(_zero3(), h) == {
        "reduce_bucket_size": {"value": 65536, "from": "hidden size 256"},
        "stage3_param_persistence_threshold": {"value": 0, "from": "ds_config"},
    }
    zero2 = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    assert zero_buffers(zero2, h) == {"reduce_bucket_size": {"value": 65536, "from": "hidden size 256"}}
    assert zero_buffers({"zero_optimization": {"stage": 0}}, h) == {}
    assert zero_buffers(_zero3(), None) == {"stage3_param_persistence_threshold": {"value": 0, "from": "ds_config"}}
    with pytest.raises(ValueError, match='zero_optimization.reduce_bucket_size is "auto"'):
        zero_buffers(_zero3(reduce_bucket_size="auto"), None)


def test_each_family_names_the_width_its_buffers_follow():
    from compt.families import family_of

    assert family_of("clip").hidden_size(tiny_model(64, 1, embed=48)) == 64
    wide_text = tiny_model(32, 1)
    wide_text["text_cfg"]["width"] = 96
    assert family_of("clip").hidden_size(wide_text) == 96  # the wider tower
    assert family_of("clip").hidden_size({"embed_dim": 512}) == 768  # open_clip's default vision width
    assert family_of("llama").hidden_size({"hidden_size": 256, "num_hidden_layers": 2}) == 256
