"""The run directory contract: ``manifest.json`` plus one folder per stage.

<run>/manifest.json                     chain name, resolved config, per-stage status/paths/sha256/summary
<run>/stages/<k>-<name>/model.safetensors, config.json, metrics.json, loss.csv, loss.png
Only rank 0 writes; every write goes to a temporary name and is renamed into place.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from compt.config import ChainConfig

STATUSES = ("pending", "running", "done")


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

    def conflict(self, cfg: ChainConfig, ds_config: dict) -> str | None:
        """Why this run directory cannot take ``cfg`` (read-only, so every rank can ask)."""
        old = self.read_manifest()
        if old is not None and (old.get("config") != cfg.model_dump(mode="json") or old.get("ds_config") != ds_config):
            return (f"--output {self.root} holds a run of a different chain config; "
                    "pick a new --output directory (or delete the old run)")
        return None

    def open(self, cfg: ChainConfig, ds_config: dict) -> dict:
        """Create the manifest, or reuse an existing one for the *same* resolved config."""
        problem = self.conflict(cfg, ds_config)
        if problem:
            raise ValueError(problem)
        old = self.read_manifest()
        if old is not None:
            return old
        self.root.mkdir(parents=True, exist_ok=True)
        manifest = {
            "chain": cfg.name,
            "config": cfg.model_dump(mode="json"),
            "ds_config": ds_config,
            "stages": [
                {"index": k, "name": s.name, "status": "pending", "dir": str(self.stage_dir(k, s.name).relative_to(self.root)),
                 "weights": None, "sha256": None, "metrics": None}
                for k, s in enumerate(cfg.stages)
            ],
        }
        write_json(self.manifest_path, manifest)
        return manifest

    def update_stage(self, k: int, **fields: Any) -> dict:
        manifest = self.read_manifest()
        entry = manifest["stages"][k]
        if "status" in fields and fields["status"] not in STATUSES:
            raise ValueError(f"bad status {fields['status']!r}")
        entry.update(fields)
        write_json(self.manifest_path, manifest)
        return manifest
