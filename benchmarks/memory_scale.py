"""Per-rank memory of a grown LLaMA stage on 1 vs 2 CPU ranks: does ZeRO-3 divide it?

    python benchmarks/memory_scale.py [--size 220m|100m] --label after                  # this tree
    git worktree add /tmp/before 83c6ef6
    python benchmarks/memory_scale.py [--size 220m|100m] --label before --tree /tmp/before

A two-stage chain (launch/chain.py, ds_configs/zero3.json, fp32): a ~35M-parameter LLaMA trained 2 steps,
then a ~220M one grown from it (official growth, KL distillation on), 2 steps, short sequences (``--size
100m``: ~17M -> ~100M, where one rank cannot hold the larger stage's ~9 GiB peak). Each rank
process runs the tree's own launch/chain.py under a thin wrapper that, around every ``train_stage`` call,
resets the kernel's resident high-water mark (/proc/self/clear_refs) and reads the stage's baseline RSS and
peak VmHWM: the same measurement for trees with and without compt.memory (for the tree that has it, its
metrics.json ``memory`` figures are recorded beside). The figure is the grown stage's peak above its
baseline, per rank; the ratio is the 2-rank worst rank over the 1-rank figure (target <= 0.6). Results
accumulate by label in benchmarks/results/memory-llama-<size>-cpu.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import runpy
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
MIB = 1 << 20


def buffers(hidden: int) -> dict:
    """ZeRO's gradient bucket sized from the model's width (transformers' rule, h*h), given explicitly so trees
    with and without compt's own sizing run alike: DeepSpeed's default (5e8 elements) alone is ~2 GiB per rank
    whatever the rank count. The prefetch bucket keeps DeepSpeed's default: at 0.9*h*h, DeepSpeed 0.19.8 left
    a prefetched parameter in flight after evaluation and the save then failed ("Cannot partition a param in
    flight") for these untied LLaMA models, before and after this change alike."""
    return {"zero_optimization": {"reduce_bucket_size": hidden * hidden}}


def llama(hidden: int, layers: int, mlp: int) -> dict:
    return {"vocab_size": 8192, "hidden_size": hidden, "intermediate_size": mlp, "num_hidden_layers": layers,
            "num_attention_heads": hidden // 64, "num_key_value_heads": hidden // 64, "head_dim": 64,
            "max_position_embeddings": 64, "tie_word_embeddings": False}


# (teacher, student) as (hidden, layers, MLP width): ~35M -> ~220M, and ~17M -> ~100M for machines where one
# rank cannot hold the larger stage (its 1-rank peak is ~9 GiB).
SIZES = {"220m": ((512, 8, 1376), (1024, 16, 2752)), "100m": ((384, 6, 1024), (768, 12, 2048))}


def chain(size: str) -> dict:
    (th, tl, tm), (sh, sl, sm) = SIZES[size]
    return {**CHAIN, "stages": [
        {"name": "teacher", "model": llama(th, tl, tm), "budget": {"steps": 2}, "deepspeed": buffers(th)},
        {"name": "student", "model": llama(sh, sl, sm), "budget": {"steps": 2}, "deepspeed": buffers(sh),
         "transfer": {"init": "official", "alpha": 1.0}}]}


CHAIN = {
    "name": "memory-scale",
    "family": "llama",
    "seed": 0,
    "data": {"kind": "pydoc", "seq_len": 32, "vocab_size": 4096, "val_fraction": 0.002, "workers": 0},
    "eval": {"batch_size": 8},
    "defaults": {"lr": 1.0e-3, "warmup_steps": 1, "batch_size": 4, "log_every": 1, "checkpoint_minutes": 0},
}


def _status_kib(path: str, field: str) -> int:
    with open(path) as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def rank_job(tree: Path, out: Path, chain_args: list[str]) -> None:
    """Inside one rank process: the tree's launch/chain.py, each stage measured (see the module doc)."""
    sys.path.insert(0, str(tree))
    import compt

    compt.__path__.append(str(tree))  # compt.kernels is the tree's top-level kernels/ (its setup.py maps it)
    import compt.stage

    original = compt.stage.train_stage

    def measured(k, *args, **kwargs):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        baseline = _status_kib("/proc/self/status", "VmRSS") * 1024
        start = time.time()
        result = original(k, *args, **kwargs)
        peak = _status_kib("/proc/self/status", "VmHWM") * 1024
        rank = int(os.environ.get("RANK", "0"))
        (out / f"stage{k}-rank{rank}.json").write_text(json.dumps(
            {"stage": k, "rank": rank, "baseline_rss_bytes": baseline, "peak_rss_bytes": peak,
             "seconds": time.time() - start, "metrics_memory": result.metrics.get("memory"),
             "teacher": result.metrics.get("teacher")}))
        return result

    compt.stage.train_stage = measured
    sys.argv = [str(tree / "launch" / "chain.py"), *chain_args]
    os.chdir(tree)
    runpy.run_path(str(tree / "launch" / "chain.py"), run_name="__main__")


def run(tree: Path, ranks: int, work: Path, port: int, size: str) -> dict:
    out = work / f"ranks{ranks}"
    out.mkdir(parents=True, exist_ok=True)
    path = work / "chain.yaml"
    path.write_text(json.dumps(chain(size)))  # JSON is YAML
    cmd = ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(port), str(Path(__file__).resolve()),
           "--rank-job", "--tree", str(tree), "--out", str(out), "--", "--chain", str(path),
           "--ds_config", str(tree / "ds_configs" / "zero3.json"), "--output", str(out / "run")]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONUNBUFFERED": "1"}
    start = time.time()
    proc = subprocess.run(cmd, cwd=tree, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    stages = {}
    for path in sorted(out.glob("stage*-rank*.json")):
        r = json.loads(path.read_text())
        stages.setdefault(r["stage"], [None] * ranks)[r["rank"]] = r
    return {"ranks": ranks, "seconds": time.time() - start, "stages": {str(k): v for k, v in sorted(stages.items())}}


def above(r: dict) -> int:
    return r["peak_rss_bytes"] - r["baseline_rss_bytes"]


def render(results: dict) -> str:
    lines = [f"# Per-rank memory of a grown LLaMA stage, 1 vs 2 CPU ranks (`{results['command']}`)", "",
             f"Machine: {results['machine']}. {results['setup']}", "",
             "| tree | ranks | baseline MiB (per rank) | peak MiB (per rank) | peak above baseline MiB (per rank) "
             "| worst 2-rank / 1-rank | stage s |", "|---|---|---|---|---|---|---|"]
    for label, entry in results["labels"].items():
        one = max(above(r) for r in entry["runs"]["1"]["stages"]["1"])
        for ranks in ("1", "2"):
            recs = entry["runs"][ranks]["stages"]["1"]
            worst = max(above(r) for r in recs)
            ratio = f"**{worst / one:.2f}**" if ranks == "2" else "1"
            def mib(values) -> str:
                return " / ".join(f"{v / MIB:.0f}" for v in values)

            lines.append(f"| {label} ({entry['commit']}) | {ranks} | {mib(r['baseline_rss_bytes'] for r in recs)} | "
                         f"{mib(r['peak_rss_bytes'] for r in recs)} | {mib(above(r) for r in recs)} | {ratio} | "
                         f"{max(r['seconds'] for r in recs):.0f} |")
    lines += ["", results["note"], ""]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--label", default="after", help="the row's name in the results (before, after, ...)")
    p.add_argument("--tree", type=Path, default=REPO, help="the compt checkout to measure (default: this one)")
    p.add_argument("--work", type=Path, default=Path("/tmp/compt-memory-scale"), help="run directories")
    p.add_argument("--port", type=int, default=29870)
    p.add_argument("--size", choices=sorted(SIZES), default="220m", help="teacher -> student size (default 220m)")
    p.add_argument("--rank-job", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    args, rest = p.parse_known_args()
    tree = args.tree.resolve()
    if args.rank_job:
        rank_job(tree, args.out, [a for a in rest if a != "--"])
        return 0
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=tree, capture_output=True,
                           text=True).stdout.strip()
    work = args.work / args.size / args.label
    entry = {"tree": str(tree), "commit": commit + ("+changes" if dirty else ""),
             "runs": {str(r): run(tree, r, work, args.port + r, args.size) for r in (1, 2)}}
    out = RESULTS / f"memory-llama-{args.size}-cpu"
    path = out.with_suffix(".json")
    results = json.loads(path.read_text()) if path.exists() else {"labels": {}}
    results["labels"][args.label] = entry
    results["command"] = (f"python benchmarks/memory_scale.py --size {args.size} --label before --tree /tmp/before; "
                          f"python benchmarks/memory_scale.py --size {args.size} --label after")
    results["machine"] = (f"{platform.node()}: {os.cpu_count()} CPUs, "
                          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, "
                          f"{platform.platform()}, Python {platform.python_version()}")
    (th, tl, _), (sh, sl, _) = SIZES[args.size]
    results["setup"] = (f"Chain: LLaMA teacher (hidden {th}, {tl} layers, vocab 8192, untied) 2 steps, then a {args.size} "
                        f"student (hidden {sh}, {sl} layers) grown with official growth, KL distillation alpha 1, "
                        "2 steps; pydoc, "
                        "seq_len 32, global batch 4, fp32, ds_configs/zero3.json with each stage's reduce_bucket_size set to h*h; OMP_NUM_THREADS=1. Figures are "
                        "the grown stage's (stage 1), measured in each rank process from the start of "
                        "train_stage (baseline RSS; high-water mark reset) to its return (VmHWM).")
    results["note"] = ("Noise: the 2-CPU machine was shared with other jobs while these ran; RSS figures do not "
                       "depend on CPU contention, but allocator reuse between stages can shift a baseline by "
                       "tens of MiB.")
    path.write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(render(results))
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
