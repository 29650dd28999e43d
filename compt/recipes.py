"""Training recipes for cost accounting: which models a chain trains, for how many samples.

A Recipe is plain data (models in chain order, each with its chain and baseline sample
budgets); it comes from a built-in preset (``paper-cc3m-vit``) or from a chain YAML.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from compt.families import DEFAULT_FAMILY, family_of



@dataclass(frozen=True)
class RecipeModel:
    """One model of the family: its model config and what it costs to train where."""

    name: str
    config: dict[str, Any]  # the model config its family builds (open_clip dict, LlamaConfig fields)
    chain_samples: int  # samples seen as a chain stage
    baseline_samples: int  # samples seen when trained from scratch on its own
    teacher: bool  # whether its chain stage runs the frozen predecessor forward on every sample
    chain_epochs: float | None = None  # for display; None when the dataset size is unknown
    baseline_epochs: float | None = None


@dataclass(frozen=True)
class Recipe:
    name: str
    models: tuple[RecipeModel, ...]
    samples_per_epoch: int | None = None
    captions_per_image: int = 1  # each sample's text tower runs this many times
    source: str = ""
    family: str = DEFAULT_FAMILY  # its cost counters; LLaMA: a sample is one training sequence of seq_len tokens
    seq_len: int | None = None  # language models: tokens per sample
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------
# Presets.
# ---------------------------------------------------------------------------

def paper_vit(vision: tuple[int, int], text: tuple[int, int, int]) -> dict[str, Any]:
    """A chain ViT of METHOD.md's table: patch 16, 224 px, head width 64, ctx 77, embed_dim 512."""
    v_layers, v_width = vision
    t_layers, t_width, t_heads = text
    return {
        "embed_dim": 512,
        "vision_cfg": {"image_size": 224, "layers": v_layers, "width": v_width, "patch_size": 16, "head_width": 64},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": t_width, "heads": t_heads,
                     "layers": t_layers},
    }


PAPER_MODELS = {
    "ViT-T-16": paper_vit((12, 192), (12, 256, 4)),
    "ViT-S-16": paper_vit((12, 384), (12, 384, 6)),
    "ViT-M-16": paper_vit((12, 512), (12, 448, 7)),
    "ViT-B-16": paper_vit((12, 768), (12, 512, 8)),
    "ViT-L-16": paper_vit((24, 1024), (12, 768, 12)),
}


def epoch_recipe(name: str, models: list[tuple[str, dict]], samples_per_epoch: int, chain_epochs: list[float],
                 baseline_epochs: list[float], captions_per_image: int = 1, source: str = "",
                 notes: list[str] | None = None) -> Recipe:
    """A recipe given in epochs of one dataset; every stage after the first aligns to its teacher."""
    if not len(models) == len(chain_epochs) == len(baseline_epochs):
        raise ValueError(f"{name}: give one chain and one baseline epoch count per model "
                         f"({len(models)} models, {len(chain_epochs)} chain, {len(baseline_epochs)} baseline)")
    return Recipe(
        name=name,
        models=tuple(
            RecipeModel(n, copy.deepcopy(cfg), chain_samples=round(ce * samples_per_epoch),
                        baseline_samples=round(be * samples_per_epoch), teacher=k > 0,
                        chain_epochs=ce, baseline_epochs=be)
            for k, ((n, cfg), ce, be) in enumerate(zip(models, chain_epochs, baseline_epochs))
        ),
        samples_per_epoch=samples_per_epoch, captions_per_image=captions_per_image, source=source,
        notes=list(notes or []),
    )


def paper_cc3m_vit() -> Recipe:
    names = ["ViT-T-16", "ViT-S-16", "ViT-B-16", "ViT-L-16"]
    return epoch_recipe(
        "paper-cc3m-vit", [(n, PAPER_MODELS[n]) for n in names], samples_per_epoch=2_890_000,
        chain_epochs=[128, 24, 16, 16], baseline_epochs=[128, 128, 128, 128], captions_per_image=7,
        source="METHOD.md, Reference recipes (CC3M)",
        notes=["CC3M, 2.89M pairs per epoch, 7 captions per image (1 original + 6 long-caption sentences)",
               "baseline: every model 128 epochs from scratch; chain: T 128, S 24, B 16, L 16 epochs"],
    )


RECIPE_PRESETS = {"paper-cc3m-vit": paper_cc3m_vit}


# ---------------------------------------------------------------------------
# From a chain config (the YAML the launcher trains).
# ---------------------------------------------------------------------------

def recipe_from_chain(chain: str, baseline_epochs: float | None = None, captions_per_image: int = 1) -> Recipe:
    """The recipe a chain YAML (or chain preset such as ``demo``) trains.

    Chain samples per stage are exactly what the launcher will count: steps x global batch,
    with steps from the stage's budget and the training split's size.
    The baseline of every model (from scratch) is the first stage's sample budget, the
    usual CoM-PT protocol (the first model *is* the baseline run), unless baseline_epochs
    is given. A stage aligns to its teacher (and pays its forward) when its transfer has
    align true and alpha > 0, as in compt.stage.
    """
    from compt.config import load_chain

    cfg = load_chain(chain)
    size = _train_size(cfg) if baseline_epochs is not None or any(
        s.budget.epochs is not None for s in cfg.stages) else None

    def samples(k: int) -> int:
        stage = cfg.stages[k]
        batch = stage.settings(cfg.defaults).batch_size
        return stage.budget.steps_for(size or 0, batch) * batch

    chain_samples = [samples(k) for k in range(len(cfg.stages))]
    base = round(baseline_epochs * size) if baseline_epochs is not None else chain_samples[0]
    models = []
    for k, stage in enumerate(cfg.stages):
        t = cfg.transfer(k)
        models.append(RecipeModel(
            stage.name, cfg.model_cfg(k), chain_samples=chain_samples[k], baseline_samples=base,
            teacher=t is not None and t.align and t.alpha > 0,
            chain_epochs=chain_samples[k] / size if size else None, baseline_epochs=base / size if size else None,
        ))
    how = f"{baseline_epochs} epochs" if baseline_epochs is not None else "the first stage's budget"
    return Recipe(cfg.name, tuple(models), samples_per_epoch=size, captions_per_image=captions_per_image,
                  source=chain, notes=[f"chain config {chain}; baseline: every model from scratch for {how}"],
                  family=cfg.family, seq_len=getattr(cfg.data, "seq_len", None))


def _train_size(cfg) -> int:
    return family_of(cfg.family).train_size(cfg.data)


def load_recipe(name_or_path: str, baseline_epochs: float | None = None) -> Recipe:
    """A recipe preset by name, else a chain preset or YAML path (see recipe_from_chain)."""
    if name_or_path in RECIPE_PRESETS:
        if baseline_epochs is not None:
            raise ValueError(f"--baseline-epochs applies to chain configs; preset '{name_or_path}' "
                             "fixes its own baseline")
        return RECIPE_PRESETS[name_or_path]()
    return recipe_from_chain(name_or_path, baseline_epochs)
