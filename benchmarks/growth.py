"""Growth benchmark: cost of growing ViT-B/16 -> ViT-L/16 (the chain configs of METHOD.md)
densely and sharded under ZeRO-3 (1 and 2 ranks), and where `official` vs `exact` growth
starts on a finished chain run (embedding cosine to the teacher, step-0 zero-shot top-1).

    python benchmarks/growth.py [--run runs/demo] [--ranks 1 2] [--modes exact official]

Writes benchmarks/results/growth-<host>.json and .md. Each measurement runs in its own
process (sharded ones under the real `deepspeed` launcher) so peak memory is per process.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PATCH16 = {"image_size": 224, "patch_size": 16, "head_width": 64}
TEXT = {"context_length": 77, "vocab_size": 49408}
CHAIN_B16 = {"embed_dim": 512, "vision_cfg": {**PATCH16, "layers": 12, "width": 768},
             "text_cfg": {**TEXT, "layers": 12, "width": 512, "heads": 8}}
CHAIN_L16 = {"embed_dim": 512, "vision_cfg": {**PATCH16, "layers": 24, "width": 1024},
             "text_cfg": {**TEXT, "layers": 12, "width": 768, "heads": 12}}


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------- workers (one process each)
def worker_dense(small_path: str, mode: str) -> dict:
    import torch
    from safetensors.torch import load_file

    from compt.clip.grow import grow_state_dict
    from compt.clip.model import build_clip

    torch.manual_seed(0)
    init = None
    if mode == "official":  # the rule keeps the student's init outside the copied block
        init = {k: v.detach() for k, v in build_clip(CHAIN_L16).named_parameters()}
    else:
        with torch.device("meta"):
            init = {k: v for k, v in build_clip(CHAIN_L16).named_parameters()}
    base = _peak_mb()
    t0 = time.perf_counter()
    out = grow_state_dict(load_file(small_path), init, CHAIN_B16, CHAIN_L16, mode, noise=0.01, seed=0)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "peak_mb": _peak_mb(), "peak_mb_before": base,
            "elements": sum(v.numel() for v in out.values())}


def worker_sharded(small_path: str, mode: str) -> dict | None:
    import deepspeed
    import torch
    import torch.distributed as dist

    from compt.config import Transfer
    from compt.families import family_of
    from compt.stage import StageResult, grow_into, init_student

    deepspeed.init_distributed()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_SIZE", "1"))))
    family = family_of("clip")
    ds = {"train_batch_size": dist.get_world_size(), "zero_optimization": {"stage": 3}}
    if mode == "official":
        model = init_student(family, CHAIN_L16, None, seed=0, zero3_config=ds)
    else:  # exact overwrites every element: build straight into partitions, no full init needed
        with deepspeed.zero.Init(config_dict_or_path=ds):
            from compt.clip.model import build_clip
            model = build_clip(CHAIN_L16)
    base = _peak_mb()
    prev = StageResult(0, "b16", CHAIN_B16, Path(small_path).parent, Path(small_path), None, {})
    dist.barrier()
    t0 = time.perf_counter()
    grow_into(family, model, prev, CHAIN_L16, Transfer(init=mode, noise=0.01), seed=0, zero3=True)
    dist.barrier()
    seconds = time.perf_counter() - t0
    local = sum(p.ds_tensor.numel() for p in model.parameters())
    peaks = [None] * dist.get_world_size()
    dist.all_gather_object(peaks, {"peak_mb": _peak_mb(), "peak_mb_before": base, "local_elements": local})
    rank = dist.get_rank()
    dist.barrier()
    dist.destroy_process_group()  # a clean exit: live gloo threads can abort the process otherwise
    return {"seconds": seconds, "per_rank": peaks} if rank == 0 else None


# ---------------------------------------------------------------- growth quality on a finished run
def init_quality(run_dir: Path, modes: list[str]) -> list[dict]:
    import torch
    from safetensors.torch import load_file

    from compt.clip.evaluate import embedding_cosine, evaluate
    from compt.clip.grow import grow_state_dict
    from compt.clip.loader import eval_loader
    from compt.clip.model import build_clip, load_into, preprocess_for
    from compt.config import ChainConfig
    from compt.data import build_dataset

    manifest = json.loads((run_dir / "manifest.json").read_text())
    cfg = ChainConfig.model_validate(manifest["config"])
    val = build_dataset(cfg.data, "val")
    rows = []
    for k in range(1, len(cfg.stages)):
        small_dir = run_dir / manifest["stages"][k - 1]["dir"]
        small_cfg, big_cfg = cfg.model_cfg(k - 1), cfg.model_cfg(k)
        teacher = build_clip(small_cfg)
        small_sd = load_file(str(small_dir / "model.safetensors"))
        load_into(teacher, small_sd)
        teacher.eval()
        pre = preprocess_for(big_cfg)
        teacher_top1 = evaluate(teacher, val, preprocess_for(small_cfg), retrieval=False)["zeroshot_top1"]
        batch = next(iter(eval_loader(val, pre, len(val))))
        for mode in modes:
            torch.manual_seed(cfg.seed + k)
            student = build_clip(big_cfg)
            init = {n: p.detach() for n, p in student.named_parameters()}
            load_into(student, grow_state_dict(small_sd, init, small_cfg, big_cfg, mode, noise=0.01, seed=0))
            student.eval()
            cos = embedding_cosine(student, teacher, batch)
            top1 = evaluate(student, val, pre, retrieval=False)["zeroshot_top1"]
            rows.append({"stage": f"{k - 1}-{cfg.stages[k - 1].name} -> {k}-{cfg.stages[k].name}", "mode": mode,
                         "init_cosine_image": cos["image"], "init_cosine_text": cos["text"],
                         "init_zeroshot_top1": top1, "teacher_zeroshot_top1": teacher_top1})
    return rows


# ---------------------------------------------------------------- driver
def _run(cmd: list[str]) -> dict:
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(lines[-1][len("RESULT "):])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=None, help="finished chain run for init quality (e.g. runs/demo)")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--modes", nargs="+", default=["exact", "official"])
    ap.add_argument("--worker", choices=["dense", "sharded"], help=argparse.SUPPRESS)
    ap.add_argument("--small", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        out = (worker_dense if args.worker == "dense" else worker_sharded)(args.small, args.mode)
        if out is not None:
            print("RESULT " + json.dumps(out), flush=True)
        return 0

    import torch

    from compt.clip.model import build_clip, export_name_and_tensor
    from compt.weights import save_zero3_module

    results = {"machine": {"host": platform.node(), "platform": platform.platform(), "cpus": os.cpu_count(),
                           "torch": torch.__version__, "threads": torch.get_num_threads()},
               "command": " ".join([sys.executable, *sys.argv]), "small": CHAIN_B16, "big": CHAIN_L16,
               "growth": [], "init_quality": []}
    with tempfile.TemporaryDirectory() as tmp:
        small = Path(tmp) / "b16.safetensors"
        torch.manual_seed(0)
        save_zero3_module(build_clip(CHAIN_B16), small, rename=export_name_and_tensor)
        for mode in args.modes:
            r = _run([sys.executable, __file__, "--worker", "dense", "--small", str(small), "--mode", mode])
            results["growth"].append({"path": "dense", "ranks": 1, "mode": mode, **r})
            print(f"dense   {mode:8s}: {r['seconds']:.1f}s, peak {r['peak_mb']:.0f} MB", flush=True)
            for n in args.ranks:
                r = _run(["deepspeed", "--num_gpus", str(n), "--master_port", str(29950 + n), __file__,
                          "--worker", "sharded", "--small", str(small), "--mode", mode])
                results["growth"].append({"path": "sharded", "ranks": n, "mode": mode, **r})
                peak = max(p["peak_mb"] for p in r["per_rank"])
                print(f"sharded {mode:8s} x{n}: {r['seconds']:.1f}s, peak/rank {peak:.0f} MB", flush=True)
    if args.run:
        results["init_quality"] = init_quality(args.run, args.modes)
        results["init_quality_run"] = str(args.run)

    out_dir = REPO / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"growth-cpu{os.cpu_count()}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [f"# Growth benchmark ({results['machine']['platform']}, {results['machine']['cpus']} CPUs, "
             f"torch {results['machine']['torch']})", "", f"Command: `{results['command']}`", "",
             "ViT-B/16 -> ViT-L/16 (chain configs, 430M student params):", "",
             "| path | ranks | mode | seconds | peak RSS per rank (MB) |", "|---|---|---|---|---|"]
    for g in results["growth"]:
        peak = g["peak_mb"] if g["path"] == "dense" else max(p["peak_mb"] for p in g["per_rank"])
        lines.append(f"| {g['path']} | {g['ranks']} | {g['mode']} | {g['seconds']:.1f} | {peak:.0f} |")
    if results["init_quality"]:
        lines += ["", f"Where the grown student starts (run `{args.run}`):", "",
                  "| stages | mode | cosine image | cosine text | init zero-shot top-1 | teacher top-1 |",
                  "|---|---|---|---|---|---|"]
        for q in results["init_quality"]:
            lines.append(f"| {q['stage']} | {q['mode']} | {q['init_cosine_image']:.4f} | {q['init_cosine_text']:.4f} "
                         f"| {100 * q['init_zeroshot_top1']:.1f}% | {100 * q['teacher_zeroshot_top1']:.1f}% |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
