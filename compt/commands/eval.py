"""``compt eval``: re-evaluate a saved stage and print its metrics.

    compt eval RUN_DIR/stages/<k>-<name> [--batch-size N] [--json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def run(args: argparse.Namespace) -> int:
    from compt.config import ChainConfig
    from compt.export import ExportError, check_tensors, finished_weights, stage_entry
    from compt.families import family_of

    stage_dir = Path(args.stage_dir)
    config_path = stage_dir / "config.json"
    if not config_path.is_file():
        print(f"error: {stage_dir} is not a finished stage directory (missing {config_path}); "
              "pass RUN_DIR/stages/<k>-<name> of a stage whose status is 'done'", file=sys.stderr)
        return 2
    # The weights the manifest lists for this stage, inside the run and matching its sha256, holding the
    # tensors of the model config.json describes: a corrupt or foreign file is refused, not scored.
    try:
        run_dir, manifest, entry = stage_entry(stage_dir)
        _, weights = finished_weights(run_dir, entry, action="evaluated")
        cfg = ChainConfig.model_validate(manifest["config"])
        model_cfg = json.loads(config_path.read_text())
        check_tensors(f"stage {stage_dir.name}", weights, cfg.family, model_cfg)
    except (ExportError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.batch_size:
        cfg.eval.batch_size = args.batch_size
    family = family_of(cfg.family)
    try:
        model = family.load_teacher(model_cfg, weights)
    except (ValueError, RuntimeError) as e:  # safetensors' errors, missing/unexpected/mis-shaped tensors
        print(f"error: cannot load {weights}: {e}", file=sys.stderr)
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
