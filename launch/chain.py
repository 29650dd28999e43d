"""Train a family of models (CLIP, LLaMA) as a chain, smallest first; every stage is a DeepSpeed engine.

    deepspeed launch/chain.py --ds_config ds_configs/zero3.json [--chain demo|PATH.yaml] [--output DIR]
    deepspeed --num_gpus 2 launch/chain.py ...     (more ranks; --hostfile for more nodes)
    torchrun --nproc_per_node 2 launch/chain.py ... (or accelerate launch, mpirun, srun: see the README)

Run the same command again to resume: finished stages are verified and skipped, the
running one continues from its newest good checkpoint. Exit codes: 0 done, 1 a stage
failed (bad data, NaN losses, unwritable disk; the message says what to fix), 2 bad
input (nothing ran), 143 stopped by SIGTERM/SIGINT at a safe point (a checkpoint saved, or the
stage's weights saved when the signal came during its final evaluation or save).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

# compt (and torch) are imported in main(), after the arguments: `--help` answers at once.


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chain", default="demo", help="chain YAML path or preset name (default: the built-in demo)")
    p.add_argument("--ds_config", default="ds_configs/zero3.json", help="DeepSpeed config JSON")
    p.add_argument("--output", default=None, help="run directory (default: runs/<chain name>)")
    p.add_argument("--accept-config-change", action="store_true",
                   help="the chain config of an existing --output changed: retrain the affected stages "
                        "(their old files are kept under <output>/replaced/)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the accelerator's dense bf16 peak TFLOP/s per device, for MFU (default: looked up for "
                        "common GPUs; none on CPU)")
    p.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    from compt.checkpoint import CheckpointError, StageInterrupted, StopRequest
    from compt.config import ChainConfigError, load_chain
    from compt.distributed import LauncherError, init_distributed
    from compt.engine import batch_problems, ds_config_notes, read_ds_config
    from compt.families import family_of
    from compt.faults import StageFailed
    from compt.metrics import ChainMonitor, peak_tflops
    from compt.report import markdown_table, plot_chain, print_table
    from compt.rundir import RunDir, atomic_write_text, output_problem
    from compt.runlock import RunLocked, lock_run_dir
    from compt.stage import finished_stage, train_stage
    from compt.stopping import watch_launcher

    # 1. Validate everything before any compute.
    try:
        cfg = load_chain(args.chain, args.ds_config)
    except ChainConfigError as e:
        print(e, file=sys.stderr)
        return 2
    ds_base = read_ds_config(args.ds_config)
    run = RunDir(args.output or Path("runs") / cfg.name)
    problem = output_problem(run.root) or run.conflict(cfg, ds_base, args.accept_config_change)  # on every rank
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    watch_launcher()  # its exit stops this rank as SIGTERM does (`deepspeed` passes no signal on to its ranks)
    try:
        rank, world = init_distributed()  # deepspeed, torchrun, accelerate, mpirun, srun, or 1 rank under python
    except LauncherError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    problems = batch_problems(cfg, ds_base, world)
    if problems:
        if rank == 0:
            print("error: " + "\n  ".join(problems), file=sys.stderr)
        return 2

    # 2. The run directory: rank 0 locks it for the whole run before any rank writes there (a second launch
    #    on it exits 2 on every rank), then creates it (an existing run of the same config is resumed).
    try:
        lock = lock_run_dir(run.root, rank)  # noqa: F841 - held until main returns
    except RunLocked as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    if rank == 0:
        run.open(cfg, ds_base, args.accept_config_change)
        for note in ds_config_notes(ds_base, "grad_clip" in cfg.defaults.model_fields_set):
            print(f"note: {note}")
    import torch.distributed as dist
    dist.barrier()

    # 3. Data, shared by all stages (text: rank 0 trains the run's tokenizer, the others then load it).
    family = family_of(cfg.family)
    train_ds, val_ds = family.build_data(cfg.data, run.root, rank)
    problems = batch_problems(cfg, ds_base, world, len(train_ds))
    if problems:
        if rank == 0:
            print("error: " + "\n  ".join(problems), file=sys.stderr)
        return 2
    if rank == 0:
        from compt.streaming import size_text

        print(f"chain '{cfg.name}': {len(cfg.stages)} stages, {size_text(len(train_ds))} train / {len(val_ds)} val "
              f"samples, {world} rank(s), run dir {run.root}")

    # 4. Walk the chain: each stage grows from and aligns to the one before. One set of DeepSpeed monitors
    #    (TensorBoard, CSV, W&B: what the ds_config enables) for the whole chain, on the chain's sample axis.
    #    From here on, SIGTERM/SIGINT stop the run at the next safe point: a checkpoint between training steps,
    #    or the end of the stage being evaluated and saved (a rerun then skips it); repeats are ignored.
    monitor, peak = ChainMonitor(ds_base, rank), peak_tflops(args.peak_tflops)
    stop = StopRequest(rank).install()
    done = []
    for k, stage in enumerate(cfg.stages):
        predecessor = done[-1][2] if done else None
        result = finished_stage(run, cfg, k)
        if result is None:
            try:
                result = train_stage(k, cfg, ds_base, run, predecessor, train_ds, val_ds, monitor=monitor, peak=peak,
                                     stop=stop)
            except StageInterrupted as e:
                print(e, file=sys.stderr)
                return 143
            except (StageFailed, CheckpointError) as e:
                # Every failing rank says why: the cause may be on one rank only (its disk, its data).
                print(f"error{f' (rank {rank} of {world})' if world > 1 else ''}: {e}", file=sys.stderr)
                run.record_failure(k, stage.name, rank, world, e)
                return 1
            except Exception as e:  # noqa: BLE001 - a defect: say so, and never leave the stage `running`
                import traceback

                traceback.print_exc()
                print(f"error{f' (rank {rank} of {world})' if world > 1 else ''}: stage {k} {stage.name} failed "
                      f"unexpectedly ({type(e).__name__}: {e}); please report it with the traceback above",
                      file=sys.stderr)
                run.record_failure(k, stage.name, rank, world, e)
                return 1
        elif rank == 0:
            print(f"stage {k} {stage.name}: already done (weights verified), skipping")
        done.append((stage, result.metrics, result))
        if stop.on_any_rank():
            if rank == 0:
                print(f"stage {k} {stage.name}: stopped by {stop.reason} with the stage done (weights saved); run "
                      "the same command again to continue", file=sys.stderr)
            return 143

    # 5. The final table.
    if rank == 0:
        rows = [family.result_row(s, m) for s, m, _ in done]
        print_table(f"chain '{cfg.name}' ({world} rank(s))", family.result_headers, rows)
        atomic_write_text(run.root / "results.md", markdown_table(family.result_headers, rows))
        plot_chain(run.root / "chain.png", [m for _, m, _ in done], family.quality, title=f"chain '{cfg.name}'")
        print(f"results: {run.root / 'results.md'}, {run.root / 'chain.png'}, manifest: {run.manifest_path}")
    return 0


def shutdown() -> None:
    """Leave the process group cleanly: live gloo/shm threads can abort the exit otherwise."""
    if "torch.distributed" not in sys.modules:  # --help, or stopped before any compt import
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        code = main()
    finally:
        shutdown()
    sys.exit(code)
