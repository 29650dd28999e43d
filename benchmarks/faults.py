"""Kill a chain with SIGKILL at random moments, resume it, and compare with an uninterrupted run.

    python benchmarks/faults.py --trials 5 --ranks 1 2 --kills 2

Each trial starts a tiny chain (TINY_CHAIN: 3 stages, checkpoints every 2 steps; the test
suite's, tests/conftest.py) through the real deepspeed launcher, kills the whole process group with SIGKILL
a random delay after training starts (any moment: mid-step, mid-checkpoint, mid-save, between stages),
restarts it, possibly kills it again (``--kills``), and finally lets it finish. Every
stage's weights and loss curve must equal, bit for bit, those of an uninterrupted run
with the same rank count. Results: benchmarks/results/faults-<name>.{json,md}.

``--second-launch``: in each trial, once the first launch trains, the same command is started a
second time on the same --output (the first paused meanwhile, so they overlap); it must exit 2 naming
the first's rank 0 (the run-directory lock), and the trial must still end bit-identical.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]


def tiny_model(width: int = 32, layers: int = 1, embed: int = 32) -> dict:
    return {
        "embed_dim": embed,
        "vision_cfg": {"image_size": 16, "patch_size": 8, "width": width, "layers": layers, "head_width": 16},
        "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": width, "heads": width // 16, "layers": layers},
    }


# The tiny chain results/faults-cpu2* ran; tests/conftest.py takes it (and tiny_model) from here.
TINY_CHAIN = {
    "name": "tiny",
    "seed": 0,
    "data": {"kind": "digits", "render_size": 16},
    "eval": {"batch_size": 120},
    "defaults": {"lr": 2.0e-3, "warmup_steps": 2, "batch_size": 32, "log_every": 2, "checkpoint_every_steps": 2},
    "stages": [
        {"name": "a", "model": tiny_model(32, 1), "budget": {"steps": 6}},
        {"name": "b", "model": tiny_model(64, 1), "budget": {"steps": 8},
         "transfer": {"init": "official", "align": True, "alpha": 500}},
        {"name": "c", "model": tiny_model(64, 2), "budget": {"samples": 128},
         "transfer": {"init": "exact", "noise": 0.01, "align": True, "alpha": 500}},
    ],
}
STAGES = [f"{k}-{s['name']}" for k, s in enumerate(TINY_CHAIN["stages"])]


def command(chain: Path, out: Path, ranks: int, port: int) -> list[str]:
    return ["deepspeed", "--master_port", str(port), "--num_gpus", str(ranks), "launch/chain.py", "--chain",
            str(chain), "--ds_config", "ds_configs/zero3.json", "--output", str(out)]


def launch(chain: Path, out: Path, ranks: int, port: int) -> subprocess.Popen:
    return subprocess.Popen(command(chain, out, ranks, port), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def second_launch(chain: Path, out: Path, ranks: int, port: int) -> dict:
    """The same command again while the first runs: its exit code and whether it named the lock's holder."""
    try:
        holder = json.loads((out / ".lock").read_text())["pid"]
    except (OSError, ValueError, KeyError):
        holder = None
    proc = subprocess.run(command(chain, out, ranks, port), cwd=REPO, capture_output=True, text=True, timeout=600)
    named = holder is not None and f"pid {holder} on host" in proc.stderr
    return {"exit": proc.returncode, "named_holder": named}


def statuses(out: Path) -> list[str]:
    try:
        return [s["status"] for s in json.loads((out / "manifest.json").read_text())["stages"]]
    except (OSError, ValueError):
        return ["no manifest"]


def same_as(out: Path, ref: Path) -> list[str]:
    """Stages whose weights or loss curve differ from the reference run."""
    bad = []
    for stage in STAGES:
        got = load_file(str(out / "stages" / stage / "model.safetensors"))
        want = load_file(str(ref / "stages" / stage / "model.safetensors"))
        if got.keys() != want.keys() or not all(torch.equal(got[n], want[n]) for n in want):
            bad.append(f"{stage} weights")
        if (out / "stages" / stage / "loss.csv").read_text() != (ref / "stages" / stage / "loss.csv").read_text():
            bad.append(f"{stage} loss.csv")
    return bad


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=5, help="trials per rank count")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--kills", type=int, default=2, help="SIGKILLs per trial before it may finish")
    p.add_argument("--max-delay", type=float, default=8.0,
                   help="kill uniform(0, this) seconds after training starts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default="runs/bench-faults")
    p.add_argument("--name", default="cpu2")
    p.add_argument("--port", type=int, default=29870)
    p.add_argument("--second-launch", action="store_true",
                   help="also start the same command a second time while the first trains (must exit 2)")
    args = p.parse_args()

    work = REPO / args.workdir
    work.mkdir(parents=True, exist_ok=True)
    chain = work / "chain.yaml"
    chain.write_text(yaml.safe_dump(TINY_CHAIN))
    rng, port, trials = random.Random(args.seed), args.port, []
    t_start = time.time()
    for ranks in args.ranks:
        ref = work / f"reference-{ranks}"
        if not (ref / "results.md").exists():
            proc = launch(chain, ref, ranks, port)
            port += 1
            if proc.wait() != 0:
                print(f"reference run with {ranks} rank(s) failed", file=sys.stderr)
                return 1
        for t in range(args.trials):
            out = work / f"trial-{ranks}-{t}"
            if out.exists():
                subprocess.run(["rm", "-rf", str(out)], check=True)
            kills, second = [], None
            for _ in range(args.kills):
                started = time.time()
                proc = launch(chain, out, ranks, port)
                port += 1
                # The clock starts once training does (rank 0 marks a stage running in the manifest):
                # DeepSpeed's start-up takes longer than the whole tiny chain trains.
                manifest = out / "manifest.json"
                while proc.poll() is None and not (manifest.exists() and manifest.stat().st_mtime > started):
                    time.sleep(0.05)
                if args.second_launch and second is None and proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGSTOP)  # paused, so the overlap does not depend on timing
                    try:
                        second = second_launch(chain, out, ranks, port)
                    finally:
                        os.killpg(proc.pid, signal.SIGCONT)
                    port += 1
                delay = rng.uniform(0.0, args.max_delay)
                try:
                    proc.wait(timeout=delay)
                    kills.append({"delay_s": round(delay, 2), "killed": False, "note": "finished first"})
                    break
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    kills.append({"delay_s": round(delay, 2), "killed": True, "stages_at_kill": statuses(out)})
            proc = launch(chain, out, ranks, port)
            port += 1
            code = proc.wait()
            diff = same_as(out, ref) if code == 0 else ["resume failed"]
            if second is not None and not (second["exit"] == 2 and second["named_holder"]):
                diff.append(f"second launch exited {second['exit']}"
                            + ("" if second["named_holder"] else " without naming the lock's holder"))
            trials.append({"ranks": ranks, "trial": t, "kills": kills, "second_launch": second, "resume_exit": code,
                           "differences": diff})
            print(f"ranks {ranks} trial {t}: kills {kills}, second launch {second} -> "
                  f"{'identical' if not diff else diff}", flush=True)

    killed = sum(k["killed"] for tr in trials for k in tr["kills"])
    ok = sum(not tr["differences"] for tr in trials)
    result = {"command": "python benchmarks/faults.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
              "wall_seconds": round(time.time() - t_start), "trials": trials, "sigkills": killed,
              "trials_identical": ok, "trials_total": len(trials)}
    res = REPO / "benchmarks" / "results"
    (res / f"faults-{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# SIGKILL at random moments, then resume ({result['command']})", "",
             f"{len(trials)} trials, {killed} SIGKILLs, {ok} of {len(trials)} ended bit-identical to an "
             f"uninterrupted run (weights and loss curves of every stage). {os.cpu_count()} CPUs, "
             f"{result['wall_seconds']} s.", "", "| ranks | trial | kills (delay s: stages at kill) | second launch "
             "on the same --output | result |", "|---|---|---|---|---|"]
    for tr in trials:
        ks = "; ".join(f"{k['delay_s']}: {'/'.join(k.get('stages_at_kill', [])) or k.get('note')}" for k in tr["kills"])
        sl = tr["second_launch"]
        sl = "-" if sl is None else f"exit {sl['exit']}{', named the holder' if sl['named_holder'] else ''}"
        lines.append(f"| {tr['ranks']} | {tr['trial']} | {ks} | {sl} | "
                     f"{'identical' if not tr['differences'] else ', '.join(tr['differences'])} |")
    (res / f"faults-{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if ok == len(trials) else 1


if __name__ == "__main__":
    sys.exit(main())
