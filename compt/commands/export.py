"""``compt export``: a finished stage (or the whole family) in open_clip's and transformers'
Hub formats (CLIP) or as a transformers save_pretrained folder (LLaMA) with a model card,
optionally uploaded to the Hugging Face Hub.

    compt export RUN_DIR/stages/<k>-<name> --out DIR [--format open_clip|transformers|both]
                 [--license ID] [--push-to-hub ORG/NAME [--private] [--revision R]] [--dry-run]
    compt export RUN_DIR --all --out DIR ...
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _error(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def _exporter(path: Path, whole_run: bool):
    """The export module of the family ``path`` (a stage, or a run with ``whole_run``) belongs to.

    Every family's module has the same API (FORMATS, DEFAULT_FORMAT, claims, read_stage,
    read_run, export; see compt/export.py). The default family also claims runs that name no
    family, so another family's claim is the more specific one and comes first; what no family
    claims goes to the default family's exporter, whose reader says what is wrong with it."""
    from compt.families import DEFAULT_FAMILY, all_families, family_of

    claimed = [f for f in all_families() if f.exporter().claims(path, whole_run)]
    claimed.sort(key=lambda f: f.name == DEFAULT_FAMILY)  # stable: registry order otherwise
    return (claimed[0] if claimed else family_of(DEFAULT_FAMILY)).exporter()


def run(args: argparse.Namespace) -> int:
    from compt.export import ExportError, hub_token_available, push_folder

    if (args.private or args.revision) and not args.push_to_hub:
        return _error("--private and --revision only apply with --push-to-hub ORG/NAME")
    if args.push_to_hub and args.push_to_hub.count("/") != 1:
        return _error(f"--push-to-hub takes ORG/NAME (got '{args.push_to_hub}')")
    path = Path(args.path)
    if not args.all and (path / "manifest.json").is_file():
        return _error(f"{path} is a run directory; pass RUN_DIR/stages/<k>-<name>, or add --all for every stage")
    if args.push_to_hub and not args.dry_run and not hub_token_available():
        return _error("no Hugging Face token found; set HF_TOKEN or run `hf auth login`, then retry")
    exporter = _exporter(path, args.all)
    fmt = args.format or exporter.DEFAULT_FORMAT
    try:
        stages = exporter.read_run(path) if args.all else [exporter.read_stage(path)]
        result = exporter.export(stages, args.out, fmt=fmt, license=args.license, family=args.all,
                                 repo_id=args.push_to_hub, dry_run=args.dry_run)
    except ExportError as e:
        return _error(str(e))

    for note in result.notes:
        print(f"note: {note}")
    total = sum(size for _, size in result.files)
    if result.written:
        print(f"wrote {result.out}: {len(result.files)} files, {_size(total)}")
    else:
        target = f"upload to {args.push_to_hub}" if args.push_to_hub else f"write to {result.out}"
        extra = [w for w, on in (("private", args.private), (f"revision {args.revision}", args.revision)) if on]
        print(f"dry run: would {target}{' (' + ', '.join(extra) + ')' if extra else ''}: "
              f"{len(result.files)} files, {_size(total)}")
        for name, size in result.files:
            print(f"  {name:<40} {_size(size):>10}")
        return 0

    if args.push_to_hub:
        what = f"{stages[0].chain} " + ("(all stages)" if args.all else f"stage {stages[0].folder}")
        try:
            url = push_folder(result.out, args.push_to_hub, private=args.private, revision=args.revision,
                              commit_message=f"compt export: {what}")
        except Exception as e:  # noqa: BLE001 - report any upload failure; the export stays on disk
            print(f"error: upload to {args.push_to_hub} failed ({type(e).__name__}: {_scrub(str(e))}); "
                  f"the export is in {result.out}", file=sys.stderr)
            return 1
        print(f"uploaded to https://huggingface.co/{args.push_to_hub}: {url}")
    return 0


def _scrub(text: str) -> str:
    """Never echo the token, even if an error message carried it."""
    from huggingface_hub import get_token

    token = get_token()
    return text.replace(token, "***") if token else text


def register(sub) -> None:
    ex = sub.add_parser("export", help="export a finished stage (or --all) to open_clip/transformers Hub formats "
                                       "(LLaMA: transformers)")
    ex.add_argument("path", help="RUN_DIR/stages/<k>-<name>, or RUN_DIR with --all")
    ex.add_argument("--all", action="store_true", help="export every stage of RUN_DIR plus a family card")
    ex.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    # The union of the families' FORMATS, written out: reading them would import every family's
    # model library each time any compt command builds its parser. The exporter checks its own.
    ex.add_argument("--format", choices=["open_clip", "transformers", "both"], default=None,
                    help="CLIP: open_clip, transformers or both (default); LLaMA: transformers only (default)")
    ex.add_argument("--license", default="other", help="license id for the model card header (default: other)")
    ex.add_argument("--push-to-hub", metavar="ORG/NAME", default=None,
                    help="upload the export to this Hub model repo (token: HF_TOKEN or `hf auth login`)")
    ex.add_argument("--private", action="store_true", help="create the Hub repo private")
    ex.add_argument("--revision", default=None, help="Hub branch to upload to (created if missing)")
    ex.add_argument("--dry-run", action="store_true",
                    help="build the export in a temporary folder, list its files and sizes, write and upload nothing")
    ex.set_defaults(func=run)
