"""``compt eval``: re-evaluate a saved stage and print its metrics.

    compt eval RUN_DIR/stages/<k>-<name> [--batch-size N] [--json]
               [--imagefolder DIR [--classnames auto|imagenet|folders|FILE] [--templates auto|openai|simple|FILE]
                [--max-images N]]

The run's own evaluation (its validation split, and its ``data.imagefolder`` if the chain gives one),
or with ``--imagefolder`` zero-shot on that class-folder tree too.
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
    if args.imagefolder:
        problems = folder_problems(cfg, args)
        if problems:
            print("error: " + "\n  ".join(problems), file=sys.stderr)
            return 2
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


def _names_or_file(value: str, keywords: tuple[str, ...]) -> str | list[str]:
    """A keyword, or a file with one entry per line (blank lines skipped)."""
    if value in keywords:
        return value
    return [line.strip() for line in Path(value).read_text().splitlines() if line.strip()]


def folder_problems(cfg, args: argparse.Namespace) -> list[str]:
    """Set ``--imagefolder`` (and its options) as the config's ``data.imagefolder``; what is wrong with them."""
    from pydantic import ValidationError

    from compt.data.imagefolder import ImageFolderEval

    if "imagefolder" not in type(cfg.data).model_fields:
        return [f"--imagefolder: this stage's model family ({cfg.family}) has no image tower to evaluate"]
    try:
        spec = {"path": args.imagefolder, "max_images": args.max_images,
                "classnames": _names_or_file(args.classnames, ("auto", "imagenet", "folders")),
                "templates": _names_or_file(args.templates, ("auto", "openai", "simple"))}
    except OSError as e:
        return [f"--classnames/--templates: cannot read {e.filename} ({e.strerror}); give a keyword or a file "
                "with one entry per line"]
    try:
        folder = ImageFolderEval.model_validate(spec)
    except ValidationError as e:
        return [f"--{'.'.join(str(p) for p in err['loc'][:1]).replace('_', '-')}: {err['msg']}" for err in e.errors()]
    problems = [p.replace("data.imagefolder.path", "--imagefolder").replace("data.imagefolder.", "--")
                for p in folder.problems()]
    cfg.data.imagefolder = folder
    return problems


def register(sub) -> None:
    ev = sub.add_parser("eval", help="re-evaluate a saved stage and print its metrics")
    ev.add_argument("stage_dir", help="RUN_DIR/stages/<k>-<name>")
    ev.add_argument("--batch-size", type=int, default=None)
    ev.add_argument("--json", action="store_true", help="print the metrics as JSON")
    ev.add_argument("--imagefolder", default=None, metavar="DIR",
                    help="also zero-shot on this class-folder tree (DIR/<class>/<image>, e.g. ImageNet's val)")
    ev.add_argument("--classnames", default="auto", metavar="auto|imagenet|folders|FILE",
                    help="--imagefolder's class names: auto (ImageNet's for WordNet-id folders, else the folder "
                         "names), or a file with one name per line in sorted folder order (default: auto)")
    ev.add_argument("--templates", default="auto", metavar="auto|openai|simple|FILE",
                    help="--imagefolder's prompts: open_clip's openai or simple ImageNet templates, or a file with "
                         "one prompt per line containing {} (default: auto, openai for ImageNet classes)")
    ev.add_argument("--max-images", type=int, default=None, metavar="N",
                    help="--imagefolder: N images, taken from the classes in turn")
    ev.set_defaults(func=run)
