"""The pieces every family's model card (README.md with the Hub's YAML metadata header) shares:
values and FLOPs for people, the stage's place in its chain, budget, transfer and FLOP summary.

A family's card (compt/<family>/card.py or its export module) adds its architecture, metrics
and loading instructions.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import yaml

if TYPE_CHECKING:
    from compt.export import FinishedStage


def metadata_header(license: str, library_name: str, pipeline_tag: str, tags: list[str]) -> str:
    """The Hub's YAML front matter."""
    meta = {"library_name": library_name, "license": license, "pipeline_tag": pipeline_tag, "tags": tags}
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def format_value(x: Any) -> str:
    """A metric for a table: floats to 4 significant figures, ints with thousands separators."""
    if isinstance(x, bool) or x is None:
        return str(x)
    if isinstance(x, float):
        return f"{x:.4g}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def flatten(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) for every scalar in a nested dict; lists are left out."""
    rows = []
    for k, v in d.items():
        if isinstance(v, dict):
            rows += flatten(v, f"{prefix}{k}.")
        elif isinstance(v, (int, float, str, bool)) or v is None:
            rows.append((prefix + k, v))
    return rows


def flops_text(x: float | None) -> str:
    """FLOPs for a table ("n/a" when unknown)."""
    from compt.flops import format_flops

    return "n/a" if x is None else format_flops(x)


def chain_stage(stage: "FinishedStage") -> dict[str, Any]:
    """The chain config's entry for this stage (empty if the config lists fewer stages)."""
    stages = stage.manifest["config"].get("stages") or []
    return stages[stage.index] if stage.index < len(stages) else {}


def chain_path(stage: "FinishedStage") -> str:
    """Every stage folder of the chain, in order, this one in bold."""
    return " -> ".join(
        (f"**{e.get('dir', '').split('/')[-1]}**" if e["index"] == stage.index else e.get("dir", "").split("/")[-1])
        for e in stage.manifest["stages"])


def budget(stage: "FinishedStage") -> str:
    """The stage's budget as configured, plus the steps, batch and samples it ran where recorded."""
    given_budget = {k: v for k, v in (chain_stage(stage).get("budget") or {}).items() if v is not None}
    given = ", ".join(f"{k}={v}" for k, v in given_budget.items()) or "n/a"
    m = stage.metrics
    if m.get("steps") is not None and m.get("global_batch") is not None:
        given += (f" ({m['steps']} steps x global batch {m['global_batch']} = "
                  f"{format_value(m.get('samples_seen'))} samples)")
    return given


def transfer(stage: "FinishedStage") -> dict[str, Any] | None:
    """The stage's transfer settings (init, align, alpha) with the defaults filled in; None for the first."""
    if stage.index == 0:
        return None
    from compt.config import alpha_default
    from compt.families import DEFAULT_FAMILY

    # The chain config leaves transfer (or its alpha) out for the defaults (compt.config.Transfer).
    given = stage.metrics.get("transfer") or chain_stage(stage).get("transfer") or {}
    out = {"init": "official", "align": True, **{k: v for k, v in given.items() if v is not None}}
    out.setdefault("alpha", alpha_default(stage.manifest["config"].get("family", DEFAULT_FAMILY), out["init"]))
    return out


def predecessor(stage: "FinishedStage") -> str | None:
    """The folder of the stage this one grew from; None for the first."""
    if stage.index == 0:
        return None
    prev = stage.manifest["stages"][stage.index - 1]
    return prev.get("dir", "").split("/")[-1] or f"{stage.index - 1}-{prev.get('name')}"


def flops_summary(stage: "FinishedStage",
                  sample_train_flops: Callable[[dict[str, Any]], float] | None = None) -> dict[str, float | None]:
    """This stage's training FLOPs, the chain's up to it, and training it from scratch.

    Where metrics.json records no from-scratch figure, it is estimated as
    ``sample_train_flops(model_cfg)`` (the family's per-sample training cost of this
    architecture) times the first stage's samples: CoM-PT's baseline, every model trained
    alone like the first.
    """
    flops = stage.metrics.get("flops") or {}
    summaries = [(e.get("metrics") or {}) for e in stage.manifest["stages"][:stage.index + 1]]
    totals = [s.get("flops_total") for s in summaries]
    chain = sum(totals) if totals and all(t is not None for t in totals) else None
    scratch = flops.get("from_scratch")
    first_samples = summaries[0].get("samples_seen") if summaries else None
    if scratch is None and first_samples and sample_train_flops is not None:
        try:
            scratch = sample_train_flops(stage.model_cfg) * first_samples
        except Exception:  # noqa: BLE001 - an estimate only; the card says n/a
            scratch = None
    return {"student_train": flops.get("student_train"), "teacher_forward": flops.get("teacher_forward"),
            "total": flops.get("total"), "chain_total": chain, "from_scratch": scratch,
            "first_stage_samples": first_samples}
