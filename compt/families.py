"""The model families a chain can train, and the contract each one implements.

The core (config validation, the stage loop, the launcher, reports, costs, commands) asks
a family object everything that depends on the kind of model and never tests a family's
name. A new family is one folder (``compt/<name>/`` with a ``family.py`` implementing
:class:`Family`) plus one line in ``REGISTRY``.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

# name -> "module:class"; imported only when asked for, so listing names imports no model library.
REGISTRY = {
    "clip": "compt.clip.family:ClipFamily",
    "llama": "compt.llama.family:LlamaFamily",
}
DEFAULT_FAMILY = "clip"  # a chain config without `family:`
FAMILIES = tuple(REGISTRY)


@dataclass(frozen=True)
class Quality:
    """A family's headline metric in ``metrics.json``: benchmarks compare chains by it."""

    key: str  # e.g. zeroshot_top1, val_ppl
    label: str  # for tables: "top-1", "val ppl"
    higher_is_better: bool


@dataclass(frozen=True)
class CostCounters:
    """Per-sample FLOP counters of a family for cost accounting (compt/costs.py).

    ``count(cfg)`` and ``analytic(cfg)`` return objects with ``train`` (student forward +
    backward) and ``forward`` (teacher forward) FLOPs per sample; ``analytic`` returns None
    where its closed form does not cover the config. ``params(cfg)`` counts parameters.
    """

    count: Callable[[dict], Any]
    analytic: Callable[[dict], Any | None]
    params: Callable[[dict], int]


class Family(Protocol):
    """What the core asks of a model family (see compt/clip/family.py, compt/llama/family.py)."""

    name: str
    curve_names: tuple[str, str]  # the loss curve's (task, transfer) columns, e.g. contrastive, alignment
    data_config: type  # the pydantic model of the chain's ``data:`` section
    growth_modes: tuple[str, ...]  # which of compt.growth.MODES a stage's transfer.init may use
    quality: Quality
    result_headers: list[str]  # the final table's columns

    # Config: resolution and validation (every problem as "field: what is wrong; the fix").
    def alpha_default(self, init: str) -> float: ...
    def stage_model_cfg(self, model: Any, prev_cfg: dict | None, init: str | None) -> dict: ...
    def chain_problems(self, cfg) -> list[str]: ...

    # Data.
    def build_data(self, data_cfg, run_root: Path, rank: int) -> tuple[Any, Any]: ...
    def val_data(self, data_cfg, run_root: Path) -> Any: ...
    def train_size(self, data_cfg) -> int: ...

    # A stage.
    def build(self, model_cfg: dict, teacher_cfg: dict | None): ...
    # The width ZeRO's buffers are sized from (compt.engine.zero_buffers), as transformers' config.hidden_size.
    def hidden_size(self, model_cfg: dict) -> int: ...
    # The library functions that set weights after their modules were constructed (compt.partition.LibraryInit):
    # a ZeRO-3 build runs each with the parameters it writes gathered, so no rank holds the whole model.
    def library_inits(self) -> list: ...
    def plan(self, name: str, prev_cfg: dict, model_cfg: dict, mode: str, noise: float, seed: int): ...
    def load_teacher(self, model_cfg: dict, weights: Path): ...
    def no_decay(self, name: str, param) -> bool: ...
    def enable_activation_checkpointing(self, model) -> None: ...
    def loss(self, alpha: float | None, transfer, rank: int, world: int, kernels: str): ...
    def train_loader(self, train_ds, model_cfg: dict, teacher_cfg: dict | None, **kw): ...
    def init_metrics(self, engine, prev_cfg: dict, probe, model_cfg: dict, val_ds, cfg) -> dict: ...
    def evaluate(self, engine, val_ds, model_cfg: dict, cfg) -> dict: ...
    def sample_flops(self, model_cfg: dict, data) -> tuple[int, int]: ...
    def tokens_per_sample(self, data) -> int | None: ...  # language models: for tokens/s
    def export_name(self, name: str, tensor): ...
    def is_exported(self, name: str) -> bool: ...
    def write_config(self, path: Path, model_cfg: dict) -> None: ...

    # Reports and tools.
    def summary(self, metrics: dict) -> dict: ...
    def result_row(self, stage, metrics: dict) -> list[str]: ...
    def metrics_lines(self, metrics: dict) -> list[str]: ...
    def cost_counters(self, recipe) -> CostCounters: ...
    def sample_unit(self, recipe, captions_per_image: int) -> str: ...
    def exporter(self): ...  # a module: FORMATS, DEFAULT_FORMAT, read_stage, read_run, export, claims

    # compt grow: which raw model configs are this family's, and the growth job between two of them.
    def is_model_config(self, raw) -> bool: ...
    def config_hint(self, raw) -> str: ...
    def grow_job(self, small_raw: dict, big_raw: dict, **kw): ...


def family_of(name: str) -> Family:
    if name not in REGISTRY:
        raise ValueError(f"unknown model family {name!r}; use one of {FAMILIES}")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)()


def all_families() -> list[Family]:
    return [family_of(name) for name in REGISTRY]
