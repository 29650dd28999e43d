"""Human-facing outputs of a run: the final results table (terminal + markdown; its columns
and rows come from the family), the per-stage loss curve as CSV and PNG.
"""
from __future__ import annotations

import csv
from pathlib import Path


def print_table(title: str, headers: list[str], rows: list[list[str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for c in headers:
        table.add_column(c, justify="left" if c in ("stage", "model", "budget") else "right")
    for row in rows:
        table.add_row(*row)
    console = Console()
    if not console.is_terminal:  # logs and pipes: do not squeeze the table into 80 columns
        console = Console(width=170)
    console.print(table)


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
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


def plot_chain(path: Path, stages: list[dict], quality, title: str) -> None:
    """Each stage's quality (the family's headline metric) against the chain's cumulative training FLOPs:
    what each larger model bought, and at what total cost."""
    points = [(m, m.get(quality.key)) for m in stages]
    if not points or all(v is None for _, v in points):
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    total, xs = 0.0, []
    for m, _ in points:
        total += m["flops"]["total"]
        xs.append(total)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    shown = [(x, v, m) for x, (m, v) in zip(xs, points) if v is not None]
    ax.plot([x for x, _, _ in shown], [v for _, v, _ in shown], marker="o")
    for x, v, m in shown:
        ax.annotate(f"{m['stage']}-{m['name']}", (x, v), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.margins(x=0.1, y=0.15)  # room for the stage labels
    ax.set_xlabel("cumulative training FLOPs of the chain")
    ax.set_ylabel(f"{quality.label} ({'higher' if quality.higher_is_better else 'lower'} is better)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
