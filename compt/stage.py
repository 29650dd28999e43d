"""Train one chain stage: build the student under ZeRO-3, grow it from the predecessor,
train it (the family's own loss + transfer toward the frozen teacher), evaluate, save.

Family-agnostic: everything model-specific is asked of the stage's family
(compt.families.Family). Every rank runs this; only rank 0 writes files.
"""
from __future__ import annotations

import gc
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from compt.checkpoint import StageCheckpointer, StageInterrupted, StopRequest, any_rank
from compt.config import ChainConfig
from compt.devices import placement
from compt.engine import build_engine, merge_ds_config, stage_ds_config, zero_buffers, zero_stage
from compt.families import DEFAULT_FAMILY, Family, family_of
from compt.faults import (Counters, StageFailed, bad_data_message, gather_examples, nonfinite_message,
                          sum_across_ranks, too_much_bad_data)
from compt.kernels import expand_flat_slice
from compt.metrics import ChainMonitor, LiveLog, summary_text
from compt.memory import StageMemory
from compt.partition import build_partitioned, frozen_engine, load_partitioned
from compt.loading import loader_options
from compt.report import plot_loss, write_loss_csv
from compt.rundir import RunDir, write_json
from compt.stopping import signals_held, started_with_signals_held
from compt.weights import open_lazy, save_zero3_module, sha256_file


class StageClock:
    """A stage's elapsed time, summed over the segments of an interrupted and resumed stage: ``wall_seconds``
    (start to saved weights) and ``train_seconds`` (start to the end of the last step, build included)."""

    def __init__(self):
        self.start, self.train_end = time.time(), None
        self.before = {"wall_seconds": 0.0, "train_seconds": 0.0}

    def resume(self, elapsed: dict | None) -> None:
        if elapsed:
            self.before = {key: float(elapsed.get(key, 0.0)) for key in self.before}

    def training_done(self) -> None:
        self.train_end = time.time()

    def state(self) -> dict[str, float]:
        now = time.time()
        return {"wall_seconds": self.before["wall_seconds"] + now - self.start,
                "train_seconds": self.before["train_seconds"] + (self.train_end or now) - self.start}


@dataclass
class StageResult:
    index: int
    name: str
    model_cfg: dict[str, Any]
    dir: Path
    weights: Path
    sha256: str | None
    metrics: dict[str, Any]


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def init_student(family: Family, model_cfg: dict, teacher_cfg: dict | None, seed: int, zero3_config: dict | None,
                 init_needed: bool = True):
    """The student with its library's own initialisation, partitioned by ZeRO-3 when asked.

    Under ZeRO-3 it is built straight into partitions (compt.partition.build_partitioned): no rank ever
    holds the whole model, and the library's later initialisation (``family.library_inits``) runs with
    the parameters it writes gathered, consuming the random stream in the order a plain build does, so
    the same seed gives the same weights whatever the rank count (in fp32, bit for bit the plain build's;
    partitions in bf16/fp16 are initialised in that dtype: the same distributions, other draws). When
    every weight will be overwritten anyway (exact growth, or a resumed checkpoint) ``init_needed=False``
    skips that initialisation. ``teacher_cfg``: the predecessor's config when the student aligns to it
    (CLIP adds a projection when embedding widths differ).
    """
    torch.manual_seed(seed)
    if zero3_config is None:
        return family.build(model_cfg, teacher_cfg)
    return build_partitioned(lambda: family.build(model_cfg, teacher_cfg), zero3_config,
                             family.library_inits() if init_needed else ())


def grow_into(family: Family, model: torch.nn.Module, prev: StageResult, model_cfg: dict, transfer, seed: int,
              zero3: bool, backend: str = "auto") -> int:
    """Initialise the student from the predecessor's safetensors (read lazily, tensor by tensor).

    Under ZeRO-3 every rank computes only its own partition of each grown parameter,
    straight from the small tensor (``TensorPlan.flat_slice``): no full grown tensor is
    ever gathered, and growth randomness is counter-based, so the result is the same
    for any rank count. Without ZeRO-3 every rank computes the dense tensor. ``backend``
    picks the fused Triton expansion kernel (auto: on a GPU) or the PyTorch reference.
    Returns the number of student tensors that received teacher weights.
    """
    changed = 0
    with open_lazy(prev.weights) as small:
        for name, p in model.named_parameters():
            plan = family.plan(name, prev.model_cfg, model_cfg, transfer.init, transfer.noise, seed)
            if plan is None or any(src not in small for src in plan.sources):
                continue
            with torch.no_grad():
                if zero3 and hasattr(p, "ds_tensor"):
                    part = p.ds_tensor.data  # this rank's flat slice [start, start + size) of the padded tensor
                    sources = {src: small.get(src).to(part.device) for src in plan.sources}
                    start = part.numel() * dist.get_rank()
                    end = min(start + part.numel(), plan.numel)
                    if end > start:
                        local = part[: end - start]
                        local.copy_(expand_flat_slice(plan, sources, start, end,
                                                      local.clone() if plan.needs_init() else None,
                                                      dtype=local.dtype, backend=backend))
                else:
                    sources = {src: small.get(src) for src in plan.sources}
                    p.data.copy_(plan.dense(sources, p.data if plan.needs_init() else None,
                                            dtype=p.dtype).reshape(p.shape))
            changed += 1
    return changed


def load_frozen(family: Family, prev: StageResult, ds_cfg: dict, sharded: bool):
    """The frozen predecessor and, when ``sharded``, the DeepSpeed engine that gathers its parameters per
    module in its forward (compt.partition: built into its own ZeRO-3 partitions in the training dtype,
    read slice by slice from its safetensors; the model is ``family.build(cfg, None)``, as its weights were
    saved). Otherwise a full copy from ``family.load_teacher`` and None."""
    if not sharded:
        return family.load_teacher(prev.model_cfg, prev.weights), None
    model = load_partitioned(lambda: family.build(prev.model_cfg, None), prev.weights, ds_cfg, family.export_name)
    engine = frozen_engine(model, ds_cfg)
    return engine.module, engine


def train_loop(engine, loader, loss_step, teacher, *, steps: int, start: int, curve: list, settings,
                checkpointer: StageCheckpointer, client: dict, counters: Counters, max_bad_fraction: float,
                label: str, rank: int, names: tuple[str, str], live: LiveLog | None = None,
                clock: StageClock | None = None, stop: StopRequest | None = None) -> None:
    """Steps ``start``..``steps``; appends to ``curve``; checkpoints and honours SIGTERM/SIGINT.

    A step whose loss is NaN/Inf on any rank is skipped (no backward, no optimizer step; with
    gradient accumulation the step applies the other micro-batches' gradients) and counted;
    past ``settings.max_nonfinite_steps`` the stage stops. Bad samples are counted as the
    loader reports them; past ``max_bad_fraction`` the stage saves a checkpoint and stops.
    ``live``: every ``settings.log_every`` steps its record (throughput, MFU, ...) goes to metrics.jsonl,
    the monitors and the progress bar (a plain line per record when stderr is not a terminal).
    ``clock``: the stage's elapsed time, saved with each checkpoint so resumed stages report the sum.
    ``stop``: the run's StopRequest, installed by the caller for longer than the loop (default: one for the loop).
    """
    gas = engine.gradient_accumulation_steps()
    device, dtype = placement(engine)  # batches go where DeepSpeed put the model, floats in its training dtype
    terminal = sys.stderr.isatty()
    bar = tqdm(total=steps, initial=start, desc=label, disable=rank != 0 or not terminal, dynamic_ncols=True)
    if live is not None:
        live.start(start)

    def save(step: int) -> None:
        checkpointer.save(step, {**client, "step": step, "curve": curve, "counters": counters.state(),
                                 **({"elapsed": clock.state()} if clock is not None else {}),
                                 **({"data": loader.state()} if hasattr(loader, "state") else {})})  # streamed

    engine.train()
    step_finite, step_bad = True, 0
    with (nullcontext(stop) if stop is not None else StopRequest(rank)) as stop:
        if stop.on_any_rank():  # came while the stage was built or grown: nothing new to checkpoint
            bar.close()
            raise StageInterrupted(f"{label}: stopped by {stop.reason} before step {start + 1}"
                                   f"{f'; its checkpoint at step {start} is kept' if start else ''}, "
                                   "run the same command again to resume")
        for micro, batch in enumerate(started_with_signals_held(loader)):  # see compt.stopping.signals_held
            batch = batch.to(device, dtype, non_blocking=True)
            parts = loss_step(engine, batch, teacher)
            step_bad += len(batch.bad)
            counters.remember(batch.bad)
            finite = not any_rank(not bool(torch.isfinite(parts.total)))[0]
            if finite:
                engine.backward(parts.total)
                engine.step()
            elif gas > 1:
                engine.step()  # keeps DeepSpeed's micro-step count in line with the loader
            step_finite &= finite
            if (micro + 1) % gas:
                continue
            step = start + (micro + 1) // gas
            total, con, ali, bad = sum_across_ranks(
                [parts.total.item(), parts.task.item(),
                 parts.transfer.item() if parts.transfer is not None else 0.0, step_bad])
            counters.samples += settings.batch_size
            counters.bad_samples += int(bad)
            world = _rank_world()[1]
            if step_finite:
                total, con, ali = total / world, con / world, ali / world
                curve.append({"step": step, "loss": total, names[0]: con, names[1]: ali, "lr": engine.get_lr()[0]})
            else:
                counters.nonfinite_steps += 1
                if rank == 0:
                    tqdm.write(f"warning: {label}: non-finite loss at step {step}, step skipped "
                               f"({counters.nonfinite_steps} so far, limit {settings.max_nonfinite_steps})", file=sys.stderr)
                if counters.nonfinite_steps > settings.max_nonfinite_steps:
                    bar.close()
                    raise StageFailed(nonfinite_message(label, step, counters, settings.max_nonfinite_steps))
            step_finite, step_bad = True, 0
            bar.update(1)
            if step % settings.log_every == 0 or step == steps:
                fields = {"loss": f"{total:.3f}", "lr": f"{engine.get_lr()[0]:.2e}"}
                if live is not None:
                    norm = engine.get_global_grad_norm()
                    fields = summary_text(live.log(step, total, con, ali, engine.get_lr()[0],
                                                   float(norm) if norm is not None else None))
                bar.set_postfix(**fields)
                if rank == 0 and not terminal:  # logs and pipes: one plain line, no carriage-return redraws
                    print(f"{label}: step {step}/{steps} " + " ".join(f"{k} {v}" for k, v in fields.items()),
                          flush=True)
            if too_much_bad_data(counters, max_bad_fraction, final=False):
                bar.close()
                save(step)
                raise StageFailed(bad_data_message(label, counters, max_bad_fraction,
                                                   gather_examples(counters.examples), step))
            stopping, due = checkpointer.poll(step, steps, stop)
            if due:
                save(step)
            if stopping:
                bar.close()
                raise StageInterrupted(f"{label}: stopped by {stop.reason} after step {step}; "
                                        f"checkpoint saved, run the same command again to resume")
    bar.close()
    counters.examples = gather_examples(counters.examples)
    if too_much_bad_data(counters, max_bad_fraction, final=True):  # also when a rerun resumes at the last step
        save(steps)
        raise StageFailed(bad_data_message(label, counters, max_bad_fraction, counters.examples, steps))


def train_stage(k: int, cfg: ChainConfig, ds_base: dict, run: RunDir, prev: StageResult | None,
                train_ds, val_ds, monitor: ChainMonitor | None = None, peak: float | None = None,
                stop: StopRequest | None = None) -> StageResult:
    """``monitor``: the chain's DeepSpeed monitors; ``peak``: the device's bf16 peak TFLOP/s (for MFU).
    ``stop``: the run's StopRequest, installed for the whole stage: a signal before the first step stops it
    there, one during training checkpoints and stops, one during the evaluation or save waits for the save
    (the caller then stops, and a rerun skips the stage)."""
    clock = StageClock()
    memory = StageMemory()  # baseline: after imports, before this stage's models
    rank, world = _rank_world()
    stage = cfg.stages[k]
    model_cfg, settings, transfer = cfg.model_cfg(k), stage.settings(cfg.defaults), cfg.transfer(k)
    steps = stage.budget.steps_for(len(train_ds), settings.batch_size)
    engine_base, hidden = merge_ds_config(ds_base, stage.deepspeed), family_of(cfg.family).hidden_size(model_cfg)
    ds_cfg = stage_ds_config(engine_base, settings, steps, world, hidden_size=hidden)
    zero3 = zero_stage(ds_cfg) == 3
    out_dir = run.stage_dir(k, stage.name)
    ckpt_dir = out_dir / "checkpoints"
    resuming = StageCheckpointer.exists(ckpt_dir)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        run.update_stage(k, status="running", error=None)  # a rerun of a failed stage starts clean

    # The student: its library's own init, ZeRO-3 partitioned, grown from the predecessor.
    family = family_of(cfg.family)
    use_teacher = prev is not None and transfer.align and transfer.alpha > 0
    sharded = zero3 and prev is not None and transfer.teacher != "replicate"
    teacher, teacher_engine = load_frozen(family, prev, ds_cfg, sharded) if use_teacher else (None, None)
    overwritten = resuming or (prev is not None and transfer.init == "exact")
    model = init_student(family, model_cfg, prev.model_cfg if use_teacher else None, cfg.seed + k,
                         ds_cfg if zero3 else None, init_needed=not overwritten)
    grown = 0
    if prev is not None and transfer.init != "none" and not resuming:
        seed = transfer.seed if transfer.seed is not None else cfg.seed + k
        grown = grow_into(family, model, prev, model_cfg, transfer, seed, zero3, cfg.kernels)
    if stage.activation_checkpointing:
        family.enable_activation_checkpointing(model)
    engine = build_engine(model, ds_cfg, settings.weight_decay, family.no_decay)
    device, dtype = placement(engine)
    if teacher is not None and not sharded:  # frozen, in the training dtype, beside the student
        teacher = teacher.to(device=device, dtype=dtype)
    checkpointer = StageCheckpointer(engine, ckpt_dir, settings.checkpoint_every_steps, settings.checkpoint_minutes,
                                     settings.keep_checkpoints, rank)

    # Step-0 metrics, or everything an interrupted run had reached.
    client = checkpointer.resume() if resuming else None
    if client is None:
        client = {"step": 0, "curve": [], "metrics": {"grown_tensors": grown}}
        if prev is not None:
            probe, probe_engine = (teacher, None) if teacher is not None else load_frozen(family, prev, ds_cfg, sharded)
            if not sharded:
                probe = probe.to(device=device, dtype=dtype)
            with signals_held():  # its data workers start safe from group signals
                client["metrics"].update(family.init_metrics(engine, prev.model_cfg, probe, model_cfg, val_ds, cfg))
            if probe_engine is not None:
                probe_engine.destroy()
            del probe, probe_engine
    else:
        clock.resume(client.get("elapsed"))
        if rank == 0:
            print(f"stage {k} {stage.name}: resuming from checkpoint at step {client['step']}")
    metrics: dict[str, Any] = {"stage": k, "name": stage.name, "family": family.name, "steps": steps,
                               "global_batch": settings.batch_size, "ranks": world,
                               "zero_buffers": zero_buffers(engine_base, hidden),
                               "transfer": transfer.model_dump() if transfer else None,
                               **({"teacher": "sharded" if sharded else "replicate"} if prev is not None else {}),
                               **client["metrics"]}

    # Train.
    loader = family.train_loader(train_ds, model_cfg, prev.model_cfg if use_teacher else None,
                                 global_batch=settings.batch_size, steps=steps, rank=rank, world=world,
                                 gas=engine.gradient_accumulation_steps(), seed=cfg.seed + k,
                                 start_step=client["step"], **loader_options(cfg.data, engine.device),
                                 **({"data_state": client["data"]} if client.get("data") else {}))
    curve = list(client["curve"])
    counters = Counters.from_state(client.get("counters"))
    student_per_sample = family.sample_flops(model_cfg, cfg.data)[0]
    teacher_per_sample = family.sample_flops(prev.model_cfg, cfg.data)[1] if use_teacher else 0
    before = sum(s.budget.steps_for(len(train_ds), s.settings(cfg.defaults).batch_size)
                 * s.settings(cfg.defaults).batch_size for s in cfg.stages[:k])
    live = LiveLog(out_dir / "metrics.jsonl", rank=rank, world=world, global_batch=settings.batch_size,
                   flops_per_sample=student_per_sample + teacher_per_sample,
                   tokens_per_sample=family.tokens_per_sample(cfg.data), peak=peak, chain_samples_before=before,
                   names=family.curve_names, monitor=monitor)
    train_loop(engine, loader, family.loss(transfer.alpha if use_teacher else None, transfer, rank, world,
                                            cfg.kernels), teacher,
                steps=steps, start=client["step"], curve=curve, settings=settings, checkpointer=checkpointer,
                client={"metrics": client["metrics"]}, counters=counters,
                max_bad_fraction=getattr(cfg.data, "max_bad_fraction", 0.0), label=f"stage {k} {stage.name}",
                rank=rank, names=family.curve_names, live=live, clock=clock, stop=stop)
    metrics.update(counters.metrics())
    clock.training_done()

    # Evaluate, count, save.
    with signals_held():  # its data workers start safe from group signals; a stop waits for the save anyway
        metrics.update(family.evaluate(engine, val_ds, model_cfg, cfg))
    samples = steps * settings.batch_size
    student_flops = student_per_sample * samples
    teacher_flops = teacher_per_sample * samples
    metrics["samples_seen"] = samples
    metrics["flops"] = {"student_train": student_flops, "teacher_forward": teacher_flops,
                        "total": student_flops + teacher_flops}
    metrics["final_loss"] = curve[-1]["loss"] if curve else math.nan
    metrics["loss_curve"] = "loss.csv"
    metrics["params"] = sum(getattr(p, "ds_numel", p.numel()) for n, p in engine.module.named_parameters()
                            if family.is_exported(n))
    weights = out_dir / "model.safetensors"
    try:
        sha = save_zero3_module(engine.module, weights, metadata={"format": "pt", "compt_stage": stage.name},
                                rename=family.export_name, fp32_master=dtype != torch.float32)
        metrics["memory"] = memory.report()  # collective: every rank's figures, through the save
        metrics.update(clock.state())  # wall_seconds, train_seconds: summed over every resumed segment
        if rank == 0:
            family.write_config(out_dir / "config.json", model_cfg)
            write_loss_csv(out_dir / "loss.csv", curve)
            plot_loss(out_dir / "loss.png", curve, title=f"stage {k}: {stage.name}")
            write_json(out_dir / "metrics.json", metrics)
            run.update_stage(k, status="done", weights=str(weights.relative_to(run.root)), sha256=sha,
                             metrics=summary(metrics, family))
    except OSError as e:  # disk full, quota: every write above goes to a tmp name first
        raise StageFailed(f"stage {k} {stage.name}: could not write its results to {out_dir}: {e}. Files written "
                          "earlier are intact and the stage's checkpoints are kept; free disk space and run the same "
                          "command again to resume") from e
    _barrier()
    checkpointer.remove_all()
    for done in (engine, teacher_engine):
        done.destroy() if hasattr(done, "destroy") else None
    del engine, model, teacher, teacher_engine
    gc.collect()
    return StageResult(k, stage.name, model_cfg, out_dir, weights, sha, metrics)


def finished_stage(run: RunDir, cfg: ChainConfig, k: int) -> StageResult | None:
    """A stage an earlier run of this chain finished, if its weights still match the manifest."""
    import json

    manifest = run.read_manifest()
    entry = manifest["stages"][k] if manifest else None
    if not entry or entry["status"] != "done":
        return None
    weights = run.entry_path(entry, "weights")  # RunDirError when it leads outside the run directory
    if not weights.is_file() or sha256_file(weights) != entry["sha256"]:
        if _rank_world()[0] == 0:
            what = "is missing" if not weights.is_file() else "does not match the sha256 in the manifest (corrupt)"
            print(f"warning: stage {k} {entry['name']}: {weights} {what}; training the stage again", file=sys.stderr)
        return None
    out_dir = run.entry_path(entry, "dir")
    metrics = json.loads((out_dir / "metrics.json").read_text())
    return StageResult(k, entry["name"], cfg.model_cfg(k), out_dir, weights, entry["sha256"], metrics)


def summary(metrics: dict[str, Any], family: Family | None = None) -> dict[str, Any]:
    """The manifest's per-stage summary: the family's quality figures plus cost."""
    family = family or family_of(metrics.get("family", DEFAULT_FAMILY))  # metrics of old runs name no family
    return {
        **family.summary(metrics),
        "flops_total": metrics["flops"]["total"],
        "wall_seconds": metrics["wall_seconds"],
        "params": metrics.get("params"),
        "samples_seen": metrics.get("samples_seen"),
    }
