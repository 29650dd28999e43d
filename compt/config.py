"""Chain configuration: typed, validated once at the edge, every problem reported at once.

A chain is a name, data, evaluation settings, training defaults and an ordered list
of stages. ``load_chain`` turns a YAML file or a built-in preset into a ChainConfig.
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from compt.data import DataConfig
from compt.families import DEFAULT_FAMILY, FAMILIES, REGISTRY, family_of
from compt.growth import MODES
from compt.text.config import TextDataConfig

PRESETS = {"demo": "demo.yaml", "llama-demo": "llama-demo.yaml"}


def alpha_default(family: str, init: str) -> float:
    """The transfer weight a stage gets when its config gives none (each family's choice, with its reasons)."""
    return family_of(family).alpha_default(init)


class ChainConfigError(ValueError):
    """Raised with the complete list of problems found in a chain config."""

    def __init__(self, source: str, problems: list[str]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) in chain config {source}:\n{lines}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Budget(_Strict):
    """How long a stage trains: exactly one of epochs, steps or samples."""

    epochs: float | None = None
    steps: int | None = None
    samples: int | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> "Budget":
        given = [k for k in ("epochs", "steps", "samples") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of epochs, steps or samples (got {given or 'none'})")
        if getattr(self, given[0]) <= 0:
            raise ValueError(f"{given[0]} must be > 0 (got {getattr(self, given[0])})")
        return self

    def steps_for(self, dataset_size: int, global_batch: int) -> int:
        if self.steps is not None:
            return self.steps
        samples = self.samples if self.samples is not None else self.epochs * dataset_size
        return max(1, int(samples // global_batch))


class Transfer(_Strict):
    """How a stage uses its predecessor: parameter space (init) and feature space (align).

    init: exact (function-preserving growth), official (the reference code's slice copy),
    none (from scratch). noise/seed: symmetry breaking for exact growth (function kept).
    align/alpha: CLIP aligns embeddings to the teacher's (alpha default 500, 5 after exact
    growth); LLaMA distils the teacher's next-token distributions, KL at ``temperature``
    (alpha default 0: off). Defaults: each family's ``alpha_default``.
    """

    init: Literal[MODES] = "official"
    noise: float = Field(0.0, ge=0.0)
    seed: int | None = Field(None, description="growth noise seed (default: the chain seed + stage index)")
    align: bool = True
    alpha: float | None = Field(None, ge=0.0, description="default: CLIP 500 (5 with init exact), LLaMA 0 (no distillation)")
    temperature: float = Field(1.0, gt=0.0, description="LLaMA distillation temperature")


class TrainSettings(_Strict):
    """Optimisation settings; chain defaults, each overridable per stage."""

    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    warmup_steps: int = Field(100, ge=0)
    batch_size: int = Field(256, gt=0, description="global batch size (all ranks)")
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = Field(1e-6, gt=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    grad_clip: float | None = Field(1.0, gt=0)
    log_every: int = Field(10, gt=0)
    checkpoint_every_steps: int = Field(0, ge=0, description="mid-stage checkpoint every N steps (0 = off)")
    checkpoint_minutes: float = Field(30.0, ge=0, description="mid-stage checkpoint every M minutes (0 = off)")
    keep_checkpoints: int = Field(2, ge=1)
    max_nonfinite_steps: int = Field(3, ge=0, description="NaN/Inf-loss steps skipped before the stage stops")


class StageOverrides(_Strict):
    lr: float | None = Field(None, gt=0)
    weight_decay: float | None = Field(None, ge=0)
    warmup_steps: int | None = Field(None, ge=0)
    batch_size: int | None = Field(None, gt=0)
    min_lr_ratio: float | None = Field(None, ge=0, le=1)


class StageConfig(StageOverrides):
    name: str = Field(pattern=r"^[A-Za-z0-9._-]+$")
    model: str | dict[str, Any]
    budget: Budget
    transfer: Transfer | None = None

    def settings(self, defaults: TrainSettings) -> TrainSettings:
        over = {k: v for k, v in self.model_dump(include=set(StageOverrides.model_fields)).items() if v is not None}
        return defaults.model_copy(update=over)


class EvalConfig(_Strict):
    batch_size: int = Field(256, gt=0)
    zeroshot: bool = True
    retrieval: bool = True


class ChainConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9._-]+$")
    family: Literal[FAMILIES] = Field(DEFAULT_FAMILY, description="the model family (compt.families.REGISTRY), e.g. "
                                                                 "clip: open_clip CLIP models on image-text data; "
                                                                 "llama: transformers LlamaForCausalLM on text")
    seed: int = 0
    data: DataConfig | TextDataConfig = Field(default_factory=DataConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    defaults: TrainSettings = Field(default_factory=TrainSettings)
    kernels: Literal["auto", "triton", "reference"] = Field(
        "auto", description="growth expansion and alignment loss: auto = fused Triton kernels on a GPU, "
                        "PyTorch reference otherwise")
    stages: list[StageConfig] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _data_of_family(cls, raw: Any) -> Any:
        """``data`` is what the family trains on (image-text for CLIP, text for LLaMA): parse it as the family's kind."""
        if isinstance(raw, dict) and isinstance(raw.get("data", {}), dict) and raw.get("family", DEFAULT_FAMILY) in REGISTRY:
            kind = family_of(raw.get("family", DEFAULT_FAMILY)).data_config
            raw = {**raw, "data": kind.model_validate(raw.get("data", {}))}
        return raw

    def model_cfg(self, k: int) -> dict:
        """Stage k's resolved model config, with whatever its growth needs (e.g. LLaMA's exact-growth eps)."""
        if k == 0:
            return family_of(self.family).stage_model_cfg(self.stages[0].model, None, None)
        return family_of(self.family).stage_model_cfg(self.stages[k].model, self.model_cfg(k - 1),
                                                      self.transfer(k).init)

    def transfer(self, k: int) -> Transfer | None:
        """Stage k's transfer settings (None for the first stage), family defaults filled in."""
        if k == 0:
            return None
        t = self.stages[k].transfer or Transfer()
        return t if t.alpha is not None else t.model_copy(update={"alpha": alpha_default(self.family, t.init)})


def _pydantic_problems(err: ValidationError) -> list[str]:
    out = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-"))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field; remove it or check its spelling"
        out.append(f"{loc}: {msg}")
    return out


def _triton_runs() -> bool:
    import os

    import torch

    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def chain_problems(cfg: ChainConfig) -> list[str]:
    """Problems a well-typed config can still have: data, kernels, names; the family's: models, sizes, growth."""
    problems = list(cfg.data.problems())
    if cfg.kernels == "triton" and not _triton_runs():
        problems.append("kernels: 'triton' needs a CUDA GPU (or TRITON_INTERPRET=1 to interpret the kernels on CPU, "
                        "slowly); use 'auto' to pick Triton where it runs and the PyTorch reference elsewhere")
    names = [s.name for s in cfg.stages]
    for n in {n for n in names if names.count(n) > 1}:
        problems.append(f"stages: name '{n}' is used twice; give every stage a unique name")
    if cfg.stages[0].transfer is not None:
        problems.append("stages.0.transfer: the first stage has no predecessor; remove 'transfer'")
    family = family_of(cfg.family)
    for k in range(1, len(cfg.stages)):
        if cfg.transfer(k).init not in family.growth_modes:
            problems.append(f"stages.{k}.transfer.init: {cfg.family} models cannot grow by '{cfg.transfer(k).init}'; "
                            f"use one of {list(family.growth_modes)}")
    return problems + family.chain_problems(cfg)


def ds_config_problems(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        return [f"--ds_config: file '{path}' does not exist; use e.g. ds_configs/zero3.json"]
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        return [f"--ds_config: '{path}' is not valid JSON ({e}); fix the file or use ds_configs/zero3.json"]
    if not isinstance(cfg, dict):
        return [f"--ds_config: '{path}' must hold a JSON object"]
    problems = []
    stage = cfg.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        problems.append(f"--ds_config: zero_optimization.stage must be 0-3 (got {stage!r})")
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu"):
        if key in cfg:
            problems.append(
                f"--ds_config: '{key}' is set by compt from the chain's batch_size; remove it from '{path}'"
            )
    return problems


def _read_yaml(chain: str) -> tuple[Any, str]:
    if chain in PRESETS:
        text = resources.files("compt").joinpath("chains", PRESETS[chain]).read_text()
        return yaml.safe_load(text), f"preset '{chain}'"
    path = Path(chain)
    if not path.is_file():
        raise ChainConfigError(
            chain, [f"--chain: '{chain}' is neither a file nor a preset; use a YAML path or one of {sorted(PRESETS)}"]
        )
    try:
        return yaml.safe_load(path.read_text()), str(path)
    except yaml.YAMLError as e:
        raise ChainConfigError(chain, [f"--chain: '{chain}' is not valid YAML: {e}"]) from e


def load_chain(chain: str = "demo", ds_config: str | Path | None = None) -> ChainConfig:
    """Parse and validate a chain (YAML path or preset name); raise ChainConfigError listing all problems."""
    raw, source = _read_yaml(chain)
    problems = ds_config_problems(ds_config) if ds_config is not None else []
    if not isinstance(raw, dict):
        raise ChainConfigError(source, problems + ["the chain file must hold a mapping (name, data, stages, ...)"])
    try:
        cfg = ChainConfig.model_validate(raw)
    except ValidationError as e:
        raise ChainConfigError(source, problems + _pydantic_problems(e)) from None
    problems += chain_problems(cfg)
    if problems:
        raise ChainConfigError(source, problems)
    return cfg
