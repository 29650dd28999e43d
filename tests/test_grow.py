"""Growth rules for open_clip CLIP (compt.clip.grow), on tiny hand-checked configs."""
import open_clip
import pytest
import torch

from compt.clip.grow import MODES, grow_state_dict, grow_tensor, source_name


def cfg(width=32, vision_layers=2, text_width=32, text_layers=2, embed_dim=32):
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": 16, "patch_size": 8, "width": width, "layers": vision_layers, "head_width": 16},
        "text_cfg": {"context_length": 8, "vocab_size": 100, "width": text_width, "heads": 2, "layers": text_layers},
    }


def state_dict(c, seed):
    torch.manual_seed(seed)
    return open_clip.CLIP(**c).state_dict()


def vision_sources(small_layers, big_layers):
    small, big = cfg(vision_layers=small_layers), cfg(vision_layers=big_layers)
    names = [source_name(f"visual.transformer.resblocks.{j}.mlp.c_fc.weight", small, big, "official")
             for j in range(big_layers)]
    return [int(n.split(".")[3]) for n in names]


def test_modes():
    assert MODES == ("exact", "official", "none")
    with pytest.raises(ValueError, match="unknown growth mode"):
        source_name("logit_scale", cfg(), cfg(), "exactish")


def test_depth_mapping_vision():
    assert vision_sources(2, 4) == [0, 0, 1, 1]
    assert vision_sources(2, 3) == [0, 0, 1]
    assert vision_sources(2, 2) == [0, 1]
    # The reference's B(12) -> L(24): teacher block i -> student blocks 2i, 2i+1.
    assert vision_sources(12, 24) == [j // 2 for j in range(24)]


def test_depth_mapping_text_is_index_to_index():
    small, big = cfg(text_layers=2), cfg(text_layers=4)
    name = "transformer.resblocks.{}.attn.in_proj_weight"
    assert [source_name(name.format(j), small, big, "official") for j in range(4)] == [
        name.format(0), name.format(1), None, None]


def test_non_block_names_map_to_themselves():
    for name in ["visual.conv1.weight", "logit_scale", "token_embedding.weight", "text_projection", "ln_final.bias"]:
        assert source_name(name, cfg(), cfg(width=64), "official") == name
        assert source_name(name, cfg(), cfg(width=64), "none") is None


def test_block_copy_1d_2d_4d():
    # 1-d prefix
    out = grow_tensor("b", torch.zeros(5), torch.tensor([1.0, 2.0]), "official")
    assert out.tolist() == [1, 2, 0, 0, 0]
    # 2-d top-left block
    small = torch.arange(6.0).reshape(2, 3)
    out = grow_tensor("w", torch.full((3, 4), -1.0), small, "official")
    assert out.tolist() == [[0, 1, 2, -1], [3, 4, 5, -1], [-1, -1, -1, -1]]
    # 4-d conv: first output and input channels, top-left kernel window
    small = torch.ones(2, 3, 2, 2)
    out = grow_tensor("visual.conv1.weight", torch.zeros(4, 3, 2, 2), small, "official")
    assert out[:2].eq(1).all() and out[2:].eq(0).all()


def test_grow_tensor_keeps_dtype_and_does_not_touch_inputs():
    big = torch.zeros(4, dtype=torch.bfloat16)
    small = torch.ones(2, dtype=torch.float32)
    out = grow_tensor("b", big, small, "official")
    assert out.dtype == torch.bfloat16 and out.tolist() == [1, 1, 0, 0]
    assert big.eq(0).all()


def test_in_proj_top_left_misplaces_k_and_v_when_width_grows():
    d, D = 32, 64
    sd = grow_state_dict(state_dict(cfg(width=d), 0), state_dict(cfg(width=D), 1),
                         cfg(width=d), cfg(width=D), "official")
    small = state_dict(cfg(width=d), 0)["visual.transformer.resblocks.0.attn.in_proj_weight"]  # [3d, d]
    big = sd["visual.transformer.resblocks.0.attn.in_proj_weight"]  # [3D, D]
    tq, tk, tv = small[:d], small[d:2 * d], small[2 * d:]
    assert big.shape == (3 * D, D)
    assert torch.equal(big[:d, :d], tq)  # teacher Q -> student Q rows [0, d)
    assert torch.equal(big[d:2 * d, :d], tk)  # teacher K -> student Q rows [d, 2d) (= D)
    assert torch.equal(big[2 * d:3 * d, :d], tv)  # teacher V -> student K rows [2d, 3d)
    init = state_dict(cfg(width=D), 1)["visual.transformer.resblocks.0.attn.in_proj_weight"]
    assert torch.equal(big[3 * d:], init[3 * d:])  # student V rows keep their init
    assert torch.equal(big[:, d:], init[:, d:])


def test_grown_state_dict_loads_strict_and_follows_depth_map():
    small_cfg, big_cfg = cfg(width=32, vision_layers=2, text_layers=2), cfg(width=64, vision_layers=4,
                                                                          text_width=48, text_layers=3, embed_dim=48)
    small_sd, big_sd = state_dict(small_cfg, 0), state_dict(big_cfg, 1)
    grown = grow_state_dict(small_sd, big_sd, small_cfg, big_cfg, "official")
    assert list(grown) == list(big_sd)
    for name, t in grown.items():
        assert t.shape == big_sd[name].shape and t.dtype == big_sd[name].dtype, name

    for j, i in enumerate([0, 0, 1, 1]):
        b = grown[f"visual.transformer.resblocks.{j}.mlp.c_proj.weight"]
        assert torch.equal(b[:32, :128], small_sd[f"visual.transformer.resblocks.{i}.mlp.c_proj.weight"])
    assert torch.equal(grown["transformer.resblocks.2.ln_1.weight"], big_sd["transformer.resblocks.2.ln_1.weight"])
    assert torch.equal(grown["token_embedding.weight"][:, :32], small_sd["token_embedding.weight"])
    assert torch.equal(grown["logit_scale"], small_sd["logit_scale"])

    model = open_clip.CLIP(**big_cfg)
    model.logit_scale = torch.nn.Parameter(torch.zeros(1))  # compt's [1]-shaped logit_scale
    grown["logit_scale"] = grown["logit_scale"].reshape(model.logit_scale.shape)
    model.load_state_dict(grown, strict=True)


def test_none_mode_is_identity():
    small_cfg, big_cfg = cfg(), cfg(width=64, vision_layers=4)
    big_sd = state_dict(big_cfg, 1)
    grown = grow_state_dict(state_dict(small_cfg, 0), big_sd, small_cfg, big_cfg, "none")
    assert grown.keys() == big_sd.keys()
    assert all(torch.equal(grown[k], big_sd[k]) for k in big_sd)
    assert all(grown[k] is not big_sd[k] for k in big_sd)


@pytest.mark.parametrize("small_shape, big_shape", [((), (1,)), ((1,), ()), ((), ()), ((1,), (1,))])
def test_logit_scale_0d_and_1_element_are_the_same(small_shape, big_shape):
    small = torch.tensor(4.6052).reshape(small_shape)
    out = grow_tensor("logit_scale", torch.zeros(big_shape), small, "official")
    assert out.shape == big_shape and out.item() == pytest.approx(4.6052)


def test_student_only_tensor_keeps_init():
    big_sd = {"logit_scale": torch.zeros(1), "logit_bias": torch.full((1,), -10.0)}
    grown = grow_state_dict({"logit_scale": torch.ones(())}, big_sd, cfg(), cfg(), "official")
    assert grown["logit_scale"].tolist() == [1.0] and grown["logit_bias"].tolist() == [-10.0]


def test_shrink_raises_naming_tensor_and_shapes():
    with pytest.raises(ValueError, match=r"visual\.proj.*\(64, 32\).*\(32, 32\)"):
        grow_tensor("visual.proj", torch.zeros(32, 32), torch.zeros(64, 32), "official")
    with pytest.raises(ValueError, match="visual.conv1.weight"):
        grow_tensor("visual.conv1.weight", torch.zeros(32, 3, 8, 8), torch.zeros(32, 3, 16, 16), "official")
    with pytest.raises(ValueError, match=r"cannot grow visual\.class_embedding: .*\(64,\).*\(32,\)"):
        grow_state_dict(state_dict(cfg(width=64), 0), state_dict(cfg(width=32), 1), cfg(width=64), cfg(width=32),
                        "official")
