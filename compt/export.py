"""What every family's export shares: reading a finished run or stage (manifest paths kept inside the
run, weights checked against their sha256 and against the tensors of the stage's model), building the
output in a temporary folder renamed into place, the Hub upload.

A family's export module (compt/<family>/export.py) reads its own stage configs, writes its own
formats and cards, and has the same API: FORMATS, DEFAULT_FORMAT, read_stage, read_run, export, claims.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from compt.rundir import RunDirError, contained_path
from compt.weights import sha256_file


class ExportError(ValueError):
    """Bad input to an export (the command exits 2 and writes nothing)."""


# ---------------------------------------------------------------------------
# A finished stage of a run directory.
# ---------------------------------------------------------------------------

@dataclass
class FinishedStage:
    run: Path
    index: int
    name: str
    dir: Path
    weights: Path
    sha256: str
    model_cfg: dict[str, Any]
    metrics: dict[str, Any]
    manifest: dict[str, Any] = field(repr=False)

    @property
    def folder(self) -> str:
        return self.dir.name

    @property
    def chain(self) -> str:
        return self.manifest.get("chain") or self.manifest["config"]["name"]


# Reads one manifest entry of a run into a FinishedStage: (run, manifest, entry) -> stage.
EntryReader = Callable[[Path, dict[str, Any], dict[str, Any]], FinishedStage]


def read_json(path: Path, what: str) -> Any:
    """The JSON in ``path``, or an ExportError naming ``what`` is missing or broken."""
    if not path.is_file():
        raise ExportError(f"{what} {path} is missing")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"{what} {path} is not valid JSON ({e})") from e


def read_manifest(run: Path) -> dict[str, Any]:
    """The run's manifest.json, checked to be a compt run manifest."""
    manifest = read_json(run / "manifest.json", "run manifest")
    if not isinstance(manifest, dict) or not isinstance(manifest.get("stages"), list) or "config" not in manifest \
            or not all(isinstance(e, dict) for e in manifest["stages"]):
        raise ExportError(f"{run / 'manifest.json'} is not a compt run manifest (no 'stages'/'config')")
    return manifest


def entry_paths(run: Path, entry: dict[str, Any]) -> tuple[Path, Path]:
    """(stage dir, weights) of a manifest entry, both inside ``run``; ExportError naming the entry otherwise."""
    where = f"{run / 'manifest.json'} stage {entry.get('index', '?')}"
    try:
        stage_dir = contained_path(run, entry.get("dir"), f"{where} 'dir'")
        weights = contained_path(run, entry.get("weights") or f"{entry['dir']}/model.safetensors", f"{where} 'weights'")
    except RunDirError as e:
        raise ExportError(str(e)) from None
    return stage_dir, weights


def finished_weights(run: Path, entry: dict[str, Any], action: str = "exported") -> tuple[str, Path]:
    """(label, weights path) of a manifest entry marked done, its paths inside the run, whose weights
    match their sha256."""
    stage_dir, weights = entry_paths(run, entry)
    label = f"stage {stage_dir.name}"
    if entry.get("status") != "done":
        raise ExportError(f"{label} has status '{entry.get('status')}' in {run / 'manifest.json'}; only finished "
                          f"('done') stages can be {action}: finish the chain first (rerun the launcher with the "
                          "same --output)")
    if not weights.is_file():
        raise ExportError(f"{label}: weights file {weights} is missing")
    if not entry.get("sha256") or sha256_file(weights) != entry["sha256"]:
        raise ExportError(f"{label}: weights file {weights} does not match the sha256 in the manifest "
                          "(corrupt or replaced); retrain the stage (rerun the launcher with the same --output)")
    return label, weights


def stage_entry(stage_dir: str | Path) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """(run, manifest, entry) of the stage at ``stage_dir``, which its run's manifest must list."""
    stage_dir = Path(stage_dir)
    if not stage_dir.is_dir():
        raise ExportError(f"{stage_dir} is not a directory; pass RUN_DIR/stages/<k>-<name>")
    run = stage_dir.resolve().parent.parent
    manifest = read_manifest(run)
    entries = [e for e in manifest["stages"]
               if isinstance(e, dict) and (run / str(e.get("dir", ""))).resolve() == stage_dir.resolve()]
    if not entries:
        raise ExportError(f"{stage_dir} is not a stage listed in {run / 'manifest.json'}; "
                          "pass RUN_DIR/stages/<k>-<name>")
    return run, manifest, entries[0]


def model_tensors(family_name: str | None, model_cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """name -> shape of every tensor a stage of this family and config saves (built on the meta device,
    named as the trainer writes them)."""
    import torch

    from compt.families import DEFAULT_FAMILY, family_of

    family = family_of(family_name or DEFAULT_FAMILY)
    with torch.device("meta"):
        model = family.build(model_cfg, None)
    out = {}
    for name, p in model.named_parameters():
        renamed = family.export_name(name, p) if family.is_exported(name) else None
        if renamed is not None:
            out[renamed[0]] = tuple(renamed[1].shape)
    return out


def check_tensors(label: str, weights: Path, family_name: str | None, model_cfg: dict[str, Any]) -> None:
    """``weights`` is a valid safetensors file holding exactly the stage model's tensors (names and shapes):
    a pickle, a malformed header or another model's file is refused before anything copies or loads it."""
    from compt.weights import open_lazy

    try:
        with open_lazy(weights) as src:
            got = {k: tuple(src.shape(k)) for k in src.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise ExportError(f"{label}: weights file {weights} is not a valid safetensors file "
                          f"({type(e).__name__}: {e}); retrain the stage (rerun the launcher with the same "
                          "--output)") from None
    try:
        want = model_tensors(family_name, model_cfg)
    except Exception as e:  # noqa: BLE001 - whatever the model library says about a bad config
        raise ExportError(f"{label}: its config.json does not build a model ({type(e).__name__}: {e})") from None
    mismatch = tensor_mismatch(got, want)
    if mismatch:
        raise ExportError(f"{label}: weights file {weights} does not hold the tensors of the model in its "
                          f"config.json ({mismatch}); retrain the stage (rerun the launcher with the same --output)")


def tensor_mismatch(got: dict[str, Any], want: dict[str, Any]) -> str | None:
    """How a file's tensor shapes (name -> shape) differ from a model's: missing, unexpected and wrong-shape
    tensors, a few of each; None when they match."""
    missing, unexpected = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    wrong = sorted(f"{k} {list(got[k])} (config.json says {list(want[k])})"
                   for k in set(want) & set(got) if tuple(got[k]) != tuple(want[k]))
    parts = [f"{what}: {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}"
             for what, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if names]
    return "; ".join(parts) or None


def _checked(stage: FinishedStage) -> FinishedStage:
    check_tensors(f"stage {stage.folder}", stage.weights, stage.manifest["config"].get("family"), stage.model_cfg)
    return stage


def read_stage(stage_dir: str | Path, from_entry: EntryReader) -> FinishedStage:
    """The stage at ``stage_dir``, which its run's manifest must list; ``from_entry`` (the family's)
    reads and checks it; its weights must hold its model's tensors."""
    return _checked(from_entry(*stage_entry(stage_dir)))


def read_run(run_dir: str | Path, from_entry: EntryReader) -> list[FinishedStage]:
    """Every stage of a run, all finished and intact, or one error naming each problem."""
    run = Path(run_dir)
    if not run.is_dir():
        raise ExportError(f"{run} is not a directory; pass a run directory (the launcher's --output)")
    manifest = read_manifest(run)
    stages, problems = [], []
    for entry in manifest["stages"]:
        try:
            stages.append(_checked(from_entry(run, manifest, entry)))
        except ExportError as e:
            problems.append(str(e))
    if problems:
        raise ExportError("cannot export the whole family:\n" + "\n".join(f"  - {p}" for p in problems))
    return stages


# ---------------------------------------------------------------------------
# Which family a path belongs to: what the families' claims(path, whole_run) look at.
# Unlike the readers above these never raise; a missing or broken file is None.
# ---------------------------------------------------------------------------

def run_of(path: Path, whole_run: bool) -> Path:
    """The run directory of an export's path (a run with --all, else RUN_DIR/stages/<k>-<name>)."""
    return path if whole_run else path.resolve().parent.parent


def manifest_config(run: Path) -> dict[str, Any] | None:
    """The chain config recorded in ``run``'s manifest.json, or None where there is none to read."""
    try:
        manifest = json.loads((run / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    config = manifest.get("config") if isinstance(manifest, dict) else None
    return config if isinstance(config, dict) else None


def stage_config(stage_dir: Path) -> dict[str, Any] | None:
    """The stage's config.json, or None where there is no JSON object to read."""
    try:
        config = json.loads((stage_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


# ---------------------------------------------------------------------------
# Writing an export: stages -> a folder (or a listing, for --dry-run).
# ---------------------------------------------------------------------------

@dataclass
class ExportResult:
    out: Path
    files: list[tuple[str, int]]  # (path relative to out, bytes)
    notes: list[str]  # e.g. why the transformers format was skipped
    written: bool  # False for a dry run


def check_out(out: Path) -> None:
    """``out`` must not exist or be an empty directory: an export never mixes with old files."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {out} already exists and is not an empty directory; pick a new --out "
                          "(or remove the old export)")


def _first_missing(path: Path) -> Path | None:
    missing = None
    for p in [path, *path.parents]:
        if p.exists():
            break
        missing = p
    return missing


def normal_permissions(root: Path) -> None:
    """Every file under ``root`` readable as the umask allows (not safetensors' 0600)."""
    # safetensors writes its files 0600; an export is meant to be shared.
    umask = os.umask(0o022)
    os.umask(umask)
    for p in root.rglob("*"):
        if p.is_file():
            p.chmod(0o666 & ~umask)


def write_staged(out: Path, dry_run: bool, fill: Callable[[Path], list[str]]) -> ExportResult:
    """Build an export with ``fill(tmp) -> notes`` in a temporary sibling of ``out``, then rename it
    into place (a dry run lists and deletes it). On any failure nothing is left behind."""
    created = _first_missing(out.parent)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.export-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        notes = fill(tmp)
        normal_permissions(tmp)
        files = sorted((str(p.relative_to(tmp)), p.stat().st_size) for p in tmp.rglob("*") if p.is_file())
        if dry_run:
            shutil.rmtree(tmp)
            if created is not None:
                shutil.rmtree(created, ignore_errors=True)
            return ExportResult(out, files, notes, written=False)
        check_out(out)  # still free?
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
    return ExportResult(out, files, notes, written=True)


# ---------------------------------------------------------------------------
# The Hub.
# ---------------------------------------------------------------------------

def hub_token_available() -> bool:
    """Whether huggingface_hub finds a token (HF_TOKEN or the login cache); never returns it."""
    from huggingface_hub import get_token

    return bool(get_token())


def push_folder(folder: Path, repo_id: str, private: bool = False, revision: str | None = None,
                commit_message: str = "compt export") -> str:
    """Upload ``folder`` to the model repo ``repo_id``; returns the commit URL.

    The token is left to huggingface_hub (HF_TOKEN or the login cache) so compt never holds it.
    """
    from huggingface_hub import HfApi

    api = HfApi()
    repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    repo_id = getattr(repo, "repo_id", None) or repo_id
    if revision and revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
    info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision,
                             repo_type="model", commit_message=commit_message)
    return str(getattr(info, "commit_url", None) or info)
