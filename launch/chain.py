"""Train a family of models (CLIP, LLaMA) as a chain, smallest first; every stage is a DeepSpeed engine.

    deepspeed launch/chain.py --ds_config ds_configs/zero3.json [--chain demo|PATH.yaml] [--output DIR]
    deepspeed --num_gpus 2 launch/chain.py ...     (more ranks; --hostfile for more nodes)

Run the same command again to resume: finished stages are verified and skipped, the
running one continues from its newest good checkpoint. Exit codes: 0 done, 1 a stage
failed (bad data, NaN losses, unwritable disk; the message says what to fix), 2 bad
input (nothing ran), 143 stopped by SIGTERM/SIGINT after saving a checkpoint.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from compt.checkpoint import CheckpointError, StageInterrupted
from compt.config import ChainConfigError, load_chain
from compt.engine import read_ds_config
from compt.families import family_of
from compt.faults import StageFailed
from compt.report import markdown_table, print_table
from compt.rundir import RunDir, atomic_write_text
from compt.stage import finished_stage, train_stage


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chain", default="demo", help="chain YAML path or preset name (default: the built-in demo)")
    p.add_argument("--ds_config", default="ds_configs/zero3.json", help="DeepSpeed config JSON")
    p.add_argument("--output", default=None, help="run directory (default: runs/<chain name>)")
    p.add_argument("--accept-config-change", action="store_true",
                   help="the chain config of an existing --output changed: retrain the affected stages "
                        "(their old files are kept under <output>/replaced/)")
    p.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    return p.parse_args()


def init_distributed() -> tuple[int, int]:
    """Join the process group the deepspeed launcher set up (or a 1-rank group under plain python)."""
    import deepspeed
    import torch.distributed as dist

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
    deepspeed.init_distributed()
    import torch
    if not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
        # CPU ranks on one node share its cores; torch would start one thread per core in each.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_SIZE", "1"))))
    return dist.get_rank(), dist.get_world_size()


def main() -> int:
    args = parse_args()
    # 1. Validate everything before any compute.
    try:
        cfg = load_chain(args.chain, args.ds_config)
    except ChainConfigError as e:
        print(e, file=sys.stderr)
        return 2
    ds_base = read_ds_config(args.ds_config)
    run = RunDir(args.output or Path("runs") / cfg.name)
    problem = run.conflict(cfg, ds_base, args.accept_config_change)  # every rank checks, so no rank waits for one that quit
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    rank, world = init_distributed()

    # 2. The run directory (rank 0 creates it; an existing run of the same config is resumed).
    if rank == 0:
        run.open(cfg, ds_base, args.accept_config_change)
    import torch.distributed as dist
    dist.barrier()

    # 3. Data, shared by all stages (text: rank 0 trains the run's tokenizer, the others then load it).
    family = family_of(cfg.family)
    train_ds, val_ds = family.build_data(cfg.data, run.root, rank)
    if rank == 0:
        print(f"chain '{cfg.name}': {len(cfg.stages)} stages, {len(train_ds)} train / {len(val_ds)} val samples, "
              f"{world} rank(s), run dir {run.root}")

    # 4. Walk the chain: each stage grows from and aligns to the one before.
    done = []
    for k, stage in enumerate(cfg.stages):
        predecessor = done[-1][2] if done else None
        result = finished_stage(run, cfg, k)
        if result is None:
            try:
                result = train_stage(k, cfg, ds_base, run, predecessor, train_ds, val_ds)
            except StageInterrupted as e:
                print(e, file=sys.stderr)
                return 143
            except (StageFailed, CheckpointError) as e:
                # Every failing rank says why: the cause may be on one rank only (its disk, its data).
                print(f"error{f' (rank {rank} of {world})' if world > 1 else ''}: {e}", file=sys.stderr)
                run.record_failure(k, stage.name, rank, world, e)
                return 1
        elif rank == 0:
            print(f"stage {k} {stage.name}: already done (weights verified), skipping")
        done.append((stage, result.metrics, result))

    # 5. The final table.
    if rank == 0:
        rows = [family.result_row(s, m) for s, m, _ in done]
        print_table(f"chain '{cfg.name}' ({world} rank(s))", family.result_headers, rows)
        atomic_write_text(run.root / "results.md", markdown_table(family.result_headers, rows))
        print(f"results: {run.root / 'results.md'}, manifest: {run.manifest_path}")
    return 0


def shutdown() -> None:
    """Leave the process group cleanly: live gloo/shm threads can abort the exit otherwise."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        code = main()
    finally:
        shutdown()
    sys.exit(code)
