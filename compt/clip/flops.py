"""Per-sample training cost of an open_clip CLIP model, in FLOPs.

Counted with torch's FlopCounterMode on the meta device (free even for ViT-L),
with a closed-form matmul formula beside it as a cross-check (METHOD.md, "Cost accounting").

Conventions, shared by both counters:
- One FLOP is one multiply or one add: a matmul [m,k] x [k,n] is 2*m*n*k FLOPs (a
  multiply-accumulate is 2). Papers quoting "GFLOPs" for ViTs often mean GMACs,
  half of our number (ViT-B/16 image tower: ~17.6 GMAC = ~35.1 GFLOP here).
- Only matmuls and convolutions count; norms, softmax, GELU, embeddings lookups and
  residual adds are ignored (they are a few percent at most and FlopCounterMode
  does not count them either).
- Attention is counted dense: the text tower's causal mask does not halve QK^T or
  AV, because the kernels compute the full seq x seq scores and then mask them.
- The contrastive loss (B x B logits) is per batch, not per sample, and is excluded;
  at B = 32k and embed_dim 512 it is 2*B*512 FLOPs per sample, ~1e-4 of ViT-B/16.
- `forward` is the eval-mode forward (what a teacher pays); `train` is one train-mode
  forward + backward (what the student pays). They differ beyond the 3x only
  through patch dropout, which drops image tokens in train mode alone.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import torch

from compt.flops import count_flops


@dataclass(frozen=True)
class SampleFlops:
    forward: int  # one image + captions_per_image captions through the CLIP forward
    train: int  # forward + backward of the same, in train mode (student training)
    image_forward: int
    text_forward: int  # per caption


# ---------------------------------------------------------------------------
# Counted: FlopCounterMode on the meta device.
# ---------------------------------------------------------------------------

def count_sample_flops(model_cfg: dict, captions_per_image: int = 1) -> SampleFlops:
    """FLOPs for one sample, counted by running the model on meta tensors."""
    if captions_per_image < 1:
        raise ValueError(f"captions_per_image must be >= 1, got {captions_per_image}")
    # Memoised on the JSON text: the cost table calls this for every stage and model.
    return _count_cached(json.dumps(model_cfg, sort_keys=True), captions_per_image)


@functools.lru_cache(maxsize=None)
def _count_cached(cfg_json: str, captions_per_image: int) -> SampleFlops:
    model_cfg = json.loads(cfg_json)
    model = _build_meta_model(model_cfg)
    image, text = _meta_inputs(model_cfg, model.context_length, captions_per_image)

    model.eval()
    with torch.no_grad():
        image_forward = count_flops(lambda: model.encode_image(image))
        text_forward = count_flops(lambda: model.encode_text(text[:1]))
        forward = count_flops(lambda: model(image, text))

    # The backward really runs on meta; every aten backward op that CLIP uses has a
    # meta kernel. Image pixels need no gradient, so the patch-embedding conv's
    # backward computes only its weight gradient: train lands a hair under 3x forward.
    model.train()

    def forward_backward():
        image_features, text_features = model(image, text)[:2]
        (image_features.sum() + text_features.sum()).backward()

    train = count_flops(forward_backward)
    return SampleFlops(forward=forward, train=train,
                       image_forward=image_forward, text_forward=text_forward)


def _build_meta_model(model_cfg: dict) -> torch.nn.Module:
    import open_clip  # heavy import, only needed when counting

    cfg = dict(model_cfg)  # shallow copy: pop below must not touch the caller's dict
    model_cls = open_clip.CustomTextCLIP if cfg.pop("custom_text", False) else open_clip.CLIP
    with torch.device("meta"):
        # output_dict=False: the forward returns (image_features, text_features, scale).
        return model_cls(**cfg, nonscalar_logit_scale=True, output_dict=False)


def _meta_inputs(model_cfg: dict, context_length: int, captions: int) -> tuple[torch.Tensor, torch.Tensor]:
    height, width = _pair(model_cfg.get("vision_cfg", {}).get("image_size", 224))  # CLIPVisionCfg default
    image = torch.empty(1, 3, height, width, device="meta")
    # Token ids never reach a matmul (embedding lookup, then argmax pooling), so
    # uninitialised meta ids are fine; the shape is all that matters.
    text = torch.zeros(captions, context_length, dtype=torch.long, device="meta")
    return image, text


# ---------------------------------------------------------------------------
# Analytic: closed-form matmul FLOPs for the open_clip ViT + text transformer.
# ---------------------------------------------------------------------------

def analytic_sample_flops(model_cfg: dict, captions_per_image: int = 1) -> SampleFlops:
    """FLOPs for one sample from the config alone: 2*m*n*k per matmul, backward = 2x forward."""
    if captions_per_image < 1:
        raise ValueError(f"captions_per_image must be >= 1, got {captions_per_image}")
    embed_dim = model_cfg["embed_dim"]
    vision = _vision_dims(model_cfg.get("vision_cfg", {}))
    text = _text_dims(model_cfg.get("text_cfg", {}))

    image_forward = _image_tower_flops(vision, embed_dim, vision["seq"])
    image_forward_train = _image_tower_flops(vision, embed_dim, vision["train_seq"])
    text_forward = _tower_flops(text["seq"], text["width"], text["mlp_width"], text["layers"])
    if text["projected"]:
        text_forward += 2 * text["width"] * embed_dim

    forward = image_forward + captions_per_image * text_forward
    train = 3 * (image_forward_train + captions_per_image * text_forward)
    return SampleFlops(forward=forward, train=train,
                       image_forward=image_forward, text_forward=text_forward)


def _vision_dims(cfg: dict) -> dict:
    for field in ("timm_model_name", "attentional_pool"):
        if cfg.get(field):
            raise ValueError(f"vision_cfg.{field} is set; the analytic formula covers only "
                             f"open_clip's plain ViT. Use count_sample_flops for this config.")
    layers = cfg.get("layers", 12)
    if not isinstance(layers, int):
        raise ValueError(f"vision_cfg.layers={layers!r} is a ResNet; the analytic formula covers "
                         f"only ViTs. Use count_sample_flops for this config.")
    width = cfg.get("width", 768)
    image_h, image_w = _pair(cfg.get("image_size", 224))
    patch_h, patch_w = _pair(cfg.get("patch_size", 16))
    patches = (image_h // patch_h) * (image_w // patch_w)
    # open_clip's PatchDropout keeps max(1, int(n * (1 - p))) patches, in train mode only.
    kept = max(1, int(patches * (1 - cfg.get("patch_dropout", 0.0))))
    return dict(width=width, layers=layers, mlp_width=int(width * cfg.get("mlp_ratio", 4.0)),
                patches=patches, patch_pixels=3 * patch_h * patch_w,
                seq=patches + 1, train_seq=kept + 1)  # +1: class token


def _text_dims(cfg: dict) -> dict:
    if cfg.get("hf_model_name"):
        raise ValueError("text_cfg.hf_model_name is set; the analytic formula covers only "
                         "open_clip's own text transformer. Use count_sample_flops for this config.")
    width = cfg.get("width", 512)
    return dict(width=width, layers=cfg.get("layers", 12),
                mlp_width=int(width * cfg.get("mlp_ratio", 4.0)),
                seq=cfg.get("context_length", 77) + int(bool(cfg.get("embed_cls", False))),
                projected=cfg.get("proj_type", "linear") != "none")


def _image_tower_flops(vision: dict, embed_dim: int, seq: int) -> int:
    patch_embed = 2 * vision["patches"] * vision["patch_pixels"] * vision["width"]  # conv as a matmul
    blocks = _tower_flops(seq, vision["width"], vision["mlp_width"], vision["layers"])
    projection = 2 * vision["width"] * embed_dim  # pooled class token -> embedding
    return patch_embed + blocks + projection


def _tower_flops(seq: int, width: int, mlp_width: int, layers: int) -> int:
    qkv_and_out = 2 * seq * width * (3 * width + width)
    attention = 2 * 2 * seq * seq * width  # QK^T and AV, summed over heads
    mlp = 2 * 2 * seq * width * mlp_width  # fc up and fc down
    return layers * (qkv_and_out + attention + mlp)


def _pair(x) -> tuple[int, int]:
    return (x, x) if isinstance(x, int) else (int(x[0]), int(x[1]))
