"""Chain configuration: typed, validated once at the edge, every problem reported at once.

A chain is a name, data, evaluation settings, training defaults and an ordered list
of stages. ``load_chain`` turns a YAML file or a built-in preset into a ChainConfig.
"""
from __future__ import annotations

import copy
import json
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from compt.data import DataConfig
from compt.families import DEFAULT_FAMILY, FAMILIES, REGISTRY, family_of
from compt.growth import MODES
from compt.streaming import epoch_budget_problems
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
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # NaN or inf is never a valid setting


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
    teacher: Literal["sharded", "replicate"] | None = Field(
        None, description="the frozen predecessor under ZeRO-3: sharded (the default there: partitioned like the "
                          "student, parameters gathered per module in its forward; least memory) or replicate (a "
                          "full copy on every rank: faster, more memory); without ZeRO-3 it is always a full copy")


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
    deepspeed: dict[str, Any] | None = Field(
        None, description="merged into the ds_config for this stage only, e.g. {zero_optimization: {stage: 2}} "
                          "for a small first stage")
    activation_checkpointing: bool = Field(
        False, description="recompute activations in the backward pass (less memory, ~1/3 more compute)")

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
    problems = list(cfg.data.problems()) + epoch_budget_problems(cfg)
    if cfg.kernels == "triton" and not _triton_runs():
        problems.append("kernels: 'triton' needs a CUDA GPU (or TRITON_INTERPRET=1 to interpret the kernels on CPU, "
                        "slowly); use 'auto' to pick Triton where it runs and the PyTorch reference elsewhere")
    names = [s.name for s in cfg.stages]
    for n in {n for n in names if names.count(n) > 1}:
        problems.append(f"stages: name '{n}' is used twice; give every stage a unique name")
    if cfg.stages[0].transfer is not None:
        problems.append("stages.0.transfer: the first stage has no predecessor; remove 'transfer'")
    for k, stage in enumerate(cfg.stages):
        if stage.deepspeed is not None:
            problems += ds_dict_problems(stage.deepspeed, f"stages.{k}.deepspeed")
    family = family_of(cfg.family)
    for k in range(1, len(cfg.stages)):
        if cfg.transfer(k).init not in family.growth_modes:
            problems.append(f"stages.{k}.transfer.init: {cfg.family} models cannot grow by '{cfg.transfer(k).init}'; "
                            f"use one of {list(family.growth_modes)}")
    return problems + family.chain_problems(cfg)


def ds_dict_problems(cfg: dict, where: str) -> list[str]:
    """What compt can tell is wrong in a ds_config mapping (the file's, or a stage's ``deepspeed:`` part)."""
    problems = []
    zero = cfg.get("zero_optimization", {})
    if not isinstance(zero, dict):
        problems.append(f"{where}: zero_optimization must be a mapping (got {zero!r})")
    elif zero.get("stage", 0) not in (0, 1, 2, 3):
        problems.append(f"{where}: zero_optimization.stage must be 0-3 (got {zero.get('stage')!r})")
    for key in ("bf16", "fp16"):
        section = cfg.get(key)
        if section is not None and (not isinstance(section, dict)
                                    or section.get("enabled", False) not in (True, False, "auto")):
            problems.append(f"{where}: '{key}' must be a mapping whose 'enabled' is true, false or \"auto\" "
                            f"(got {section!r}); e.g. \"{key}\": {{\"enabled\": \"auto\"}}")
    if all(isinstance(cfg.get(k), dict) and cfg[k].get("enabled") is True for k in ("bf16", "fp16")):
        problems.append(f"{where}: bf16 and fp16 are both enabled; enable one of them (bf16 where supported)")
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu"):
        if key in cfg:
            problems.append(f"{where}: '{key}' is set by compt from the chain's batch_size; remove it")
    gas = cfg.get("gradient_accumulation_steps", 1)
    if isinstance(gas, bool) or not isinstance(gas, int) or gas < 1:
        problems.append(f"{where}: gradient_accumulation_steps must be a whole number >= 1 (got {gas!r})")
    optimizer = cfg.get("optimizer")
    if optimizer is not None:
        if not isinstance(optimizer, dict) or not isinstance(optimizer.get("type"), str):
            problems.append(f"{where}: optimizer must be a mapping with a 'type' (e.g. AdamW), got {optimizer!r}")
        elif not _known_optimizer(optimizer["type"]):
            problems.append(f"{where}: optimizer.type '{optimizer['type']}' is neither a DeepSpeed optimizer nor a "
                            "torch.optim class; use e.g. AdamW")
    return problems


def _known_optimizer(name: str) -> bool:
    """What DeepSpeed's engine accepts: its own optimizers (case-insensitive) or a torch.optim class name."""
    import torch
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS

    return name.lower() in DEEPSPEED_OPTIMIZERS or getattr(torch.optim, name, None) is not None


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
    return ds_dict_problems(cfg, f"--ds_config '{path}'")


MAX_CONFIG_NODES = 100_000  # a chain config is small; YAML aliases must not expand it past this


def _expanded_size(obj: Any, memo: dict[int, int] | None = None) -> int:
    """Nodes of ``obj`` once YAML aliases are expanded (each shared node counted every time it is used),
    computed on the shared structure, so a "billion laughs" file is measured, not expanded."""
    memo = {} if memo is None else memo
    if id(obj) in memo:
        return memo[id(obj)]
    children = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, list) else ()
    memo[id(obj)] = 1  # a cycle (a recursive alias) counts once per visit
    size = 1 + sum(_expanded_size(c, memo) for c in children)
    memo[id(obj)] = size
    return size


def _read_yaml(chain: str) -> tuple[Any, str]:
    raw, source = _parse_yaml(chain)
    if _expanded_size(raw) > MAX_CONFIG_NODES:
        raise ChainConfigError(source, [f"--chain: '{chain}' expands to more than {MAX_CONFIG_NODES:,} values "
                                        "(YAML aliases repeating aliases?); write the config out plainly"])
    return raw, source


def _parse_yaml(chain: str) -> tuple[Any, str]:
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
    # `data` is checked on its own first, so that its problems (with their `data.` prefix) and the rest of the
    # config's are reported together rather than one hiding the other.
    data_problems, rest = _data_problems(raw), raw
    if data_problems:
        rest = {k: v for k, v in raw.items() if k != "data"}
    # Type errors do not hide the semantic checks either: those run on the config with each bad field left out
    # (or a stand-in where it is required), and what they say about a bad field (or the default data standing
    # in for bad data) is dropped, so one pass reports every problem.
    cfg, type_problems, bad = validated_without_bad_fields(rest)
    problems += data_problems + type_problems
    if cfg is None:
        raise ChainConfigError(source, problems)
    bad += ["data"] if data_problems else []
    semantic = chain_problems(cfg)
    problems += [p for p in semantic if not concerns(p, bad)]
    if not any(concerns(p, ["data"]) for p in problems) and not any(b.endswith("batch_size") for b in bad):
        problems += train_size_problems(cfg)
    if ds_config is not None and not ds_config_problems(ds_config):
        problems += teacher_problems(cfg, json.loads(Path(ds_config).read_text()))
    if problems:
        raise ChainConfigError(source, problems)
    return cfg


def teacher_problems(cfg: ChainConfig, ds_config: dict) -> list[str]:
    """A sharded teacher is partitioned by ZeRO-3: its stage must run stage 3 (the ds_config's, or the stage's
    own ``deepspeed:`` override)."""
    problems = []
    default = (ds_config.get("zero_optimization") or {}).get("stage", 0)
    for k, stage in enumerate(cfg.stages):
        if stage.transfer is None or stage.transfer.teacher != "sharded":
            continue
        zero = (stage.deepspeed or {}).get("zero_optimization")
        runs = zero.get("stage", default) if isinstance(zero, dict) else default
        if runs != 3:
            problems.append(f"stages.{k}.transfer.teacher: sharded needs ZeRO stage 3, and this stage runs stage "
                            f"{runs}; use replicate, or leave it out (a full copy is the default without ZeRO-3)")
    return problems


STAND_INS: dict[str, Any] = {  # for required fields whose value is unusable: whatever passes the schema
    "name": "invalid-name",
    "model": "invalid-model",  # every family reports it as unknown: the checks that compare models skip it
    "budget": {"steps": 1},
}
STAND_IN_STAGE = {"name": "invalid-stage", "model": STAND_INS["model"], "budget": {"steps": 1}}
REPAIR_ROUNDS = 4  # leaving a field out can make its parent invalid (a budget with no value left): a few rounds


def validated_without_bad_fields(raw: dict) -> tuple[ChainConfig | None, list[str], list[str]]:
    """(config, type problems, paths of the bad fields): the config as given when it validates, else validated
    again with each bad field left out (its default applies) or, where required, a stand-in; None when
    nothing can stand in (e.g. ``stages`` is not a list)."""
    try:
        return ChainConfig.model_validate(raw), [], []
    except ValidationError as e:
        err, reported = e, _pydantic_problems(e)
    work, bad = copy.deepcopy(raw), []
    for _ in range(REPAIR_ROUNDS):
        # Where each error's field is, found before anything changes: a value that failed every member of a
        # union has one error per member, and all of them name the same field.
        fixes = {}
        for error in err.errors():
            fix = _stand_in(work, [p for p in error["loc"] if not str(p).startswith("function-")], error["type"])
            if fix is None:
                return None, reported, bad
            fixes.setdefault(fix[0], fix[1])
        for path, apply in fixes.items():
            apply()
            bad.append(path)
        try:
            return ChainConfig.model_validate(work), reported, bad
        except ValidationError as e:
            err = e
    return None, reported, bad


def _stand_in(raw: dict, loc: list, kind: str) -> tuple[str, Callable[[], None]] | None:
    """(dotted path, change) for the field an error's ``loc`` names in ``raw``: the change removes it (its
    default applies) or, where it is required, puts a stand-in there; None when nothing can stand in. A loc may
    go deeper than the data: pydantic names the union member a value failed (``stages.0.model.str``), so the
    field is the deepest key present."""
    chain = []  # (container, key) from the top down
    node: Any = raw
    for key in loc:
        if isinstance(node, dict) and key in node or isinstance(node, list) and key in range(len(node)):
            chain.append((node, key))
            node = node[key]
        else:
            break
    if kind == "missing" and len(chain) == len(loc) - 1 and isinstance(node, dict):
        key, path = loc[-1], ".".join(str(p) for p in loc)
        stand_in = [STAND_IN_STAGE] if key == "stages" else STAND_INS.get(key)
        if stand_in is None:
            return None
        return path, lambda: node.__setitem__(key, copy.deepcopy(stand_in))
    while chain and isinstance(chain[-1][0], list) and not (len(chain) == 2 and chain[0][1] == "stages"):
        chain.pop()  # an item of a list value (betas): the list as a whole is the field
    if not chain:
        return None
    container, key = chain[-1]
    path = ".".join(str(k) for _, k in chain)
    if isinstance(container, list):  # a stage that is not a mapping: a stand-in stage keeps the others' indices
        return path, lambda: container.__setitem__(key, {**STAND_IN_STAGE, "name": f"invalid-stage-{key}"})
    return path, lambda: container.pop(key, None)


def concerns(problem: str, paths: list[str]) -> bool:
    """Whether ``problem`` ("field: ...") is about one of ``paths`` or a field inside one."""
    field = problem.split(":", 1)[0].split(" ", 1)[0]
    return any(field == p or field.startswith(p + ".") or (p.startswith(field + ".") and field != "stages")
               for p in paths)


# Kinds whose training-set size is known without building the data for training: the built-in ones are
# computed (images are rendered lazily) and a CSV is one pass over its rows. Not these, checked once the
# ranks have built the data: webdataset (its size is the count of every shard's samples, so every tar is
# read; streamed sets declare data.train_samples), hf (loading the set imports `datasets` and may download),
# and text (the sequences depend on the tokenizer the run trains).
SIZED_KINDS = ("digits", "digit-numbers", "csv")


def train_size_problems(cfg: ChainConfig) -> list[str]:
    """Each stage's global batch against the training set's size where that is known before any rank starts."""
    if not isinstance(cfg.data, DataConfig) or cfg.data.kind not in SIZED_KINDS:
        return []
    from compt.data import build_dataset

    try:
        size = len(build_dataset(cfg.data, "train"))
    except ValueError as e:  # a CSV without the named columns, a label that is not an integer
        return [str(e)]
    problems = []
    for k, stage in enumerate(cfg.stages):
        batch = stage.settings(cfg.defaults).batch_size
        if batch > size:
            source = "" if stage.batch_size is not None else " (defaults.batch_size)"
            problems.append(f"stages.{k}.batch_size: {batch}{source} is larger than the training set ({size} "
                            f"samples in data.{'train' if cfg.data.kind == 'csv' else 'kind ' + cfg.data.kind}); "
                            f"give a batch_size of at most {size}, or more data")
    return problems


def _data_problems(raw: dict) -> list[str]:
    """Schema problems of the `data:` section, as the chain's family reads it ([] when it parses)."""
    family, data = raw.get("family", DEFAULT_FAMILY), raw.get("data", {})
    if family not in REGISTRY:
        return []
    if not isinstance(data, dict):
        return [f"data: must be a mapping (kind, paths, ...), got {type(data).__name__}"]
    try:
        family_of(family).data_config.model_validate(data)
    except ValidationError as e:
        return [p if p.startswith("data") else f"data.{p}" for p in _pydantic_problems(e)]
    return []
