"""Human-facing outputs of a run: the final results table (terminal + markdown),
the per-stage loss curve as CSV and PNG.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Sequence

from compt.flops import format_flops

COLUMNS = ("stage", "model", "params", "budget", "init top-1", "top-1", "top-5", "I->T R@1", "T->I R@1", "FLOPs", "wall")


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def result_rows(stages: Sequence[tuple[Any, dict]]) -> list[list[str]]:
    """One row per (StageConfig, metrics dict)."""
    rows = []
    for stage, m in stages:
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


def print_table(title: str, rows: list[list[str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for c in COLUMNS:
        table.add_column(c, justify="left" if c in ("stage", "model", "budget") else "right")
    for row in rows:
        table.add_row(*row)
    console = Console()
    if not console.is_terminal:  # logs and pipes: do not squeeze the table into 80 columns
        console = Console(width=170)
    console.print(table)


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
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
    ax.plot(steps, [c["contrastive"] for c in curve], label="contrastive")
    if any(c["alignment"] for c in curve):
        ax.plot(steps, [c["alignment"] for c in curve], label="alignment")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
