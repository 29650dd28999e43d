"""CLIP model cards (README.md with the Hub's YAML metadata header) for exported chain models
and for a whole family: architecture, lineage in the chain, cost, metrics, and how to load them.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from compt.card import (budget, chain_path, flatten, flops_summary, flops_text, format_value, metadata_header,
                        predecessor, transfer)

if TYPE_CHECKING:
    from compt.export import FinishedStage

TAGS = ["clip", "compt", "chain-of-models"]
# Metrics shown elsewhere in the card (or not metrics at all).
_NOT_METRICS = {"stage", "name", "transfer", "flops", "loss_curve", "ranks"}


def _header(formats: list[str], license: str) -> str:
    return metadata_header(license, library_name="open_clip" if "open_clip" in formats else "transformers",
                           pipeline_tag="zero-shot-image-classification",
                           tags=TAGS + [f for f in ("open_clip", "transformers") if f in formats])


def _sample_train_flops(cfg: dict[str, Any]) -> float:
    from compt.clip.flops import count_sample_flops

    return count_sample_flops(cfg).train


def _architecture(cfg: dict[str, Any]) -> list[str]:
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    return [
        f"| image tower | ViT: width {v['width']}, {v['layers']} layers, head width {v.get('head_width', 64)}, "
        f"patch {v['patch_size']}, image size {v['image_size']} |",
        f"| text tower | transformer: width {t['width']}, {t['layers']} layers, {t['heads']} heads, "
        f"context length {t.get('context_length', 77)} tokens |",
        f"| embedding dim | {cfg['embed_dim']} |",
        f"| activation | {'QuickGELU' if cfg.get('quick_gelu') else 'GELU'} |",
    ]


def _load_snippets(formats: list[str], ctx: int, repo_id: str | None, subfolder: str | None) -> list[str]:
    lines = ["## How to load", ""]
    if "open_clip" in formats:
        if repo_id and subfolder:
            lines += ["With open_clip (download this model's folder, then load it from disk):", "", "```python",
                      "import open_clip", "from huggingface_hub import snapshot_download",
                      f'root = snapshot_download("{repo_id}", allow_patterns=["{subfolder}/*"])',
                      f'source = f"local-dir:{{root}}/{subfolder}"']
        else:
            lines += ["With open_clip:", "", "```python", "import open_clip",
                      f'source = "{f"hf-hub:{repo_id}" if repo_id else "local-dir:path/to/this/folder"}"']
        lines += ["model, _, preprocess = open_clip.create_model_and_transforms(source)",
                  "tokenizer = open_clip.get_tokenizer(source)",
                  "model.eval()",
                  'text = tokenizer(["a photo of a cat", "a photo of a dog"])',
                  "image_features = model.encode_image(preprocess(image).unsqueeze(0), normalize=True)",
                  "text_features = model.encode_text(text, normalize=True)", "```", ""]
    if "transformers" in formats:
        where = f'"{repo_id}"' if repo_id else '"path/to/this/folder"'
        sub = f', subfolder="{subfolder}"' if repo_id and subfolder else ""
        lines += ["With transformers:", "", "```python", "from transformers import CLIPModel, CLIPProcessor",
                  f"model = CLIPModel.from_pretrained({where}{sub})",
                  f"processor = CLIPProcessor.from_pretrained({where}{sub})",
                  'inputs = processor(text=["a photo of a cat", "a photo of a dog"], images=image,',
                  f'                   padding="max_length", max_length={ctx}, truncation=True, return_tensors="pt")',
                  "outputs = model(**inputs)  # outputs.image_embeds, outputs.text_embeds, outputs.logits_per_image",
                  "```", "",
                  f"The text tower reads at most {ctx} tokens. transformers' CLIPTokenizer does not apply "
                  "open_clip's ftfy/HTML clean-up, so text with curly quotes or HTML entities can tokenize "
                  "differently; the image processor resizes with a different resampling implementation "
                  "than open_clip's eval transform (pixel values differ slightly).", ""]
    return lines


def stage_card(stage: "FinishedStage", formats: list[str], license: str = "other", skipped: str | None = None,
               repo_id: str | None = None, subfolder: str | None = None) -> str:
    """README.md for one exported model."""
    n = len(stage.manifest["stages"])
    ctx = int(stage.model_cfg["text_cfg"].get("context_length", 77))
    m = stage.metrics
    data = stage.manifest["config"].get("data") or {}
    lines = [
        _header(formats, license),
        f"# {stage.chain} / {stage.folder}",
        "",
        f"A CLIP model, stage {stage.index} of {n} of the chain `{stage.chain}`, trained with "
        "compt (Chain-of-Models Pre-Training on DeepSpeed): each model of the family "
        "starts from its trained predecessor (growth in parameter space) and trains a short budget with the "
        "CLIP contrastive loss plus an alignment loss towards the predecessor's embeddings.",
        "",
        "## Model", "", "| | |", "|---|---|", *_architecture(stage.model_cfg),
        f"| parameters | {format_value(m.get('params'))} |",
        f"| formats in this folder | {', '.join(formats)} |",
        "",
    ]
    if skipped:
        lines += [f"transformers format not included: {skipped}.", ""]

    t, prev = transfer(stage), predecessor(stage)
    f = flops_summary(stage, _sample_train_flops)
    lines += ["## Chain lineage", "", f"Chain: {chain_path(stage)}", "", "| | |", "|---|---|"]
    lines.append(f"| predecessor | {f'`{prev}`' if prev else 'none: first model of the chain'} |")
    if t is None:
        lines.append("| growth (parameter space) | none: trained from scratch |")
        lines.append("| alignment (feature space) | none |")
    else:
        growth = {"official": "official (reference growth rule from the predecessor)",
                  "none": "none (from scratch)"}.get(t["init"], t["init"])
        lines.append(f"| growth (parameter space) | {growth} |")
        align = (f"to the predecessor's embeddings, weight alpha = {format_value(float(t['alpha']))}"
                 if t["align"] and float(t["alpha"]) > 0 else "off")
        lines.append(f"| alignment (feature space) | {align} |")
    lines.append(f"| budget | {budget(stage)} |")
    train = f" {data['train']}" if data.get("train") else ""
    lines.append(f"| training data | {data.get('kind', 'n/a')}{train} |")
    lines.append(f"| FLOPs, this stage | {flops_text(f['total'])} (student training {flops_text(f['student_train'])}, "
                 f"teacher forward {flops_text(f['teacher_forward'])}) |")
    lines.append(f"| FLOPs, chain up to this model | {flops_text(f['chain_total'])} |")
    scratch = flops_text(f["from_scratch"])
    if f["from_scratch"] and f["first_stage_samples"] and not (stage.metrics.get("flops") or {}).get("from_scratch"):
        samples = format_value(f["first_stage_samples"])
        scratch += f" (estimate: this model alone for the first stage's {samples} samples)"
    lines.append(f"| FLOPs, from scratch | {scratch} |")
    if f["from_scratch"] and f["total"]:
        lines.append(f"| this stage vs from scratch | {f['total'] / f['from_scratch']:.3g}x the FLOPs |")
    lines.append("")

    rows = [(k, v) for k, v in flatten({k: v for k, v in m.items() if k not in _NOT_METRICS})]
    lines += ["## Metrics", "", "From the stage's `metrics.json` (validation split of the training data).", "",
              "| metric | value |", "|---|---|", *[f"| {k} | {format_value(v)} |" for k, v in rows], ""]
    lines += _load_snippets(formats, ctx, repo_id, subfolder)
    return "\n".join(lines).rstrip() + "\n"


def family_card(members: list[tuple["FinishedStage", list[str], str | None]], license: str = "other",
                repo_id: str | None = None) -> str:
    """README.md for a whole exported chain: one row per model folder."""
    first = members[0][0]
    formats = sorted({f for _, fs, _ in members for f in fs}, key=["open_clip", "transformers"].index)
    lines = [
        _header(formats, license),
        f"# {first.chain}: a CLIP model family",
        "",
        f"{len(members)} CLIP models trained as a chain with compt (Chain-of-Models Pre-Training), smallest "
        "first: each model starts from its trained predecessor and aligns to its embeddings. "
        "One folder per model, each with its own model card.",
        "",
        "| folder | params | predecessor | growth | alignment | budget | zero-shot top-1 | FLOPs (stage) "
        "| FLOPs from scratch | formats |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for stage, fs, _ in members:
        t, f = transfer(stage), flops_summary(stage, _sample_train_flops)
        top1 = stage.metrics.get("zeroshot_top1")
        lines.append(
            f"| [`{stage.folder}`]({stage.folder}/README.md) | {format_value(stage.metrics.get('params'))} "
            f"| {predecessor(stage) or '-'} | {t['init'] if t else 'scratch'} "
            f"| {('alpha ' + format_value(float(t['alpha']))) if t and t['align'] and float(t['alpha']) > 0 else '-'} "
            f"| {budget(stage).split(' (')[0]} | {'-' if top1 is None else f'{100 * top1:.1f}%'} "
            f"| {flops_text(f['total'])} | {flops_text(f['from_scratch'])} | {', '.join(fs)} |")
    skipped = [(s.folder, p) for s, fs, p in members if p]
    if skipped:
        lines += ["", *[f"- `{folder}`: transformers format not included: {p}." for folder, p in skipped]]
    sub = members[-1][0].folder
    lines += [""] + _load_snippets(formats, int(members[-1][0].model_cfg["text_cfg"].get("context_length", 77)),
                                   repo_id, sub if repo_id else None)
    if not repo_id:
        lines = [ln.replace("path/to/this/folder", f"path/to/this/folder/{sub}") for ln in lines]
    return "\n".join(lines).rstrip() + "\n"
