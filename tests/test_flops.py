"""Per-sample FLOPs: the meta-device count and the analytic formula agree, and match hand numbers."""
import open_clip
import pytest

from compt.clip.flops import analytic_sample_flops, count_sample_flops
from compt.flops import format_flops

TINY = dict(embed_dim=64,
            vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2, head_width=32),
            text_cfg=dict(context_length=16, vocab_size=49408, width=64, heads=2, layers=2))
VIT_B_16 = open_clip.get_model_config("ViT-B-16")
VIT_L_16 = {"embed_dim": 512,
            "vision_cfg": {"image_size": 224, "layers": 24, "width": 1024, "patch_size": 16, "head_width": 64},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 768, "heads": 12, "layers": 12}}
CONFIGS = pytest.mark.parametrize("cfg", [TINY, VIT_B_16, VIT_L_16], ids=["tiny", "ViT-B-16", "ViT-L-16"])


def _close(a, b, rel):
    return abs(a - b) <= rel * b


@CONFIGS
@pytest.mark.parametrize("captions", [1, 7])
def test_counted_matches_analytic(cfg, captions):
    counted = count_sample_flops(cfg, captions)
    analytic = analytic_sample_flops(cfg, captions)
    for field in ("forward", "train", "image_forward", "text_forward"):
        assert _close(getattr(counted, field), getattr(analytic, field), 0.05), field


@CONFIGS
def test_train_is_about_three_forwards(cfg):
    flops = count_sample_flops(cfg)
    assert 2.9 <= flops.train / flops.forward <= 3.1


@CONFIGS
def test_each_extra_caption_costs_one_text_tower(cfg):
    for count in (count_sample_flops, analytic_sample_flops):
        one, seven = count(cfg, 1), count(cfg, 7)
        assert seven.forward - one.forward == 6 * one.text_forward
        assert seven.image_forward == one.image_forward
        assert seven.text_forward == one.text_forward


def test_vit_b_16_image_tower_by_hand():
    # ViT-B/16 at 224px, 2 FLOPs per multiply-accumulate (FlopCounterMode's convention):
    #   tokens  n = 14*14 + 1 = 197, width d = 768, MLP 3072, 12 blocks
    #   patch conv      2 * 196 * 768 * 768                      =    231,211,008
    #   per block  qkv+out 2*n*d*4d = 929,562,624; MLP 2*2*n*d*4d = 1,859,125,248;
    #              QK^T+AV 2*2*n^2*d = 119,218,176  -> 2,907,906,048; x12 = 34,894,872,576
    #   projection      2 * 768 * 512                            =        786,432
    #   total                                                    ~ 35.13e9 FLOPs
    # i.e. ~17.6 GMACs, the "17.5 GFLOPs" usually quoted for ViT-B/16 (MAC convention).
    assert _close(count_sample_flops(VIT_B_16).image_forward, 35.13e9, 0.10)


def test_patch_dropout_lowers_only_the_training_cost():
    cfg = dict(TINY, vision_cfg=dict(TINY["vision_cfg"], patch_dropout=0.5))
    counted, analytic = count_sample_flops(cfg), analytic_sample_flops(cfg)
    assert counted.forward == count_sample_flops(TINY).forward  # teachers run in eval mode
    assert counted.train < count_sample_flops(TINY).train
    assert _close(counted.train, analytic.train, 0.05)


def test_counts_are_memoised():
    assert count_sample_flops(dict(VIT_B_16)) is count_sample_flops(VIT_B_16)


def test_analytic_names_the_field_it_cannot_model():
    cfg = dict(TINY, vision_cfg=dict(TINY["vision_cfg"], timm_model_name="convnext_tiny"))
    with pytest.raises(ValueError, match="vision_cfg.timm_model_name"):
        analytic_sample_flops(cfg)


@pytest.mark.parametrize("x, text", [
    (1.234e12, "1.23 TFLOP"), (456e9, "456 GFLOP"), (7.8e6, "7.8 MFLOP"),
    (999.7e9, "1 TFLOP"), (3.2e20, "320 EFLOP"), (12, "12 FLOP"), (0, "0 FLOP"),
])
def test_format_flops(x, text):
    assert format_flops(x) == text
