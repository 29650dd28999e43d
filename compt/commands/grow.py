"""``compt grow``: grow a trained checkpoint into a larger model config, for open_clip CLIP
or LLaMA (transformers' LlamaForCausalLM); the family is read from the config files.

    compt grow --from-checkpoint SMALL.safetensors --from-config SMALL.json \\
               --to-config LARGE.json --out LARGE.safetensors [--mode exact|official] [--noise F] [--seed N]

CLIP configs are open_clip model configs (``embed_dim``, ``vision_cfg``, ``text_cfg``); the
output holds every tensor of ``open_clip.CLIP(**json.load(LARGE.json))`` in float32 (stock 0-d
logit_scale), so ``model.load_state_dict(safetensors.torch.load_file(OUT))`` loads it strictly.

LLaMA configs are HF ``config.json`` files (``model_type: "llama"``, or a folder holding one).
The output holds every stored tensor of LlamaForCausalLM in float32, as ``save_pretrained``
writes them (no ``lm_head.weight`` when the embeddings are tied), and the grown model's
config.json goes to ``--out-config`` (default: OUT with ``.config.json`` for its suffix). In
``exact`` mode that config is not always the ``--to-config``: exact growth sets the student's
``rms_norm_eps`` from the teacher's (see compt/llama/grow.py), so build the grown model from
the written config (``--out DIR/model.safetensors --out-config DIR/config.json`` makes DIR a
folder ``LlamaForCausalLM.from_pretrained`` reads).

The small checkpoint is read one tensor at a time and the output is written tensor by tensor
to ``OUT.tmp``, then renamed: on any error nothing is written.

``official`` keeps the student's own init outside the copied blocks: that init is the
family's initialisation of the large model on CPU after ``torch.manual_seed(--seed)``, so the
output is a function of the inputs and ``--seed``. ``exact`` needs no student init (its only
randomness is counter-based, from ``--seed``).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


class _Refused(Exception):
    """Bad input: printed as ``error: ...``, exit code 2."""


_CLIP_KEYS = ("embed_dim", "vision_cfg", "text_cfg")


def _read_config(path: str, flag: str) -> tuple[str, dict]:
    """(family, raw config) of a CLIP model config or an HF LLaMA config.json (or its folder)."""
    from compt.llama.model import is_llama_config

    p = Path(path)
    if p.is_dir() and (p / "config.json").is_file():
        p = p / "config.json"
    if not p.is_file():
        raise _Refused(f"{flag} {path}: no such file")
    try:
        cfg = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _Refused(f"{flag} {path}: not a readable JSON model config ({e})") from e
    if isinstance(cfg, dict) and is_llama_config(cfg):
        return "llama", cfg
    missing = [k for k in _CLIP_KEYS if not isinstance(cfg, dict) or k not in cfg]
    if missing:
        raise _Refused(f"{flag} {path}: an open_clip model config needs {', '.join(missing)} "
                       "(or give an HF LLaMA config.json, with model_type 'llama')")
    return "clip", cfg


@dataclass
class _Job:
    """What to write: the student tensors in order, their plans, and what checks the checkpoint."""

    shapes: dict[str, tuple[int, ...]]  # student tensors, in output order
    small_shapes: dict[str, tuple[int, ...]]  # teacher tensors as the checkpoint stores them
    plans: dict[str, Any]  # name -> TensorPlan | None
    make_init: Callable[[], dict]  # the student's own init (only called when some tensor keeps it)
    meta: dict[str, str]
    config: dict | None = None  # the grown model's config, written to --out-config (LLaMA)
    notes: list[str] = field(default_factory=list)


def _clip_job(args: argparse.Namespace, small_cfg: dict, big_cfg: dict) -> _Job:
    from compt.clip.grow import growth_problem, plan_tensor, state_shapes

    problem = growth_problem(small_cfg, big_cfg, args.mode)
    if problem:
        raise _Refused(f"cannot grow {args.from_config} into {args.to_config} ({args.mode}): {problem}")

    def make_init() -> dict:
        import open_clip
        import torch

        with torch.random.fork_rng(devices=[]):  # the student's own init, where the rule keeps it
            torch.manual_seed(args.seed)
            return open_clip.CLIP(**big_cfg).state_dict()

    shapes = state_shapes(big_cfg)
    plans = {name: plan_tensor(name, small_cfg, big_cfg, args.mode, args.noise, args.seed) for name in shapes}
    meta = {"compt.grow": json.dumps({"mode": args.mode, "noise": args.noise, "seed": args.seed,
                                      "from_config": small_cfg, "to_config": big_cfg})}
    return _Job(shapes, state_shapes(small_cfg), plans, make_init, meta)


def _llama_job(args: argparse.Namespace, small_raw: dict, big_raw: dict) -> _Job:
    from compt.llama.grow import exact_config, growth_problem, plan_tensor
    from compt.llama.model import build_llama, llama_config_problem, llama_state_shapes, resolve_llama_config

    for flag, path, raw in (("--from-config", args.from_config, small_raw), ("--to-config", args.to_config, big_raw)):
        problem = llama_config_problem(raw)
        if problem:
            raise _Refused(f"{flag} {path}: {problem}")
    small_cfg, big_cfg = resolve_llama_config(small_raw), resolve_llama_config(big_raw)
    problem = growth_problem(small_cfg, big_cfg, args.mode)
    if problem:
        raise _Refused(f"cannot grow {args.from_config} into {args.to_config} ({args.mode}): {problem}")
    notes = []
    student_cfg = big_cfg
    if args.mode == "exact":
        student_cfg = exact_config(small_cfg, big_cfg)
        if student_cfg["rms_norm_eps"] != big_cfg["rms_norm_eps"]:
            notes.append(f"rms_norm_eps of the grown model is {student_cfg['rms_norm_eps']!r}, not the "
                         f"{big_cfg['rms_norm_eps']!r} of {args.to_config}: exact growth sets it from the teacher's; "
                         "build the model from the written config")

    def make_init() -> dict:
        import torch

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)
            return build_llama(student_cfg, torch.float32).state_dict()

    shapes = llama_state_shapes(student_cfg)
    plans = {name: plan_tensor(name, small_cfg, student_cfg, args.mode, args.noise, args.seed) for name in shapes}
    meta = {"format": "pt",
            "compt.grow": json.dumps({"mode": args.mode, "noise": args.noise, "seed": args.seed,
                                      "from_config": small_cfg, "to_config": student_cfg})}
    return _Job(shapes, llama_state_shapes(small_cfg), plans, make_init, meta, config=student_cfg, notes=notes)


def _write_config(path: Path, cfg: dict) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return tmp


def _grow(args: argparse.Namespace) -> str:
    import torch

    from compt.weights import SafetensorsStreamWriter, open_lazy

    if not (math.isfinite(args.noise) and args.noise >= 0):
        raise _Refused(f"--noise must be a finite number >= 0, got {args.noise}")
    small_family, small_raw = _read_config(args.from_config, "--from-config")
    big_family, big_raw = _read_config(args.to_config, "--to-config")
    if small_family != big_family:
        raise _Refused(f"--from-config {args.from_config} is a {small_family} config but --to-config "
                       f"{args.to_config} is a {big_family} config; both must be the same model family")
    if small_family == "clip" and args.out_config is not None:
        raise _Refused("--out-config is for LLaMA configs; a CLIP model's config is --to-config itself")
    job = (_clip_job if small_family == "clip" else _llama_job)(args, small_raw, big_raw)
    out = Path(args.out)
    if not out.parent.is_dir():
        raise _Refused(f"--out {args.out}: directory {out.parent} does not exist")
    out_config = None
    if job.config is not None:
        out_config = Path(args.out_config) if args.out_config else out.with_suffix(".config.json")
        if not out_config.parent.is_dir():
            raise _Refused(f"--out-config {out_config}: directory {out_config.parent} does not exist")
        if out_config.resolve() == out.resolve():
            raise _Refused(f"--out-config {out_config} is the same file as --out")
    if not Path(args.from_checkpoint).is_file():
        raise _Refused(f"--from-checkpoint {args.from_checkpoint}: no such file")

    plans = job.plans
    config_tmp = None
    with contextlib.ExitStack() as stack:
        try:
            small = stack.enter_context(open_lazy(args.from_checkpoint))
        except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad file
            raise _Refused(f"--from-checkpoint {args.from_checkpoint}: not a readable safetensors file "
                           f"({type(e).__name__}: {e})") from e
        have = set(small.keys())
        needed = sorted({s for p in plans.values() if p is not None for s in p.sources})
        missing = [s for s in needed if s not in have]
        if missing:
            raise _Refused(f"--from-checkpoint {args.from_checkpoint} lacks {len(missing)} tensor(s) that "
                           f"{args.from_config} has and growth reads: {', '.join(missing[:8])}"
                           + (" ..." if len(missing) > 8 else ""))
        wrong = []
        for s in needed:
            got, want = small.shape(s), job.small_shapes[s]
            if got != want and not (math.prod(got) == math.prod(want) == 1 and len(got) <= 1 and len(want) <= 1):
                wrong.append(f"{s} is {got}, config says {want}")
        if wrong:
            raise _Refused(f"--from-checkpoint {args.from_checkpoint} does not match {args.from_config}: "
                           + "; ".join(wrong[:8]))

        init = job.make_init() if any(p is None or p.needs_init() for p in plans.values()) else None
        specs = [(name, shape, torch.float32) for name, shape in job.shapes.items()]
        try:
            if out_config is not None:
                config_tmp = _write_config(out_config, job.config)
            with SafetensorsStreamWriter(out, specs, metadata=job.meta) as writer:
                for name, shape in job.shapes.items():
                    plan = plans[name]
                    if plan is None:
                        value = init[name].to(torch.float32)
                    else:
                        try:
                            teacher = {s: small.get(s) for s in plan.sources}
                        except Exception as e:  # noqa: BLE001 - a truncated or corrupt tensor payload
                            raise _Refused(f"--from-checkpoint {args.from_checkpoint}: cannot read tensor "
                                           f"{plan.sources[0]} ({type(e).__name__}: {e})") from e
                        value = plan.dense(teacher, init=init[name] if plan.needs_init() else None,
                                           dtype=torch.float32).reshape(shape)
                    writer.write(name, value)
                digest = writer.close()
        except BaseException:
            if config_tmp is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(config_tmp)
            raise
    if config_tmp is not None:
        os.replace(config_tmp, out_config)
    grown = sum(p is not None for p in plans.values())
    lines = [f"grew {grown}/{len(job.shapes)} tensors ({args.mode}, noise {args.noise}, seed {args.seed}) from "
             f"{args.from_checkpoint} into {args.out} (sha256 {digest})"]
    if out_config is not None:
        lines.append(f"the grown model's config: {out_config}")
    lines += [f"note: {n}" for n in job.notes]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        print(_grow(args))
    except _Refused as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def register(sub) -> None:
    gr = sub.add_parser("grow", help="grow a CLIP or LLaMA checkpoint into a larger model config (exact or official "
                                     "rule)",
                        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    gr.add_argument("--from-checkpoint", required=True, help="the small model's weights (safetensors)")
    gr.add_argument("--from-config", required=True,
                    help="the small model's config: open_clip model config (JSON) or HF LLaMA config.json")
    gr.add_argument("--to-config", required=True, help="the large model's config, same family as --from-config")
    gr.add_argument("--out", required=True, help="where to write the large model's weights (safetensors)")
    gr.add_argument("--out-config", default=None,
                    help="LLaMA: where to write the grown model's config.json (default: OUT with suffix .config.json)")
    gr.add_argument("--mode", choices=("exact", "official"), default="exact",
                    help="exact: function-preserving (default); official: the paper's reference rule")
    gr.add_argument("--noise", type=float, default=0.0,
                    help="exact: relative std of the symmetry-breaking noise (0 allowed)")
    gr.add_argument("--seed", type=int, default=0, help="seed of the counter-based noise and of official's init")
    gr.set_defaults(func=run)
