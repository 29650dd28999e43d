"""Training throughput: one chain stage through compt's DeepSpeed path (ZeRO-3, 1 rank)
vs a plain PyTorch loop (same model, batches, AdamW, clipping), in one process.

    python benchmarks/throughput.py [--model demo-base|ViT-B-16] [--batch 64] [--steps 40] [--zero 3] [--profile 15]

Data loading is excluded on both sides (batches are built once), so the ratio measures
the engine's overhead. The DeepSpeed side runs compt's own training loop
(compt.stage.train_loop: the cross-rank finite-loss check, loss logging, fault counters,
progress bar, checkpoint polling with checkpoints off) with the chain's CLIP loss step;
the plain side is a bare loop with the same model, loss, AdamW, clipping and schedule.
Writes benchmarks/results/throughput-<device>-<model>-<ds config>.json and .md (--results).
On a CUDA device it runs bf16 autocast on both sides and reports images/s and model
FLOPs utilisation (MFU) against the device's measured bf16 matmul peak.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
DEMO_BASE = {"embed_dim": 64,
             "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 128, "layers": 4, "head_width": 32},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 4}}


def make_batches(model_cfg: dict, batch: int, n: int, device):
    """``n`` training batches of ``batch`` digit images (rendered and preprocessed for ``model_cfg``) with
    their tokenized captions, on ``device``: the first ``len(train) // batch`` built once, then repeated."""
    from compt.clip.loader import Batch, train_loader
    from compt.clip.model import preprocess_for
    from compt.data import DataConfig, build_dataset

    v = model_cfg["vision_cfg"]
    ds = build_dataset(DataConfig(kind="digits", render_size=min(v["image_size"], 64)), "train")
    pre = preprocess_for(model_cfg)
    loader = train_loader(ds, pre, None, global_batch=batch, steps=min(n, len(ds) // batch), rank=0, world=1,
                          gas=1, seed=0)
    out = [Batch(b.images.to(device), b.texts.to(device)) for b in loader]
    return [out[i % len(out)] for i in range(n)]


def _time_loop(loop, batches, warmup: int, device) -> float:
    """Seconds ``loop`` takes over the batches after the first ``warmup`` (run first, untimed)."""
    loop(batches[:warmup])
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    loop(batches[warmup:])
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def run_deepspeed(model_cfg, batches, args, device, profile=None) -> float | None:
    """Seconds for the timed batches; with ``profile`` (a cProfile.Profile) it records them instead (None)."""
    import tempfile

    from compt.checkpoint import StageCheckpointer
    from compt.clip.loader import Batch
    from compt.config import TrainSettings
    from compt.engine import build_engine, read_ds_config, stage_ds_config
    from compt.families import family_of
    from compt.faults import Counters
    from compt.stage import init_student, train_loop

    family = family_of("clip")
    settings = TrainSettings(batch_size=args.batch, warmup_steps=5)
    base = read_ds_config(args.ds_config or REPO / "ds_configs" / f"zero{args.zero}.json")
    if device.type == "cuda":
        base["bf16"] = {"enabled": True}
    ds_cfg = stage_ds_config(base, settings, total_steps=len(batches), world_size=1)
    zero3 = ds_cfg.get("zero_optimization", {}).get("stage") == 3
    model = init_student(family, model_cfg, None, 0, ds_cfg if zero3 else None)
    engine = build_engine(model if zero3 else model.to(device), ds_cfg, settings.weight_decay, family.no_decay)
    loss_step = family.loss(None, None, 0, 1, "auto")  # a first stage: contrastive loss only

    def loop(part):
        if device.type == "cuda":
            part = [Batch(b.images.to(torch.bfloat16), b.texts) for b in part]
        with tempfile.TemporaryDirectory() as tmp:  # checkpoints off: nothing is written there
            train_loop(engine, iter(part), loss_step, None, steps=len(part), start=0, curve=[], settings=settings,
                       checkpointer=StageCheckpointer(engine, Path(tmp), 0, 0, 1, 0), client={},
                       counters=Counters(), max_bad_fraction=1.0, label="throughput", rank=0,
                       names=family.curve_names)

    try:
        if profile is None:
            return _time_loop(loop, batches, args.warmup, device)
        loop(batches[:args.warmup])
        profile.enable()
        loop(batches[args.warmup:])
        profile.disable()
        return None
    finally:
        engine.destroy() if hasattr(engine, "destroy") else None


def run_plain(model_cfg, batches, args, device) -> float:
    from compt.clip.losses import ChainLoss
    from compt.clip.model import build_clip
    from compt.config import TrainSettings
    from compt.engine import param_groups
    from compt.families import family_of

    s = TrainSettings(batch_size=args.batch, warmup_steps=5)
    torch.manual_seed(0)
    model = build_clip(model_cfg).to(device)
    groups = param_groups(model, s.weight_decay, family_of("clip").no_decay)
    opt = torch.optim.AdamW(groups, lr=s.lr, betas=s.betas, eps=s.eps)
    total = len(batches)
    sched = torch.optim.lr_scheduler.LambdaLR(  # the same warmup + cosine as compt's DeepSpeed config
        opt, lambda i: min(1.0, (i + 1) / 5) * 0.5 * (1 + math.cos(math.pi * i / total)))
    loss_fn = ChainLoss(None)

    def loop(part):
        for b in part:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = loss_fn(model(b.images, b.texts)).total
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()

    return _time_loop(loop, batches, args.warmup, device)


def profile_deepspeed(model_cfg, batches, args, device) -> dict:
    """The costliest functions (self time) of one profiled DeepSpeed run, and DeepSpeed's own share."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    run_deepspeed(model_cfg, batches, args, device, profile=prof)
    stats = pstats.Stats(prof).stats  # (file, line, name) -> (calls, primitive calls, self, cumulative, callers)
    total = sum(v[2] for v in stats.values())
    in_ds = sum(v[2] for k, v in stats.items() if f"{os.sep}deepspeed{os.sep}" in k[0])
    rows = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:args.profile]
    top = [{"function": (f"{Path(k[0]).parent.name}/{Path(k[0]).name}:{k[1]}({k[2]})" if k[0] != "~" else k[2]),
            "calls": v[1], "self_s": v[2], "cumulative_s": v[3]} for k, v in rows]
    return {"profiled_seconds": total, "deepspeed_python_share": in_ds / total if total else 0.0, "top": top}


def init_single_rank(port: int = 29560) -> None:
    """A 1-rank process group for DeepSpeed in this process (MASTER_PORT from the environment if set)."""
    import deepspeed

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))
    deepspeed.init_distributed()


def model_cost(model_cfg: dict) -> dict:
    """{"params": parameter count, "train_flops_per_sample": counted forward+backward FLOPs of one sample,
    one caption} of an open_clip model config (both counted on the meta device)."""
    from compt.clip.flops import count_sample_flops
    from compt.clip.model import build_clip

    with torch.device("meta"):
        n_params = sum(p.numel() for p in build_clip(model_cfg).parameters())
    return {"params": n_params, "train_flops_per_sample": count_sample_flops(model_cfg).train}


def matmul_peak_tflops(device) -> float | None:
    """bf16 TFLOP/s of an 8192^3 matrix product on a CUDA ``device`` (None elsewhere): the MFU denominator."""
    if device.type != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        a @ a
    torch.cuda.synchronize()
    return 20 * 2 * 8192 ** 3 / (time.perf_counter() - t0) / 1e12


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo-base", help="demo-base or an open_clip model name (e.g. ViT-B-16)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=40, help="timed steps per side (after --warmup)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--zero", type=int, choices=[2, 3], default=3)
    ap.add_argument("--ds_config", default=None, help="DeepSpeed config (default: ds_configs/zero<--zero>.json)")
    ap.add_argument("--repeats", type=int, default=2, help="alternate the two sides this many times")
    ap.add_argument("--results", default=str(REPO / "benchmarks" / "results"), help="folder for the json/md")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="after timing, profile one more DeepSpeed run (cProfile) and report its N most costly "
                         "functions and the share of time spent in DeepSpeed's own Python code")
    args = ap.parse_args()

    import deepspeed
    import open_clip

    init_single_rank()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model_cfg = DEMO_BASE if args.model == "demo-base" else open_clip.get_model_config(args.model)
    batches = make_batches(model_cfg, args.batch, args.warmup + args.steps, device)

    times = {"deepspeed": [], "plain": []}
    for _ in range(args.repeats):  # alternate, so machine noise hits both sides alike
        times["plain"].append(run_plain(model_cfg, batches, args, device))
        times["deepspeed"].append(run_deepspeed(model_cfg, batches, args, device))
    sps = {k: args.steps * args.batch / min(v) for k, v in times.items()}
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "deepspeed": deepspeed.__version__},
        "command": " ".join([sys.executable, *sys.argv]),
        "model": args.model, "batch": args.batch, "timed_steps": args.steps, "zero_stage": args.zero,
        "seconds": times, "samples_per_s": sps, "ratio_deepspeed_over_plain": sps["deepspeed"] / sps["plain"],
    }
    cost = model_cost(model_cfg)
    train_flops, n_params = cost["train_flops_per_sample"], cost["params"]
    # Compute per parameter: the DeepSpeed overhead grows with the parameter count, the work with the FLOPs.
    result.update(params=n_params, train_flops_per_sample=train_flops,
                  achieved_tflops={k: v * train_flops / 1e12 for k, v in sps.items()})
    peak = matmul_peak_tflops(device)
    if peak:
        result["matmul_peak_tflops_bf16"] = peak
        result["mfu"] = {k: v * train_flops / 1e12 / peak for k, v in sps.items()}
    label = "cuda-" + torch.cuda.get_device_name().replace(" ", "-") if device.type == "cuda" else f"cpu{os.cpu_count()}"
    config_name = Path(args.ds_config).stem if args.ds_config else f"zero{args.zero}"
    result["ds_config"] = config_name
    batch = "" if args.batch == 64 else f"-b{args.batch}"  # the default batch keeps the older result names
    out = Path(args.results) / f"throughput-{label}-{args.model}{batch}-{config_name}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    md = [f"# Throughput: {args.model}, batch {args.batch}, DeepSpeed config {config_name}, {result['device']}", "",
          f"Command: `{result['command']}`", "", "| path | samples/s |" + (" MFU |" if peak else ""),
          "|---|---|" + ("---|" if peak else "")]
    for k, v in sps.items():
        md.append(f"| {k} | {v:.1f} |" + (f" {100 * result['mfu'][k]:.1f}% |" if peak else ""))
    md += ["", f"DeepSpeed / plain: {result['ratio_deepspeed_over_plain']:.3f} (best of {args.repeats} alternating runs)",
           "", f"{n_params / 1e6:.2f}M parameters, {train_flops / 1e9:.3g} GFLOP per training sample "
           f"(forward+backward, counted); plain loop {result['achieved_tflops']['plain'] * 1e3:.1f} GFLOP/s."]
    if args.profile:
        result["profile"] = profile_deepspeed(model_cfg, batches, args, device)
        md += ["", f"## Where the DeepSpeed side's time goes (cProfile of one more run, {args.steps} steps; "
               "profiling slows it down)", "",
               f"{100 * result['profile']['deepspeed_python_share']:.0f}% of the profiled time is in DeepSpeed's "
               f"own Python code (self time of functions in the deepspeed package; the tensor ops they call "
               f"are counted as torch).", "", "| function | calls | self s | cumulative s |", "|---|---|---|---|"]
        md += [f"| `{r['function']}` | {r['calls']} | {r['self_s']:.3f} | {r['cumulative_s']:.3f} |"
               for r in result["profile"]["top"]]
        out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
