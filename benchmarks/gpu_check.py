"""The first GPU run in one command: what works on one CUDA device and what breaks, written down.

    python benchmarks/gpu_check.py [--out DIR] [--budget 400] [--parts chain,throughput,kernels]
    python benchmarks/gpu_check.py --dry-run --out DIR      # no CUDA: every part on CPU at toy sizes

Writes <out>/gpu-<device>.json, .md and .log (every child process's output; default <out>:
benchmarks/results; a dry run writes only where --out says, else to a fresh temporary folder):
(a) chain: the demo chain (``compt/chains/demo.yaml``) through the real deepspeed launcher on one
    GPU with a ZeRO-3 ds_config that says ``"bf16": {"enabled": true}``: ok or not, wall time, each
    stage's top-1 next to the CPU run's (CPU_DEMO_REFERENCE, or --cpu-reference RUN_DIR);
(b) throughput: ViT-B/16 (224 px, 1 caption) samples/s through compt's stage loop
    (compt.stage.train_loop on a DeepSpeed ZeRO-3 bf16 engine) vs a plain PyTorch loop (autocast
    bf16, AdamW, same model, batches, clipping and schedule), both from benchmarks/throughput.py, and
    MFU = counted FLOPs per sample (compt.clip.flops.count_sample_flops) x samples/s over the bf16
    peak measured with an 8192^3 matmul on the device (the data-sheet peak is reported beside it);
(c) kernels: benchmarks/kernel_bench.py in its quick modes, each as a subprocess (fused expansion
    vs the measured copy bandwidth; fused LLaMA KL loss and whole LLaMA head (cross-entropy + KL,
    ``--distill --head``) vs naive and Liger-Kernel where importable;
    fused alignment loss vs eager and torch.compile, last), its JSON and markdown folded in.
Each part runs in child processes under its own time budget (a share of --budget; time a part does
not use passes to the next), so a hang or a crash costs one part: it is recorded with the tail of
its output (the traceback) and the other parts still run. Results are rewritten after every part,
so a run killed from outside leaves what it had. JSON fields: device, ok, command, versions,
preflight (missing modules), timings, errors, chain.ok, throughput.mfu, throughput.compt_vs_plain,
kernels.<mode>, targets (issue 19's, each with its measured value). Exit code: 0 every part ok,
1 some part failed (results written all the same), 2 no CUDA device and no --dry-run.

--dry-run (no GPU; tests/test_gpu_check.py): a 3-stage tiny chain instead of the demo, a tiny
CLIP ViT instead of ViT-B/16 and kernel_bench.py's ``--device cpu`` dry modes, in a few minutes
on 2 cores; its numbers mean nothing, its plumbing is what the GPU run will use.

Python packages it needs beyond torch and Triton (what compt imports on these paths; setup.py's
install_requires minus what only other data kinds use): deepspeed (+ hjson, pydantic,
pydantic-core, annotated-types, typing-inspection; and ninja, py-cpuinfo, psutil, msgpack, einops,
numpy, packaging, tqdm), open_clip_torch (+ ftfy, wcwidth, regex, timm, torchvision,
huggingface-hub, safetensors), braceexpand (compt.data imports it; not in install_requires),
pyyaml, scikit-learn (the digits data), pillow, rich, matplotlib, transformers and tokenizers
(compt.llama, imported with the family registry); optional: liger-kernel (part c's Liger column).
The GPU image ('cuda', /work/.library/device/KINDS.md) has all of these except deepspeed, hjson,
pydantic, pydantic-core, annotated-types, typing-inspection, open_clip_torch, ftfy, wcwidth,
braceexpand (and liger-kernel): bring those as wheels, and compt itself from the tree.

How to run on the GPU machine (device tool, /work/.library/device/README.md), from the repo root:
1. Here, once: the wheels into an ignored folder that travels with ``carry``. The GPU machine's
   python is 3.12, so binary wheels are fetched for cp312; deepspeed is an sdist and builds here
   into a pure-Python wheel (about a minute; ``pip wheel`` also builds its dependencies, so
   ``--no-deps``); keep one version of each:

       mkdir -p .git/info .whl && echo /.whl/ >> .git/info/exclude
       python3 -m pip wheel --no-deps -w .whl deepspeed==0.19.8
       python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
           --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \\
           -d .whl hjson==3.1.0 pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 \\
           typing-inspection==0.4.2 typing-extensions==4.16.0 open_clip_torch==3.3.0 ftfy==6.3.1 \\
           wcwidth==0.7.0 braceexpand==0.1.7 liger-kernel==0.8.5
       du -sh .whl    # about 7 MB; a call carries at most 64 MiB

   (pydantic pins its pydantic-core exactly: take the pair `pip show pydantic` has here; it needs
   typing-extensions >= 4.14.1, which the image may predate, hence that wheel too.)
2. One device call (command, carry [".whl"], timeout_s 480). It installs the wheels and compt from
   the tree as sent (so edits made after step 1 are in), runs, and leaves the results in $OUT,
   which come back to this machine:

       python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade
           --target /tmp/site .whl/*.whl &&
       python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir
           --target /tmp/compt . && export PYTHONPATH=/tmp/site:/tmp/compt PYTHONUNBUFFERED=1 || exit 3;
       set -o pipefail; python3 benchmarks/gpu_check.py --out $OUT 2>&1 | tee $OUT/console.log

   (one line in the call; the breaks here are for reading). The parts take at most --budget
   (400 s) plus about 20 s; with the installs the call ends inside 8 minutes, leaving device time
   for a second call. Give the machine back (give_back) unless that second call follows at once.
3. Copy gpu-<device>.json and .md from the call's files into benchmarks/results/. A second call
   can rerun only what broke (after a fix): ``--parts chain`` (or throughput, kernels;
   kernels:expansion, kernels:distill, kernels:loss) with a smaller --budget, and
   ``--merge benchmarks/results/gpu-<device>.json`` (the copied file travels with the tree) to take
   the other parts from the first run, so the file written is complete. ``--torch-adam`` gives both
   DeepSpeed parts torch's AdamW instead of DeepSpeed's fused Adam (a CUDA op DeepSpeed JIT-builds
   with nvcc on first use; its load time is reported).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

REPO = Path(__file__).resolve().parent.parent
KERNEL_BENCH = REPO / "benchmarks" / "kernel_bench.py"

# The CPU run of the demo chain that the GPU run's quality and wall time are compared with:
# `deepspeed launch/chain.py --ds_config ds_configs/zero3.json` (fp32; 1 rank, 2 threads, 2-core
# x86-64, torch 2.14.1, deepspeed 0.19.8), 2026-12-07, 3 min 46 s in all.
CPU_DEMO_REFERENCE = {
    "source": "deepspeed launch/chain.py --ds_config ds_configs/zero3.json on a 2-core CPU (fp32, 1 rank), "
              "2026-12-07",
    "chain": "demo",
    "top1": {"tiny": 0.9666666388511658, "small": 0.980555534362793, "base": 0.9833333492279053},
    "wall_seconds": {"tiny": 71.35, "small": 52.30, "base": 83.48},
    "total_wall_seconds": 225.5,
}
# bf16 is not fp32 and a GPU sums in another order: a stage "matches" its CPU top-1 within this
# (3 points = 11 of the demo's 360 validation images; the CPU stages differ by 1.4 and 0.3 points).
TOP1_TOLERANCE = 0.03

# Dense bf16 tensor-core peaks from NVIDIA's data sheets (TFLOP/s, without sparsity), by name pattern.
TABLE_BF16_TFLOPS = ((r"H200.*NVL", 835.5), (r"H200", 989.4), (r"H100.*NVL", 835.5), (r"H100.*PCIe", 756.5),
                     (r"H100", 989.4), (r"GH200", 989.4), (r"A100", 312.0))

# The parts in the order they run, each with its share of --budget (time a part leaves unused passes
# on to the next). The alignment loss runs last: torch.compile's compile time is the least predictable.
PART_WEIGHTS = {"chain": 0.45, "throughput": 0.20, "kernels:expansion": 0.10, "kernels:distill": 0.10,
                "kernels:loss": 0.15}
MIN_PART_SECONDS = 15.0

TINY_VIT = {"embed_dim": 32,  # the demo's first stage: the dry run's stand-in for ViT-B/16
            "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}


def _tiny_clip(width: int, layers: int, embed: int = 32) -> dict:
    return {"embed_dim": embed,
            "vision_cfg": {"image_size": 16, "patch_size": 8, "width": width, "layers": layers, "head_width": 16},
            "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": width, "heads": width // 16,
                         "layers": layers}}


TINY_CHAIN = {  # the dry run's stand-in for the demo: width growth (official), then depth growth (exact)
    "name": "gpu-check-tiny", "seed": 0,
    "data": {"kind": "digits", "render_size": 16},
    "eval": {"batch_size": 120},
    "defaults": {"lr": 2.0e-3, "warmup_steps": 2, "batch_size": 32},
    "stages": [
        {"name": "a", "model": _tiny_clip(32, 1), "budget": {"steps": 4}},
        {"name": "b", "model": _tiny_clip(64, 1), "budget": {"steps": 4},
         "transfer": {"init": "official", "align": True}},
        {"name": "c", "model": _tiny_clip(64, 2), "budget": {"steps": 4},
         "transfer": {"init": "exact", "noise": 0.01, "align": True}},
    ],
}

# kernel_bench.py's arguments per mode: quick settings on the GPU, its CPU dry run at tiny shapes.
KERNEL_ARGS = {
    "loss": {"gpu": ["--quick", "--reps", "10", "--warmup", "3"],
             "dry": ["--device", "cpu", "--batches", "5", "--dims", "24", "--captions", "1", "7", "--reps", "2",
                     "--warmup", "1"]},
    "expansion": {"gpu": ["--expansion", "--reps", "3", "--expansion-ref-reps", "1"],
                  "dry": ["--device", "cpu", "--expansion", "--expansion-models", "{teacher}", "{student}",
                          "--reps", "1", "--expansion-ref-reps", "1", "--expansion-ranks", "2",
                          "--bandwidth-gib", "0.01"]},
    "distill": {"gpu": ["--distill", "--head", "--reps", "5", "--warmup", "2"],
                "dry": ["--device", "cpu", "--distill", "--head", "--distill-tokens", "13", "--distill-vocab", "200",
                        "--distill-dims", "16:16", "--reps", "2", "--warmup", "1"]},
}

# Imported on the parts' paths; preflight reports which are missing before anything runs.
REQUIRED_MODULES = ("deepspeed", "hjson", "pydantic", "open_clip", "ftfy", "regex", "braceexpand", "yaml",
                    "safetensors", "sklearn", "PIL", "tqdm", "rich", "matplotlib", "transformers", "tokenizers",
                    "torchvision", "timm", "huggingface_hub", "triton", "compt", "compt.kernels")
OPTIONAL_MODULES = ("liger_kernel",)


def say(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------
# Child processes: run with a timeout, log everything, echo progress, keep the failure's tail.
# ---------------------------------------------------------------------------

# Not echoed (still logged): DeepSpeed's INFO lines, Python warnings and the source line they quote.
_QUIET = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,]+\] \[(INFO|DEBUG)\]|\w+Warning: |^  return func\(")


def last_segment(line: str) -> str:
    """What a terminal shows of a line that progress bars rewrote with carriage returns."""
    return line.rstrip("\r").rsplit("\r", 1)[-1].rstrip()


def failure_tail(text: str, lines: int = 60, max_chars: int = 6000) -> str:
    """The end of a child's output, from its last traceback when that is near the end."""
    rows = [r for r in (last_segment(x) for x in text.split("\n")) if r.strip()]
    start = max(0, len(rows) - lines)
    tb = [i for i, r in enumerate(rows) if r.startswith("Traceback (most recent call last)")]
    if tb and tb[-1] < start and len(rows) - tb[-1] <= 300:
        start = tb[-1]
    return "\n".join(rows[start:])[-max_chars:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the child's process group (compt checkpoints and exits on it), SIGKILL what is left."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_logged(label: str, cmd: list[str], *, timeout: float, env: dict, log) -> dict:
    """Run ``cmd`` (own process group) for at most ``timeout`` s; its output goes to ``log`` and its
    progress lines to stdout. Returns returncode, timed_out, wall_s and the whole output."""
    say(f"{label}: start, budget {timeout:.0f} s: {shlex.join(cmd)}")
    log.write(f"\n===== {label} ({time.strftime('%Y-%m-%d %H:%M:%S')}): {shlex.join(cmd)}\n")
    log.flush()
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    chunks: list[bytes] = []
    state = {"last": ""}

    def reader() -> None:
        pending = b""
        for chunk in iter(lambda: proc.stdout.read1(65536), b""):
            chunks.append(chunk)
            *lines, pending = (pending + chunk).split(b"\n")
            for raw in lines:
                line = last_segment(raw.decode(errors="replace"))
                log.write(line + "\n")
                if line.strip():
                    state["last"] = line
                    if not _QUIET.search(line):
                        print(f"    {label} | {line[:240]}", flush=True)
            part = last_segment(pending.decode(errors="replace"))
            if part.strip():
                state["last"] = part
            pending = pending[-200_000:]
        if pending:
            log.write(last_segment(pending.decode(errors="replace")) + "\n")
        log.flush()

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    timed_out, next_beat = False, t0 + 30
    while proc.poll() is None:
        now = time.monotonic()
        if now - t0 >= timeout:
            timed_out = True
            say(f"{label}: over its budget of {timeout:.0f} s, stopping it")
            _stop_group(proc)
            break
        if now >= next_beat:
            say(f"{label}: {now - t0:.0f} s, last output: {state['last'][:160]}")
            next_beat += 30
        time.sleep(0.25)
    proc.wait()
    thread.join(timeout=10)
    wall = time.monotonic() - t0
    say(f"{label}: {'timed out' if timed_out else f'exit {proc.returncode}'} after {wall:.1f} s")
    return {"returncode": proc.returncode, "timed_out": timed_out, "wall_s": wall,
            "output": b"".join(chunks).decode(errors="replace")}


def child_error(run: dict, what: str) -> dict:
    why = f"timed out after {run['wall_s']:.0f} s" if run["timed_out"] else f"exit code {run['returncode']}"
    return {"message": f"{what}: {why}", "tail": failure_tail(run["output"])}


def exception_error(what: str) -> dict:
    return {"message": f"{what}: {sys.exc_info()[0].__name__}: {sys.exc_info()[1]}"[:500],
            "tail": traceback.format_exc()[-6000:]}


# ---------------------------------------------------------------------------
# The machine.
# ---------------------------------------------------------------------------

def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def table_peak_tflops(device: str) -> float | None:
    """The data sheet's dense bf16 peak for a device name (None for devices not in the table)."""
    return next((v for pattern, v in TABLE_BF16_TFLOPS if re.search(pattern, device, re.I)), None)


def versions() -> dict:
    from importlib import metadata

    import torch

    out: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "cuda": torch.version.cuda}
    for key, dist in (("triton", "triton"), ("deepspeed", "deepspeed"), ("open_clip", "open_clip_torch"),
                      ("transformers", "transformers"), ("pydantic", "pydantic"), ("numpy", "numpy"),
                      ("liger_kernel", "liger-kernel")):
        try:
            out[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[key] = None
    try:
        import compt

        out["compt_from"] = str(Path(compt.__file__).parent)
    except ImportError:
        out["compt_from"] = None
    return out


def machine(dry: bool) -> dict:
    import torch

    out: dict[str, Any] = {"platform": platform.platform(), "cpus": os.cpu_count()}
    if not dry:
        p = torch.cuda.get_device_properties(0)
        out["gpu"] = {"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                      "multiprocessors": p.multi_processor_count, "capability": f"{p.major}.{p.minor}",
                      "bf16_supported": torch.cuda.is_bf16_supported()}
        try:
            out["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            out["driver"] = None
    return out


def preflight() -> dict:
    """Which modules the parts import are missing here (looked up, not imported)."""
    import importlib.util

    def missing(names):
        out = []
        for name in names:
            try:
                found = importlib.util.find_spec(name) is not None
            except (ImportError, ValueError):
                found = False
            if not found:
                out.append(name)
        return out

    return {"missing": missing(REQUIRED_MODULES), "optional_missing": missing(OPTIONAL_MODULES)}


# ---------------------------------------------------------------------------
# (a) The chain through the deepspeed launcher.
# ---------------------------------------------------------------------------

def chain_ds_config(bf16: bool, torch_adam: bool) -> dict:
    """ds_configs/zero3.json's ZeRO-3 settings with bf16 explicitly on (GPU) or off (CPU dry run)."""
    base = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    cfg = {k: v for k, v in base.items() if k not in ("bf16", "fp16")}
    cfg["bf16"] = {"enabled": bf16}
    if torch_adam:
        cfg["optimizer"] = {"type": "AdamW", "params": {"torch_adam": True}}
    return cfg


def read_run_stages(run_dir: Path) -> list[dict]:
    """Each stage of a run directory: manifest status and its metrics.json's figures (what exists)."""
    manifest_path = run_dir / "manifest.json"
    if not manifest_path.exists():
        return []
    manifest = json.loads(manifest_path.read_text())
    stages = []
    for entry in manifest.get("stages", []):
        row = {"name": entry["name"], "status": entry.get("status")}
        stage_dir = run_dir / entry.get("dir", f"stages/{entry.get('index')}-{entry['name']}")
        metrics_path = stage_dir / "metrics.json"
        if metrics_path.exists():
            m = json.loads(metrics_path.read_text())
            for key in ("zeroshot_top1", "zeroshot_top5", "init_zeroshot_top1", "val_ppl", "final_loss", "steps",
                        "samples_seen", "wall_seconds", "nonfinite_steps_skipped"):
                if key in m:
                    row[key] = m[key]
        errors = sorted((stage_dir / "errors").glob("rank*.log")) if (stage_dir / "errors").is_dir() else []
        if errors:
            row["errors"] = {p.name: p.read_text()[-2000:] for p in errors}
        stages.append(row)
    return stages


def reference_from_run(run_dir: Path) -> dict:
    """--cpu-reference: a finished CPU run directory of the same chain."""
    stages = read_run_stages(run_dir)
    if not stages:
        raise ValueError(f"--cpu-reference {run_dir}: no manifest.json with stages there")
    return {"source": str(run_dir), "top1": {s["name"]: s.get("zeroshot_top1") for s in stages},
            "wall_seconds": {s["name"]: s.get("wall_seconds") for s in stages}}


def compare_with_reference(stages: list[dict], reference: dict | None, tolerance: float = TOP1_TOLERANCE):
    """Adds each stage's CPU top-1 and wall time and the difference; returns the verdict (None without
    a reference). Within tolerance only when every reference stage finished and each is within it."""
    if not reference:
        return None
    diffs = []
    for s in stages:
        cpu = reference["top1"].get(s["name"])
        s["cpu_top1"] = cpu
        s["cpu_wall_seconds"] = (reference.get("wall_seconds") or {}).get(s["name"])
        gpu = s.get("zeroshot_top1")
        s["top1_minus_cpu"] = gpu - cpu if gpu is not None and cpu is not None else None
        if s["top1_minus_cpu"] is not None:
            diffs.append(s["top1_minus_cpu"])
    compared = len(diffs)
    return {"source": reference["source"], "tolerance": tolerance, "stages_compared": compared,
            "max_abs_diff": max((abs(d) for d in diffs), default=None),
            "within_tolerance": compared == len(reference["top1"]) and all(abs(d) <= tolerance for d in diffs)}


def part_chain(ctx: "Context", timeout: float) -> dict:
    run_dir = ctx.work / "chain-run"
    if ctx.args.chain:
        chain = ctx.args.chain
    elif ctx.dry:
        chain = str(ctx.work / "tiny-chain.yaml")
        import yaml

        Path(chain).write_text(yaml.safe_dump(TINY_CHAIN))
    else:
        chain = "demo"
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", str(free_port()),
           "launch/chain.py", "--chain", chain, "--ds_config", str(ctx.ds_config_path), "--output", str(run_dir)]
    run = run_logged("chain", cmd, timeout=timeout, env=ctx.env, log=ctx.log)
    stages = read_run_stages(run_dir)
    out: dict[str, Any] = {
        "chain": "tiny (dry run)" if ctx.dry and not ctx.args.chain else chain,
        "command": "deepspeed " + shlex.join(cmd[3:]), "ds_config": ctx.ds_config,
        "returncode": run["returncode"], "timed_out": run["timed_out"], "wall_s": run["wall_s"], "stages": stages,
        "ok": run["returncode"] == 0 and bool(stages) and all(s["status"] == "done" for s in stages),
    }
    manifest = run_dir / "manifest.json"
    if manifest.exists():  # what the run recorded as its engine config: did bf16 reach it?
        out["manifest_bf16"] = json.loads(manifest.read_text()).get("ds_config", {}).get("bf16")
    jit = re.findall(r"Time to load (\w+) op: ([\d.]+) seconds", run["output"])
    if jit:
        out["deepspeed_ops_load_s"] = {name: float(s) for name, s in jit}
    reference = None
    if ctx.args.cpu_reference:
        reference = reference_from_run(Path(ctx.args.cpu_reference))
    elif chain == "demo" and not ctx.dry:
        reference = CPU_DEMO_REFERENCE
    out["vs_cpu"] = compare_with_reference(stages, reference)
    if reference and out["ok"] and reference.get("total_wall_seconds"):
        out["cpu_total_wall_s"] = reference["total_wall_seconds"]
    if not out["ok"]:
        out["error"] = child_error(run, "the chain did not finish") if run["returncode"] or run["timed_out"] else {
            "message": "the launcher exited 0 but not every stage is done", "tail": failure_tail(run["output"])}
    return out


# ---------------------------------------------------------------------------
# (b) Throughput: compt's stage loop vs a plain loop (child process: --part throughput).
# ---------------------------------------------------------------------------

def throughput_child(args) -> int:
    """In its own process (one rank, its own CUDA context): both sides alternately, then MFU."""
    import open_clip
    import torch

    import throughput as tp  # benchmarks/throughput.py, beside this script

    out_path = Path(args.part_out)
    dry = args.dry_run
    device = torch.device("cpu" if dry else "cuda")
    name = "tiny ViT (dry run)" if dry else args.model
    model_cfg = TINY_VIT if dry else open_clip.get_model_config(args.model)
    if model_cfg is None:
        raise SystemExit(f"--model {args.model!r}: not an open_clip model name")
    batch, steps, warmup, repeats = args.batch, args.steps, args.warmup, args.repeats
    result: dict[str, Any] = {"model": name, "model_cfg": model_cfg, "image_size": model_cfg["vision_cfg"]["image_size"],
                              "captions": 1, "batch": batch, "timed_steps": steps, "warmup_steps": warmup,
                              "repeats": repeats, "precision": "fp32 (CPU)" if dry else "bf16",
                              "seconds": {"compt": [], "plain": []}, "errors": {}}

    def save():
        out_path.write_text(json.dumps(result, indent=2) + "\n")

    tp.init_single_rank()
    result.update(tp.model_cost(model_cfg))
    peak = tp.matmul_peak_tflops(device)
    result["matmul_peak_tflops_bf16"] = peak
    print(f"bf16 matmul peak: {peak:.0f} TFLOP/s" if peak else "bf16 matmul peak: not measured on CPU", flush=True)
    t0 = time.perf_counter()
    batches = tp.make_batches(model_cfg, batch, warmup + steps, device)
    print(f"{len(batches)} batches of {batch} ready in {time.perf_counter() - t0:.1f} s", flush=True)
    opts = SimpleNamespace(batch=batch, warmup=warmup, ds_config=args.ds_config_file, zero=3)
    sides = (("plain", tp.run_plain), ("compt", tp.run_deepspeed))
    peak_mem: dict[str, float] = {}
    for r in range(repeats):  # alternate, so machine noise hits both sides alike
        for side, fn in sides:
            if side in result["errors"]:
                continue
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            try:
                seconds = fn(model_cfg, batches, opts, device)
            except Exception:  # noqa: BLE001 - recorded, the other side still runs
                result["errors"][side] = exception_error(f"{side} side")
                print(f"{side} #{r + 1}: FAILED\n{result['errors'][side]['tail']}", flush=True)
                save()
                continue
            result["seconds"][side].append(seconds)
            if device.type == "cuda":
                peak_mem[side] = max(peak_mem.get(side, 0.0), torch.cuda.max_memory_allocated() / 2**30)
                torch.cuda.empty_cache()
            print(f"{side} #{r + 1}: {seconds:.2f} s for {steps} steps = {steps * batch / seconds:.1f} samples/s",
                  flush=True)
            save()
    sps = {k: steps * batch / min(v) for k, v in result["seconds"].items() if v}
    result["samples_per_s"] = sps
    result["compt_vs_plain"] = sps["compt"] / sps["plain"] if {"compt", "plain"} <= set(sps) else None
    flops = result["train_flops_per_sample"]
    result["achieved_tflops"] = {k: v * flops / 1e12 for k, v in sps.items()}
    result["mfu_by_side"] = {k: v / peak for k, v in result["achieved_tflops"].items()} if peak else None
    result["mfu"] = (result["mfu_by_side"] or {}).get("compt")
    result["mfu_plain"] = (result["mfu_by_side"] or {}).get("plain")
    if peak_mem:
        result["peak_memory_gib"] = peak_mem
    save()
    if torch.distributed.is_initialized():  # leave the (NCCL) process group cleanly before exiting
        torch.distributed.destroy_process_group()
    return 0


def part_throughput(ctx: "Context", timeout: float) -> dict:
    out_path = ctx.work / "throughput.json"
    a = ctx.args
    size = ["--batch", "8", "--steps", "2", "--warmup", "1", "--repeats", "1"] if ctx.dry else [
        "--batch", str(a.batch), "--steps", str(a.steps), "--warmup", str(a.warmup), "--repeats", str(a.repeats)]
    cmd = [sys.executable, str(Path(__file__).resolve()), "--part", "throughput", "--part-out", str(out_path),
           "--ds-config-file", str(ctx.ds_config_path), "--model", a.model, *size] + (["--dry-run"] if ctx.dry else [])
    env = {**ctx.env, "MASTER_PORT": str(free_port())}
    run = run_logged("throughput", cmd, timeout=timeout, env=env, log=ctx.log)
    out = json.loads(out_path.read_text()) if out_path.exists() else {}
    out.update(command=shlex.join(cmd), wall_s=run["wall_s"], returncode=run["returncode"], timed_out=run["timed_out"])
    out.setdefault("compt_vs_plain", None)
    out.setdefault("mfu", None)
    if not ctx.dry:
        out["table_peak_tflops_bf16"] = table = table_peak_tflops(ctx.device)
        if table and out.get("achieved_tflops"):
            out["mfu_vs_table_peak"] = {k: v / table for k, v in out["achieved_tflops"].items()}
    out["ok"] = run["returncode"] == 0 and not run["timed_out"] and out["compt_vs_plain"] is not None
    if not out["ok"]:
        if out.get("errors"):
            side, err = next(iter(out["errors"].items()))
            out["error"] = {"message": f"{err['message']} ({len(out['errors'])} side(s) failed)", "tail": err["tail"]}
        else:
            out["error"] = child_error(run, "the throughput run did not finish")
    return out


# ---------------------------------------------------------------------------
# (c) benchmarks/kernel_bench.py's quick modes, one subprocess each.
# ---------------------------------------------------------------------------

def kernel_summary(mode: str, result: dict) -> dict:
    """The few figures of a kernel_bench result that answer issue 19's targets."""
    agreement = result.get("agreement") or []
    out: dict[str, Any] = {"agreement_ok": f"{sum(r['ok'] for r in agreement)}/{len(agreement)}" if agreement else None}
    if mode == "loss":
        out.update(result.get("targets", {}))
    elif mode == "expansion":
        ex = result.get("expansion", {})
        out.update(bit_identical_everywhere=ex.get("bit_identical_everywhere"),
                   target_within_2x_of_bandwidth=ex.get("target_within_2x_of_bandwidth"),
                   bandwidth_limit_gbs=ex.get("bandwidth", {}).get("limit_gbs"),
                   max_x_of_bandwidth_limit=max((r["x_of_bandwidth_limit"] for r in ex.get("rows", [])
                                                 if r.get("x_of_bandwidth_limit") is not None), default=None))
    elif mode == "distill":
        d, head = result.get("distill", {}), result.get("head") or {}
        out.update(d.get("targets", {}), impls=d.get("impls"), notes=d.get("notes"))
        out.update({f"head_{k}": v for k, v in head.get("targets", {}).items()})
        head_agreement = result.get("head_agreement") or []
        if head_agreement:
            out["head_agreement_ok"] = f"{sum(r['ok'] for r in head_agreement)}/{len(head_agreement)}"
    return out


def part_kernels(ctx: "Context", mode: str, timeout: float) -> dict:
    folder = ctx.work / f"kernels-{mode}"
    shutil.rmtree(folder, ignore_errors=True)
    extra = KERNEL_ARGS[mode]["dry" if ctx.dry else "gpu"]
    if ctx.dry and mode == "expansion":
        models = {}
        for role, cfg in (("teacher", _tiny_clip(16, 1, 16)), ("student", _tiny_clip(32, 1, 24))):
            cfg["text_cfg"].update(context_length=8, vocab_size=50 if role == "teacher" else 60)
            models[role] = ctx.work / f"{role}.json"
            models[role].write_text(json.dumps(cfg))
        extra = [x.format(**{k: str(v) for k, v in models.items()}) for x in extra]
    cmd = [sys.executable, str(KERNEL_BENCH), *extra, "--results", str(folder)]
    run = run_logged(f"kernels:{mode}", cmd, timeout=timeout, env=ctx.env, log=ctx.log)
    out: dict[str, Any] = {"command": shlex.join(cmd), "returncode": run["returncode"], "timed_out": run["timed_out"],
                           "wall_s": run["wall_s"]}
    written = sorted(folder.glob("*.json")) if folder.is_dir() else []
    if written:
        out["result"] = json.loads(written[0].read_text())
        out["markdown"] = written[0].with_suffix(".md").read_text() if written[0].with_suffix(".md").exists() else ""
        out["summary"] = kernel_summary(mode, out["result"])
    out["ok"] = run["returncode"] == 0 and not run["timed_out"] and bool(written)
    if not out["ok"]:
        out["error"] = child_error(run, f"kernel_bench.py ({mode})") if run["returncode"] or run["timed_out"] else {
            "message": f"kernel_bench.py ({mode}) exited 0 but wrote no result (no CUDA or no triton?)",
            "tail": failure_tail(run["output"])}
    return out


# ---------------------------------------------------------------------------
# Targets, JSON, markdown.
# ---------------------------------------------------------------------------

def _target(text: str, value, met) -> dict:
    return {"target": text, "value": value, "met": met}


def targets(result: dict) -> dict:
    """Issue 19's targets, each beside its measured value (met None: not measured)."""
    chain, tput, k = result.get("chain") or {}, result.get("throughput") or {}, result.get("kernels") or {}
    vs_cpu = chain.get("vs_cpu") or {}
    ratio, mfu = tput.get("compt_vs_plain"), tput.get("mfu")
    loss = ((k.get("loss") or {}).get("summary")) or {}
    ex = ((k.get("expansion") or {}).get("summary")) or {}
    dist = ((k.get("distill") or {}).get("summary")) or {}

    def known(flag, *needed):
        return None if any(x is None for x in needed) else bool(flag)

    return {
        "chain_completes_bf16": _target("the demo chain completes on the GPU in bf16", chain.get("ok"),
                                        chain.get("ok") if chain else None),
        "chain_quality_matches_cpu": _target(f"every stage's top-1 within {TOP1_TOLERANCE:.0%} of the CPU run",
                                             vs_cpu.get("max_abs_diff"), vs_cpu.get("within_tolerance")),
        "compt_vs_plain": _target(">= 0.9x the plain loop's samples/s", ratio,
                                  None if ratio is None else ratio >= 0.9),
        "mfu": _target(">= 40% of the measured bf16 matmul peak", mfu, None if mfu is None else mfu >= 0.40),
        "alignment_vs_eager": _target("fused alignment loss >= 3x eager", loss.get("min_speedup_vs_eager"),
                                      known(loss.get("fused_3x_eager_everywhere"), loss.get("min_speedup_vs_eager"))),
        "alignment_vs_compile": _target("fused alignment loss not slower than torch.compile",
                                        loss.get("min_speedup_vs_compile"),
                                        known(loss.get("fused_not_slower_than_compile_everywhere"),
                                              loss.get("min_speedup_vs_compile"))),
        "expansion_vs_bandwidth": _target("expansion within 2x of the copy bandwidth",
                                          ex.get("max_x_of_bandwidth_limit"),
                                          known(ex.get("target_within_2x_of_bandwidth"),
                                                ex.get("max_x_of_bandwidth_limit"))),
        "distill_peak_memory": _target("fused LLaMA KL head peak <= 30% of naive", dist.get("max_peak_vs_naive"),
                                       known(dist.get("fused_peak_at_most_30pct_of_naive"),
                                             dist.get("max_peak_vs_naive"))),
        "distill_time": _target("fused LLaMA KL head time <= naive", dist.get("max_time_vs_naive"),
                                known(dist.get("fused_not_slower_than_naive"), dist.get("max_time_vs_naive"))),
        "head_peak_memory": _target("fused LLaMA head (cross-entropy + KL) peak <= 30% of naive",
                                    dist.get("head_max_peak_vs_naive"),
                                    known(dist.get("head_fused_peak_at_most_30pct_of_naive"),
                                          dist.get("head_max_peak_vs_naive"))),
        "head_time": _target("fused LLaMA head (cross-entropy + KL) time <= naive", dist.get("head_max_time_vs_naive"),
                             known(dist.get("head_fused_not_slower_than_naive"), dist.get("head_max_time_vs_naive"))),
    }


def _f(x, spec: str = ".2f", scale: float = 1.0) -> str:
    return "-" if x is None else format(x * scale, spec)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def to_markdown(result: dict) -> str:
    from compt.flops import format_flops

    v = result["versions"]
    lines = [f"# GPU check: {result['device']}", ""]
    if result["dry_run"]:
        lines += ["**Dry run on CPU** at toy sizes (tiny chain, tiny ViT, kernel_bench.py's CPU mode): a check of "
                  "the script's plumbing; the numbers mean nothing.", ""]
    lines += [f"{result['date']}; {result['timings'].get('total_s', 0):.0f} s in all (budget {result['budget_s']:.0f} s)."
              f" torch {v['torch']} (CUDA {v['cuda']}), triton {v['triton']}, deepspeed {v['deepspeed']}, open_clip "
              f"{v['open_clip']}, transformers {v['transformers']}, python {v['python']}.", "",
              f"Command: `{result['command']}`", ""]
    gpu = result["machine"].get("gpu")
    if gpu:
        lines += [f"GPU: {gpu['name']}, {gpu['memory_gib']} GiB, {gpu['multiprocessors']} SMs, compute capability "
                  f"{gpu['capability']}, driver {result['machine'].get('driver')}.", ""]
    pre = result["preflight"]
    if pre["missing"] or pre["optional_missing"]:
        lines += [f"Missing modules: {', '.join(pre['missing']) or 'none'}; optional missing: "
                  f"{', '.join(pre['optional_missing']) or 'none'}.", ""]
    if result.get("merged_from"):
        m = result["merged_from"]
        lines += [f"Parts {', '.join(m['parts'])} are from the earlier run of {m['date']} (`{m['command']}`).", ""]
    lines += ["| part | ok | seconds | budget s | error |", "|---|---|---|---|---|"]
    for name, part in result["parts"].items():
        err = (part.get("error") or {}).get("message", "")
        lines.append(f"| {name} | {part.get('ok')} | {_f(part.get('wall_s'), '.1f')} | "
                     f"{_f(result['budgets_s'].get(name), '.0f')} | {err[:160]} |")
    lines += ["", "## Targets (issue 19)", "", "| target | measured | met |", "|---|---|---|"]
    for t in result["targets"].values():
        value = t["value"]
        value = _f(value, ".3f") if isinstance(value, float) else ("-" if value is None else str(value))
        lines.append(f"| {t['target']} | {value} | {'-' if t['met'] is None else t['met']} |")

    chain = result.get("chain")
    if chain and "stages" in chain:  # (not when gpu_check's own chain code failed before the run)
        lines += ["", f"## (a) Chain `{chain['chain']}`: deepspeed launcher, 1 {'rank' if result['dry_run'] else 'GPU'},"
                  f" ZeRO-3, bf16 {chain['ds_config'].get('bf16', {}).get('enabled')}", "",
                  f"Command: `{chain['command']}`", "",
                  f"ok: {chain['ok']}; wall {chain['wall_s']:.1f} s"
                  + (f" (the CPU run: {chain['cpu_total_wall_s']:.0f} s)" if chain.get("cpu_total_wall_s") else "")
                  + f"; bf16 section in the run's manifest: {chain.get('manifest_bf16')}."
                  + (f" DeepSpeed ops loaded (JIT): {chain['deepspeed_ops_load_s']} s." if chain.get(
                      "deepspeed_ops_load_s") else ""), "",
                  "| stage | status | top-1 | CPU top-1 | difference | steps | wall s | CPU wall s |",
                  "|---|---|---|---|---|---|---|---|"]
        for s in chain["stages"]:
            lines.append(f"| {s['name']} | {s['status']} | {_pct(s.get('zeroshot_top1'))} | {_pct(s.get('cpu_top1'))} "
                         f"| {_f(s.get('top1_minus_cpu'), '+.1f', 100)} | {s.get('steps', '-')} | "
                         f"{_f(s.get('wall_seconds'), '.1f')} | {_f(s.get('cpu_wall_seconds'), '.1f')} |")
        vs = chain.get("vs_cpu")
        lines += ["", f"CPU reference: {vs['source']}; largest difference {_f(vs['max_abs_diff'], '.1f', 100)} points "
                  f"(tolerance {100 * vs['tolerance']:.0f}); within: {vs['within_tolerance']}." if vs else
                  "No CPU reference for this chain."]

    tput = result.get("throughput")
    if tput and tput.get("model"):
        peak, table = tput.get("matmul_peak_tflops_bf16"), tput.get("table_peak_tflops_bf16")
        lines += ["", f"## (b) Throughput: {tput['model']}, {tput['image_size']} px, 1 caption, batch {tput['batch']}, "
                  f"{tput['precision']}", "", f"Command: `{tput['command']}`", "",
                  "| path | samples/s | TFLOP/s | MFU (measured peak) | MFU (table peak) | peak memory GiB |",
                  "|---|---|---|---|---|---|"]
        for side, label in (("compt", "compt stage loop (DeepSpeed ZeRO-3)"), ("plain", "plain PyTorch loop")):
            sps = (tput.get("samples_per_s") or {}).get(side)
            lines.append(f"| {label} | {_f(sps, '.1f')} | {_f((tput.get('achieved_tflops') or {}).get(side), '.3g')} "
                         f"| {_pct((tput.get('mfu_by_side') or {}).get(side))} | "
                         f"{_pct((tput.get('mfu_vs_table_peak') or {}).get(side))} | "
                         f"{_f((tput.get('peak_memory_gib') or {}).get(side), '.1f')} |")
        lines += ["", f"compt / plain: {_f(tput.get('compt_vs_plain'), '.3f')} (best of {tput['repeats']} alternating "
                  f"runs of {tput['timed_steps']} steps after {tput['warmup_steps']} warm-up). bf16 matmul peak: "
                  f"measured {_f(peak, '.0f')} TFLOP/s, data sheet {_f(table, '.0f')}. "
                  f"{tput['params'] / 1e6:.1f}M parameters, {format_flops(tput['train_flops_per_sample'])} per "
                  "training sample (forward+backward, counted)."]

    kernels = result.get("kernels") or {}
    if kernels:
        lines += ["", "## (c) Kernels: benchmarks/kernel_bench.py", "", "| mode | ok | seconds | summary |",
                  "|---|---|---|---|"]
        for mode, k in kernels.items():
            summary = ", ".join(f"{key} {float(f'{val:.3g}') if isinstance(val, float) else val}"
                                for key, val in (k.get("summary") or {}).items() if key != "notes")
            lines.append(f"| {mode} | {k['ok']} | {k['wall_s']:.1f} | {summary[:400]} |")
        for mode, k in kernels.items():
            if k.get("markdown"):
                lines += ["", re.sub(r"(?m)^(#+) ", lambda m: "#" * (len(m.group(1)) + 2) + " ", k["markdown"]).strip()]

    errors = {name: part["error"] for name, part in result["parts"].items() if part.get("error")}
    if errors:
        lines += ["", "## Errors"]
        for name, err in errors.items():
            lines += ["", f"### {name}: {err['message']}", "", "```", err.get("tail", "").strip(), "```"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# Driver.
# ---------------------------------------------------------------------------

@dataclass
class Context:
    args: argparse.Namespace
    dry: bool
    device: str
    work: Path
    env: dict
    log: Any
    ds_config: dict = field(default_factory=dict)
    ds_config_path: Path = Path()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="folder for gpu-<device>.{json,md,log} (default: benchmarks/results; "
                   "a dry run: a new temporary folder)")
    p.add_argument("--dry-run", action="store_true", help="run every part on CPU at toy sizes (no CUDA needed)")
    p.add_argument("--parts", default="chain,throughput,kernels",
                   help="comma list of chain, throughput, kernels (all three modes) or kernels:loss, "
                        "kernels:expansion, kernels:distill")
    p.add_argument("--budget", type=float, default=400.0, help="seconds for all parts together (shared by weight)")
    p.add_argument("--chain", default=None, help="(a): a chain YAML or preset instead of the demo (dry run: tiny)")
    p.add_argument("--cpu-reference", default=None, metavar="RUN_DIR",
                   help="(a): compare with this CPU run directory of the same chain instead of CPU_DEMO_REFERENCE")
    p.add_argument("--torch-adam", action="store_true",
                   help="(a), (b): torch's AdamW in DeepSpeed instead of its fused Adam (a JIT-compiled CUDA op)")
    p.add_argument("--model", default="ViT-B-16", help="(b): open_clip model (dry run: a tiny ViT)")
    p.add_argument("--batch", type=int, default=128, help="(b): batch (one GPU)")
    p.add_argument("--steps", type=int, default=30, help="(b): timed steps per side and repeat")
    p.add_argument("--warmup", type=int, default=5, help="(b): untimed steps first")
    p.add_argument("--repeats", type=int, default=2, help="(b): alternating runs of each side (the best counts)")
    p.add_argument("--merge", default=None, metavar="GPU_JSON",
                   help="an earlier gpu-<device>.json of this device: the parts this run leaves out are taken "
                        "from it, so a second run of only what broke still writes a complete result")
    p.add_argument("--workdir", default=None, help="scratch folder (run directory, configs; default: temporary, "
                   "removed at the end)")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder")
    p.add_argument("--part", choices=["throughput"], default=None, help=argparse.SUPPRESS)  # child process
    p.add_argument("--part-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--ds-config-file", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    wanted = [x.strip() for x in args.parts.split(",") if x.strip()]
    known = [k for k in PART_WEIGHTS]
    parts = []
    for w in wanted:
        match = [k for k in known if k == w or k.startswith(w + ":")]
        if not match:
            p.error(f"--parts: unknown part {w!r} (known: chain, throughput, kernels, {', '.join(known[2:])})")
        parts += [m for m in match if m not in parts]
    if args.merge and not Path(args.merge).is_file():
        p.error(f"--merge {args.merge}: no such file")
    if args.cpu_reference and not (Path(args.cpu_reference) / "manifest.json").is_file():
        p.error(f"--cpu-reference {args.cpu_reference}: not a run directory (no manifest.json)")
    args.part_list = [k for k in known if k in parts]  # always in the documented order
    return args


def plan_timeout(deadline: float, remaining_parts: list[str]) -> float:
    """This part's share of what is left of the budget (by weight among the parts still to run)."""
    left = deadline - time.monotonic()
    weights = [PART_WEIGHTS[p] for p in remaining_parts]
    return left * weights[0] / sum(weights)


def merge_earlier(result: dict, earlier: dict, rerun: list[str]) -> None:
    """Take the parts that ``rerun`` leaves out from an earlier result of the same device."""
    if earlier.get("device") != result["device"]:
        raise SystemExit(f"--merge: that result is of {earlier.get('device')!r}, this device is {result['device']!r}")
    taken = [p for p in earlier.get("parts", {}) if p not in rerun]
    for part in taken:
        for key in ("parts", "errors", "budgets_s"):
            if part in earlier.get(key, {}):
                result[key][part] = earlier[key][part]
        if f"{part}_s" in earlier.get("timings", {}):
            result["timings"][f"{part}_s"] = earlier["timings"][f"{part}_s"]
        if part.startswith("kernels:"):
            mode = part.split(":", 1)[1]
            if mode in (earlier.get("kernels") or {}):
                result["kernels"][mode] = earlier["kernels"][mode]
        else:
            result[part] = earlier.get(part)
    result["merged_from"] = {"date": earlier.get("date"), "command": earlier.get("command"), "parts": taken}
    say(f"--merge: {', '.join(taken) or 'nothing'} taken from the run of {earlier.get('date')}")


def write_results(result: dict, out: Path) -> Path:
    stem = out / f"gpu-{slug(result['device'])}"
    result["targets"] = targets(result)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    try:
        md = to_markdown(result)
    except Exception:  # noqa: BLE001 - the JSON is written; a report bug must not end the run
        md = (f"# GPU check: {result['device']}\n\nThe markdown report failed (the JSON beside it has every "
              f"figure):\n\n```\n{traceback.format_exc()[-4000:]}```\n")
    stem.with_suffix(".md").write_text(md)
    return stem


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.part == "throughput":
        return throughput_child(args)
    import torch

    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        print("benchmarks/gpu_check.py: no CUDA device here. Run it on the GPU machine (see its docstring), or "
              "--dry-run --out DIR for the CPU dry run. Nothing measured, nothing written.")
        return 2
    t_start = time.monotonic()
    deadline = t_start + args.budget
    device = f"cpu dry run ({os.cpu_count()} cores)" if dry else torch.cuda.get_device_name(0)
    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp(prefix="gpu-check-dry-")) if dry
                                           else REPO / "benchmarks" / "results")
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if dry:  # every child on CPU, even on a machine that has a GPU
        env.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")
    else:
        env.pop("TRITON_INTERPRET", None)
    stem = out / f"gpu-{slug(device)}"
    result: dict[str, Any] = {
        "device": device, "dry_run": dry, "ok": None,
        "command": shlex.join([sys.executable, *(sys.argv if argv is None else [__file__, *argv])]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "budget_s": args.budget, "versions": versions(),
        "machine": machine(dry), "preflight": preflight(), "parts": {}, "budgets_s": {}, "timings": {},
        "errors": {}, "chain": None, "throughput": None, "kernels": {},
    }
    if args.merge:
        merge_earlier(result, json.loads(Path(args.merge).read_text()), args.part_list)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="gpu-check-work-"))
    work.mkdir(parents=True, exist_ok=True)
    say(f"device: {device}; results: {stem}.{{json,md,log}}; scratch: {work}")
    say(f"versions: {json.dumps(result['versions'])}")
    if result["preflight"]["missing"]:
        say(f"MISSING modules (the parts that import them will fail): {', '.join(result['preflight']['missing'])}")
    ds_config = chain_ds_config(bf16=not dry, torch_adam=args.torch_adam)
    ds_path = work / "ds_config.json"
    ds_path.write_text(json.dumps(ds_config, indent=2) + "\n")
    try:
        with open(stem.with_suffix(".log"), "w") as log:
            ctx = Context(args=args, dry=dry, device=device, work=work, env=env, log=log, ds_config=ds_config,
                          ds_config_path=ds_path)
            for i, part in enumerate(args.part_list):
                timeout = plan_timeout(deadline, args.part_list[i:])
                result["budgets_s"][part] = timeout
                t0 = time.monotonic()
                if timeout < MIN_PART_SECONDS:
                    record = {"ok": False, "wall_s": 0.0, "error": {
                        "message": f"skipped: {timeout:.0f} s of the budget left", "tail": ""}}
                else:
                    try:
                        if part == "chain":
                            record = part_chain(ctx, timeout)
                        elif part == "throughput":
                            record = part_throughput(ctx, timeout)
                        else:
                            record = part_kernels(ctx, part.split(":", 1)[1], timeout)
                    except Exception:  # noqa: BLE001 - a bug here must not cost the other parts
                        record = {"ok": False, "error": exception_error(f"gpu_check.py's own {part} code")}
                record.setdefault("wall_s", time.monotonic() - t0)
                result["parts"][part] = {"ok": record["ok"], "wall_s": record["wall_s"], "error": record.get("error")}
                result["timings"][f"{part}_s"] = record["wall_s"]
                result["errors"][part] = record.get("error")
                if part.startswith("kernels:"):
                    result["kernels"][part.split(":", 1)[1]] = record
                else:
                    result[part] = record
                result["timings"]["total_s"] = time.monotonic() - t_start
                result["ok"] = all(p["ok"] for p in result["parts"].values())
                write_results(result, out)
                say(f"{part}: {'ok' if record['ok'] else 'FAILED: ' + record['error']['message']}")
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    result["timings"]["total_s"] = time.monotonic() - t_start
    result["ok"] = all(p["ok"] for p in result["parts"].values())
    write_results(result, out)
    say(f"done in {result['timings']['total_s']:.0f} s: {'every part ok' if result['ok'] else 'some part FAILED'}; "
        f"wrote {stem}.json, .md and .log")
    for t in result["targets"].values():
        say(f"  target {t['target']}: {t['value']} -> {'-' if t['met'] is None else t['met']}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
