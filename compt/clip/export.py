"""Export finished chain stages for the Hugging Face Hub: open_clip's hub layout and
transformers' CLIPModel (weight conversion, configs, tokenizer, image processor).

Everything is checked before anything is written; the export is built in a temporary
folder next to ``--out`` and renamed into place at the end, so bad input writes nothing.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from compt import export as core
from compt.clip.card import family_card, stage_card
from compt.export import ExportError, ExportResult, FinishedStage, check_out, finished_weights, read_json, write_staged

FORMATS = ("open_clip", "transformers", "both")
DEFAULT_FORMAT = "both"
OPEN_CLIP_FILES = ("open_clip_config.json", "open_clip_model.safetensors")
# open_clip's SimpleTokenizer: start/end of text ids. The end token is the largest id,
# which is what open_clip's argmax pooling relies on.
BOS_ID, EOS_ID, CLIP_VOCAB = 49406, 49407, 49408


# ---------------------------------------------------------------------------
# A finished stage of a CLIP run directory.
# ---------------------------------------------------------------------------

def _stage_from_entry(run: Path, manifest: dict[str, Any], entry: dict[str, Any]) -> FinishedStage:
    label, weights = finished_weights(run, entry)
    stage_dir = run / entry["dir"]
    model_cfg = read_json(stage_dir / "config.json", f"{label}: model config")
    metrics = read_json(stage_dir / "metrics.json", f"{label}: metrics")
    return FinishedStage(run, int(entry["index"]), entry["name"], stage_dir, weights, entry["sha256"],
                         model_cfg, metrics, manifest)


def read_stage(stage_dir: str | Path) -> FinishedStage:
    """A stage the manifest marks done, with its weights checked against the recorded sha256."""
    return core.read_stage(stage_dir, _stage_from_entry)


def read_run(run_dir: str | Path) -> list[FinishedStage]:
    """Every stage of a run, all finished and intact, or one error naming each problem."""
    return core.read_run(run_dir, _stage_from_entry)


_CLIP_KEYS = ("embed_dim", "vision_cfg", "text_cfg")


def claims(path: Path, whole_run: bool) -> bool:
    """Whether ``path`` (a stage, or a run with ``whole_run``) is a CLIP one: its run's manifest
    names the family clip or none (CLIP is the default family), or its config.json is open_clip's."""
    config = core.manifest_config(core.run_of(path, whole_run))
    if config is not None and config.get("family") in (None, "clip"):
        return True
    stage_cfg = None if whole_run else core.stage_config(path)
    return stage_cfg is not None and any(k in stage_cfg for k in _CLIP_KEYS)


# ---------------------------------------------------------------------------
# open_clip's hub layout.
# ---------------------------------------------------------------------------

def preprocess_cfg(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """Eval preprocessing as compt uses it (compt.clip.model.preprocess_for), in open_clip's keys."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    given = model_cfg.get("preprocess_cfg") or {}
    return {
        "size": model_cfg["vision_cfg"]["image_size"],
        "mean": list(given.get("mean") or OPENAI_DATASET_MEAN),
        "std": list(given.get("std") or OPENAI_DATASET_STD),
        "interpolation": given.get("interpolation") or "bicubic",
        "resize_mode": given.get("resize_mode") or "shortest",
    }


def write_open_clip(stage: FinishedStage, out: Path) -> None:
    """open_clip_config.json + open_clip_model.safetensors (the stage's weights, byte for byte)."""
    model_cfg = {k: v for k, v in stage.model_cfg.items() if k != "preprocess_cfg"}
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg(stage.model_cfg)}
    (out / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")
    shutil.copyfile(stage.weights, out / "open_clip_model.safetensors")


# ---------------------------------------------------------------------------
# transformers' CLIPModel.
# ---------------------------------------------------------------------------

_CUSTOM_BLOCK = ("qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc")


def _tower_problems(cfg, tower: str) -> list[str]:
    out = []
    if cfg.ls_init_value is not None:
        out.append(f"{tower}.ls_init_value (layer scale)")
    if (cfg.block_type not in (None, "default")) or any(getattr(cfg, k) for k in _CUSTOM_BLOCK):
        out.append(f"{tower}: custom attention block ({', '.join(k for k in _CUSTOM_BLOCK if getattr(cfg, k))})")
    if cfg.act_kwargs:
        out.append(f"{tower}.act_kwargs")
    if cfg.norm_kwargs and set(cfg.norm_kwargs) != {"eps"}:
        out.append(f"{tower}.norm_kwargs other than eps")
    return out


def transformers_problem(model_cfg: dict[str, Any]) -> str | None:
    """Why transformers' CLIPModel cannot compute exactly this model, or None."""
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    problems = []
    if model_cfg.get("custom_text"):
        problems.append("a custom text tower (custom_text)")
    if model_cfg.get("multimodal_cfg"):
        problems.append("a multimodal decoder (CoCa)")
    if model_cfg.get("init_logit_bias") is not None:
        problems.append("a logit bias (SigLIP-style loss)")
    if preprocess_cfg(model_cfg)["resize_mode"] == "longest":
        problems.append("preprocess resize_mode 'longest' (CLIPImageProcessor has no letterbox resize)")
    v = CLIPVisionCfg(**model_cfg["vision_cfg"])
    t = CLIPTextCfg(**model_cfg["text_cfg"])
    if v.timm_model_name:
        problems.append(f"a timm image tower ({v.timm_model_name})")
    if isinstance(v.layers, (tuple, list)):
        problems.append("a ResNet image tower")
    if v.attentional_pool:
        problems.append("vision_cfg.attentional_pool (attentional pooling)")
    elif v.pool_type != "tok":
        problems.append(f"vision_cfg.pool_type '{v.pool_type}' (transformers pools the class token)")
    if v.no_ln_pre:
        problems.append("vision_cfg.no_ln_pre (transformers always applies pre_layrnorm)")
    if v.pos_embed_type != "learnable":
        problems.append(f"vision_cfg.pos_embed_type '{v.pos_embed_type}'")
    for key in ("image_size", "patch_size"):
        val = getattr(v, key)
        if isinstance(val, (tuple, list)) and len(set(val)) != 1:
            problems.append(f"vision_cfg.{key} {list(val)} is not square")
    problems += _tower_problems(v, "vision_cfg")
    if t.hf_model_name:
        problems.append(f"a Hugging Face text tower ({t.hf_model_name})")
    if t.hf_tokenizer_name or t.tokenizer_kwargs:
        problems.append("a tokenizer other than open_clip's default CLIP BPE (hf_tokenizer_name/tokenizer_kwargs)")
    if t.vocab_size < CLIP_VOCAB:
        problems.append(f"text_cfg.vocab_size {t.vocab_size} < {CLIP_VOCAB} (the CLIP tokenizer's ids)")
    if not (t.pool_type == "argmax" or (t.pool_type == "eos" and t.eos_id == EOS_ID)):
        problems.append(f"text_cfg.pool_type '{t.pool_type}' (transformers pools at the end-of-text token)")
    if t.embed_cls:
        problems.append("text_cfg.embed_cls")
    if t.no_causal_mask:
        problems.append("text_cfg.no_causal_mask (transformers' CLIP text tower is causal)")
    if t.proj_type != "linear" or t.proj_bias:
        problems.append(f"text_cfg projection '{t.proj_type}'{' with bias' if t.proj_bias else ''} "
                        "(transformers uses a bias-free linear projection)")
    problems += _tower_problems(t, "text_cfg")
    if not problems:
        return None
    return "transformers' CLIPModel cannot express " + "; ".join(problems)


def _side(x) -> int:
    return int(x[0]) if isinstance(x, (tuple, list)) else int(x)


def transformers_config(model_cfg: dict[str, Any], logit_scale: float | None = None):
    """The CLIPConfig of the same architecture (call only when transformers_problem is None)."""
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg
    from transformers import CLIPConfig

    v = CLIPVisionCfg(**model_cfg["vision_cfg"])
    t = CLIPTextCfg(**model_cfg["text_cfg"])
    act = "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"  # open_clip: QuickGELU or exact nn.GELU
    embed = int(model_cfg["embed_dim"])
    text = dict(vocab_size=t.vocab_size, hidden_size=t.width, intermediate_size=int(t.width * t.mlp_ratio),
                num_hidden_layers=t.layers, num_attention_heads=t.heads, max_position_embeddings=t.context_length,
                hidden_act=act, layer_norm_eps=(t.norm_kwargs or {}).get("eps", 1e-5), projection_dim=embed,
                # Pool at the first end-of-text token (any eos_token_id but the legacy 2 does):
                # the same position as open_clip's argmax, whatever the padding.
                bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID)
    vision = dict(hidden_size=v.width, intermediate_size=int(v.width * v.mlp_ratio), num_hidden_layers=v.layers,
                  num_attention_heads=v.width // v.head_width, image_size=_side(v.image_size),
                  patch_size=_side(v.patch_size), num_channels=3, hidden_act=act,
                  layer_norm_eps=(v.norm_kwargs or {}).get("eps", 1e-5), projection_dim=embed)
    extra = {} if logit_scale is None else {"logit_scale_init_value": float(logit_scale)}
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=embed, **extra)


def _encoder(get: Callable[[str], torch.Tensor], src: str, dst: str, layers: int) -> dict[str, torch.Tensor]:
    out = {}
    for i in range(layers):
        s, d = f"{src}.resblocks.{i}.", f"{dst}.encoder.layers.{i}."
        # nn.MultiheadAttention packs q, k, v row-wise in in_proj.
        for part, w, b in zip("qkv", get(s + "attn.in_proj_weight").chunk(3), get(s + "attn.in_proj_bias").chunk(3)):
            out[f"{d}self_attn.{part}_proj.weight"], out[f"{d}self_attn.{part}_proj.bias"] = w, b
        pairs = {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
                 "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
        for a, b in pairs.items():
            out[f"{d}{b}.weight"], out[f"{d}{b}.bias"] = get(f"{s}{a}.weight"), get(f"{s}{a}.bias")
    return out


def to_transformers_state_dict(get: Callable[[str], torch.Tensor],
                               model_cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
    """open_clip CLIP weights (by name, via ``get``) -> transformers CLIPModel weights."""
    vl, tl = model_cfg["vision_cfg"]["layers"], model_cfg["text_cfg"]["layers"]
    out = {
        "vision_model.embeddings.class_embedding": get("visual.class_embedding"),
        "vision_model.embeddings.patch_embedding.weight": get("visual.conv1.weight"),
        "vision_model.embeddings.position_embedding.weight": get("visual.positional_embedding"),
        "vision_model.pre_layrnorm.weight": get("visual.ln_pre.weight"),
        "vision_model.pre_layrnorm.bias": get("visual.ln_pre.bias"),
        "vision_model.post_layernorm.weight": get("visual.ln_post.weight"),
        "vision_model.post_layernorm.bias": get("visual.ln_post.bias"),
        "visual_projection.weight": get("visual.proj").t(),  # open_clip: x @ proj; Linear: x @ W.T
        "text_model.embeddings.token_embedding.weight": get("token_embedding.weight"),
        "text_model.embeddings.position_embedding.weight": get("positional_embedding"),
        "text_model.final_layer_norm.weight": get("ln_final.weight"),
        "text_model.final_layer_norm.bias": get("ln_final.bias"),
        "text_projection.weight": get("text_projection").t(),
        "logit_scale": get("logit_scale").reshape(()),
        **_encoder(get, "visual.transformer", "vision_model", vl),
        **_encoder(get, "transformer", "text_model", tl),
    }
    # safetensors stores neither views nor shared storage.
    return {k: v.detach().to(torch.float32).contiguous().clone() for k, v in out.items()}


def _check_against_transformers(config, state: dict[str, torch.Tensor]) -> None:
    """The converted names and shapes are exactly what this transformers version builds."""
    from transformers import CLIPModel

    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in CLIPModel(config).state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if want != got:
        diff = sorted(set(want.items()) ^ set(got.items()))[:6]
        raise RuntimeError(f"open_clip -> transformers conversion does not match transformers' CLIPModel: {diff}")


def image_processor(model_cfg: dict[str, Any]):
    """CLIPImageProcessor doing compt's eval transform: resize the shortest side, center crop, normalise."""
    from transformers import CLIPImageProcessor
    from transformers.image_utils import PILImageResampling

    pp = preprocess_cfg(model_cfg)
    size = _side(pp["size"])
    resample = PILImageResampling.BILINEAR if pp["interpolation"] == "bilinear" else PILImageResampling.BICUBIC
    if pp["resize_mode"] == "squash":
        return CLIPImageProcessor(size={"height": size, "width": size}, do_center_crop=False, resample=resample,
                                  image_mean=pp["mean"], image_std=pp["std"])
    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                              resample=resample, image_mean=pp["mean"], image_std=pp["std"])


def write_transformers(stage: FinishedStage, out: Path) -> None:
    """config.json + model.safetensors + tokenizer and image-processor files for CLIPModel/CLIPProcessor."""
    from safetensors.torch import save_file
    from transformers import CLIPProcessor

    from compt.clip.hf_tokenizer import clip_tokenizer, write_bpe_files
    from compt.weights import open_lazy

    with open_lazy(stage.weights) as src:
        state = to_transformers_state_dict(src.get, stage.model_cfg)
    config = transformers_config(stage.model_cfg, float(state["logit_scale"]))
    config.architectures = ["CLIPModel"]
    _check_against_transformers(config, state)
    config.save_pretrained(str(out))
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    images = image_processor(stage.model_cfg)
    tokenizer = clip_tokenizer(int(stage.model_cfg["text_cfg"].get("context_length", 77)))
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(str(out))
    images.save_pretrained(str(out))  # preprocessor_config.json, which transformers < 5 reads
    write_bpe_files(out)


# ---------------------------------------------------------------------------
# One export: stages -> a folder (or a listing, for --dry-run).
# ---------------------------------------------------------------------------

def _formats_for(stage: FinishedStage, fmt: str) -> tuple[list[str], str | None]:
    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)} (got '{fmt}')")
    if stage.model_cfg["text_cfg"].get("hf_tokenizer_name"):
        # open_clip's local-dir loader would look for that tokenizer's files in the folder.
        raise ExportError(f"stage {stage.folder}: text_cfg.hf_tokenizer_name is set; compt export only writes "
                          "models using open_clip's default CLIP tokenizer")
    problem = transformers_problem(stage.model_cfg)
    if fmt == "transformers" and problem:
        raise ExportError(f"stage {stage.folder}: {problem}; export it with --format open_clip")
    formats = ["open_clip", "transformers"] if fmt == "both" else [fmt]
    if problem:
        formats = [f for f in formats if f != "transformers"]
    return formats, problem


def export(stages: list[FinishedStage], out: str | Path, fmt: str = "both", license: str = "other",
           family: bool = False, repo_id: str | None = None, dry_run: bool = False) -> ExportResult:
    """Write one folder per model (``family``: subfolders plus a family card) at ``out``.

    ``repo_id`` only shapes the loading instructions in the cards. With ``dry_run`` the
    export is built in a temporary folder, listed and deleted.
    """
    out = Path(out)
    check_out(out)
    plans = [(s, *_formats_for(s, fmt)) for s in stages]  # every check before any write
    notes = [f"stage {s.folder}: transformers format skipped: {p}" for s, formats, p in plans
             if p and fmt == "both"]

    def fill(tmp: Path) -> list[str]:
        for stage, formats, problem in plans:
            folder = tmp / stage.folder if family else tmp
            folder.mkdir(exist_ok=True)
            if "open_clip" in formats:
                write_open_clip(stage, folder)
            if "transformers" in formats:
                write_transformers(stage, folder)
            readme = stage_card(stage, formats=formats, license=license, skipped=problem,
                                repo_id=repo_id, subfolder=stage.folder if family else None)
            (folder / "README.md").write_text(readme)
        if family:
            (tmp / "README.md").write_text(family_card(
                [(s, formats, p) for s, formats, p in plans], license=license, repo_id=repo_id))
        return notes

    return write_staged(out, dry_run, fill)
