"""What a chain stage needs to know about CLIP models: build, grow, feed, score, count, save.

The stage pipeline (compt/stage.py) is family-agnostic and calls these methods; the
LLaMA family (compt/llama/family.py) implements the same ones.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from compt.clip.grow import plan_tensor
from compt.clip.model import build_clip, export_name_and_tensor, load_into, preprocess_for, write_model_config
from compt.evaluate import embedding_cosine, evaluate
from compt.flops import count_sample_flops
from compt.loader import Batch, eval_loader, train_loader
from compt.losses import ChainLoss, LossParts


class ClipFamily:
    name = "clip"
    curve_names = ("contrastive", "alignment")
    # open_clip initialises nested modules after construction: a model built inside
    # zero.Init() would keep PyTorch's defaults, so it is built in full unless every
    # weight is overwritten anyway (see stage.init_student).
    partitioned_build_ok = True

    def build(self, model_cfg: dict, teacher_cfg: dict | None) -> torch.nn.Module:
        return build_clip(model_cfg, align_to_dim=teacher_cfg["embed_dim"] if teacher_cfg else None)

    def plan(self, name: str, prev_cfg: dict, model_cfg: dict, mode: str, noise: float, seed: int):
        return plan_tensor(name, prev_cfg, model_cfg, mode, noise, seed)

    def load_teacher(self, model_cfg: dict, weights: Path) -> torch.nn.Module:
        teacher = build_clip(model_cfg)
        load_into(teacher, load_file(str(weights)))
        return teacher.eval().requires_grad_(False)

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
        init = evaluate(engine, val_ds, pre, cfg.eval.batch_size, cfg.eval.zeroshot, retrieval=False)
        engine.train()
        return {"init_cosine": cosine, "init_zeroshot_top1": init["zeroshot_top1"]}

    def evaluate(self, engine, val_ds, model_cfg: dict, cfg) -> dict[str, Any]:
        return evaluate(engine, val_ds, preprocess_for(model_cfg), cfg.eval.batch_size, cfg.eval.zeroshot,
                        cfg.eval.retrieval)

    def sample_flops(self, model_cfg: dict, data) -> tuple[int, int]:
        """(student train, teacher forward) FLOPs per training sample."""
        f = count_sample_flops(model_cfg)
        return f.train, f.forward

    def export_name(self, name: str, tensor: torch.Tensor):
        return export_name_and_tensor(name, tensor)

    def is_exported(self, name: str) -> bool:
        return not name.startswith("align_proj.")

    def write_config(self, path: Path, model_cfg: dict) -> None:
        write_model_config(path, model_cfg)

    def summary(self, metrics: dict[str, Any]) -> dict[str, Any]:
        r = metrics.get("retrieval") or {}
        return {
            "zeroshot_top1": metrics.get("zeroshot_top1"),
            "zeroshot_top5": metrics.get("zeroshot_top5"),
            "i2t_R@1": (r.get("image_to_text") or {}).get("R@1"),
            "t2i_R@1": (r.get("text_to_image") or {}).get("R@1"),
            "init_zeroshot_top1": metrics.get("init_zeroshot_top1"),
        }
