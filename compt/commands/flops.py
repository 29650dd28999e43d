"""``compt flops``: the training cost of a chain recipe vs training every model from scratch.

    compt flops --chain paper-cc3m-vit|demo|PATH.yaml [--baseline-epochs E] [--json]
"""
from __future__ import annotations

import argparse
import json
import sys


def run(args: argparse.Namespace) -> int:
    from compt.config import ChainConfigError
    from compt.costs import chain_cost
    from compt.recipes import RECIPE_PRESETS, load_recipe

    try:
        recipe = load_recipe(args.chain, args.baseline_epochs)
    except ChainConfigError as e:
        print(f"error: {e}\n(recipe presets: {', '.join(sorted(RECIPE_PRESETS))})", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cost = chain_cost(recipe)
    if cost.analytic_agrees is False:
        print(f"warning: counted and analytic FLOPs differ by {100 * cost.analytic_max_rel_diff:.1f}% "
              f"(tolerance {100 * 0.05:.0f}%)", file=sys.stderr)
    if args.json:
        print(json.dumps({"source": recipe.source, "notes": recipe.notes, **cost.to_json()}, indent=2))
    else:
        print_cost(recipe, cost)
    return 0


def print_cost(recipe, cost) -> None:
    from rich.console import Console
    from rich.table import Table

    from compt.flops import format_flops

    def epochs(x):
        return "-" if x is None else f"{x:.3g}"

    from compt.families import family_of

    unit = family_of(recipe.family).sample_unit(recipe, cost.captions_per_image)
    table = Table(title=f"{cost.recipe}: {unit}"
                        + (f", {cost.samples_per_epoch:,} samples per epoch" if cost.samples_per_epoch else ""))
    for col in ("model", "params", "train / sample", "teacher fwd / sample", "baseline epochs", "baseline",
                "chain epochs", "chain", "chain / baseline"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for m in cost.per_model:
        table.add_row(m.name, f"{m.params / 1e6:.1f}M", format_flops(m.train_per_sample),
                      format_flops(m.teacher_forward_per_sample) if m.teacher_forward_per_sample else "-",
                      epochs(m.baseline_epochs), format_flops(m.baseline_flops),
                      epochs(m.chain_epochs), format_flops(m.chain_flops),
                      f"{m.chain_flops / m.baseline_flops:.3f}")
    table.add_row("family", "", "", "", "", format_flops(cost.baseline_flops), "", format_flops(cost.chain_flops),
                  f"{cost.chain_flops / cost.baseline_flops:.3f}", style="bold")
    console = Console()
    if not console.is_terminal:
        console = Console(width=150)
    console.print(table)
    line = f"acceleration (baseline / chain FLOPs): {cost.acceleration:.2f}x"
    if cost.analytic_acceleration is not None:
        line += (f"  (analytic formula: {cost.analytic_acceleration:.2f}x, per-sample figures within "
                 f"{100 * cost.analytic_max_rel_diff:.1f}%)")
    console.print(line)
    for note in recipe.notes:
        console.print(f"[dim]{note}[/dim]")


def register(sub) -> None:
    p = sub.add_parser("flops", help="FLOPs of a chain recipe vs every model from scratch (acceleration ratio)")
    p.add_argument("--chain", required=True,
                   help="a recipe preset (paper-cc3m-vit), a chain preset (demo) or a chain YAML path")
    p.add_argument("--baseline-epochs", type=float, default=None,
                   help="chain YAML only: baseline epochs per model (default: the first stage's budget)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)
