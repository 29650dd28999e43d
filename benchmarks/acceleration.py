"""Measured acceleration of CoM-PT vs training every model from scratch, quality side by side.

    python benchmarks/acceleration.py --quick          # minutes: tiny models, main comparison only
    python benchmarks/acceleration.py                  # the full study (see --help for its parts)

Every chain runs through the real launcher (``deepspeed launch/chain.py``) on the built-in
digit-numbers data, and every figure is read back from the run directories it writes
(RUN/stages/<k>-<name>/metrics.json): zero-shot top-1, retrieval R@1, counted FLOPs
(flops.total), wall seconds. Methods:

- baseline: one chain whose stages all use ``transfer: {init: none, align: false}`` and the
  full budget, i.e. every model from scratch (the launcher only needs each stage to be
  larger than the previous one, which a family is).
- official / exact: CoM-PT, the first model with the full budget, every later model with
  ``chain_fraction`` of it, grown (init official|exact) and aligned (align true).
  ``exact`` runs only when the chain config accepts ``init: exact`` (checked with
  compt.config.load_chain); otherwise it is skipped with a note.

Studies: main (3 methods x seeds), compute to reach the baseline's quality (CoM-PT chains at
several uniform stage-budget fractions), chain length (2, 3, 4 models between the same
smallest and largest), ablation (parameter space only, feature space only, both, neither).

The first stage of a CoM-PT chain is the same computation as the baseline's first stage
(same model, budget, seed and data). Unless --retrain-first-stage is given, a chain's run
directory is seeded with the baseline's finished first stage and the launcher's resume
skips it (its sha256 is checked); its FLOPs and wall time still count in the chain. One
chain per seed always retrains it, and the JSON records whether both came out identical.

Outputs: benchmarks/results/acceleration-<name>.{json,md,png}; run directories under --workdir
(finished runs are reused when the benchmark runs again with the same settings).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
DS_CONFIG = "ds_configs/zero3.json"
BASELINE = {"init": "none", "align": False}
REUSED_MARK = "FIRST_STAGE_FROM_BASELINE"  # in a run dir whose first stage was copied from the baseline


# ---------------------------------------------------------------------------
# What to run.
# ---------------------------------------------------------------------------

def clip_model(width: int, layers: int, head_width: int = 32, embed_dim: int = 64, image_size: int = 32,
               patch_size: int = 8, context_length: int = 20) -> dict[str, Any]:
    """A small open_clip CLIP: the same width/depth for both towers, one head per head_width channels."""
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": image_size, "patch_size": patch_size, "width": width, "layers": layers,
                       "head_width": head_width},
        "text_cfg": {"context_length": context_length, "vocab_size": 49408, "width": width,
                     "heads": width // head_width, "layers": layers},
    }


@dataclass
class Setup:
    """One benchmark mode: the model family, budgets and which studies run."""

    models: dict[str, dict]  # the family, smallest first
    main: list[str]  # the chain of the main comparison (>= 3 models)
    lengths: list[list[str]]  # chain-length study: same smallest and largest model
    baseline_steps: int  # every model's from-scratch budget; also the first chain stage's
    chain_fraction: float  # later chain stages train this fraction of baseline_steps
    search_fractions: list[float]  # compute-to-reach study
    seeds: int
    studies: list[str]
    batch_size: int = 64
    lr: float = 2e-3
    warmup_fraction: float = 0.05
    alpha: float = 500.0
    eval_batch_size: int = 300
    match_tolerance: float = 0.0  # "matches the baseline" = top-1 >= baseline top-1 - this

    def steps(self, fraction: float) -> int:
        return max(1, round(fraction * self.baseline_steps))


FULL = Setup(
    models={"xs": clip_model(64, 2), "s": clip_model(96, 2), "m": clip_model(128, 2), "l": clip_model(128, 4)},
    main=["xs", "m", "l"],
    lengths=[["xs", "l"], ["xs", "m", "l"], ["xs", "s", "m", "l"]],
    baseline_steps=1000, chain_fraction=0.25, search_fractions=[0.125, 0.25, 0.5],
    seeds=3, studies=["main", "search", "length", "ablation"],
)

QUICK = Setup(
    models={"xs": clip_model(32, 1, head_width=16), "m": clip_model(64, 1, head_width=16),
            "l": clip_model(64, 2, head_width=16)},
    main=["xs", "m", "l"],
    lengths=[["xs", "m", "l"]],
    baseline_steps=120, chain_fraction=0.25, search_fractions=[0.25],
    seeds=1, studies=["main", "search"],
)

STUDIES = ("main", "search", "length", "ablation")


@dataclass
class RunSpec:
    """One chain through the launcher."""

    id: str
    method: str  # baseline | official | exact | an ablation label
    models: list[str]
    seed: int
    fraction: float  # later stages' budget as a fraction of the baseline budget (1 for the baseline)
    transfer: dict | None  # None: baseline (from scratch, full budget for every stage)
    studies: set[str] = field(default_factory=set)


def chain_dict(setup: Setup, spec: RunSpec) -> dict[str, Any]:
    stages = []
    for k, name in enumerate(spec.models):
        steps = setup.baseline_steps if k == 0 or spec.transfer is None else setup.steps(spec.fraction)
        stage = {"name": name, "model": setup.models[name], "budget": {"steps": steps},
                 "warmup_steps": max(1, round(setup.warmup_fraction * steps))}
        if k > 0:
            transfer = dict(BASELINE) if spec.transfer is None else dict(spec.transfer)
            if transfer.get("align"):
                transfer.setdefault("alpha", setup.alpha)
            stage["transfer"] = transfer
        stages.append(stage)
    return {
        "name": spec.id, "seed": spec.seed,
        "data": {"kind": "digit-numbers"},
        "eval": {"batch_size": setup.eval_batch_size},
        "defaults": {"lr": setup.lr, "batch_size": setup.batch_size, "log_every": 50},
        "stages": stages,
    }


def exact_available(setup: Setup, workdir: Path) -> tuple[bool, str]:
    """Whether the chain config accepts ``init: exact`` (another part of compt may add it)."""
    from compt.config import ChainConfigError, load_chain

    probe = RunSpec("probe-exact", "exact", setup.main, 0, setup.chain_fraction, {"init": "exact", "align": True})
    path = workdir / "probe-exact.yaml"
    path.write_text(yaml.safe_dump(chain_dict(setup, probe), sort_keys=False))
    try:
        load_chain(str(path))
    except ChainConfigError as e:
        return False, f"exact skipped: this compt's chain config rejects init: exact ({' '.join(e.problems)})"
    return True, "exact: the chain config accepts init: exact"


def plan(setup: Setup, exact: bool) -> list[RunSpec]:
    """Every run the selected studies need, identical chains merged (one run serves several studies)."""
    growth = ["official"] + (["exact"] if exact else [])
    runs: dict[str, RunSpec] = {}

    def add(method: str, models: list[str], seed: int, fraction: float, transfer: dict | None, study: str):
        tag = "baseline" if transfer is None else f"{method}-f{fraction:g}"
        rid = f"{tag}-{'-'.join(models)}-seed{seed}"
        spec = runs.setdefault(rid, RunSpec(rid, method, models, seed, fraction, transfer))
        spec.studies.add(study)

    family = list(setup.models)
    needed = set(setup.main) | ({m for c in setup.lengths for m in c} if "length" in setup.studies else set())
    for seed in range(setup.seeds):
        # The baseline of a seed covers every model a study of that seed compares against.
        models = [m for m in family if m in needed] if seed == 0 else list(setup.main)
        add("baseline", models, seed, 1.0, None, "main")
        for method in growth:
            add(method, setup.main, seed, setup.chain_fraction, {"init": method, "align": True}, "main")
    for method in growth:
        if "search" in setup.studies:
            for f in setup.search_fractions:
                add(method, setup.main, 0, f, {"init": method, "align": True}, "search")
        if "length" in setup.studies:
            for chain in setup.lengths:
                add(method, chain, 0, setup.chain_fraction, {"init": method, "align": True}, "length")
    if "ablation" in setup.studies:
        f = setup.chain_fraction
        for method in growth:
            add(method, setup.main, 0, f, {"init": method, "align": True}, "ablation")
            add(f"param-only-{method}", setup.main, 0, f, {"init": method, "align": False}, "ablation")
        add("feature-only", setup.main, 0, f, {"init": "none", "align": True}, "ablation")
        add("neither", setup.main, 0, f, {"init": "none", "align": False}, "ablation")
    # Baselines first: every chain of a seed reuses its baseline's first stage.
    return sorted(runs.values(), key=lambda r: (r.seed, r.transfer is not None))


# ---------------------------------------------------------------------------
# Running through the launcher.
# ---------------------------------------------------------------------------

class Launcher:
    def __init__(self, workdir: Path, port: int, retrain_first: bool, log=print):
        self.workdir, self.port, self.retrain_first, self.log = workdir, port, retrain_first, log
        self.first_stage: dict[int, Path] = {}  # seed -> the baseline's finished first stage dir
        self.retrained: set[int] = set()  # seeds whose first stage was checked by retraining it once

    def run(self, setup: Setup, spec: RunSpec) -> dict[str, Any]:
        from compt.config import load_chain

        chain_path = self.workdir / f"{spec.id}.yaml"
        chain_path.write_text(yaml.safe_dump(chain_dict(setup, spec), sort_keys=False))
        cfg = load_chain(str(chain_path), REPO / DS_CONFIG)  # every problem, before any compute
        run_dir = self.workdir / spec.id
        self.port = free_port(self.port)
        cmd = ["deepspeed", "--master_port", str(self.port), "launch/chain.py", "--chain", str(chain_path),
               "--ds_config", DS_CONFIG, "--output", str(run_dir)]
        self.port += 1
        launch_seconds = 0.0
        earlier = self._finished(run_dir, cfg)
        if not earlier and (run_dir / "manifest.json").is_file() and not self._same_config(run_dir, cfg):
            # Settings (or compt's config schema) changed since that run: keep it aside, train anew.
            stale = run_dir.with_name(run_dir.name + ".stale")
            shutil.rmtree(stale, ignore_errors=True)
            run_dir.rename(stale)
            self.log(f"  {spec.id}: {run_dir} holds another config; moved it to {stale}")
        if not earlier:
            if spec.transfer is not None and spec.seed in self.first_stage and not run_dir.exists():
                if self.retrain_first or spec.seed not in self.retrained:
                    self.retrained.add(spec.seed)  # this run trains its first stage: a determinism check
                else:
                    self._seed_first_stage(run_dir, cfg, self.first_stage[spec.seed])
            log_path = self.workdir / f"{spec.id}.log"
            for attempt in range(3):
                self.log(f"  {spec.id}: {shlex.join(cmd)}")
                t0 = time.time()
                with open(log_path, "w") as log:
                    proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
                launch_seconds = time.time() - t0
                # On a shared machine another job can take the port between our check and the launch.
                if proc.returncode == 0 or "EADDRINUSE" not in log_path.read_text() or attempt == 2:
                    break
                self.port = free_port(self.port + 1)
                cmd[2] = str(self.port)
                self.port += 1
            if proc.returncode != 0:
                tail = log_path.read_text()[-4000:]
                raise RuntimeError(f"{spec.id}: launcher exited with {proc.returncode}\n{tail}")
        else:
            self.log(f"  {spec.id}: finished earlier in {run_dir}, reusing")
        if spec.transfer is not None and not (run_dir / REUSED_MARK).exists():
            self.retrained.add(spec.seed)
        stages = read_stages(run_dir)
        if spec.transfer is None:
            self.first_stage.setdefault(spec.seed, run_dir / "stages" / f"0-{spec.models[0]}")
        return {"id": spec.id, "method": spec.method, "models": spec.models, "seed": spec.seed,
                "fraction": spec.fraction, "transfer": spec.transfer, "studies": sorted(spec.studies),
                "run_dir": str(run_dir), "chain_yaml": str(chain_path), "command": shlex.join(cmd),
                "finished_in_an_earlier_invocation": earlier, "launch_seconds": round(launch_seconds, 1), "first_stage_reused": (run_dir / REUSED_MARK).exists(),
                "stages": stages}

    @staticmethod
    def _same_config(run_dir: Path, cfg) -> bool:
        """What the launcher's resume requires: the same resolved chain config and DeepSpeed config."""
        from compt.engine import read_ds_config

        manifest = json.loads((run_dir / "manifest.json").read_text())
        return (manifest.get("config") == cfg.model_dump(mode="json")
                and manifest.get("ds_config") == read_ds_config(REPO / DS_CONFIG))

    @classmethod
    def _finished(cls, run_dir: Path, cfg) -> bool:
        manifest_path = run_dir / "manifest.json"
        if not manifest_path.is_file() or not cls._same_config(run_dir, cfg):
            return False
        return all(s["status"] == "done" for s in json.loads(manifest_path.read_text())["stages"])

    @staticmethod
    def _seed_first_stage(run_dir: Path, cfg, source: Path) -> None:
        """Give a new run the baseline's finished first stage; the launcher's resume verifies and skips it."""
        from compt.engine import read_ds_config
        from compt.rundir import RunDir
        from compt.stage import summary
        from compt.weights import sha256_file

        run = RunDir(run_dir)
        run.open(cfg, read_ds_config(REPO / DS_CONFIG))
        dst = run.stage_dir(0, cfg.stages[0].name)
        shutil.copytree(source, dst, ignore=shutil.ignore_patterns("checkpoints"))
        weights = dst / "model.safetensors"
        metrics = json.loads((dst / "metrics.json").read_text())
        run.update_stage(0, status="done", weights=str(weights.relative_to(run.root)), sha256=sha256_file(weights),
                         metrics=summary(metrics))
        (run_dir / REUSED_MARK).write_text(f"stage 0 copied from {source}\n")


def free_port(start: int) -> int:
    """The first port from ``start`` on that nothing listens on (DeepSpeed's rendezvous binds it)."""
    for port in range(start, start + 500):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {start}..{start + 499}; pass another --port")


def read_stages(run_dir: Path) -> list[dict[str, Any]]:
    manifest = json.loads((run_dir / "manifest.json").read_text())
    out = []
    for entry in manifest["stages"]:
        m = json.loads((run_dir / entry["dir"] / "metrics.json").read_text())
        r = m.get("retrieval") or {}
        out.append({
            "name": entry["name"], "steps": m["steps"], "samples_seen": m["samples_seen"],
            "zeroshot_top1": m["zeroshot_top1"], "zeroshot_top5": m["zeroshot_top5"],
            "i2t_R@1": (r.get("image_to_text") or {}).get("R@1"), "t2i_R@1": (r.get("text_to_image") or {}).get("R@1"),
            "init_zeroshot_top1": m.get("init_zeroshot_top1"),
            "flops": m["flops"]["total"], "student_flops": m["flops"]["student_train"],
            "teacher_flops": m["flops"]["teacher_forward"],
            "wall_seconds": m["wall_seconds"], "train_seconds": m.get("train_seconds"),
            "params": m.get("params"), "sha256": entry["sha256"],
        })
    return out


# ---------------------------------------------------------------------------
# Summaries.
# ---------------------------------------------------------------------------

def _mean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def _std(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.stdev(xs) if len(xs) > 1 else None


def _stage(run: dict, model: str) -> dict:
    return next(s for s in run["stages"] if s["name"] == model)


def _find(runs: list[dict], **match) -> list[dict]:
    return [r for r in runs if all(r[k] == v for k, v in match.items())]


def baseline_stage(runs: list[dict], model: str, seed: int) -> dict:
    for r in _find(runs, method="baseline", seed=seed):
        if model in r["models"]:
            return _stage(r, model)
    raise KeyError(f"no baseline run of {model} for seed {seed}")


def chain_summary(runs: list[dict], chain_runs: list[dict]) -> dict[str, Any]:
    """Per model (mean over seeds) and per chain: acceleration by FLOPs and by wall time vs the baseline."""
    models = chain_runs[0]["models"]
    per_model = []
    base_flops = base_wall = base_train = chain_flops = chain_wall = chain_train = 0.0
    for name in models:
        stages = [_stage(r, name) for r in chain_runs]
        bases = [baseline_stage(runs, name, r["seed"]) for r in chain_runs]
        row = {"name": name}
        for key in ("zeroshot_top1", "i2t_R@1", "t2i_R@1", "init_zeroshot_top1", "flops", "wall_seconds",
                    "train_seconds", "samples_seen"):
            row[key] = _mean([s[key] for s in stages])
        row["zeroshot_top1_std"] = _std([s["zeroshot_top1"] for s in stages])
        row["zeroshot_top1_seeds"] = [s["zeroshot_top1"] for s in stages]
        row["baseline_zeroshot_top1"] = _mean([b["zeroshot_top1"] for b in bases])
        row["baseline_flops"] = _mean([b["flops"] for b in bases])
        per_model.append(row)
        base_flops += row["baseline_flops"]
        base_wall += _mean([b["wall_seconds"] for b in bases])
        base_train += _mean([b["train_seconds"] for b in bases])
        chain_flops += row["flops"]
        chain_wall += row["wall_seconds"]
        chain_train += row["train_seconds"]
    return {
        "models": models, "seeds": [r["seed"] for r in chain_runs], "per_model": per_model,
        "flops": chain_flops, "baseline_flops": base_flops,
        "wall_seconds": chain_wall, "baseline_wall_seconds": base_wall,
        "acceleration_flops": base_flops / chain_flops,
        "acceleration_wall": base_wall / chain_wall,
        "acceleration_train_seconds": base_train / chain_train,
    }


def baseline_summary(runs: list[dict], models: list[str], seeds: list[int]) -> dict[str, Any]:
    per_model = []
    for name in models:
        stages = [baseline_stage(runs, name, s) for s in seeds]
        row = {"name": name}
        for key in ("zeroshot_top1", "i2t_R@1", "t2i_R@1", "flops", "wall_seconds", "train_seconds", "samples_seen"):
            row[key] = _mean([s[key] for s in stages])
        row["zeroshot_top1_std"] = _std([s["zeroshot_top1"] for s in stages])
        row["zeroshot_top1_seeds"] = [s["zeroshot_top1"] for s in stages]
        per_model.append(row)
    return {"models": models, "seeds": seeds, "per_model": per_model,
            "flops": sum(r["flops"] for r in per_model), "wall_seconds": sum(r["wall_seconds"] for r in per_model),
            "acceleration_flops": 1.0, "acceleration_wall": 1.0, "acceleration_train_seconds": 1.0}


def compute_to_reach(setup: Setup, runs: list[dict], method: str) -> list[dict[str, Any]]:
    """Per later model: the smallest searched stage budget whose top-1 matches its from-scratch baseline (seed 0)."""
    search = sorted(_find(runs, method=method, seed=0, models=setup.main), key=lambda r: r["fraction"])
    out = []
    for name in setup.main[1:]:
        base = baseline_stage(runs, name, 0)
        target = base["zeroshot_top1"] - setup.match_tolerance
        points = [{"fraction": r["fraction"], "steps": _stage(r, name)["steps"],
                   "zeroshot_top1": _stage(r, name)["zeroshot_top1"], "stage_flops": _stage(r, name)["flops"],
                   "chain_flops_through_model": sum(s["flops"] for s in r["stages"][:r["models"].index(name) + 1])}
                  for r in search]
        hit = next((p for p in points if p["zeroshot_top1"] >= target), None)
        out.append({
            "model": name, "baseline_zeroshot_top1": base["zeroshot_top1"], "baseline_flops": base["flops"],
            "searched_fractions": [p["fraction"] for p in points], "points": points,
            "reached_at_fraction": hit["fraction"] if hit else None,
            "stage_flops_to_reach": hit["stage_flops"] if hit else None,
            "saving_vs_baseline": base["flops"] / hit["stage_flops"] if hit else None,
        })
    return out


def chain_length_study(setup: Setup, runs: list[dict], methods: list[str]) -> list[dict[str, Any]]:
    out = []
    for method in methods:
        for chain in setup.lengths:
            found = _find(runs, method=method, seed=0, models=chain, fraction=setup.chain_fraction)
            if not found:
                continue
            s = chain_summary(runs, found)
            last = s["per_model"][-1]
            out.append({"method": method, "models": chain, "length": len(chain),
                        "acceleration_flops": s["acceleration_flops"], "acceleration_wall": s["acceleration_wall"],
                        "largest_zeroshot_top1": last["zeroshot_top1"],
                        "largest_baseline_zeroshot_top1": last["baseline_zeroshot_top1"],
                        "mean_zeroshot_top1": _mean([m["zeroshot_top1"] for m in s["per_model"]]),
                        "mean_baseline_zeroshot_top1": _mean([m["baseline_zeroshot_top1"] for m in s["per_model"]])})
    return out


ABLATION_LABELS = {
    "official": "both (official init + align)", "exact": "both (exact init + align)",
    "param-only-official": "parameter space only (official init)", "param-only-exact": "parameter space only (exact init)",
    "feature-only": "feature space only (align, random init)", "neither": "neither (short budget from scratch)",
}


def ablation_study(setup: Setup, runs: list[dict]) -> list[dict[str, Any]]:
    out = []
    for method, label in ABLATION_LABELS.items():
        found = _find(runs, method=method, seed=0, models=setup.main, fraction=setup.chain_fraction)
        found = [r for r in found if "ablation" in r["studies"]]
        if not found:
            continue
        s = chain_summary(runs, found)
        out.append({"variant": label, "method": method, "transfer": found[0]["transfer"],
                    "per_model": [{k: m[k] for k in ("name", "zeroshot_top1", "init_zeroshot_top1", "i2t_R@1",
                                                     "t2i_R@1", "flops", "baseline_zeroshot_top1")}
                                  for m in s["per_model"]],
                    "acceleration_flops": s["acceleration_flops"]})
    return out


def first_stage_check(runs: list[dict]) -> list[dict[str, Any]]:
    """For every seed: did a chain that retrained its first stage reproduce the baseline's bit for bit?"""
    out = []
    for r in runs:
        if r["transfer"] is None or r["first_stage_reused"]:
            continue
        base = baseline_stage(runs, r["models"][0], r["seed"])
        mine = r["stages"][0]
        out.append({"seed": r["seed"], "run": r["id"], "identical_weights": mine["sha256"] == base["sha256"],
                    "zeroshot_top1": mine["zeroshot_top1"], "baseline_zeroshot_top1": base["zeroshot_top1"]})
    return out


def predicted_costs(runs: list[dict]) -> dict[str, Any]:
    """`compt flops` on each main chain's YAML: the accounting tool must predict what the runs counted."""
    from compt.costs import chain_cost
    from compt.recipes import recipe_from_chain

    out = {}
    for r in runs:
        if r["seed"] != 0 or "main" not in r["studies"]:
            continue
        cost = chain_cost(recipe_from_chain(r["chain_yaml"]))
        measured = sum(s["flops"] for s in r["stages"])
        out[r["id"]] = {"predicted_chain_flops": cost.chain_flops, "measured_chain_flops": measured,
                        "equal": cost.chain_flops == measured}
    return out


def summarize(setup: Setup, runs: list[dict], exact: bool) -> dict[str, Any]:
    """Every study's tables from the finished runs (pure: reads only the run records)."""
    methods = ["official"] + (["exact"] if exact else [])
    summary: dict[str, Any] = {"main": {"baseline": baseline_summary(runs, setup.main, list(range(setup.seeds)))}}
    for method in methods:
        summary["main"][method] = chain_summary(
            runs, _find(runs, method=method, models=setup.main, fraction=setup.chain_fraction))
    if "search" in setup.studies:
        summary["compute_to_reach"] = {m: compute_to_reach(setup, runs, m) for m in methods}
    if "length" in setup.studies:
        summary["chain_length"] = chain_length_study(setup, runs, methods)
    if "ablation" in setup.studies:
        summary["ablation"] = ablation_study(setup, runs)
    summary["first_stage_reuse_check"] = first_stage_check(runs)
    return summary


# ---------------------------------------------------------------------------
# Outputs.
# ---------------------------------------------------------------------------

def machine() -> dict[str, Any]:
    import torch

    def version(pkg):
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "deepspeed": version("deepspeed"), "open_clip_torch": version("open_clip_torch"),
            "cuda": torch.cuda.is_available()}


def _pct(x: float | None, std: float | None = None) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.1f}%" + (f" ± {100 * std:.1f}" if std is not None else "")


def _x(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def markdown(result: dict[str, Any]) -> str:
    from compt.flops import format_flops

    s = result["summary"]
    m = result["machine"]
    reused = sum(r["finished_in_an_earlier_invocation"] for r in result["runs"])
    lines = [
        f"# CoM-PT acceleration benchmark: {result['name']} ({result['mode']})", "",
        f"Command: `{result['command']}`  ",
        f"Machine: {m['platform']}, {m['cpu_count']} CPU(s) ({m['cpus_usable']} usable), torch {m['torch']} "
        f"({m['torch_threads']} threads), deepspeed {m['deepspeed']}, open_clip {m['open_clip_torch']}  ",
        f"Load average at start / end: {result['loadavg_start']} / {result['loadavg_end']} (a shared machine: "
        f"wall times are noisy)  ",
        f"Time: {result['seconds']:.0f} s for {len(result['runs'])} chains"
        + (f" ({reused} finished in an earlier invocation, reused)" if reused else "")
        + f" (training stages: {result['stage_seconds']:.0f} s in all)"
        + "; data: digit-numbers "
        f"(90 classes, 8,100 train / 900 val), seeds: {result['setup']['seeds']}", "",
        "## Main comparison (zero-shot top-1 and retrieval R@1 on the val split; mean ± std over seeds)", "",
        "| method | model | top-1 | I→T R@1 | T→I R@1 | init top-1 | FLOPs | wall |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, c in s["main"].items():
        for row in c["per_model"]:
            lines.append(f"| {method} | {row['name']} | {_pct(row['zeroshot_top1'], row['zeroshot_top1_std'])} | "
                         f"{_pct(row['i2t_R@1'])} | {_pct(row['t2i_R@1'])} | {_pct(row.get('init_zeroshot_top1'))} | "
                         f"{format_flops(row['flops'])} | {row['wall_seconds']:.0f} s |")
    lines += ["", "| method | chain | FLOPs | wall | acceleration (FLOPs) | acceleration (wall) | "
                  "acceleration (train seconds) | largest model top-1 |", "|---|---|---|---|---|---|---|---|"]
    for method, c in s["main"].items():
        lines.append(f"| {method} | {' → '.join(c['models'])} | {format_flops(c['flops'])} | "
                     f"{c['wall_seconds']:.0f} s | {_x(c['acceleration_flops'])} | {_x(c['acceleration_wall'])} | "
                     f"{_x(c['acceleration_train_seconds'])} | {_pct(c['per_model'][-1]['zeroshot_top1'])} |")
    if s.get("compute_to_reach"):
        lines += ["", "## Compute to reach the baseline's quality (seed 0; searched stage budgets = fractions of "
                      "the from-scratch budget)", "",
                  "| method | model | baseline top-1 | top-1 at each searched fraction | reached at | "
                  "stage FLOPs to reach | baseline FLOPs / that |", "|---|---|---|---|---|---|---|"]
        for method, rows in s["compute_to_reach"].items():
            for row in rows:
                pts = ", ".join(f"{p['fraction']:g}: {_pct(p['zeroshot_top1'])}" for p in row["points"])
                lines.append(f"| {method} | {row['model']} | {_pct(row['baseline_zeroshot_top1'])} | {pts} | "
                             f"{row['reached_at_fraction'] if row['reached_at_fraction'] is not None else 'not reached'}"
                             f" | {format_flops(row['stage_flops_to_reach']) if row['stage_flops_to_reach'] else '-'}"
                             f" | {_x(row['saving_vs_baseline'])} |")
    if s.get("chain_length"):
        lines += ["", "## Chain length (same smallest and largest model; seed 0)", "",
                  "| method | chain | acceleration (FLOPs) | acceleration (wall) | largest top-1 (baseline) | "
                  "mean top-1 (baseline) |", "|---|---|---|---|---|---|"]
        for row in s["chain_length"]:
            lines.append(f"| {row['method']} | {' → '.join(row['models'])} | {_x(row['acceleration_flops'])} | "
                         f"{_x(row['acceleration_wall'])} | {_pct(row['largest_zeroshot_top1'])} "
                         f"({_pct(row['largest_baseline_zeroshot_top1'])}) | {_pct(row['mean_zeroshot_top1'])} "
                         f"({_pct(row['mean_baseline_zeroshot_top1'])}) |")
    if s.get("ablation"):
        models = result["setup"]["main"]
        lines += ["", "## Ablation (seed 0; later stages at the chain budget)", "",
                  "| variant | " + " | ".join(f"{n} top-1 (init)" for n in models) + " | acceleration (FLOPs) |",
                  "|---|" + "---|" * len(models) + "---|"]
        for row in s["ablation"]:
            cells = [f"{_pct(p['zeroshot_top1'])} ({_pct(p['init_zeroshot_top1'])})" for p in row["per_model"]]
            lines.append(f"| {row['variant']} | " + " | ".join(cells) + f" | {_x(row['acceleration_flops'])} |")
    lines += ["", "## Notes", ""] + [f"- {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"baseline": "tab:gray", "official": "tab:blue", "exact": "tab:green"}
    fig, ax = plt.subplots(figsize=(10.5, 4.8))
    for method, c in result["summary"]["main"].items():
        xs, cum = [], 0.0
        for row in c["per_model"]:
            cum += row["flops"]
            xs.append(cum)
        ys = [100 * row["zeroshot_top1"] for row in c["per_model"]]
        label = ("baseline (each model from scratch)" if method == "baseline"
                 else f"CoM-PT {method} ({_x(c['acceleration_flops'])} fewer FLOPs)")
        ax.plot(xs, ys, marker="o", color=colors.get(method), label=label)
        for i, (x, y, row) in enumerate(zip(xs, ys, c["per_model"])):
            if i == 0 and method != "baseline":
                continue  # the first model is the baseline's: labelled once
            ax.annotate(row["name"], (x, y), textcoords="offset points", xytext=(6, -12) if i == 0 else (5, 5),
                        fontsize=8, zorder=10,
                        color=colors.get(method))
    # Other budgets of the compute-to-reach search: the chain's largest model at each fraction.
    for method, rows in (result["summary"].get("compute_to_reach") or {}).items():
        last = rows[-1]
        pts = [p for p in last["points"] if p["fraction"] != result["setup"]["chain_fraction"]]
        if pts:
            ax.scatter([p["chain_flops_through_model"] for p in pts], [100 * p["zeroshot_top1"] for p in pts],
                       facecolors="none", edgecolors=colors.get(method), s=50,
                       label=f"{method}, other budgets (fractions {', '.join(format(p['fraction'], 'g') for p in pts)})")
    ablation_colors = iter(["tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"])
    for row in result["summary"].get("ablation") or []:
        if row["method"] in ("official", "exact"):
            continue
        ax.scatter([sum(p["flops"] for p in row["per_model"])], [100 * row["per_model"][-1]["zeroshot_top1"]],
                   marker="x", s=40, color=next(ablation_colors), label=f"ablation: {row['variant']}")
    if ax.get_ylim()[0] < 20:  # near chance: show it
        ax.axhline(100 / 90, color="black", lw=0.8, ls=":", label="chance (1/90)")
    ax.set_xscale("log")
    ax.margins(x=0.06, y=0.12)
    ax.set_xlabel("cumulative training FLOPs of the family (counted)")
    ax.set_ylabel("zero-shot top-1 on digit-numbers val (%)")
    title = "quality vs compute" + (f": {result['name']}" if result["name"] != result["mode"] else "")
    ax.set_title(f"{title} ({result['mode']} mode, seeds: {result['setup']['seeds']})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------
# Main.
# ---------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny models, few steps, 1 seed, main comparison only")
    p.add_argument("--name", default=None, help="results name (default: quick or full)")
    p.add_argument("--seeds", type=int, default=None, help="seeds of the main comparison (default: 3, quick 1)")
    p.add_argument("--studies", default=None,
                   help=f"comma-separated subset of {','.join(STUDIES)} (default: all, quick: main,search)")
    p.add_argument("--baseline-steps", type=int, default=None, help="from-scratch budget per model, in steps")
    p.add_argument("--chain-fraction", type=float, default=None, help="later chain stages' budget fraction")
    p.add_argument("--search-fractions", default=None, help="comma-separated budget fractions to search")
    p.add_argument("--results", default=str(REPO / "benchmarks" / "results"), help="folder for json/md/png")
    p.add_argument("--workdir", default=None, help="run directories (default: runs/bench-acceleration-<name>)")
    p.add_argument("--fresh", action="store_true", help="delete the workdir first instead of reusing finished runs")
    p.add_argument("--retrain-first-stage", action="store_true",
                   help="every chain trains its first stage itself instead of reusing the baseline's")
    p.add_argument("--port", type=int, default=29840, help="first --master_port; each launch takes the next")
    p.add_argument("--dry-run", action="store_true", help="print the planned runs and exit")
    p.add_argument("--replot", action="store_true",
                   help="only re-render the markdown and PNG from the existing results JSON of --name")
    return p.parse_args(argv)


def build_setup(args: argparse.Namespace) -> Setup:
    import copy

    setup = copy.deepcopy(QUICK if args.quick else FULL)
    if args.seeds is not None:
        setup.seeds = args.seeds
    if args.studies is not None:
        setup.studies = [s.strip() for s in args.studies.split(",") if s.strip()]
        bad = [s for s in setup.studies if s not in STUDIES]
        if bad or "main" not in setup.studies:
            raise SystemExit(f"--studies: {bad or 'main is missing'}; pick from {','.join(STUDIES)} (main always)")
    if args.baseline_steps is not None:
        setup.baseline_steps = args.baseline_steps
    if args.chain_fraction is not None:
        setup.chain_fraction = args.chain_fraction
    if args.search_fractions is not None:
        setup.search_fractions = [float(f) for f in args.search_fractions.split(",")]
    if setup.chain_fraction not in setup.search_fractions:
        setup.search_fractions = sorted(setup.search_fractions + [setup.chain_fraction])
    return setup


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup = build_setup(args)
    name = args.name or ("quick" if args.quick else "full")
    if args.replot:
        stem = Path(args.results) / f"acceleration-{name}"
        result = json.loads(Path(f"{stem}.json").read_text())
        Path(f"{stem}.md").write_text(markdown(result))
        plot(result, Path(f"{stem}.png"))
        print(f"re-rendered {stem}.md and {stem}.png")
        return 0
    workdir = Path(args.workdir or REPO / "runs" / f"bench-acceleration-{name}").resolve()
    if args.fresh and workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)

    t0, load0 = time.time(), [round(x, 2) for x in os.getloadavg()]
    exact, exact_note = exact_available(setup, workdir)
    specs = plan(setup, exact)
    print(f"acceleration benchmark '{name}': {len(specs)} chains, workdir {workdir}")
    if args.dry_run:
        for spec in specs:
            print(f"  {spec.id}  ({', '.join(sorted(spec.studies))})")
        return 0
    launcher = Launcher(workdir, args.port, args.retrain_first_stage)
    runs = []
    for i, spec in enumerate(specs, 1):
        print(f"[{i}/{len(specs)}] {spec.id}", flush=True)
        runs.append(launcher.run(setup, spec))

    summary = summarize(setup, runs, exact)
    summary["predicted_vs_measured_flops"] = predicted_costs(runs)

    notes = [
        exact_note,
        "Quality is zero-shot top-1 over all 90 classes of the digit-numbers val split (900 images built from "
        "digit images never seen in training; 9 of the 90 numbers never appear in training at all).",
        "FLOPs are the launcher's counted flops.total per stage (student forward+backward + teacher forward, "
        "torch.utils.flop_counter); the first model is counted in the baseline and in every chain.",
        "Wall time is the sum of the stages' wall_seconds (build, growth, training, evaluation, saving); launcher "
        "start-up is excluded. 'train seconds' stops before the final evaluation.",
        f"Budgets: every from-scratch model {setup.baseline_steps} steps at global batch {setup.batch_size}; "
        f"CoM-PT later stages {setup.chain_fraction:g} of that; lr {setup.lr:g}, warmup "
        f"{setup.warmup_fraction:g} of each stage's steps, cosine to 0, alpha {setup.alpha:g}.",
        f"'Matches the baseline' means top-1 >= baseline top-1 - {setup.match_tolerance:g}, seed 0 on both sides.",
    ]
    if args.quick:
        notes.insert(0, "QUICK MODE: a check of the whole pipeline (launcher, accounting, reports) with budgets far "
                        "below what these models need to learn 90 classes (chance is 1.1%); its qualities are not a "
                        "measurement of CoM-PT. The full mode is the measurement.")
    if not args.retrain_first_stage:
        notes.append("A chain's first stage is the baseline's (identical config and seed), reused through the "
                     "launcher's resume; one chain per seed retrains it, see first_stage_reuse_check.")
    result = {
        "name": name, "mode": "quick" if args.quick else "full",
        "command": shlex.join(["python", *(sys.argv if argv is None else ["benchmarks/acceleration.py", *argv])]),
        "machine": machine(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t0)),
        "seconds": round(time.time() - t0, 1), "loadavg_start": load0,
        # Wall seconds of every stage trained for these results (a reused first stage counts once).
        "stage_seconds": round(sum(st["wall_seconds"] for r in runs
                                   for st in r["stages"][int(r["first_stage_reused"]):]), 1),
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "setup": {**{k: v for k, v in vars(setup).items() if k != "models"}, "exact_available": exact},
        "models": setup.models, "ds_config": DS_CONFIG, "summary": summary, "runs": runs, "notes": notes,
    }
    stem = results / f"acceleration-{name}"
    Path(f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    Path(f"{stem}.md").write_text(markdown(result))
    plot(result, Path(f"{stem}.png"))
    print(markdown(result))
    print(f"wrote {stem}.json, {stem}.md, {stem}.png in {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
