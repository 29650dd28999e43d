"""``compt grow``: grow a trained checkpoint into a larger model config, for open_clip CLIP
or LLaMA (transformers' LlamaForCausalLM); the family is read from the config files.

    compt grow --from-checkpoint SMALL.safetensors --from-config SMALL.json \\
               --to-config LARGE.json --out LARGE.safetensors [--mode exact|official] [--noise F] [--seed N]

CLIP configs are open_clip model configs (``embed_dim``, ``vision_cfg``, ``text_cfg``); the
output holds every tensor of ``open_clip.CLIP(**json.load(LARGE.json))`` (stock 0-d logit_scale), so
``model.load_state_dict(safetensors.torch.load_file(OUT))`` loads it strictly. Output tensors keep the
source checkpoint's dtype (float64 in, float64 out) unless ``--dtype`` says otherwise.

LLaMA configs are HF ``config.json`` files (``model_type: "llama"``, or a folder holding one).
The output holds every stored tensor of LlamaForCausalLM (in the source's dtype), as ``save_pretrained``
writes them (no ``lm_head.weight`` when the embeddings are tied), and the grown model's
config.json goes to ``--out-config`` (default: OUT with ``.config.json`` for its suffix). In
``exact`` mode that config is not always the ``--to-config``: exact growth sets the student's
``rms_norm_eps`` from the teacher's (see compt/llama/grow.py), so build the grown model from
the written config (``--out DIR/model.safetensors --out-config DIR/config.json`` makes DIR a
folder ``LlamaForCausalLM.from_pretrained`` reads).

The small checkpoint is read one tensor at a time and the output is written tensor by tensor
to ``OUT.tmp``, then renamed: on any error nothing is written. An existing OUT (or OUT config) is
only replaced with ``--force``; an output that is one of the command's own input files is refused
even then.

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
from pathlib import Path

from compt.families import DEFAULT_FAMILY, Family, all_families, family_of
from compt.growth import GrowthRefused


def _detection_order() -> list[Family]:
    """The default family last: the others recognise a config by a marker it names (a
    ``model_type``), the default by its keys alone, so it takes only what no other claims."""
    default = family_of(DEFAULT_FAMILY)
    return [f for f in all_families() if f.name != default.name] + [default]


def _read_config(path: str, flag: str) -> tuple[Family, dict]:
    """(family, raw config) of a model config file (or the folder holding its config.json)."""
    p = Path(path)
    if p.is_dir() and (p / "config.json").is_file():
        p = p / "config.json"
    if not p.is_file():
        raise GrowthRefused(f"{flag} {path}: no such file")
    try:
        cfg = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GrowthRefused(f"{flag} {path}: not a readable JSON model config ({e})") from e
    families = _detection_order()
    for family in families:
        if family.is_model_config(cfg):
            return family, cfg
    default, others = families[-1], families[:-1]
    alternatives = "; or ".join(f.config_hint(cfg) for f in others)
    raise GrowthRefused(f"{flag} {path}: {default.config_hint(cfg)}" + (f" (or {alternatives})" if others else ""))


def _write_config(path: Path, cfg: dict) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return tmp


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def _check_outputs(args: argparse.Namespace, outputs: list[tuple[Path, str]]) -> None:
    """No output may be one of the inputs (not even with --force: the input is read while the output is
    written), and none may replace an existing file without --force."""
    inputs = [(Path(args.from_checkpoint), "--from-checkpoint"), (Path(args.from_config), "--from-config"),
              (Path(args.to_config), "--to-config")]
    for path, flag in outputs:
        for source, source_flag in inputs:
            if _same_file(path, source) or (source.is_dir() and _same_file(path, source / "config.json")):
                raise GrowthRefused(f"{flag} {path} is the same file as {source_flag} {source}: growing would "
                                    f"overwrite its own input; pick another {flag}")
        if path.exists() and not args.force:
            raise GrowthRefused(f"{flag} {path} already exists; pass --force to replace it, or pick another {flag}")
        if path.is_dir():
            raise GrowthRefused(f"{flag} {path} is a directory; give a file path")


def _grow(args: argparse.Namespace) -> str:
    import torch

    from compt.weights import SafetensorsStreamWriter, open_lazy

    if not (math.isfinite(args.noise) and args.noise >= 0):
        raise GrowthRefused(f"--noise must be a finite number >= 0, got {args.noise}")
    small_family, small_raw = _read_config(args.from_config, "--from-config")
    big_family, big_raw = _read_config(args.to_config, "--to-config")
    if small_family.name != big_family.name:
        raise GrowthRefused(f"--from-config {args.from_config} is a {small_family.name} config but --to-config "
                            f"{args.to_config} is a {big_family.name} config; both must be the same model family")
    job = small_family.grow_job(small_raw, big_raw, mode=args.mode, noise=args.noise, seed=args.seed,
                                from_label=args.from_config, to_label=args.to_config,
                                out_config_given=args.out_config is not None)
    out = Path(args.out)
    if not out.parent.is_dir():
        raise GrowthRefused(f"--out {args.out}: directory {out.parent} does not exist")
    out_config = None
    if job.config is not None:
        out_config = Path(args.out_config) if args.out_config else out.with_suffix(".config.json")
        if not out_config.parent.is_dir():
            raise GrowthRefused(f"--out-config {out_config}: directory {out_config.parent} does not exist")
        if out_config.resolve() == out.resolve():
            raise GrowthRefused(f"--out-config {out_config} is the same file as --out")
    if not Path(args.from_checkpoint).is_file():
        raise GrowthRefused(f"--from-checkpoint {args.from_checkpoint}: no such file")
    _check_outputs(args, [(out, "--out"), *([(out_config, "--out-config")] if out_config is not None else [])])

    plans = job.plans
    config_tmp = None
    with contextlib.ExitStack() as stack:
        try:
            small = stack.enter_context(open_lazy(args.from_checkpoint))
        except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad file
            raise GrowthRefused(f"--from-checkpoint {args.from_checkpoint}: not a readable safetensors file "
                                f"({type(e).__name__}: {e})") from e
        have = set(small.keys())
        needed = sorted({s for p in plans.values() if p is not None for s in p.sources})
        missing = [s for s in needed if s not in have]
        if missing:
            raise GrowthRefused(f"--from-checkpoint {args.from_checkpoint} lacks {len(missing)} tensor(s) that "
                                f"{args.from_config} has and growth reads: {', '.join(missing[:8])}"
                                + (" ..." if len(missing) > 8 else ""))
        wrong = []
        for s in needed:
            got, want = small.shape(s), job.small_shapes[s]
            if got != want and not (math.prod(got) == math.prod(want) == 1 and len(got) <= 1 and len(want) <= 1):
                wrong.append(f"{s} is {got}, config says {want}")
        if wrong:
            raise GrowthRefused(f"--from-checkpoint {args.from_checkpoint} does not match {args.from_config}: "
                                + "; ".join(wrong[:8]))

        init = job.make_init() if any(p is None or p.needs_init() for p in plans.values()) else None
        dtype = _out_dtype(args.dtype, small, needed)
        specs = [(name, shape, dtype) for name, shape in job.shapes.items()]
        try:
            if out_config is not None:
                config_tmp = _write_config(out_config, job.config)
            with SafetensorsStreamWriter(out, specs, metadata=job.meta) as writer:
                for name, shape in job.shapes.items():
                    plan = plans[name]
                    if plan is None:
                        value = init[name].to(dtype)
                    else:
                        try:
                            teacher = {s: small.get(s) for s in plan.sources}
                        except Exception as e:  # noqa: BLE001 - a truncated or corrupt tensor payload
                            raise GrowthRefused(f"--from-checkpoint {args.from_checkpoint}: cannot read tensor "
                                                f"{plan.sources[0]} ({type(e).__name__}: {e})") from e
                        value = plan.dense(teacher, init=init[name] if plan.needs_init() else None,
                                           dtype=dtype).reshape(shape)
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
    except GrowthRefused as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


DTYPES = {"float64": "F64", "float32": "F32", "bfloat16": "BF16", "float16": "F16"}


def _out_dtype(choice: str, small, needed: list[str]):
    """--dtype, or the source checkpoint's (float) dtype: fp64 in, fp64 out."""
    from compt.weights import SAFETENSORS_DTYPES

    if choice != "source":
        return SAFETENSORS_DTYPES[DTYPES[choice]]
    floats = [small.dtype(s) for s in needed if small.dtype(s).is_floating_point]
    return floats[0] if floats else SAFETENSORS_DTYPES["F32"]


def register(sub) -> None:
    from compt.growth import MODES

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
    gr.add_argument("--mode", choices=[m for m in MODES if m != "none"], default="exact",
                    help="exact: function-preserving (default); official: the paper's reference rule")
    gr.add_argument("--noise", type=float, default=0.0,
                    help="exact: relative std of the symmetry-breaking noise (0 allowed)")
    gr.add_argument("--seed", type=int, default=0, help="seed of the counter-based noise and of official's init")
    gr.add_argument("--dtype", choices=["source", *DTYPES], default="source",
                    help="dtype of the written weights (default: the source checkpoint's; growth is computed in "
                         "float64 either way)")
    gr.add_argument("--force", action="store_true",
                    help="replace an existing --out / --out-config (never one of the input files)")
    gr.set_defaults(func=run)
