"""``compt eval``: re-evaluate a saved stage and print its metrics.

    compt eval RUN_DIR/stages/<k>-<name> [--batch-size N] [--json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def run(args: argparse.Namespace) -> int:
    from safetensors import SafetensorError

    from compt.config import ChainConfig
    from compt.families import family_of

    stage_dir = Path(args.stage_dir)
    files = {n: stage_dir / n for n in ("config.json", "model.safetensors")}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        print(f"error: {stage_dir} is not a finished stage directory (missing {', '.join(missing)}); "
              "pass RUN_DIR/stages/<k>-<name> of a stage whose status is 'done'", file=sys.stderr)
        return 2
    run_dir = stage_dir.parent.parent
    manifest_path = run_dir / "manifest.json"
    if not manifest_path.is_file():
        print(f"error: no manifest at {manifest_path}; the stage directory must sit inside its run directory",
              file=sys.stderr)
        return 2
    cfg = ChainConfig.model_validate(json.loads(manifest_path.read_text())["config"])
    if args.batch_size:
        cfg.eval.batch_size = args.batch_size
    family = family_of(cfg.family)
    model_cfg = json.loads(files["config.json"].read_text())
    try:
        model = family.load_teacher(model_cfg, files["model.safetensors"])
    except (SafetensorError, ValueError) as e:
        print(f"error: cannot load {files['model.safetensors']}: {e}", file=sys.stderr)
        return 2
    metrics = family.evaluate(model, family.val_data(cfg.data, run_dir), model_cfg, cfg)
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        first, *rest = family.metrics_lines(metrics)
        print(f"{stage_dir}: {first}")
        for line in rest:
            print(line)
    return 0


def register(sub) -> None:
    ev = sub.add_parser("eval", help="re-evaluate a saved stage and print its metrics")
    ev.add_argument("stage_dir", help="RUN_DIR/stages/<k>-<name>")
    ev.add_argument("--batch-size", type=int, default=None)
    ev.add_argument("--json", action="store_true", help="print the metrics as JSON")
    ev.set_defaults(func=run)
