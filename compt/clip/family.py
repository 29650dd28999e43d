"""The CLIP family (open_clip models on image-text data): what the core asks of it
(compt.families.Family): config checks, data, build, grow, feed, score, count, save, report.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from compt.clip.evaluate import embedding_cosine, evaluate, evaluate_imagefolder
from compt.clip.flops import count_sample_flops
from compt.clip.grow import growth_problem, plan_tensor
from compt.clip.loader import Batch, eval_loader, train_loader
from compt.clip.losses import ChainLoss
from compt.clip.model import (build_clip, export_name_and_tensor, load_into, model_config_problem, preprocess_for,
                              resolve_model_config, size_problem, write_model_config)
from compt.data import DataConfig, build_dataset
from compt.data.imagefolder import build_imagefolder
from compt.engine import no_decay_by_name
from compt.families import CostCounters, Quality
from compt.growth import MODES
from compt.loading import loader_options
from compt.flops import format_flops
from compt.loss import LossParts

# The alignment weight: METHOD.md's 500, except after exact growth, whose student starts as good as its
# teacher: on digit-numbers (benchmarks/results/acceleration-full-exact-alpha5) exact chains trained better
# at 5 than at 500 on each of 3 seeds, for both later models (l top-1 75.3% vs 65.4%).
ALPHA = 500.0
ALPHA_EXACT = 5.0


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


class ClipFamily:
    name = "clip"
    curve_names = ("contrastive", "alignment")
    data_config = DataConfig
    growth_modes = MODES  # every mode of compt.growth; impossible pairs are reported by chain_problems
    quality = Quality("zeroshot_top1", "top-1", higher_is_better=True)
    result_headers = ["stage", "model", "params", "budget", "init top-1", "top-1", "top-5", "I->T R@1", "T->I R@1",
                      "folder top-1/5", "FLOPs", "wall"]

    # -- config -------------------------------------------------------------------------------------------------
    def alpha_default(self, init: str) -> float:
        return ALPHA_EXACT if init == "exact" else ALPHA

    def stage_model_cfg(self, model, prev_cfg: dict | None, init: str | None) -> dict:
        return resolve_model_config(model)

    def chain_problems(self, cfg) -> list[str]:
        """Models that open_clip cannot build, stages not larger than their predecessor, impossible growth,
        batches too small for a contrastive loss."""
        problems: list[str] = []
        resolved: list[dict | None] = []
        for k, stage in enumerate(cfg.stages):
            p = model_config_problem(stage.model)
            if p:
                problems.append(f"stages.{k}.model: {p}")
                resolved.append(None)
                continue
            resolved.append(resolve_model_config(stage.model))
            if k > 0 and resolved[k - 1] is not None:
                p = size_problem(resolved[k - 1], resolved[k])
                if p:
                    problems.append(f"stages.{k}.model: {p}")
                mode = cfg.transfer(k).init
                if not p and mode != "none":
                    p = growth_problem(resolved[k - 1], resolved[k], mode)
                    if p:
                        problems.append(f"stages.{k}.transfer.init: {mode} growth is impossible here: {p}; "
                                        "use another mode or change the model")
            bs = stage.settings(cfg.defaults).batch_size
            if bs < 2:
                problems.append(f"stages.{k}.batch_size: contrastive training needs a batch of at least 2")
        return problems

    # -- data ---------------------------------------------------------------------------------------------------
    def build_data(self, data_cfg, run_root: Path, rank: int):
        return build_dataset(data_cfg, "train"), build_dataset(data_cfg, "val")

    def val_data(self, data_cfg, run_root: Path):
        return build_dataset(data_cfg, "val")

    def train_size(self, data_cfg) -> int:
        return len(build_dataset(data_cfg, "train"))

    # -- a stage ------------------------------------------------------------------------------------------------

    def build(self, model_cfg: dict, teacher_cfg: dict | None) -> torch.nn.Module:
        return build_clip(model_cfg, align_to_dim=teacher_cfg["embed_dim"] if teacher_cfg else None)

    def hidden_size(self, model_cfg: dict) -> int:
        """The wider tower's width (transformers takes the largest of a model's hidden_sizes); a width the
        config leaves out is open_clip's default for it."""
        from open_clip.model import CLIPTextCfg, CLIPVisionCfg

        return max(int(model_cfg.get("vision_cfg", {}).get("width", CLIPVisionCfg.width)),
                   int(model_cfg.get("text_cfg", {}).get("width", CLIPTextCfg.width)))

    def library_inits(self) -> list:
        """open_clip re-initialises the text tower from TextTransformer.__init__ after its blocks exist, through
        torch.nn.init, one tensor at a time."""
        from compt.partition import torch_inits

        return torch_inits()

    def plan(self, name: str, prev_cfg: dict, model_cfg: dict, mode: str, noise: float, seed: int):
        return plan_tensor(name, prev_cfg, model_cfg, mode, noise, seed)

    def load_teacher(self, model_cfg: dict, weights: Path) -> torch.nn.Module:
        teacher = build_clip(model_cfg)
        load_into(teacher, load_file(str(weights)))
        return teacher.eval().requires_grad_(False)

    def no_decay(self, name: str, p: torch.nn.Parameter) -> bool:
        """open_clip's convention: no weight decay on norms, biases, embeddings and the logit scale."""
        return no_decay_by_name(name, p)

    def enable_activation_checkpointing(self, model: torch.nn.Module) -> None:
        """open_clip's own switch: both towers recompute each residual block in the backward pass."""
        model.set_grad_checkpointing(True)

    def loss(self, alpha: float | None, transfer, rank: int, world: int, kernels: str):
        clip_loss = ChainLoss(alpha, rank, world, kernels)

        def step(engine, batch: Batch, teacher) -> LossParts:
            out = engine(batch.images, batch.texts)
            with torch.no_grad():
                t_out = teacher(*batch.teacher_inputs()) if teacher is not None else None
            return clip_loss(out, t_out)
        return step

    def train_loader(self, train_ds, model_cfg: dict, teacher_cfg: dict | None, **kw):
        t_pre = preprocess_for(teacher_cfg) if teacher_cfg else None
        return train_loader(train_ds, preprocess_for(model_cfg), t_pre, **kw)

    def init_metrics(self, engine, prev_cfg: dict, probe, model_cfg: dict, val_ds, cfg) -> dict[str, Any]:
        """Where the grown student starts: embedding cosine to the predecessor on one
        validation batch, and zero-shot top-1."""
        pre, probe_pre = preprocess_for(model_cfg), preprocess_for(prev_cfg)
        size = min(cfg.eval.batch_size, len(val_ds))
        first = next(iter(eval_loader(val_ds, pre, size)))
        if probe_pre.key != pre.key:
            tb = next(iter(eval_loader(val_ds, probe_pre, size)))
            first.teacher_images, first.teacher_texts = tb.images, tb.texts
        engine.eval()
        cosine = embedding_cosine(engine, probe, first)
        init = evaluate(engine, val_ds, pre, cfg.eval.batch_size, cfg.eval.zeroshot, retrieval=False,
                        **loader_options(cfg.data, getattr(engine, "device", "cpu")))
        engine.train()
        return {"init_cosine": cosine, "init_zeroshot_top1": init["zeroshot_top1"]}

    def evaluate(self, engine, val_ds, model_cfg: dict, cfg) -> dict[str, Any]:
        """The validation split, and the class-folder tree of ``data.imagefolder`` when given."""
        pre, options = preprocess_for(model_cfg), loader_options(cfg.data, getattr(engine, "device", "cpu"))
        metrics = evaluate(engine, val_ds, pre, cfg.eval.batch_size, cfg.eval.zeroshot, cfg.eval.retrieval, **options)
        if cfg.data.imagefolder is not None:
            metrics.update(evaluate_imagefolder(engine, build_imagefolder(cfg.data.imagefolder), pre,
                                                cfg.eval.batch_size, **options))
        return metrics

    def sample_flops(self, model_cfg: dict, data) -> tuple[int, int]:
        """(student train, teacher forward) FLOPs per training sample."""
        f = count_sample_flops(model_cfg)
        return f.train, f.forward

    def tokens_per_sample(self, data) -> int | None:
        return None  # throughput is images (samples) per second

    def export_name(self, name: str, tensor: torch.Tensor):
        return export_name_and_tensor(name, tensor)

    def is_exported(self, name: str) -> bool:
        return not name.startswith("align_proj.")

    def write_config(self, path: Path, model_cfg: dict) -> None:
        write_model_config(path, model_cfg)

    # -- reports and tools ----------------------------------------------------------------------------------------
    def summary(self, metrics: dict[str, Any]) -> dict[str, Any]:
        r = metrics.get("retrieval") or {}
        return {
            "zeroshot_top1": metrics.get("zeroshot_top1"),
            "zeroshot_top5": metrics.get("zeroshot_top5"),
            "i2t_R@1": (r.get("image_to_text") or {}).get("R@1"),
            "t2i_R@1": (r.get("text_to_image") or {}).get("R@1"),
            "init_zeroshot_top1": metrics.get("init_zeroshot_top1"),
            **{k: metrics[k] for k in ("imagefolder_top1", "imagefolder_top5") if k in metrics},
        }

    def result_row(self, stage, m: dict[str, Any]) -> list[str]:
        r = m.get("retrieval") or {}
        model = stage.model if isinstance(stage.model, str) else "inline"
        budget = ", ".join(f"{k}={v}" for k, v in stage.budget.model_dump().items() if v is not None)
        return [
            f"{m['stage']}-{m['name']}", model, f"{m['params'] / 1e6:.2f}M", f"{budget} ({m['steps']} steps)",
            _pct(m.get("init_zeroshot_top1")), _pct(m.get("zeroshot_top1")), _pct(m.get("zeroshot_top5")),
            _pct((r.get("image_to_text") or {}).get("R@1")), _pct((r.get("text_to_image") or {}).get("R@1")),
            f"{_pct(m['imagefolder_top1'])} / {_pct(m['imagefolder_top5'])}" if "imagefolder_top1" in m else "-",
            format_flops(m["flops"]["total"]), f"{m['wall_seconds']:.0f}s",
        ]

    def metrics_lines(self, metrics: dict[str, Any]) -> list[str]:
        """``compt eval``'s text output after its first line."""
        lines = [f"{metrics['val_samples']} validation samples"]
        for key in ("zeroshot_top1", "zeroshot_top5"):
            if metrics[key] is not None:
                lines.append(f"  {key:<16} {100 * metrics[key]:6.2f}%")
        for direction, recalls in (metrics["retrieval"] or {}).items():
            lines.append(f"  {direction:<16} " + "  ".join(f"{k} {100 * v:6.2f}%" for k, v in recalls.items()))
        if "imagefolder_top1" in metrics:
            bad = metrics["imagefolder_bad_samples"]["count"]
            lines.append(f"{metrics['imagefolder_samples']} class-folder images, {metrics['imagefolder_classes']} "
                         f"classes{f' ({bad} unreadable, skipped)' if bad else ''}")
            for key in ("imagefolder_top1", "imagefolder_top5"):
                lines.append(f"  {key:<16} {100 * metrics[key]:6.2f}%")
        return lines

    def cost_counters(self, recipe) -> CostCounters:
        from compt.clip.flops import analytic_sample_flops
        from compt.clip.model import count_params

        def analytic(cfg: dict):
            try:
                return analytic_sample_flops(cfg, recipe.captions_per_image)
            except ValueError:  # a tower the closed form does not model (timm, HF text, ResNet)
                return None

        return CostCounters(lambda cfg: count_sample_flops(cfg, recipe.captions_per_image), analytic, count_params)

    def sample_unit(self, recipe, captions_per_image: int) -> str:
        return f"{captions_per_image} caption(s) per image"

    def exporter(self):
        import compt.clip.export

        return compt.clip.export

    def is_model_config(self, raw) -> bool:
        from compt.clip.grow import is_model_config

        return is_model_config(raw)

    def grow_job(self, small_raw: dict, big_raw: dict, **kw):
        from compt.clip.grow import grow_job

        return grow_job(small_raw, big_raw, **kw)

    def config_hint(self, raw) -> str:
        from compt.clip.grow import config_hint

        return config_hint(raw)
