"""The run directory contract: ``manifest.json`` plus one folder per stage.

<run>/manifest.json                     chain name, resolved config, per-stage status/paths/sha256/summary
<run>/stages/<k>-<name>/model.safetensors, config.json, metrics.json, loss.csv, loss.png
<run>/replaced/<time>/<k>-<name>/       stages retrained after a confirmed config change (kept, never deleted)
Only rank 0 writes; every write goes to a temporary name and is renamed into place.

A stage's *fingerprint* hashes everything its weights depend on: its model, budget,
transfer and optimisation settings, the data, seed, evaluation, kernels, the DeepSpeed
config, and its predecessor's fingerprint. Settings that cannot change the weights
(logging, checkpoint frequency, fault thresholds) are left out, so they can change on
resume. A changed fingerprint on a stage with progress needs ``--accept-config-change``.

Every path the manifest holds (a stage's ``dir`` and ``weights``) must resolve inside the run
directory: a run directory is user input (someone may send you one), and compt moves, hashes and
exports what those paths name.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from compt.config import ChainConfig, Transfer
from compt.metrics import MONITOR_KEYS

STATUSES = ("pending", "running", "done", "failed")
RESULT_NEUTRAL_SETTINGS = {"log_every", "checkpoint_every_steps", "checkpoint_minutes", "keep_checkpoints",
                           "max_nonfinite_steps"}
# imagefolder: an extra evaluation after training, so adding one keeps the fingerprints of runs made without it
RESULT_NEUTRAL_DATA = {"max_bad_fraction", "workers", "imagefolder"}


def stage_fingerprints(cfg: ChainConfig, ds_config: dict) -> list[str]:
    common = {"seed": cfg.seed, "data": cfg.data.model_dump(mode="json", exclude=RESULT_NEUTRAL_DATA),
              "eval": cfg.eval.model_dump(mode="json"), "kernels": cfg.kernels,
              # printing and monitoring (TensorBoard, CSV, W&B, steps_per_print) never change the weights
              "ds_config": {k: v for k, v in ds_config.items() if k not in MONITOR_KEYS}}
    out, prev = [], ""
    for k, stage in enumerate(cfg.stages):
        transfer = cfg.transfer(k)
        payload = {**common, "name": stage.name, "model": cfg.model_cfg(k), "budget": stage.budget.model_dump(),
                   # where the teacher lives (sharded or replicated) changes memory and speed, not its numbers
                   "transfer": transfer.model_dump(mode="json", exclude={"teacher"}) if transfer else None,
                   "settings": stage.settings(cfg.defaults).model_dump(mode="json", exclude=RESULT_NEUTRAL_SETTINGS),
                   "predecessor": prev}
        if stage.deepspeed:  # only when given, so runs from before per-stage engine settings keep their fingerprints
            payload["deepspeed"] = stage.deepspeed
        prev = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
        out.append(prev)
    return out


class RunDirError(ValueError):
    """The run directory cannot be trusted as it is (a manifest path leading outside it, a malformed
    manifest): the launcher exits 2 naming the entry, before anything is moved or written."""


def contained_path(root: str | Path, rel: Any, what: str) -> Path:
    """``root / rel``, which must resolve (symlinks followed) strictly inside ``root``; RunDirError naming
    ``what`` (e.g. ``manifest.json stages[1].dir``) otherwise."""
    root = Path(root)
    if not isinstance(rel, str) or not rel.strip():
        raise RunDirError(f"{what} is {rel!r}, not a path inside {root}: the file was edited or is not compt's; "
                          "restore it (or pick a new --output / run directory)")
    path = root / rel
    base, target = root.resolve(), path.resolve()
    # compt writes these paths relative and without '..': anything else was put there by hand.
    if Path(rel).is_absolute() or ".." in Path(rel).parts or target == base or not target.is_relative_to(base):
        raise RunDirError(f"{what} is {rel!r}, which leads outside {root} (to {target}): compt only reads, moves "
                          "and exports files inside the run directory. The file was edited or comes from another "
                          "machine; fix that entry (a stage's files are in stages/<k>-<name>) or pick a new "
                          "--output")
    return path


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.manifest_path = self.root / "manifest.json"

    def stage_dir(self, k: int, name: str) -> Path:
        return self.root / "stages" / f"{k}-{name}"

    def read_manifest(self) -> dict | None:
        if not self.manifest_path.is_file():
            return None
        return json.loads(self.manifest_path.read_text())

    def entry_path(self, entry: dict, key: str) -> Path:
        """A stage entry's ``dir`` or ``weights``, checked to lie inside the run directory (RunDirError)."""
        index = entry.get("index", "?") if isinstance(entry, dict) else "?"
        return contained_path(self.root, entry.get(key) if isinstance(entry, dict) else None,
                              f"{self.manifest_path} stage {index} '{key}'")

    def untrusted(self) -> str | None:
        """Why the existing manifest cannot be used as it is (unreadable, or a path leading outside the run
        directory), naming each bad entry; None when it can (or there is none). Read-only: every rank asks."""
        try:
            manifest = self.read_manifest()
        except (OSError, ValueError) as e:
            return (f"{self.manifest_path} is not readable JSON ({e}); restore it from a backup, or move the run "
                    "directory away and start a new --output")
        if manifest is None:
            return None
        stages = manifest.get("stages") if isinstance(manifest, dict) else None
        if not isinstance(stages, list) or not all(isinstance(e, dict) for e in stages):
            return f"{self.manifest_path} is not a compt run manifest (no list of stage entries); pick a new --output"
        problems = []
        for e in stages:
            for key in ("dir", "weights"):
                if key == "weights" and e.get(key) is None:
                    continue
                try:
                    self.entry_path(e, key)
                except RunDirError as err:
                    problems.append(str(err))
        return "\n  ".join(problems) or None

    def _has_progress(self, entry: dict) -> bool:
        return entry["status"] != "pending" or (self.entry_path(entry, "dir") / "checkpoints").exists()

    def changed_stages(self, cfg: ChainConfig, ds_config: dict) -> list[dict]:
        """Old manifest entries with progress whose inputs differ in ``cfg`` (or that ``cfg`` drops)."""
        old = self.read_manifest()
        if old is None:
            return []
        new = stage_fingerprints(cfg, ds_config)
        try:
            before = stage_fingerprints(self._config_as_trained(old), old.get("ds_config") or {})
        except (ValidationError, ValueError, KeyError):
            before = [None] * len(old["stages"])  # written by an incompatible compt: treat all as changed
        return [e for k, e in enumerate(old["stages"])
                if self._has_progress(e) and (k >= len(new) or before[k] != new[k])]

    @staticmethod
    def _config_as_trained(manifest: dict) -> ChainConfig:
        """The manifest's chain config with the transfer settings its stages used: defaults that left the
        config (an alpha not given) are those of the compt that wrote it, so a changed default is a change."""
        cfg = ChainConfig.model_validate(manifest["config"])
        used = manifest.get("transfers") or []
        stages = [s.model_copy(update={"transfer": Transfer.model_validate(used[k])})
                  if k < len(used) and used[k] is not None else s for k, s in enumerate(cfg.stages)]
        return cfg.model_copy(update={"stages": stages})

    def conflict(self, cfg: ChainConfig, ds_config: dict, accept_change: bool = False) -> str | None:
        """Why this run directory cannot take ``cfg`` (read-only, so every rank can ask)."""
        untrusted = self.untrusted()
        if untrusted:
            return untrusted
        return None if accept_change else self._refusal(self.changed_stages(cfg, ds_config))

    def _refusal(self, changed: list[dict]) -> str | None:
        if not changed:
            return None
        names = ", ".join(f"{e['index']} '{e['name']}' ({e['status']})" for e in changed)
        return (f"--output {self.root} holds a run whose config differs for stage(s) with progress: {names}. "
                "Run again with --accept-config-change to retrain them (their files move to "
                f"{self.root / 'replaced'}), or pick a new --output directory")

    def _entry(self, k: int, name: str) -> dict:
        return {"index": k, "name": name, "status": "pending",
                "dir": str(self.stage_dir(k, name).relative_to(self.root)), "weights": None, "sha256": None,
                "metrics": None}

    def open(self, cfg: ChainConfig, ds_config: dict, accept_change: bool = False) -> dict:
        """Create the manifest, or take over an existing one: unchanged stages keep their state;
        changed stages with progress (only with ``accept_change``) move to ``replaced/`` and restart."""
        untrusted = self.untrusted()
        if untrusted:
            raise RunDirError(untrusted)
        changed_entries = self.changed_stages(cfg, ds_config)
        problem = None if accept_change else self._refusal(changed_entries)
        if problem:
            raise ValueError(problem)
        old = self.read_manifest()
        changed = {e["index"] for e in changed_entries}
        if changed:
            aside = self.root / "replaced" / time.strftime("%Y%m%d-%H%M%S")
            for e in old["stages"]:
                if e["index"] in changed and self.entry_path(e, "dir").exists():
                    aside.mkdir(parents=True, exist_ok=True)
                    shutil.move(str(self.entry_path(e, "dir")), str(aside / Path(e["dir"]).name))
            print(f"config change accepted: stage(s) {sorted(changed)} restart; their old files are in {aside}")
        self.root.mkdir(parents=True, exist_ok=True)
        kept = {e["index"]: e for e in (old or {"stages": []})["stages"] if e["index"] not in changed}
        manifest = {
            "chain": cfg.name,
            "config": cfg.model_dump(mode="json"),
            "ds_config": ds_config,
            # Each stage's transfer with compt's defaults filled in (changed_stages compares against them).
            "transfers": [t.model_dump(mode="json") if t else None for t in map(cfg.transfer, range(len(cfg.stages)))],
            "stages": [kept[k] if k in kept and kept[k]["name"] == s.name else self._entry(k, s.name)
                       for k, s in enumerate(cfg.stages)],
        }
        write_json(self.manifest_path, manifest)
        return manifest

    def record_failure(self, k: int, name: str, rank: int, world: int, error: BaseException) -> None:
        """Keep why stage ``k`` failed on this rank: every rank appends to its own
        ``<stage dir>/errors/rank<r>.log`` (a failure on one rank often shows on the others only as a
        lost connection), and rank 0 marks the stage failed in the manifest. Best effort: on a full
        disk the file may not be written, so the caller prints the error too."""
        log = self.stage_dir(k, name) / "errors" / f"rank{rank}.log"
        try:
            log.parent.mkdir(parents=True, exist_ok=True)
            with log.open("a") as f:
                f.write(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] rank {rank} of {world}: "
                        f"{type(error).__name__}: {error}\n")
        except OSError:
            pass
        if rank == 0:
            where = (self.stage_dir(k, name) / "errors").relative_to(self.root)
            self.update_stage(k, status="failed", error=str(error) + (
                f" [rank 0's error; every failing rank's own is in {where}/rank<r>.log]" if world > 1 else ""))

    def update_stage(self, k: int, **fields: Any) -> dict:
        manifest = self.read_manifest()
        entry = manifest["stages"][k]
        if "status" in fields and fields["status"] not in STATUSES:
            raise ValueError(f"bad status {fields['status']!r}")
        entry.update(fields)
        write_json(self.manifest_path, manifest)
        return manifest


def output_problem(root: Path) -> str | None:
    """Why a run cannot be written at ``root`` (a file there, a read-only place), said before any rank starts."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        return f"--output {root} is a file; give a directory (new, or a run directory to resume)"
    existing = root
    while not existing.exists():
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        return (f"--output {root}: cannot write in {existing} (read-only filesystem or no permission); "
                "give a directory you can write to")
    return None
