"""Measured acceleration of CoM-PT vs training every model from scratch, quality side by side.

    python benchmarks/acceleration.py --quick                   # minutes: tiny CLIPs, main comparison only
    python benchmarks/acceleration.py                           # the full CLIP study (see --help for its parts)
    python benchmarks/acceleration.py --family llama --quick    # minutes: tiny LLaMAs
    python benchmarks/acceleration.py --family llama            # the full LLaMA study

Every chain runs through the real launcher (``deepspeed launch/chain.py``) and every figure is
read back from the run directories it writes (RUN/stages/<k>-<name>/metrics.json): the family's
quality figure, counted FLOPs (flops.total), wall seconds. Families (--family):

- clip: open_clip CLIPs on the built-in digit-numbers data; quality = zero-shot top-1 (higher
  is better; retrieval R@1 beside it).
- llama: transformers LLaMAs on the built-in pydoc corpus (a BPE tokenizer trained into every
  run dir); quality = validation perplexity (lower is better); the feature space is KL
  distillation from the teacher's next-token distributions.

Methods:

- baseline: one chain whose stages all use ``transfer: {init: none, align: false}`` and the
  full budget, i.e. every model from scratch (the launcher only needs each stage to be
  larger than the previous one, which a family is).
- official / exact: CoM-PT, the first model with the full budget, every later model with
  ``chain_fraction`` of it, grown (init official|exact) and aligned (align true).
  ``exact`` runs only when the chain config accepts ``init: exact`` (checked with
  compt.config.load_chain); otherwise it is skipped with a note.

Studies: main (3 methods x seeds), compute to reach the baseline's quality (CoM-PT chains at
several uniform stage-budget fractions; "reached" = within --match-tolerance of the baseline),
chain length (2, 3, 4 models between the same smallest and largest), ablation (parameter space
only, feature space only, both, neither).

The first stage of a CoM-PT chain is the same computation as the baseline's first stage
(same model, budget, seed and data). Unless --retrain-first-stage is given, a chain's run
directory is seeded with the baseline's finished first stage and the launcher's resume
skips it (its sha256 is checked); its FLOPs and wall time still count in the chain. One
chain per seed always retrains it, and the JSON records whether both came out identical.

Outputs: benchmarks/results/acceleration-<name>.{json,md,png}; run directories under --workdir
(finished runs are reused when the benchmark runs again with the same settings).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import cached_property
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import yaml

from compt import families
from compt.families import DEFAULT_FAMILY

REPO = Path(__file__).resolve().parents[1]
DS_CONFIG = "ds_configs/zero3.json"
BASELINE = {"init": "none", "align": False}
REUSED_MARK = "FIRST_STAGE_FROM_BASELINE"  # in a run dir whose first stage was copied from the baseline


# ---------------------------------------------------------------------------
# What to run.
# ---------------------------------------------------------------------------

def clip_model(width: int, layers: int, head_width: int = 32, embed_dim: int = 64, image_size: int = 32,
               patch_size: int = 8, context_length: int = 20) -> dict[str, Any]:
    """A small open_clip CLIP: the same width/depth for both towers, one head per head_width channels."""
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": image_size, "patch_size": patch_size, "width": width, "layers": layers,
                       "head_width": head_width},
        "text_cfg": {"context_length": context_length, "vocab_size": 49408, "width": width,
                     "heads": width // head_width, "layers": layers},
    }


def llama_model(hidden: int, layers: int, heads: int, kv_heads: int, mlp: int, vocab: int,
                context: int) -> dict[str, Any]:
    """A small LlamaForCausalLM config with tied embeddings; head_dim 16 in every size, so exact growth applies."""
    return {"vocab_size": vocab, "hidden_size": hidden, "intermediate_size": mlp, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": 16,
            "max_position_embeddings": context, "tie_word_embeddings": True}


@dataclass
class Setup:
    """One benchmark mode: the model family, budgets and which studies run."""

    models: dict[str, dict]  # the family, smallest first
    main: list[str]  # the chain of the main comparison (>= 3 models)
    lengths: list[list[str]]  # chain-length study: same smallest and largest model
    baseline_steps: int  # every model's from-scratch budget; also the first chain stage's
    chain_fraction: float  # later chain stages train this fraction of baseline_steps
    search_fractions: list[float]  # compute-to-reach study
    seeds: int
    studies: list[str]
    batch_size: int = 64
    lr: float = 2e-3
    warmup_fraction: float = 0.05
    alpha: float | None = None  # alignment weight of aligned chains; None: the family's alpha_default
    eval_batch_size: int = 300
    match_tolerance: float = 0.0  # "matches the baseline": see Quality.matches
    family: str = DEFAULT_FAMILY  # a compt model family (compt.families) with a preset in PRESETS
    data: dict = field(default_factory=lambda: {"kind": "digit-numbers"})
    exact_noise: float = 0.0  # symmetry-breaking noise of exact growth (the grown function is kept)
    model_lr: dict[str, float] = field(default_factory=dict)  # per-model peak lr (else lr), same in every method
    methods: list[str] = field(default_factory=lambda: ["official", "exact"])  # keys of GROWTH: the CoM-PT chains

    def lr_of(self, model: str) -> float:
        return self.model_lr.get(model, self.lr)

    def lr_text(self) -> str:
        if not self.model_lr:
            return f"lr {self.lr:g}"
        return "peak lr " + ", ".join(f"{m} {self.lr_of(m):g}" for m in self.models) + " (the same in every method)"

    def steps(self, fraction: float) -> int:
        return max(1, round(fraction * self.baseline_steps))


FULL = Setup(
    models={"xs": clip_model(64, 2), "s": clip_model(96, 2), "m": clip_model(128, 2), "l": clip_model(128, 4)},
    main=["xs", "m", "l"],
    lengths=[["xs", "l"], ["xs", "m", "l"], ["xs", "s", "m", "l"]],
    baseline_steps=1000, chain_fraction=0.25, search_fractions=[0.125, 0.25, 0.5],
    seeds=3, studies=["main", "search", "length", "ablation"],
    # From scratch at lr 2e-3 (seed 0) l reached 61.4% top-1, below m's 76.2%; at 1e-3, 78.8%.
    model_lr={"l": 1e-3},
)

QUICK = Setup(
    models={"xs": clip_model(32, 1, head_width=16), "m": clip_model(64, 1, head_width=16),
            "l": clip_model(64, 2, head_width=16)},
    main=["xs", "m", "l"],
    lengths=[["xs", "m", "l"]],
    baseline_steps=120, chain_fraction=0.25, search_fractions=[0.25],
    seeds=1, studies=["main", "search"],
)

# Widths x1.5-3 between sizes, depth 2 -> 3 -> 4, grouped-query attention: every link (and xs -> l
# directly, for the chain-length study) is an exact growth. Sized for 2 CPU cores: the 4 models from
# scratch take about 3 minutes there, the whole study with 1 seed about 18.
LLAMA_FULL = Setup(
    models={"xs": llama_model(32, 2, 2, 1, 96, 2048, 64), "s": llama_model(64, 2, 4, 2, 176, 2048, 64),
            "m": llama_model(96, 3, 6, 2, 256, 2048, 64), "l": llama_model(128, 4, 8, 2, 352, 2048, 64)},
    main=["xs", "m", "l"],
    lengths=[["xs", "l"], ["xs", "m", "l"], ["xs", "s", "m", "l"]],
    baseline_steps=300, chain_fraction=0.25, search_fractions=[0.125, 0.25, 0.5],
    seeds=3, studies=["main", "search", "length", "ablation"],
    family="llama", data={"kind": "pydoc", "seq_len": 64, "vocab_size": 2048},
    batch_size=32, lr=3e-3, alpha=1.0, eval_batch_size=64, match_tolerance=0.05, exact_noise=0.01,
)

LLAMA_QUICK = Setup(
    models={"xs": llama_model(32, 1, 2, 1, 64, 512, 32), "m": llama_model(64, 1, 4, 2, 128, 512, 32),
            "l": llama_model(64, 2, 4, 2, 128, 512, 32)},
    main=["xs", "m", "l"],
    lengths=[["xs", "m", "l"]],
    baseline_steps=40, chain_fraction=0.25, search_fractions=[0.25],
    seeds=1, studies=["main", "search"],
    family="llama", data={"kind": "pydoc", "seq_len": 32, "vocab_size": 512},
    batch_size=16, lr=3e-3, alpha=1.0, eval_batch_size=64, match_tolerance=0.05, exact_noise=0.01,
)

STUDIES = ("main", "search", "length", "ablation")

# The CoM-PT variants a study can compare with the baseline (--methods): each later stage's transfer.
GROWTH = {
    "official": {"init": "official", "align": True},
    "exact": {"init": "exact", "align": True},
    "param-only-official": {"init": "official", "align": False},
    "param-only-exact": {"init": "exact", "align": False},
}


# ---------------------------------------------------------------------------
# How the benchmark runs and shows a model family. What the family is (its quality figure, which way is
# better, its default alignment weight) is compt's: compt.families.family_of(name).
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class QualityStyle:
    """How the benchmark matches and shows a family's quality figure."""

    relative_tolerance: bool  # match_tolerance is a fraction of the baseline's value (else absolute)
    percent: bool  # a fraction shown as a percentage
    plot_scale: float = 1.0


@dataclass(frozen=True)
class Quality:
    """The figure a family's models are compared by, and which way is better (the family's own
    compt.families.Quality), with how the benchmark matches and shows it."""

    key: str  # per-stage metrics.json figure; init_<key> is the grown model's at step 0
    label: str  # how tables name it
    higher_is_better: bool
    relative_tolerance: bool
    percent: bool
    plot_scale: float = 1.0

    def matches(self, value: float, baseline: float, tolerance: float) -> bool:
        """Whether a CoM-PT model is as good as its from-scratch baseline, within ``tolerance``."""
        slack = tolerance * abs(baseline) if self.relative_tolerance else tolerance
        return value >= baseline - slack if self.higher_is_better else value <= baseline + slack

    def rule(self, tolerance: float) -> str:
        if self.higher_is_better:
            bound = f">= baseline {self.label} " + (f"x (1 - {tolerance:g})" if self.relative_tolerance
                                                   else f"- {tolerance:g}")
        else:
            bound = f"<= baseline {self.label} " + (f"x (1 + {tolerance:g})" if self.relative_tolerance
                                                   else f"+ {tolerance:g}")
        return (f"'Matches the baseline' means {self.label} {bound}: on the means over seeds in the main "
                f"comparison, on seed 0 (both sides) in the budget search.")

    def format(self, x: float | None, std: float | None = None) -> str:
        return _pct(x, std) if self.percent else _num(x, std)

    def gap(self, value: float, baseline: float) -> str:
        """How far ``value`` is from the baseline's, in the units the tolerance uses."""
        if self.relative_tolerance:
            return _ratio(value, baseline)
        return f"{100 * (value - baseline):+.1f} points" if self.percent else f"{value - baseline:+.3g}"


@dataclass(frozen=True)
class Preset:
    """What the benchmark runs for a model family and how it reports it; the family is ``full.family``."""

    full: Setup
    quick: Setup
    about: str  # for --help
    result_prefix: str  # default results name: <prefix>quick / <prefix>full
    untagged_alpha: float  # the weight of aligned chains whose ids name none (see alpha_tag)
    quality_style: QualityStyle
    side: tuple[str, ...]  # other per-model figures, averaged over seeds like the quality
    init: tuple[str, ...]  # figures of a grown model at step 0
    figures: Callable[[dict], dict]  # metrics.json -> the figures above (and more), in table order
    columns: tuple[tuple[str, Callable[[dict], str]], ...]  # main table: header, cell of a per-model row
    main_caption: str
    library: tuple[str, str]  # (name shown, package) whose version goes with the machine
    data_caption: Callable[[dict], str]  # the results' setup -> a short description of the data
    notes: Callable[[Setup], list[str]]  # notes on quality, cost, budgets and the match rule
    quick_note: str
    ylabel: str
    yscale: str
    decorate: Callable[[Any, dict], None]  # (axes, result): reference lines on the plot
    findings: Callable[[dict], list[str]]  # result -> sentences on what the tables show (rendered, not stored)

    @property
    def family(self) -> str:
        return self.full.family

    @cached_property
    def quality(self) -> Quality:
        """The family's quality figure (compt's), matched and shown in this preset's style."""
        q = families.family_of(self.family).quality
        return Quality(q.key, q.label, q.higher_is_better, **asdict(self.quality_style))


def clip_figures(m: dict) -> dict:
    r = m.get("retrieval") or {}
    return {"zeroshot_top1": m["zeroshot_top1"], "zeroshot_top5": m["zeroshot_top5"],
            "i2t_R@1": (r.get("image_to_text") or {}).get("R@1"), "t2i_R@1": (r.get("text_to_image") or {}).get("R@1"),
            "init_zeroshot_top1": m.get("init_zeroshot_top1")}


def llama_figures(m: dict) -> dict:
    return {"val_ppl": m["val_ppl"], "val_loss": m["val_loss"], "init_val_ppl": m.get("init_val_ppl"),
            "teacher_val_ppl": m.get("teacher_val_ppl")}


FLOPS_NOTE = ("FLOPs are the launcher's counted flops.total per stage (student forward+backward + teacher forward, "
              "torch.utils.flop_counter); the first model is counted in the baseline and in every chain.")
WALL_NOTE = ("Wall time is the sum of the stages' wall_seconds (build, growth, training, evaluation, saving); launcher "
             "start-up is excluded. 'train seconds' stops before the final evaluation.")


def clip_notes(setup: Setup) -> list[str]:
    family = families.family_of(setup.family)
    return [
        "Quality is zero-shot top-1 over all 90 classes of the digit-numbers val split (900 images built from "
        "digit images never seen in training; 9 of the 90 numbers never appear in training at all).",
        FLOPS_NOTE, WALL_NOTE,
        f"Budgets: every from-scratch model {setup.baseline_steps} steps at global batch {setup.batch_size}; "
        f"CoM-PT later stages {setup.chain_fraction:g} of that; {setup.lr_text()}, warmup "
        f"{setup.warmup_fraction:g} of each stage's steps, cosine to 0, " + (
            f"alpha {setup.alpha:g}." if setup.alpha is not None else
            f"alpha: compt's defaults, {family.alpha_default('official'):g} after official growth (and random "
            f"init), {family.alpha_default('exact'):g} after exact growth."),
        preset_of(setup).quality.rule(setup.match_tolerance),
    ]


def pydoc_blocks(data: dict) -> tuple[int, int]:
    """(train, val) blocks of the pydoc corpus under ``data``; the tokenizer is trained in a temporary folder."""
    import tempfile

    from compt.text import build_text_datasets
    from compt.text.config import TextDataConfig

    with tempfile.TemporaryDirectory() as tmp:
        built = build_text_datasets(TextDataConfig(**data), tmp)
        return len(built.train), len(built.val)


def llama_notes(setup: Setup) -> list[str]:
    seq_len, vocab = setup.data["seq_len"], setup.data["vocab_size"]
    train, val = pydoc_blocks(setup.data)
    tokens = setup.baseline_steps * setup.batch_size * seq_len
    return [
        f"Quality is validation perplexity, exp of the mean next-token cross-entropy over every token of the "
        f"held-out pydoc documents ({val} blocks of {seq_len} + 1 tokens; training split: {train} blocks); lower is "
        f"better. The corpus is Python's documentation topics (pydoc_data), split by whole documents; the "
        f"byte-level BPE tokenizer (vocab {vocab}) is trained on the training documents inside every run "
        f"directory (identically in every run).",
        FLOPS_NOTE.replace("teacher forward,", f"teacher forward, per training sequence of {seq_len} tokens, "
                                               "logits at every position;"),
        WALL_NOTE,
        f"Budgets: every from-scratch model {setup.baseline_steps} steps at global batch {setup.batch_size} "
        f"sequences ({tokens:,} tokens, {setup.baseline_steps * setup.batch_size / train:.1f} epochs of the "
        f"training split); CoM-PT later stages {setup.chain_fraction:g} of that; {setup.lr_text()}, warmup "
        f"{setup.warmup_fraction:g} of each stage's steps, cosine to 0. Feature space = KL distillation: "
        f"alpha {setup.alpha:g} x KL(teacher || student) over next-token distributions at temperature 1, next to "
        f"the next-token loss; parameter space = growth (exact growth with noise {setup.exact_noise:g}, which "
        f"keeps the function)." + (" compt's own LLaMA default is no distillation (alpha 0); the study sets it "
                                    "to measure the method with it." if setup.alpha else ""),
        preset_of(setup).quality.rule(setup.match_tolerance),
    ]


def clip_decorate(ax, result: dict) -> None:
    if ax.get_ylim()[0] < 20:  # near chance: show it
        ax.axhline(100 / 90, color="black", lw=0.8, ls=":", label="chance (1/90)")


def llama_decorate(ax, result: dict) -> None:
    """The bar the largest model has to clear: its from-scratch perplexity, plus the tolerance."""
    q, tol = preset_of(result["setup"]).quality, result["setup"]["match_tolerance"]
    last = result["summary"]["main"]["baseline"]["per_model"][-1]
    bar = last[q.key] * (1 + tol) if q.relative_tolerance else last[q.key] + tol
    ax.axhline(bar, color="black", lw=0.8, ls=":",
               label=f"{last['name']} from scratch" + (f" x (1 + {tol:g})" if tol else ""))


# The benchmark's presets, by compt family name (--family).
PRESETS: dict[str, Preset] = {p.family: p for p in (
    Preset(
        full=FULL, quick=QUICK, about="CLIPs on digit-numbers, quality = zero-shot top-1", result_prefix="",
        untagged_alpha=500.0,  # the CLIP paper's
        quality_style=QualityStyle(relative_tolerance=False, percent=True, plot_scale=100.0),
        side=("i2t_R@1", "t2i_R@1"), init=("init_zeroshot_top1",), figures=clip_figures,
        columns=(("top-1", lambda r: _pct(r["zeroshot_top1"], r["zeroshot_top1_std"])),
                 ("I→T R@1", lambda r: _pct(r["i2t_R@1"])), ("T→I R@1", lambda r: _pct(r["t2i_R@1"])),
                 ("init top-1", lambda r: _pct(r.get("init_zeroshot_top1")))),
        main_caption="zero-shot top-1 and retrieval R@1 on the val split; mean ± std over seeds",
        library=("open_clip", "open_clip_torch"),
        data_caption=lambda setup: "digit-numbers (90 classes, 8,100 train / 900 val)",
        notes=clip_notes,
        quick_note="QUICK MODE: a check of the whole pipeline (launcher, accounting, reports) with budgets far "
                   "below what these models need to learn 90 classes (chance is 1.1%); its qualities are not a "
                   "measurement of CoM-PT. The full mode is the measurement.",
        ylabel="zero-shot top-1 on digit-numbers val (%)", yscale="linear", decorate=clip_decorate,
        findings=lambda result: verdicts(result),
    ),
    Preset(
        full=LLAMA_FULL, quick=LLAMA_QUICK, about="LLaMAs on the pydoc corpus, quality = validation perplexity",
        result_prefix="llama-", untagged_alpha=1.0,  # compt's first LLaMA default
        quality_style=QualityStyle(relative_tolerance=True, percent=False),
        side=("val_loss",), init=("init_val_ppl", "teacher_val_ppl"), figures=llama_figures,
        columns=(("val ppl", lambda r: _num(r["val_ppl"], r["val_ppl_std"])),
                 ("vs baseline", lambda r: _ratio(r["val_ppl"], r.get("baseline_val_ppl"))),
                 ("val loss", lambda r: _num(r["val_loss"], digits=3)),
                 ("init val ppl", lambda r: _num(r.get("init_val_ppl"))),
                 ("teacher val ppl", lambda r: _num(r.get("teacher_val_ppl")))),
        main_caption="validation perplexity on held-out pydoc documents, lower is better; 'vs baseline' = "
                     "val ppl / the from-scratch model's; mean ± std over seeds",
        library=("transformers", "transformers"),
        data_caption=lambda setup: (f"pydoc (Python's documentation topics), seq_len {setup['data']['seq_len']}, "
                                    f"BPE vocab {setup['data']['vocab_size']}"),
        notes=llama_notes,
        quick_note="QUICK MODE: a check of the whole pipeline (launcher, accounting, reports) with tiny models "
                   "and budgets far below what they need; its perplexities are not a measurement of CoM-PT. "
                   "The full mode is the measurement.",
        ylabel="validation perplexity on pydoc (log scale; lower is better)", yscale="log",
        decorate=llama_decorate, findings=lambda result: verdicts(result),
    ),
)}


def preset_of(setup: Setup | dict) -> Preset:
    """The preset of a Setup's family, or of the setup recorded in a results JSON (older results, all
    of the default family, name none)."""
    return PRESETS[setup.family if isinstance(setup, Setup) else setup.get("family", DEFAULT_FAMILY)]


@dataclass
class RunSpec:
    """One chain through the launcher."""

    id: str
    method: str  # baseline | official | exact | an ablation label
    models: list[str]
    seed: int
    fraction: float  # later stages' budget as a fraction of the baseline budget (1 for the baseline)
    transfer: dict | None  # None: baseline (from scratch, full budget for every stage)
    studies: set[str] = field(default_factory=set)


def chain_dict(setup: Setup, spec: RunSpec) -> dict[str, Any]:
    stages = []
    for k, name in enumerate(spec.models):
        steps = setup.baseline_steps if k == 0 or spec.transfer is None else setup.steps(spec.fraction)
        stage = {"name": name, "model": setup.models[name], "budget": {"steps": steps},
                 "warmup_steps": max(1, round(setup.warmup_fraction * steps))}
        if name in setup.model_lr:
            stage["lr"] = setup.model_lr[name]
        if k > 0:
            transfer = dict(BASELINE) if spec.transfer is None else dict(spec.transfer)
            if transfer.get("align"):
                transfer.setdefault("alpha", chain_alpha(setup, transfer["init"]))
            if transfer.get("init") == "exact" and setup.exact_noise:
                transfer.setdefault("noise", setup.exact_noise)
            stage["transfer"] = transfer
        stages.append(stage)
    return {
        "name": spec.id, "family": setup.family, "seed": spec.seed,
        "data": dict(setup.data),
        "eval": {"batch_size": setup.eval_batch_size},
        "defaults": {"lr": setup.lr, "batch_size": setup.batch_size, "log_every": 50},
        "stages": stages,
    }


def exact_available(setup: Setup, workdir: Path) -> tuple[bool, str]:
    """Whether the chain config accepts ``init: exact`` (another part of compt may add it)."""
    from compt.config import ChainConfigError, load_chain

    probe = RunSpec("probe-exact", "exact", setup.main, 0, setup.chain_fraction, {"init": "exact", "align": True})
    path = workdir / "probe-exact.yaml"
    path.write_text(yaml.safe_dump(chain_dict(setup, probe), sort_keys=False))
    try:
        load_chain(str(path))
    except ChainConfigError as e:
        return False, f"exact skipped: this compt's chain config rejects init: exact ({' '.join(e.problems)})"
    return True, "exact: the chain config accepts init: exact"


def chain_alpha(setup: Setup, init: str) -> float:
    """The alignment weight of an aligned chain: --alpha, else the family's default for its growth."""
    return setup.alpha if setup.alpha is not None else families.family_of(setup.family).alpha_default(init)


def alpha_tag(setup: Setup, transfer: dict) -> str:
    """An aligned chain's id names its weight where it is not the preset's untagged_alpha (the weight of the
    chains whose ids predate weights in ids), so studies at other weights share a workdir (its baselines,
    unaligned chains and untagged chains) without replacing each other's."""
    if not transfer["align"]:
        return ""
    alpha = chain_alpha(setup, transfer["init"])
    return "" if alpha == preset_of(setup).untagged_alpha else f"-a{alpha:g}"


def growth_methods(setup: Setup, exact: bool) -> list[str]:
    """The CoM-PT methods this study compares (exact ones only where the chain config accepts exact growth)."""
    return [m for m in setup.methods if exact or GROWTH[m]["init"] != "exact"]


def plan(setup: Setup, exact: bool) -> list[RunSpec]:
    """Every run the selected studies need, identical chains merged (one run serves several studies)."""
    growth = growth_methods(setup, exact)
    runs: dict[str, RunSpec] = {}

    def add(method: str, models: list[str], seed: int, fraction: float, transfer: dict | None, study: str):
        tag = "baseline" if transfer is None else f"{method}{alpha_tag(setup, transfer)}-f{fraction:g}"
        rid = f"{tag}-{'-'.join(models)}-seed{seed}"
        spec = runs.setdefault(rid, RunSpec(rid, method, models, seed, fraction, transfer))
        spec.studies.add(study)

    family = list(setup.models)
    needed = set(setup.main) | ({m for c in setup.lengths for m in c} if "length" in setup.studies else set())
    for seed in range(setup.seeds):
        # The baseline of a seed covers every model a study of that seed compares against.
        models = [m for m in family if m in needed] if seed == 0 else list(setup.main)
        add("baseline", models, seed, 1.0, None, "main")
        for method in growth:
            add(method, setup.main, seed, setup.chain_fraction, dict(GROWTH[method]), "main")
    for method in growth:
        if "search" in setup.studies:
            for f in setup.search_fractions:
                add(method, setup.main, 0, f, dict(GROWTH[method]), "search")
        if "length" in setup.studies:
            for chain in setup.lengths:
                add(method, chain, 0, setup.chain_fraction, dict(GROWTH[method]), "length")
    if "ablation" in setup.studies:
        f = setup.chain_fraction
        for init in dict.fromkeys(GROWTH[m]["init"] for m in growth):
            add(init, setup.main, 0, f, dict(GROWTH[init]), "ablation")
            add(f"param-only-{init}", setup.main, 0, f, dict(GROWTH[f"param-only-{init}"]), "ablation")
        add("feature-only", setup.main, 0, f, {"init": "none", "align": True}, "ablation")
        add("neither", setup.main, 0, f, {"init": "none", "align": False}, "ablation")
    # Baselines first: every chain of a seed reuses its baseline's first stage.
    return sorted(runs.values(), key=lambda r: (r.seed, r.transfer is not None))


# ---------------------------------------------------------------------------
# Running through the launcher.
# ---------------------------------------------------------------------------

class Launcher:
    def __init__(self, workdir: Path, port: int, retrain_first: bool, log=print):
        self.workdir, self.port, self.retrain_first, self.log = workdir, port, retrain_first, log
        self.first_stage: dict[int, Path] = {}  # seed -> the baseline's finished first stage dir
        self.retrained: set[int] = set()  # seeds whose first stage was checked by retraining it once

    def run(self, setup: Setup, spec: RunSpec) -> dict[str, Any]:
        from compt.config import load_chain

        chain_path = self.workdir / f"{spec.id}.yaml"
        chain_path.write_text(yaml.safe_dump(chain_dict(setup, spec), sort_keys=False))
        cfg = load_chain(str(chain_path), REPO / DS_CONFIG)  # every problem, before any compute
        run_dir = self.workdir / spec.id
        self.port = free_port(self.port)
        cmd = ["deepspeed", "--master_port", str(self.port), "launch/chain.py", "--chain", str(chain_path),
               "--ds_config", DS_CONFIG, "--output", str(run_dir)]
        self.port += 1
        launch_seconds = 0.0
        earlier = self._finished(run_dir, cfg)
        if not earlier and (run_dir / "manifest.json").is_file() and not self._same_config(run_dir, cfg):
            # Settings (or compt's config schema) changed since that run: keep it aside, train anew.
            stale = run_dir.with_name(run_dir.name + ".stale")
            shutil.rmtree(stale, ignore_errors=True)
            run_dir.rename(stale)
            self.log(f"  {spec.id}: {run_dir} holds another config; moved it to {stale}")
        if not earlier:
            if spec.transfer is not None and spec.seed in self.first_stage and not run_dir.exists():
                if self.retrain_first or spec.seed not in self.retrained:
                    self.retrained.add(spec.seed)  # this run trains its first stage: a determinism check
                else:
                    self._seed_first_stage(run_dir, cfg, self.first_stage[spec.seed])
            log_path = self.workdir / f"{spec.id}.log"
            for attempt in range(3):
                self.log(f"  {spec.id}: {shlex.join(cmd)}")
                t0 = time.time()
                with open(log_path, "w") as log:
                    proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
                launch_seconds = time.time() - t0
                # On a shared machine another job can take the port between our check and the launch.
                if proc.returncode == 0 or "EADDRINUSE" not in log_path.read_text() or attempt == 2:
                    break
                self.port = free_port(self.port + 1)
                cmd[2] = str(self.port)
                self.port += 1
            if proc.returncode != 0:
                tail = log_path.read_text()[-4000:]
                raise RuntimeError(f"{spec.id}: launcher exited with {proc.returncode}\n{tail}")
        else:
            self.log(f"  {spec.id}: finished earlier in {run_dir}, reusing")
        if spec.transfer is not None and not (run_dir / REUSED_MARK).exists():
            self.retrained.add(spec.seed)
        stages = read_stages(run_dir, preset_of(setup))
        if spec.transfer is None:
            self.first_stage.setdefault(spec.seed, run_dir / "stages" / f"0-{spec.models[0]}")
        return {"id": spec.id, "method": spec.method, "models": spec.models, "seed": spec.seed,
                "fraction": spec.fraction, "transfer": spec.transfer, "studies": sorted(spec.studies),
                "run_dir": str(run_dir), "chain_yaml": str(chain_path), "command": shlex.join(cmd),
                "finished_in_an_earlier_invocation": earlier, "launch_seconds": round(launch_seconds, 1), "first_stage_reused": (run_dir / REUSED_MARK).exists(),
                "stages": stages}

    def adopt_finished(self, setup: Setup, specs: list[RunSpec]) -> None:
        """Learn from chains an earlier invocation finished in the workdir (for --only-runs/--only-seeds,
        whose selection may leave out a seed's baseline): a finished baseline's first stage is given to
        this invocation's chains of its seed, and a finished chain that trained its own first stage is
        that seed's determinism check, so no chain here retrains it again."""
        from compt.config import ChainConfig

        for spec in specs:
            run_dir = self.workdir / spec.id
            # This invocation's config of the chain (not the YAML an earlier one left), as _finished compares it.
            if not self._finished(run_dir, ChainConfig.model_validate(chain_dict(setup, spec))):
                continue
            if spec.transfer is None:
                self.first_stage.setdefault(spec.seed, run_dir / "stages" / f"0-{spec.models[0]}")
            elif not (run_dir / REUSED_MARK).exists():
                self.retrained.add(spec.seed)

    @staticmethod
    def _same_config(run_dir: Path, cfg) -> bool:
        """What the launcher's resume requires: the same resolved chain config and DeepSpeed config."""
        from compt.engine import read_ds_config

        manifest = json.loads((run_dir / "manifest.json").read_text())
        return (manifest.get("config") == cfg.model_dump(mode="json")
                and manifest.get("ds_config") == read_ds_config(REPO / DS_CONFIG))

    @classmethod
    def _finished(cls, run_dir: Path, cfg) -> bool:
        manifest_path = run_dir / "manifest.json"
        if not manifest_path.is_file() or not cls._same_config(run_dir, cfg):
            return False
        return all(s["status"] == "done" for s in json.loads(manifest_path.read_text())["stages"])

    @staticmethod
    def _seed_first_stage(run_dir: Path, cfg, source: Path) -> None:
        """Give a new run the baseline's finished first stage; the launcher's resume verifies and skips it."""
        from compt.engine import read_ds_config
        from compt.rundir import RunDir
        from compt.stage import summary
        from compt.weights import sha256_file

        run = RunDir(run_dir)
        run.open(cfg, read_ds_config(REPO / DS_CONFIG))
        dst = run.stage_dir(0, cfg.stages[0].name)
        shutil.copytree(source, dst, ignore=shutil.ignore_patterns("checkpoints"))
        weights = dst / "model.safetensors"
        metrics = json.loads((dst / "metrics.json").read_text())
        run.update_stage(0, status="done", weights=str(weights.relative_to(run.root)), sha256=sha256_file(weights),
                         metrics=summary(metrics))
        (run_dir / REUSED_MARK).write_text(f"stage 0 copied from {source}\n")


def free_port(start: int) -> int:
    """The first port from ``start`` on that nothing listens on (DeepSpeed's rendezvous binds it)."""
    for port in range(start, start + 500):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {start}..{start + 499}; pass another --port")


def read_stages(run_dir: Path, fam: Preset) -> list[dict[str, Any]]:
    manifest = json.loads((run_dir / "manifest.json").read_text())
    out = []
    for entry in manifest["stages"]:
        m = json.loads((run_dir / entry["dir"] / "metrics.json").read_text())
        out.append({
            "name": entry["name"], "steps": m["steps"], "samples_seen": m["samples_seen"], **fam.figures(m),
            "flops": m["flops"]["total"], "student_flops": m["flops"]["student_train"],
            "teacher_flops": m["flops"]["teacher_forward"],
            "wall_seconds": m["wall_seconds"], "train_seconds": m.get("train_seconds"),
            "params": m.get("params"), "sha256": entry["sha256"],
        })
    return out


# ---------------------------------------------------------------------------
# Summaries.
# ---------------------------------------------------------------------------

def _mean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def _std(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.stdev(xs) if len(xs) > 1 else None


def _stage(run: dict, model: str) -> dict:
    return next(s for s in run["stages"] if s["name"] == model)


def _find(runs: list[dict], **match) -> list[dict]:
    return [r for r in runs if all(r[k] == v for k, v in match.items())]


def baseline_stage(runs: list[dict], model: str, seed: int) -> dict:
    for r in _find(runs, method="baseline", seed=seed):
        if model in r["models"]:
            return _stage(r, model)
    raise KeyError(f"no baseline run of {model} for seed {seed}")


def chain_summary(runs: list[dict], chain_runs: list[dict], fam: Preset) -> dict[str, Any]:
    """Per model (mean over seeds) and per chain: acceleration by FLOPs and by wall time vs the baseline."""
    q = fam.quality.key
    models = chain_runs[0]["models"]
    per_model = []
    base_flops = base_wall = base_train = chain_flops = chain_wall = chain_train = 0.0
    for name in models:
        stages = [_stage(r, name) for r in chain_runs]
        bases = [baseline_stage(runs, name, r["seed"]) for r in chain_runs]
        row = {"name": name}
        for key in (q, *fam.side, *fam.init, "flops", "wall_seconds", "train_seconds", "samples_seen"):
            row[key] = _mean([s[key] for s in stages])
        row[f"{q}_std"] = _std([s[q] for s in stages])
        row[f"{q}_seeds"] = [s[q] for s in stages]
        row[f"baseline_{q}"] = _mean([b[q] for b in bases])
        row["baseline_flops"] = _mean([b["flops"] for b in bases])
        per_model.append(row)
        base_flops += row["baseline_flops"]
        base_wall += _mean([b["wall_seconds"] for b in bases])
        base_train += _mean([b["train_seconds"] for b in bases])
        chain_flops += row["flops"]
        chain_wall += row["wall_seconds"]
        chain_train += row["train_seconds"]
    return {
        "models": models, "seeds": [r["seed"] for r in chain_runs], "per_model": per_model,
        "flops": chain_flops, "baseline_flops": base_flops,
        "wall_seconds": chain_wall, "baseline_wall_seconds": base_wall,
        "acceleration_flops": base_flops / chain_flops,
        "acceleration_wall": base_wall / chain_wall,
        "acceleration_train_seconds": base_train / chain_train,
    }


def baseline_summary(runs: list[dict], models: list[str], seeds: list[int], fam: Preset) -> dict[str, Any]:
    q = fam.quality.key
    per_model = []
    for name in models:
        stages = [baseline_stage(runs, name, s) for s in seeds]
        row = {"name": name}
        for key in (q, *fam.side, "flops", "wall_seconds", "train_seconds", "samples_seen"):
            row[key] = _mean([s[key] for s in stages])
        row[f"{q}_std"] = _std([s[q] for s in stages])
        row[f"{q}_seeds"] = [s[q] for s in stages]
        per_model.append(row)
    return {"models": models, "seeds": seeds, "per_model": per_model,
            "flops": sum(r["flops"] for r in per_model), "wall_seconds": sum(r["wall_seconds"] for r in per_model),
            "acceleration_flops": 1.0, "acceleration_wall": 1.0, "acceleration_train_seconds": 1.0}


def compute_to_reach(setup: Setup, runs: list[dict], method: str) -> list[dict[str, Any]]:
    """Per later model: the smallest searched stage budget whose quality matches its from-scratch baseline
    (seed 0; Quality.matches with setup.match_tolerance)."""
    quality = preset_of(setup).quality
    q = quality.key
    search = sorted(_find(runs, method=method, seed=0, models=setup.main), key=lambda r: r["fraction"])
    out = []
    for name in setup.main[1:]:
        base = baseline_stage(runs, name, 0)
        points = [{"fraction": r["fraction"], "steps": _stage(r, name)["steps"],
                   q: _stage(r, name)[q], "stage_flops": _stage(r, name)["flops"],
                   "chain_flops_through_model": sum(s["flops"] for s in r["stages"][:r["models"].index(name) + 1])}
                  for r in search]
        hit = next((p for p in points if quality.matches(p[q], base[q], setup.match_tolerance)), None)
        out.append({
            "model": name, f"baseline_{q}": base[q], "baseline_flops": base["flops"],
            "searched_fractions": [p["fraction"] for p in points], "points": points,
            "reached_at_fraction": hit["fraction"] if hit else None,
            "stage_flops_to_reach": hit["stage_flops"] if hit else None,
            "saving_vs_baseline": base["flops"] / hit["stage_flops"] if hit else None,
        })
    return out


def chain_length_study(setup: Setup, runs: list[dict], methods: list[str]) -> list[dict[str, Any]]:
    fam = preset_of(setup)
    q = fam.quality.key
    out = []
    for method in methods:
        for chain in setup.lengths:
            found = _find(runs, method=method, seed=0, models=chain, fraction=setup.chain_fraction)
            if not found:
                continue
            s = chain_summary(runs, found, fam)
            last = s["per_model"][-1]
            out.append({"method": method, "models": chain, "length": len(chain),
                        "acceleration_flops": s["acceleration_flops"], "acceleration_wall": s["acceleration_wall"],
                        f"largest_{q}": last[q], f"largest_baseline_{q}": last[f"baseline_{q}"],
                        f"mean_{q}": _mean([m[q] for m in s["per_model"]]),
                        f"mean_baseline_{q}": _mean([m[f"baseline_{q}"] for m in s["per_model"]])})
    return out


ABLATION_LABELS = {
    "official": "both (official init + align)", "exact": "both (exact init + align)",
    "param-only-official": "parameter space only (official init)", "param-only-exact": "parameter space only (exact init)",
    "feature-only": "feature space only (align, random init)", "neither": "neither (short budget from scratch)",
}


def ablation_study(setup: Setup, runs: list[dict]) -> list[dict[str, Any]]:
    fam = preset_of(setup)
    q = fam.quality.key
    out = []
    for method, label in ABLATION_LABELS.items():
        found = _find(runs, method=method, seed=0, models=setup.main, fraction=setup.chain_fraction)
        found = [r for r in found if "ablation" in r["studies"]]
        if not found:
            continue
        s = chain_summary(runs, found, fam)
        out.append({"variant": label, "method": method, "transfer": found[0]["transfer"],
                    "per_model": [{k: m[k] for k in ("name", q, *fam.init, *fam.side, "flops", f"baseline_{q}")}
                                  for m in s["per_model"]],
                    "acceleration_flops": s["acceleration_flops"]})
    return out


def first_stage_check(runs: list[dict], fam: Preset) -> list[dict[str, Any]]:
    """For every seed: did a chain that retrained its first stage reproduce the baseline's bit for bit?"""
    q = fam.quality.key
    out = []
    for r in runs:
        if r["transfer"] is None or r["first_stage_reused"]:
            continue
        base = baseline_stage(runs, r["models"][0], r["seed"])
        mine = r["stages"][0]
        out.append({"seed": r["seed"], "run": r["id"], "identical_weights": mine["sha256"] == base["sha256"],
                    q: mine[q], f"baseline_{q}": base[q]})
    return out


def predicted_costs(runs: list[dict]) -> dict[str, Any]:
    """`compt flops` on each main chain's YAML: the accounting tool must predict what the runs counted."""
    from compt.costs import chain_cost
    from compt.recipes import recipe_from_chain

    out = {}
    for r in runs:
        if r["seed"] != 0 or "main" not in r["studies"]:
            continue
        cost = chain_cost(recipe_from_chain(r["chain_yaml"]))
        measured = sum(s["flops"] for s in r["stages"])
        out[r["id"]] = {"predicted_chain_flops": cost.chain_flops, "measured_chain_flops": measured,
                        "equal": cost.chain_flops == measured}
    return out


def summarize(setup: Setup, runs: list[dict], exact: bool) -> dict[str, Any]:
    """Every study's tables from the finished runs (pure: reads only the run records)."""
    fam = preset_of(setup)
    methods = growth_methods(setup, exact)
    summary: dict[str, Any] = {"main": {"baseline": baseline_summary(runs, setup.main, list(range(setup.seeds)),
                                                                     fam)}}
    for method in methods:
        summary["main"][method] = chain_summary(
            runs, _find(runs, method=method, models=setup.main, fraction=setup.chain_fraction), fam)
        if GROWTH[method]["align"]:
            summary["main"][method]["alpha"] = chain_alpha(setup, GROWTH[method]["init"])
    if "search" in setup.studies:
        summary["compute_to_reach"] = {m: compute_to_reach(setup, runs, m) for m in methods}
    if "length" in setup.studies:
        summary["chain_length"] = chain_length_study(setup, runs, methods)
    if "ablation" in setup.studies:
        summary["ablation"] = ablation_study(setup, runs)
    summary["first_stage_reuse_check"] = first_stage_check(runs, fam)
    return summary


# ---------------------------------------------------------------------------
# Outputs.
# ---------------------------------------------------------------------------

def verdicts(result: dict[str, Any]) -> list[str]:
    """What the tables say, in sentences: did each CoM-PT model match its from-scratch baseline, and at what cost."""
    quality = preset_of(result["setup"]).quality
    q, tol, summary = quality.key, result["setup"]["match_tolerance"], result["summary"]
    fmt = quality.format
    base = summary["main"]["baseline"]["per_model"]
    out = [f"From scratch, every model at the full budget ({quality.label}): "
           + ", ".join(f"{row['name']} {fmt(row[q])}" for row in base) + "."]
    for small, big in zip(base, base[1:]):
        if quality.matches(small[q], big[q], tol):  # the bigger model is not clearly better
            out.append(f"From scratch, {big['name']} is only {quality.gap(big[q], small[q])} vs {small['name']} "
                       f"(within the tolerance): at this budget the larger model barely improves on the smaller one, "
                       f"an easy baseline for a chain model that inherits a trained predecessor.")
    for method, c in summary["main"].items():
        if method == "baseline":
            continue
        parts = []
        for row in c["per_model"][1:]:
            value, base = row[q], row[f"baseline_{q}"]
            verdict = "matches" if quality.matches(value, base, tol) else "does NOT match"
            parts.append(f"{row['name']} {quality.format(value)} vs {quality.format(base)} from scratch "
                         f"({quality.gap(value, base)}: {verdict})")
        out.append(f"**{method}** (main comparison, {quality.label}): acceleration {_x(c['acceleration_flops'])} by "
                   f"FLOPs, {_x(c['acceleration_wall'])} by wall time; " + "; ".join(parts) + ".")
    for method, rows in (summary.get("compute_to_reach") or {}).items():
        parts = []
        for row in rows:
            if row["reached_at_fraction"] is None:
                parts.append(f"{row['model']} not reached at any searched budget "
                             f"(up to {max(row['searched_fractions']):g} of the from-scratch one)")
            else:
                parts.append(f"{row['model']} reached at {row['reached_at_fraction']:g} of the from-scratch budget "
                             f"({_x(row['saving_vs_baseline'])} fewer stage FLOPs)")
        out.append(f"**{method}**, compute to reach the baseline: " + "; ".join(parts) + ".")
    for method in dict.fromkeys(r["method"] for r in summary.get("chain_length") or []):
        rows = [r for r in summary["chain_length"] if r["method"] == method]
        out.append(f"Chain length, {method}: the largest model reaches "
                   + ", ".join(f"{fmt(r[f'largest_{q}'])} via {' → '.join(r['models'])} "
                               f"({_x(r['acceleration_flops'])} by FLOPs)" for r in rows)
                   + f"; {fmt(rows[0][f'largest_baseline_{q}'])} from scratch.")
    if summary.get("ablation"):
        rows = sorted(summary["ablation"], key=lambda r: r["per_model"][-1][q], reverse=quality.higher_is_better)
        last = rows[0]["per_model"][-1]
        out.append(f"Ablation, {last['name']} {quality.label} from best to worst: "
                   + ", ".join(f"{r['variant']} {fmt(r['per_model'][-1][q])}" for r in rows)
                   + f"; {fmt(last[f'baseline_{q}'])} from scratch.")
    if result["setup"]["seeds"] == 1:
        out.append("One seed: the seed-to-seed spread is not measured, so small differences are not resolved.")
    return out


def machine(fam: Preset) -> dict[str, Any]:
    import torch

    def version(pkg):
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "deepspeed": version("deepspeed"), fam.library[1]: version(fam.library[1]),
            "cuda": torch.cuda.is_available()}


def _pct(x: float | None, std: float | None = None) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.1f}%" + (f" ± {100 * std:.1f}" if std is not None else "")


def _num(x: float | None, std: float | None = None, digits: int = 1) -> str:
    if x is None:
        return "-"
    return f"{x:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def _ratio(x: float | None, base: float | None) -> str:
    """x relative to base, as a signed percentage."""
    return "-" if x is None or base is None else f"{x / base - 1:+.1%}"


def _x(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def markdown(result: dict[str, Any]) -> str:
    from compt.flops import format_flops

    fam = preset_of(result["setup"])
    quality, q, label = fam.quality, fam.quality.key, fam.quality.label
    s = result["summary"]
    m = result["machine"]
    reused = sum(r["finished_in_an_earlier_invocation"] for r in result["runs"])
    lines = [
        f"# CoM-PT acceleration benchmark: {result['name']} ({result['mode']})", "",
        f"Command: `{result['command']}`  ",
        f"Machine: {m['platform']}, {m['cpu_count']} CPU(s) ({m['cpus_usable']} usable), torch {m['torch']} "
        f"({m['torch_threads']} threads), deepspeed {m['deepspeed']}, {fam.library[0]} {m.get(fam.library[1])}  ",
        f"Load average at start / end: {result['loadavg_start']} / {result['loadavg_end']} (a shared machine: "
        f"wall times are noisy)  ",
        f"Time: {result['seconds']:.0f} s for {len(result['runs'])} chains"
        + (f" ({reused} finished in an earlier invocation, reused)" if reused else "")
        + f" (training stages: {result['stage_seconds']:.0f} s in all)"
        + f"; data: {fam.data_caption(result['setup'])}, seeds: {result['setup']['seeds']}", "",
        f"## Main comparison ({fam.main_caption})", "",
        "| method | model | " + " | ".join(h for h, _ in fam.columns) + " | FLOPs | wall |",
        "|---|---|" + "---|" * len(fam.columns) + "---|---|",
    ]
    for method, c in s["main"].items():
        for row in c["per_model"]:
            lines.append(f"| {method} | {row['name']} | " + " | ".join(cell(row) for _, cell in fam.columns)
                         + f" | {format_flops(row['flops'])} | {row['wall_seconds']:.0f} s |")
    lines += ["", "| method | chain | FLOPs | wall | acceleration (FLOPs) | acceleration (wall) | "
                  f"acceleration (train seconds) | largest model {label} |", "|---|---|---|---|---|---|---|---|"]
    for method, c in s["main"].items():
        lines.append(f"| {method} | {' → '.join(c['models'])} | {format_flops(c['flops'])} | "
                     f"{c['wall_seconds']:.0f} s | {_x(c['acceleration_flops'])} | {_x(c['acceleration_wall'])} | "
                     f"{_x(c['acceleration_train_seconds'])} | {quality.format(c['per_model'][-1][q])} |")
    if s.get("compute_to_reach"):
        lines += ["", "## Compute to reach the baseline's quality (seed 0; searched stage budgets = fractions of "
                      "the from-scratch budget)", "",
                  f"| method | model | baseline {label} | {label} at each searched fraction | reached at | "
                  "stage FLOPs to reach | baseline FLOPs / that |", "|---|---|---|---|---|---|---|"]
        for method, rows in s["compute_to_reach"].items():
            for row in rows:
                pts = ", ".join(f"{p['fraction']:g}: {quality.format(p[q])}" for p in row["points"])
                lines.append(f"| {method} | {row['model']} | {quality.format(row[f'baseline_{q}'])} | {pts} | "
                             f"{row['reached_at_fraction'] if row['reached_at_fraction'] is not None else 'not reached'}"
                             f" | {format_flops(row['stage_flops_to_reach']) if row['stage_flops_to_reach'] else '-'}"
                             f" | {_x(row['saving_vs_baseline'])} |")
    if s.get("chain_length"):
        lines += ["", "## Chain length (same smallest and largest model; seed 0)", "",
                  f"| method | chain | acceleration (FLOPs) | acceleration (wall) | largest {label} (baseline) | "
                  f"mean {label} (baseline) |", "|---|---|---|---|---|---|"]
        for row in s["chain_length"]:
            lines.append(f"| {row['method']} | {' → '.join(row['models'])} | {_x(row['acceleration_flops'])} | "
                         f"{_x(row['acceleration_wall'])} | {quality.format(row[f'largest_{q}'])} "
                         f"({quality.format(row[f'largest_baseline_{q}'])}) | {quality.format(row[f'mean_{q}'])} "
                         f"({quality.format(row[f'mean_baseline_{q}'])}) |")
    if s.get("ablation"):
        models = result["setup"]["main"]
        lines += ["", "## Ablation (seed 0; later stages at the chain budget)", "",
                  "| variant | " + " | ".join(f"{n} {label} (init)" for n in models) + " | acceleration (FLOPs) |",
                  "|---|" + "---|" * len(models) + "---|"]
        for row in s["ablation"]:
            cells = [f"{quality.format(p[q])} ({quality.format(p[f'init_{q}'])})" for p in row["per_model"]]
            lines.append(f"| {row['variant']} | " + " | ".join(cells) + f" | {_x(row['acceleration_flops'])} |")
    findings = fam.findings(result)
    if findings:
        lines += ["", "## What the numbers show", ""] + [f"- {f}" for f in findings]
    lines += ["", "## Notes", ""] + [f"- {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fam = preset_of(result["setup"])
    q, scale = fam.quality.key, fam.quality.plot_scale
    colors = {"baseline": "tab:gray", "official": "tab:blue", "exact": "tab:green",
              "param-only-official": "tab:orange", "param-only-exact": "tab:red"}
    fig, ax = plt.subplots(figsize=(10.5, 4.8))
    seeds = result["setup"]["seeds"]
    mean, seed0 = (f", mean of {seeds} seeds", " (seed 0)") if seeds > 1 else ("", "")
    for method, c in result["summary"]["main"].items():
        xs, cum = [], 0.0
        for row in c["per_model"]:
            cum += row["flops"]
            xs.append(cum)
        ys = [scale * row[q] for row in c["per_model"]]
        weight = f"alpha {c['alpha']:g}, " if c.get("alpha") is not None else ""
        label = (f"baseline (each model from scratch{mean})" if method == "baseline"
                 else f"CoM-PT {method} ({weight}{_x(c['acceleration_flops'])} fewer FLOPs{mean})")
        ax.plot(xs, ys, marker="o", color=colors.get(method), label=label)
        for i, (x, y, row) in enumerate(zip(xs, ys, c["per_model"])):
            if i == 0 and method != "baseline":
                continue  # the first model is the baseline's: labelled once
            ax.annotate(row["name"], (x, y), textcoords="offset points", xytext=(6, -12) if i == 0 else (5, 5),
                        fontsize=8, zorder=10,
                        color=colors.get(method))
    # Other budgets of the compute-to-reach search: the chain's largest model at each fraction.
    for method, rows in (result["summary"].get("compute_to_reach") or {}).items():
        last = rows[-1]
        pts = [p for p in last["points"] if p["fraction"] != result["setup"]["chain_fraction"]]
        if pts:
            ax.scatter([p["chain_flops_through_model"] for p in pts], [scale * p[q] for p in pts],
                       facecolors="none", edgecolors=colors.get(method), s=50,
                       label=f"{method}, other budgets (fractions {', '.join(format(p['fraction'], 'g') for p in pts)})"
                             + seed0)
    ablation_colors = iter(["tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"])
    for row in result["summary"].get("ablation") or []:
        if row["method"] in ("official", "exact"):
            continue
        ax.scatter([sum(p["flops"] for p in row["per_model"])], [scale * row["per_model"][-1][q]],
                   marker="x", s=40, color=next(ablation_colors), label=f"ablation: {row['variant']}{seed0}")
    fam.decorate(ax, result)
    ax.set_xscale("log")
    ax.set_yscale(fam.yscale)
    if fam.yscale == "log":  # plain numbers (perplexities), not powers of ten
        plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
    ax.margins(x=0.06, y=0.12)
    ax.set_xlabel("cumulative training FLOPs of the family (counted)")
    ax.set_ylabel(fam.ylabel)
    title = "quality vs compute" + (f": {result['name']}" if result["name"] != result["mode"] else "")
    ax.set_title(f"{title} ({result['mode']} mode, seeds: {result['setup']['seeds']})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------
# Main.
# ---------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=sorted(PRESETS), default=DEFAULT_FAMILY,
                   help="; ".join(f"{name}: {preset.about}" for name, preset in PRESETS.items())
                        + f" (default: {DEFAULT_FAMILY})")
    p.add_argument("--quick", action="store_true", help="tiny models, few steps, 1 seed, main comparison only")
    p.add_argument("--name", default=None,
                   help="results name (default: quick or full; for llama llama-quick or llama-full)")
    p.add_argument("--seeds", type=int, default=None, help="seeds of the main comparison (default: 3, quick 1)")
    p.add_argument("--studies", default=None,
                   help=f"comma-separated subset of {','.join(STUDIES)} (default: all, quick: main,search)")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated CoM-PT variants to compare with the baseline, from {','.join(GROWTH)} "
                        "(default: official,exact; param-only-* train without the alignment term)")
    p.add_argument("--alpha", type=float, default=None,
                   help="alignment weight of every aligned chain (default: clip compt's, 500 or 5 after exact "
                        "growth; llama the preset's 1, to study distillation); a weight other than clip 500 / "
                        "llama 1 goes into those chains' ids, so a --workdir shared with another study reuses its "
                        "baselines and unaligned chains and keeps its aligned ones")
    p.add_argument("--baseline-steps", type=int, default=None, help="from-scratch budget per model, in steps")
    p.add_argument("--chain-fraction", type=float, default=None, help="later chain stages' budget fraction")
    p.add_argument("--search-fractions", default=None, help="comma-separated budget fractions to search")
    p.add_argument("--match-tolerance", type=float, default=None,
                   help="a CoM-PT model matches its baseline within this: top-1 points (clip, default 0) or a "
                        "fraction of the baseline's perplexity (llama, default 0.05)")
    p.add_argument("--results", default=str(REPO / "benchmarks" / "results"), help="folder for json/md/png")
    p.add_argument("--workdir", default=None, help="run directories (default: runs/bench-acceleration-<name>)")
    p.add_argument("--fresh", action="store_true", help="delete the workdir first instead of reusing finished runs")
    p.add_argument("--retrain-first-stage", action="store_true",
                   help="every chain trains its first stage itself instead of reusing the baseline's")
    p.add_argument("--port", type=int, default=29840, help="first --master_port; each launch takes the next")
    p.add_argument("--dry-run", action="store_true", help="print the planned runs and exit")
    p.add_argument("--only-seeds", default=None,
                   help="comma-separated seeds: train only those seeds' chains, in this order, and write no results "
                        "(to split a long study across processes or machines sharing --workdir; a last run without "
                        "it reuses every finished chain and writes the results; give each process other chains: "
                        "two processes must not train the same chain at once; chains grow from a seed's "
                        "baseline first stage when an earlier invocation finished it)")
    p.add_argument("--only-runs", default=None,
                   help="comma-separated chain ids (as --dry-run prints them): train only those, in this order, "
                        "and write no results (like --only-seeds)")
    p.add_argument("--replot", action="store_true",
                   help="only re-render the markdown and PNG from the existing results JSON of --name")
    return p.parse_args(argv)


def build_setup(args: argparse.Namespace) -> Setup:
    import copy

    fam = PRESETS[args.family]
    setup = copy.deepcopy(fam.quick if args.quick else fam.full)
    if args.seeds is not None:
        setup.seeds = args.seeds
    if args.studies is not None:
        setup.studies = [s.strip() for s in args.studies.split(",") if s.strip()]
        bad = [s for s in setup.studies if s not in STUDIES]
        if bad or "main" not in setup.studies:
            raise SystemExit(f"--studies: {bad or 'main is missing'}; pick from {','.join(STUDIES)} (main always)")
    if args.methods is not None:
        setup.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        bad = [m for m in setup.methods if m not in GROWTH]
        if bad or not setup.methods:
            raise SystemExit(f"--methods: {', '.join(bad) or 'none given'}; pick from {','.join(GROWTH)}")
    if args.alpha is not None:
        if not args.alpha >= 0:
            raise SystemExit(f"--alpha {args.alpha:g}: the alignment weight must be >= 0")
        setup.alpha = args.alpha
    if args.baseline_steps is not None:
        setup.baseline_steps = args.baseline_steps
    if args.chain_fraction is not None:
        setup.chain_fraction = args.chain_fraction
    if args.search_fractions is not None:
        setup.search_fractions = [float(f) for f in args.search_fractions.split(",")]
    if args.match_tolerance is not None:
        setup.match_tolerance = args.match_tolerance
    if setup.chain_fraction not in setup.search_fractions:
        setup.search_fractions = sorted(setup.search_fractions + [setup.chain_fraction])
    return setup


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup = build_setup(args)
    fam = preset_of(setup)
    name = args.name or fam.result_prefix + ("quick" if args.quick else "full")
    if args.replot:
        stem = Path(args.results) / f"acceleration-{name}"
        result = json.loads(Path(f"{stem}.json").read_text())
        Path(f"{stem}.md").write_text(markdown(result))
        plot(result, Path(f"{stem}.png"))
        print(f"re-rendered {stem}.md and {stem}.png")
        return 0
    workdir = Path(args.workdir or REPO / "runs" / f"bench-acceleration-{name}").resolve()
    if args.fresh and workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)

    t0, load0 = time.time(), [round(x, 2) for x in os.getloadavg()]
    exact, exact_note = exact_available(setup, workdir)
    specs = full_plan = plan(setup, exact)
    print(f"acceleration benchmark '{name}': {len(specs)} chains, workdir {workdir}")
    if args.only_seeds is not None:
        order = [int(x) for x in args.only_seeds.split(",") if x.strip()]
        specs = sorted((s for s in specs if s.seed in order), key=lambda s: (order.index(s.seed), s.transfer is not None))
        print(f"--only-seeds {args.only_seeds}: {len(specs)} chains, no results written")
    if args.only_runs is not None:
        by_id = {s.id: s for s in specs}
        wanted = [x.strip() for x in args.only_runs.split(",") if x.strip()]
        unknown = [x for x in wanted if x not in by_id]
        if unknown:
            raise SystemExit(f"--only-runs: {', '.join(unknown)} not in this study's plan; see --dry-run")
        specs = [by_id[x] for x in wanted]
        print(f"--only-runs: {len(specs)} chains, no results written")
    if args.dry_run:
        for spec in specs:
            print(f"  {spec.id}  ({', '.join(sorted(spec.studies))})")
        return 0
    launcher = Launcher(workdir, args.port, args.retrain_first_stage)
    if args.only_seeds is not None or args.only_runs is not None:
        launcher.adopt_finished(setup, full_plan)
    runs = []
    for i, spec in enumerate(specs, 1):
        print(f"[{i}/{len(specs)}] {spec.id}", flush=True)
        runs.append(launcher.run(setup, spec))
    if args.only_seeds is not None or args.only_runs is not None:
        return 0

    summary = summarize(setup, runs, exact)
    summary["predicted_vs_measured_flops"] = predicted_costs(runs)

    notes = [exact_note, *fam.notes(setup)]
    if args.quick:
        notes.insert(0, fam.quick_note)
    if not args.retrain_first_stage:
        notes.append("A chain's first stage is the baseline's (identical config and seed), reused through the "
                     "launcher's resume; one chain per seed retrains it, see first_stage_reuse_check.")
    result = {
        "name": name, "mode": "quick" if args.quick else "full",
        "command": shlex.join(["python", *(sys.argv if argv is None else ["benchmarks/acceleration.py", *argv])]),
        "machine": machine(fam), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t0)),
        "seconds": round(time.time() - t0, 1), "loadavg_start": load0,
        # Wall seconds of every stage trained for these results (a reused first stage counts once).
        "stage_seconds": round(sum(st["wall_seconds"] for r in runs
                                   for st in r["stages"][int(r["first_stage_reused"]):]), 1),
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "setup": {**{k: v for k, v in vars(setup).items() if k != "models"}, "exact_available": exact},
        "models": setup.models, "ds_config": DS_CONFIG, "summary": summary, "runs": runs, "notes": notes,
    }
    stem = results / f"acceleration-{name}"
    Path(f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    Path(f"{stem}.md").write_text(markdown(result))
    plot(result, Path(f"{stem}.png"))
    print(markdown(result))
    print(f"wrote {stem}.json, {stem}.md, {stem}.png in {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
