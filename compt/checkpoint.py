"""Mid-stage DeepSpeed checkpoints: save every N steps / minutes, keep the last K,
resume from the newest good one, and save before exiting on SIGTERM/SIGINT.

The checkpoint holds DeepSpeed's model, optimizer and LR-schedule state; compt adds the
step count, the loss curve so far, the bad-data counters and the step-0 metrics as
client state. The data position needs nothing more: batches are a pure function of
(seed, step).

A checkpoint is *complete* once ``<tag>/compt-sha256.json`` (the sha256 of every file
in the tag, hashed by the ranks in parallel) exists; only then does ``latest`` point at
it. Resume verifies the hashes before loading and falls back to older complete tags
when the newest one is corrupt or cannot be loaded. DeepSpeed's files are loaded with
``torch.load(weights_only=True)``, allowing only the few DeepSpeed types they hold.

Elastic resume: a ZeRO tag saved on N ranks is resumed on M != N ranks through DeepSpeed's
universal checkpoint. Rank 0 converts the verified tag with ``ds_to_universal`` into
``universal/<tag>`` beside it, the ranks hash the result like a save (its own
``compt-sha256.json``, plus the source tag's index digest so a replaced tag is converted
again), and the engine loads it with DeepSpeed's ``load_universal`` switched on for that load.
The data position still needs only the step for map-style data: its batches come from
compt.sampler.GlobalBatchSampler, a function of (seed, step) over the global batch whatever
the rank count (streamed data keeps its own position in the client state: compt.streaming).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from compt.devices import collective_device
from compt.rundir import RunDirError, atomic_write_text, contained_path
from compt.weights import sha256_file

HASHES = "compt-sha256.json"
UNIVERSAL = "universal"  # <checkpoints>/universal/<tag>: a tag converted for another rank count
SOURCE = "compt-source.json"  # in a conversion: which tag (and index digest) it was made from
# DeepSpeed writes one ZeRO optimizer partition per data-parallel rank (ds_to_universal parses the same names).
_ZERO_PARTITION = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt")


class StageInterrupted(RuntimeError):
    """A stage stopped on SIGTERM/SIGINT at a safe point: after saving a checkpoint, or before its first step."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, or no checkpoint of a stage could be loaded."""


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def any_rank(*flags: bool) -> list[bool]:
    """Each flag true on every rank if it is true on any rank (keeps collective decisions in step)."""
    t = torch.tensor([1 if f else 0 for f in flags], dtype=torch.int64, device=collective_device())
    if _distributed():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def _gather(obj: Any) -> list[Any]:
    if not _distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if _distributed() else (0, 1)


def _inside(root: Path, name: str) -> bool:
    """An index entry names a file inside the tag folder (relative, no '..', no symlink out of it)."""
    try:
        contained_path(root, name, "")
    except RunDirError:
        return False
    return True


def _my_share(files: list[Path]) -> list[Path]:
    rank, world = _rank_world()
    return files[rank::world]


def _safe_globals() -> list[type]:
    """The non-tensor types DeepSpeed pickles into its checkpoint files (fragment_address, two ints: ZeRO-1/2's
    parameter slice mappings, without which no ZeRO-2 checkpoint loaded)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def _deepspeed_types_allowed():
    """torch's safe_globals context removes its types on exit even where an outer one had added them, so a
    nested use (the checkpoint engine's load inside weights_only_loading) adds only what is missing."""
    missing = [t for t in _safe_globals() if t not in torch.serialization.get_safe_globals()]
    with torch.serialization.safe_globals(missing):
        yield


def use_weights_only_loading(engine) -> None:
    """Make the engine's checkpoint engine load with ``weights_only=True`` (no arbitrary pickles)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    ce = getattr(engine, "checkpoint_engine", None)
    if type(ce) is not TorchCheckpointEngine:
        return  # a user-chosen engine (fast/decoupled writers) keeps its own loader

    def load(path: str, map_location=None):
        with _deepspeed_types_allowed():
            return torch.load(path, map_location=map_location, weights_only=True)

    ce.load = load


@contextlib.contextmanager
def weights_only_loading():
    """Every ``torch.load`` inside is ``weights_only=True`` with DeepSpeed's few types allowed, including
    calls that ask for ``weights_only=False``: ds_to_universal and ZeRO-3's universal loader call torch.load
    themselves, past the checkpoint engine that use_weights_only_loading patches."""
    before = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with _deepspeed_types_allowed():
            yield
    finally:
        if before is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = before


def restore_group_settings(param_groups: list[dict], before: list[dict]) -> None:
    """Put back the settings that differed between parameter groups before a universal load: ZeRO-3's
    universal loader (DeepSpeed 0.19.8) gives every group the first group's settings, so the no-decay
    group came back with weight decay. Settings all groups shared (the lr the schedule sets) are left."""
    for key in {k for g in before for k in g}:
        if len({repr(g.get(key)) for g in before}) > 1:
            for group, kept in zip(param_groups, before):
                group[key] = kept[key]


def untie_step_counters(optimizer: torch.optim.Optimizer) -> None:
    """Give each parameter's optimizer state its own ``step`` tensor. ZeRO-3's universal loader (DeepSpeed
    0.19.8) puts one tensor object in every state, and torch's Adam adds 1 to it in place once per state, so
    with two parameter groups the step count ran twice as fast and skewed Adam's bias correction (measured
    here: the loss one update after a 2 -> 1 rank resume was 7e-4 above the uninterrupted run's; untied, equal)."""
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def saved_ranks(names) -> int | None:
    """The data-parallel rank count a tag was saved on, from its file names; None without ZeRO partitions
    (a plain optimizer state loads on any rank count)."""
    ranks = {int(m.group(1)) for n in names if (m := _ZERO_PARTITION.fullmatch(Path(n).name))}
    return max(ranks) + 1 if ranks else None


def convert_to_universal(src: Path, out: Path) -> None:
    """DeepSpeed's ds_to_universal over one tag, in this process. Its worker pools are turned off: they
    fork this rank, whose gloo and intra-op threads a fork does not carry safely (DeepSpeed takes the same
    serial path in its own tests). compt's models have no tensor or pipeline parallelism, so the only
    universal_checkpoint_info the conversion needs is its version, which ``inject_missing_state`` supplies
    (ZeRO-3 conversion does not read it; ZeRO-1/2 conversion asserts it)."""
    from argparse import Namespace

    from deepspeed.checkpoint import ds_to_universal

    args = Namespace(input_folder=str(src), output_folder=str(out), num_extract_workers=1, num_merge_workers=1,
                     keep_temp_folder=False, strict=True, inject_missing_state=True)
    log = io.StringIO()  # its progress bars and prints; the tail goes into the error when it fails
    try:
        with weights_only_loading(), contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            ds_to_universal.main(args)
    except Exception as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [""]
        # torch's weights-only refusal names the type it refused several lines down
        cause = next((ln for ln in lines[1:] if "error:" in ln.lower()), "")
        tail = " | ".join(log.getvalue().strip().splitlines()[-2:])
        raise RuntimeError(f"{type(e).__name__}: {lines[0][:300]}" + (f" {cause[:300]}" if cause else "")
                           + (f" (ds_to_universal said: {tail[:300]})" if tail else "")) from e


class StopRequest:
    """Turns SIGTERM/SIGINT into a flag checked at safe points: between training steps (the stage then
    checkpoints and stops) and after each stage's save. The launcher installs it for the whole chain, so a
    signal during a stage's build, growth, evaluation or save is deferred, never fatal halfway. The first
    signal is acknowledged once (by ``rank`` 0); repeats (a second Ctrl-C) are ignored."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, rank: int = 0):
        self.signum: int | None = None
        self.rank = rank
        self._old: dict[int, Any] = {}

    def install(self) -> "StopRequest":
        for s in self.SIGNALS:
            self._old[s] = signal.signal(s, self._handle)
        return self

    __enter__ = install

    def on_any_rank(self) -> bool:
        """Whether a signal reached any rank (a collective: every rank asks at the same point)."""
        return any_rank(self.signum is not None)[0]

    @property
    def reason(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "a signal to another rank"

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            return
        self.signum = signum
        if self.rank == 0:  # os.write: the main thread may be inside a print to stderr, which is not reentrant
            try:
                os.write(2, f"{self.reason}: stopping at the next safe point (a checkpoint after the current "
                            "training step, or the end of the stage's evaluation and save); further signals are "
                            "ignored\n".encode())
            except OSError:
                pass

    def __exit__(self, *exc) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)


def _warn(rank: int, message: str) -> None:
    if rank == 0:
        print(f"warning: {message}", file=sys.stderr, flush=True)


class StageCheckpointer:
    def __init__(self, engine, directory: Path, every_steps: int, every_minutes: float, keep: int, rank: int):
        self.engine, self.dir, self.every_steps, self.every_minutes = engine, directory, every_steps, every_minutes
        self.keep, self.rank = keep, rank
        self._last = time.monotonic()
        if engine is not None:
            use_weights_only_loading(engine)

    # -- what is on disk ---------------------------------------------------------------
    @staticmethod
    def complete_tags(directory: Path) -> list[str]:
        """Tags whose hash list was written (newest first); the one ``latest`` names comes first."""
        tags = sorted((p.name for p in directory.glob("step*") if (p / HASHES).is_file()), reverse=True)
        latest = directory / "latest"
        if latest.is_file():
            named = latest.read_text().strip()
            if named in tags:
                tags.remove(named)
                tags.insert(0, named)
        return tags

    @classmethod
    def exists(cls, directory: Path) -> bool:
        return directory.is_dir() and bool(cls.complete_tags(directory))

    def _files(self, tag: str) -> list[Path]:
        root = self.dir / tag
        return sorted(p for p in root.rglob("*") if p.is_file() and p.name != HASHES)

    def verify(self, tag: str) -> str | None:
        """Why ``tag`` cannot be trusted (missing/changed/extra files), checked by all ranks in parallel.

        The index must list every file of the tag folder, each inside it: an empty or partial index
        (``{}``, ``[]``, a file left out) and a file nobody hashed are refusals, not passes."""
        root = self.dir / tag
        try:
            want = json.loads((root / HASHES).read_text())
        except (OSError, ValueError) as e:
            return f"{root / HASHES} is unreadable ({e})"
        if not isinstance(want, dict) or not want or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in want.items()):
            return (f"{root / HASHES} lists no files (an empty or malformed index, {type(want).__name__} of "
                    f"{len(want) if hasattr(want, '__len__') else '?'} entries): the checkpoint is not verified")
        problems = []
        names = sorted(want)
        outside = [n for n in names if not _inside(root, n)]
        if outside:
            return f"{root / HASHES} names files outside {root}: {', '.join(repr(n) for n in outside[:5])}"
        if _rank_world()[0] == 0:
            extra = sorted(str(p.relative_to(root)) for p in self._files(tag) if str(p.relative_to(root)) not in want)
            if extra:
                problems.append(f"{root} holds files {HASHES} does not list (added after the save): "
                                f"{', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}")
        for name in _my_share(names):
            path = root / name
            if not path.is_file():
                problems.append(f"{path} is missing")
            elif sha256_file(path) != want[name]:
                problems.append(f"{path} does not match its sha256 (truncated or corrupt)")
        return "; ".join(sum(_gather(problems), [])) or None

    def _index(self, tag: str) -> dict[str, str]:
        """Hash every file of ``tag`` (the ranks in parallel); rank 0 writes them as its ``compt-sha256.json``."""
        share = {str(p.relative_to(self.dir / tag)): sha256_file(p) for p in _my_share(self._files(tag))}
        hashes = {k: v for part in _gather(share) for k, v in part.items()}
        if self.rank == 0:
            atomic_write_text(self.dir / tag / HASHES, json.dumps(hashes, indent=1, sort_keys=True))
        return hashes

    # -- resume --------------------------------------------------------------------------
    def resume(self) -> dict[str, Any] | None:
        """Load the newest good checkpoint into the engine; its client state, or None when there is none.

        Corrupt or unloadable checkpoints are reported and skipped in favour of older ones. A tag saved
        on another rank count is loaded through its universal conversion, and the resume is recorded
        in the client state's metrics (``elastic_resumes``: step, from_ranks, to_ranks).
        """
        failures, world = [], _rank_world()[1]
        for tag in self.complete_tags(self.dir):
            problem, saved = self.verify(tag), None
            if problem is None:
                saved = saved_ranks(json.loads((self.dir / tag / HASHES).read_text()))
                elastic = saved is not None and saved != world
                try:
                    problem = self._universal(tag, saved) if elastic else None
                    if problem is None:
                        path, client = self._load(f"{UNIVERSAL}/{tag}" if elastic else tag, elastic)
                        problem = None if path is not None else "DeepSpeed found nothing to load"
                except Exception as e:  # noqa: BLE001 - reported, then the next older tag is tried
                    problem = f"loading failed: {type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
                if problem and elastic:
                    problem = (f"saved on {saved} ranks, resuming on {world} through DeepSpeed's universal "
                               f"checkpoint {self.dir / UNIVERSAL / tag}: {problem}")
            if any_rank(problem is not None)[0]:
                failures.append(f"{self.dir / tag}: {problem or 'failed on another rank'}")
                _warn(self.rank, f"checkpoint {self.dir / tag} is unusable ({problem}); trying an older one")
                continue
            if failures:
                _warn(self.rank, f"resumed from the older checkpoint {self.dir / tag}")
            if elastic:
                client.setdefault("metrics", {}).setdefault("elastic_resumes", []).append(
                    {"step": client.get("step"), "from_ranks": saved, "to_ranks": world})
                if self.rank == 0:
                    print(f"{self.dir / tag}: saved on {saved} rank(s), resumed on {world} through DeepSpeed's "
                          f"universal checkpoint {self.dir / UNIVERSAL / tag}", flush=True)
            return client
        if failures:
            elastic = any("universal checkpoint" in f for f in failures)
            raise CheckpointError(
                "no usable checkpoint in " + str(self.dir) + ":\n  " + "\n  ".join(failures)
                + ("\nrun on the rank count a checkpoint was saved on to resume it directly, or " if elastic
                   else "\n") + f"delete {self.dir} to restart the stage from its beginning")
        return None

    def _load(self, tag: str, universal: bool) -> tuple[Any, dict[str, Any]]:
        """The engine's load_checkpoint of ``tag``; ``universal``: through DeepSpeed's universal loader.

        DeepSpeed reads its ``load_universal`` setting only while loading, so it is switched on for this
        one load: which tags need it is known per tag, after the engine exists (a fallback to an older tag
        may meet another rank count)."""
        if not universal:
            return self.engine.load_checkpoint(str(self.dir), tag=tag)
        config = self.engine._config  # noqa: SLF001 - see the docstring; restored below
        optimizer = getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)
        groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        before, config.load_universal_checkpoint = config.load_universal_checkpoint, True
        try:
            with weights_only_loading():
                loaded = self.engine.load_checkpoint(str(self.dir), tag=tag)
        finally:
            config.load_universal_checkpoint = before
        restore_group_settings(optimizer.param_groups, groups)
        untie_step_counters(optimizer)
        return loaded

    def _universal(self, tag: str, saved: int) -> str | None:
        """Make ``universal/<tag>`` (rank 0 converts, all ranks hash), or check an earlier conversion of
        the same tag; why it cannot be used, or None."""
        src, out = self.dir / tag, self.dir / UNIVERSAL / tag
        source = {"tag": tag, "ranks": saved, "index_sha256": sha256_file(src / HASHES)}
        try:
            reusable = json.loads((out / SOURCE).read_text()) == source and (out / HASHES).is_file()
        except (OSError, ValueError):
            reusable = False
        if all(_gather(reusable)) and self.verify(f"{UNIVERSAL}/{tag}") is None:
            return None
        partial = self.dir / UNIVERSAL / f"partial-{tag}"
        problem = None
        if self.rank == 0:
            try:
                for old in (out, partial):
                    shutil.rmtree(old, ignore_errors=True)
                convert_to_universal(src, partial)
                atomic_write_text(partial / SOURCE, json.dumps(source, indent=1, sort_keys=True))
            except Exception as e:  # noqa: BLE001 - every rank hears it below
                shutil.rmtree(partial, ignore_errors=True)
                problem = f"converting failed: {e}"
        problem = _gather(problem)[0]
        if problem is None:
            self._index(f"{UNIVERSAL}/{partial.name}")
            if self.rank == 0:
                partial.rename(out)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        return problem

    # -- save ----------------------------------------------------------------------------
    def poll(self, step: int, total: int, stop: StopRequest) -> tuple[bool, bool]:
        """(stop now, checkpoint now), agreed by all ranks in one collective."""
        by_steps = self.every_steps > 0 and step % self.every_steps == 0 and step < total
        by_time = self.every_minutes > 0 and (time.monotonic() - self._last) >= 60 * self.every_minutes
        stopping, due = any_rank(stop.signum is not None, by_steps or by_time)
        return stopping, stopping or due

    def save(self, step: int, client_state: dict[str, Any]) -> None:
        """Write tag ``step<N>``, hash it, then point ``latest`` at it and drop tags beyond ``keep``.

        A failure (disk full, quota) removes the partial tag and raises CheckpointError; the
        previous checkpoint and ``latest`` are untouched.
        """
        tag = f"step{step:08d}"
        previous = self.complete_tags(self.dir) if self.dir.is_dir() else []
        try:
            self.engine.save_checkpoint(str(self.dir), tag=tag, client_state=client_state, save_latest=False)
            self._index(tag)
            if self.rank == 0:
                atomic_write_text(self.dir / "latest", tag)
        except Exception as e:
            if self.rank == 0:
                shutil.rmtree(self.dir / tag, ignore_errors=True)
            kept = f"the previous checkpoint {self.dir / previous[0]} is intact" if previous else "no earlier checkpoint"
            free = shutil.disk_usage(self.dir).free / 2**30 if self.dir.exists() else float("nan")
            others = ("; with several ranks a lost connection means another rank failed first: see its error"
                      if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 else "")
            raise CheckpointError(f"could not write checkpoint {self.dir / tag}: {type(e).__name__}: {e}; {kept}. "
                                  f"{free:.1f} GiB are free there. Fix the cause (disk space, quota or file-size "
                                  f"limit{others}) and run the same command again to resume") from e
        self._last = time.monotonic()
        if self.rank == 0:
            keep = set(self.complete_tags(self.dir)[: self.keep])
            for old in [*self.dir.glob("step*"), *(self.dir / UNIVERSAL).glob("*step*")]:
                if old.is_dir() and old.name not in keep:  # conversions go with their tags
                    shutil.rmtree(old, ignore_errors=True)  # older tags and partial saves of a crashed run
        if dist.is_available() and dist.is_initialized():
            dist.barrier()

    def remove_all(self) -> None:
        """After the stage's final weights are safely written, its checkpoints are no longer needed."""
        if self.rank == 0:
            shutil.rmtree(self.dir, ignore_errors=True)
