"""Human-facing outputs of a run: the final results table (terminal + markdown),
the per-stage loss curve as CSV and PNG.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Sequence

from compt.flops import format_flops


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


HEADERS = {
    "clip": ["stage", "model", "params", "budget", "init top-1", "top-1", "top-5", "I->T R@1", "T->I R@1", "FLOPs",
             "wall"],
    "llama": ["stage", "model", "params", "budget", "teacher ppl", "init ppl", "val ppl", "val loss", "FLOPs", "wall"],
}


def _num(x: float | None, fmt: str = ".2f") -> str:
    return "-" if x is None else format(x, fmt)


def result_rows(stages: Sequence[tuple[Any, dict]], family: str = "clip") -> list[list[str]]:
    """One row per (StageConfig, metrics dict), under HEADERS[family]."""
    rows = []
    for stage, m in stages:
        if family == "llama":
            model = stage.model if isinstance(stage.model, str) else "inline"
            budget = ", ".join(f"{k}={v}" for k, v in stage.budget.model_dump().items() if v is not None)
            rows.append([f"{m['stage']}-{m['name']}", model, f"{m['params'] / 1e6:.2f}M",
                         f"{budget} ({m['steps']} steps)", _num(m.get("teacher_val_ppl")),
                         _num(m.get("init_val_ppl")), _num(m.get("val_ppl")), _num(m.get("val_loss"), ".4f"),
                         format_flops(m["flops"]["total"]), f"{m['wall_seconds']:.0f}s"])
            continue
        r = m.get("retrieval") or {}
        model = stage.model if isinstance(stage.model, str) else "inline"
        budget = ", ".join(f"{k}={v}" for k, v in stage.budget.model_dump().items() if v is not None)
        rows.append([
            f"{m['stage']}-{m['name']}", model, f"{m['params'] / 1e6:.2f}M", f"{budget} ({m['steps']} steps)",
            _pct(m.get("init_zeroshot_top1")), _pct(m.get("zeroshot_top1")), _pct(m.get("zeroshot_top5")),
            _pct((r.get("image_to_text") or {}).get("R@1")), _pct((r.get("text_to_image") or {}).get("R@1")),
            format_flops(m["flops"]["total"]), f"{m['wall_seconds']:.0f}s",
        ])
    return rows


def print_table(title: str, rows: list[list[str]], family: str = "clip") -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for c in HEADERS[family]:
        table.add_column(c, justify="left" if c in ("stage", "model", "budget") else "right")
    for row in rows:
        table.add_row(*row)
    console = Console()
    if not console.is_terminal:  # logs and pipes: do not squeeze the table into 80 columns
        console = Console(width=170)
    console.print(table)


def markdown_table(rows: list[list[str]], family: str = "clip") -> str:
    lines = ["| " + " | ".join(HEADERS[family]) + " |", "|" + "---|" * len(HEADERS[family])]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_loss_csv(path: Path, curve: list[dict[str, float]]) -> None:
    if not curve:
        return
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(curve[0]))
        w.writeheader()
        w.writerows(curve)


def plot_loss(path: Path, curve: list[dict[str, float]], title: str) -> None:
    if not curve:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [c["step"] for c in curve]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [c["loss"] for c in curve], label="total")
    task, transfer = [key for key in curve[0] if key not in ("step", "loss", "lr")]  # e.g. contrastive, alignment
    ax.plot(steps, [c[task] for c in curve], label=task)
    if any(c[transfer] for c in curve):
        ax.plot(steps, [c[transfer] for c in curve], label=transfer)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
