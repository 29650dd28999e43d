"""``compt grow``: grow a trained open_clip CLIP checkpoint into a larger model config.

    compt grow --from-checkpoint SMALL.safetensors --from-config SMALL.json \\
               --to-config LARGE.json --out LARGE.safetensors [--mode exact|official] [--noise F] [--seed N]

The output holds every tensor of ``open_clip.CLIP(**json.load(LARGE.json))`` in float32
(stock 0-d logit_scale), so ``model.load_state_dict(safetensors.torch.load_file(OUT))``
loads it strictly. The small checkpoint is read one tensor at a time and the output is
written tensor by tensor to ``OUT.tmp``, then renamed: on any error nothing is written.

``official`` keeps the student's own init outside the copied blocks: that init is
open_clip's initialisation of the large model on CPU after ``torch.manual_seed(--seed)``,
so the output is a function of the inputs and ``--seed``. ``exact`` needs no student init
(its only randomness is counter-based, from ``--seed``).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from pathlib import Path


class _Refused(Exception):
    """Bad input: printed as ``error: ...``, exit code 2."""


def _read_config(path: str, flag: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise _Refused(f"{flag} {path}: no such file")
    try:
        cfg = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _Refused(f"{flag} {path}: not a readable JSON model config ({e})") from e
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if not isinstance(cfg, dict) or k not in cfg]
    if missing:
        raise _Refused(f"{flag} {path}: an open_clip model config needs {', '.join(missing)}")
    return cfg


def _grow(args: argparse.Namespace) -> str:
    import torch

    from compt.clip.grow import growth_problem, plan_tensor, state_shapes
    from compt.weights import SafetensorsStreamWriter, open_lazy

    if not (math.isfinite(args.noise) and args.noise >= 0):
        raise _Refused(f"--noise must be a finite number >= 0, got {args.noise}")
    small_cfg = _read_config(args.from_config, "--from-config")
    big_cfg = _read_config(args.to_config, "--to-config")
    problem = growth_problem(small_cfg, big_cfg, args.mode)
    if problem:
        raise _Refused(f"cannot grow {args.from_config} into {args.to_config} ({args.mode}): {problem}")
    out = Path(args.out)
    if not out.parent.is_dir():
        raise _Refused(f"--out {args.out}: directory {out.parent} does not exist")
    if not Path(args.from_checkpoint).is_file():
        raise _Refused(f"--from-checkpoint {args.from_checkpoint}: no such file")

    shapes = state_shapes(big_cfg)
    plans = {name: plan_tensor(name, small_cfg, big_cfg, args.mode, args.noise, args.seed) for name in shapes}
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
        small_shapes = state_shapes(small_cfg)
        wrong = []
        for s in needed:
            got, want = small.shape(s), small_shapes[s]
            if got != want and not (math.prod(got) == math.prod(want) == 1 and len(got) <= 1 and len(want) <= 1):
                wrong.append(f"{s} is {got}, config says {want}")
        if wrong:
            raise _Refused(f"--from-checkpoint {args.from_checkpoint} does not match {args.from_config}: "
                           + "; ".join(wrong[:8]))

        init = None
        if any(p is None or p.needs_init() for p in plans.values()):
            import open_clip

            with torch.random.fork_rng(devices=[]):  # the student's own init, where the rule keeps it
                torch.manual_seed(args.seed)
                init = open_clip.CLIP(**big_cfg).state_dict()

        specs = [(name, shape, torch.float32) for name, shape in shapes.items()]
        meta = {"compt.grow": json.dumps({"mode": args.mode, "noise": args.noise, "seed": args.seed,
                                          "from_config": small_cfg, "to_config": big_cfg})}
        with SafetensorsStreamWriter(out, specs, metadata=meta) as writer:
            for name, shape in shapes.items():
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
    grown = sum(p is not None for p in plans.values())
    return (f"grew {grown}/{len(shapes)} tensors ({args.mode}, noise {args.noise}, seed {args.seed}) from "
            f"{args.from_checkpoint} into {args.out} (sha256 {digest})")


def run(args: argparse.Namespace) -> int:
    try:
        print(_grow(args))
    except _Refused as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def register(sub) -> None:
    gr = sub.add_parser("grow", help="grow a CLIP checkpoint into a larger model config (exact or official rule)",
                        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    gr.add_argument("--from-checkpoint", required=True, help="the small model's weights (safetensors)")
    gr.add_argument("--from-config", required=True, help="the small model's open_clip config (JSON)")
    gr.add_argument("--to-config", required=True, help="the large model's open_clip config (JSON)")
    gr.add_argument("--out", required=True, help="where to write the large model's weights (safetensors)")
    gr.add_argument("--mode", choices=("exact", "official"), default="exact",
                    help="exact: function-preserving (default); official: the paper's reference rule")
    gr.add_argument("--noise", type=float, default=0.0,
                    help="exact: relative std of the symmetry-breaking noise (0 allowed)")
    gr.add_argument("--seed", type=int, default=0, help="seed of the counter-based noise and of official's init")
    gr.set_defaults(func=run)
