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

``--kinds`` adds other faults (default: sigkill, the above), each trial one launch (plus a rerun):

    python benchmarks/faults.py --kinds sigterm-eval sigterm-save truncated-shard bad-csv-row --trials 3 --ranks 1

sigterm-eval / sigterm-save: SIGTERM to the run's process group while a random stage is evaluated after
its last step (a random delay after its last step line) or while its weights are written (as soon as
the weights' temporary file appears). The launch must exit 143 without a traceback; the rerun must
finish (exit 0) with every stage bit-identical to the uninterrupted reference.
truncated-shard / bad-csv-row: one stage trained on digits as webdataset shards, one of them cut short
(even trials) or overwritten with 1 KB of garbage (odd trials) at a random byte, or as an open_clip CSV
with one random row damaged (trial t: CSV_DAMAGES[t % 4]: a non-UTF-8 byte, a caption over the
131072-character limit, a missing field, a caption opening with an unbalanced quote). The stage must
finish (exit 0; data.max_bad_fraction 0.5) with the damage counted in bad_samples and named by shard
and byte offset, or by CSV row.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import re
import shlex
import signal
import subprocess
import sys
import threading
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


class Watched:
    """A launch whose merged stdout/stderr is read line by line as it runs."""

    def __init__(self, cmd: list[str]):
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.reader.start()

    def seen(self, text: str) -> bool:
        return any(text in line for line in list(self.lines))

    def finish(self) -> tuple[int, str]:
        code = self.proc.wait()
        self.reader.join(timeout=60)
        return code, "".join(self.lines)


def shell_status(code: int) -> int:
    """An exit code as a shell reports it: 128 + N for a process killed by signal N (subprocess says -N)."""
    return 128 - code if code < 0 else code


def signal_trial(kind: str, work: Path, ref: Path, out: Path, ranks: int, port: int, rng: random.Random) -> dict:
    """SIGTERM during a random stage's final evaluation (sigterm-eval) or weights save (sigterm-save). The chain
    ends at that stage (the reference's stages up to it are the same computation), so a trial is one launch
    that trains up to the signal and a rerun that finds every stage done."""
    k = rng.randrange(len(STAGES))
    chain = work / f"chain-to-{k}.yaml"
    chain.write_text(yaml.safe_dump({**TINY_CHAIN, "stages": TINY_CHAIN["stages"][:k + 1]}))
    stage = TINY_CHAIN["stages"][k]
    steps = stage["budget"].get("steps") or stage["budget"]["samples"] // TINY_CHAIN["defaults"]["batch_size"]
    weights = out / "stages" / STAGES[k] / "model.safetensors"
    tmp = weights.with_name(weights.name + ".tmp")
    run = Watched(command(chain, out, ranks, port))
    last_step = f"stage {k} {stage['name']}: step {steps}/{steps}"
    while run.proc.poll() is None and not run.seen(last_step):
        time.sleep(0.005)
    if kind == "sigterm-eval":
        time.sleep(rng.uniform(0.0, 0.3))
    else:
        while run.proc.poll() is None and not tmp.exists() and not weights.exists():
            time.sleep(0.001)
    phase = ("run over" if run.proc.poll() is not None else "saving" if tmp.exists() else
             "saved" if weights.exists() else "evaluating")
    if run.proc.poll() is None:
        os.killpg(run.proc.pid, signal.SIGTERM)
    code, log = run.finish()
    again = subprocess.run(command(chain, out, ranks, port + 1), cwd=REPO, capture_output=True, text=True,
                           timeout=600)
    diff = same_as(out, ref, STAGES[:k + 1]) if again.returncode == 0 else [f"rerun exited {again.returncode}"]
    # The group's SIGTERM also reaches the `deepspeed` command, which dies of it (143 to a shell) while its
    # rank saves and exits 143 itself; the rank says which safe point it stopped at.
    if shell_status(code) != 143:
        diff.append(f"signalled launch exited {shell_status(code)}")
    if "Traceback" in log:
        diff.append("traceback")
    said = ("stage done" if "with the stage done (weights saved)" in log else
            "checkpointed" if "checkpoint saved, run the same command again" in log else "-")
    if said == "-":
        diff.append("no stop message")
    return {"fault": f"SIGTERM at stage {k} ({phase})", "exit": shell_status(code), "said": said,
            "rerun_exit": again.returncode, "differences": diff}


def digit_images(work: Path) -> list[tuple[Path, int]]:
    """sklearn's digits as 16x16 PNGs (made once per workdir): (path, digit)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits, folder = load_digits(), work / "digit-png"
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        path = folder / f"{i:04d}.png"
        if not path.exists():
            Image.fromarray((pixels * 255 / 16).astype("uint8")).resize((16, 16)).convert("RGB").save(path)
        out.append((path, int(label)))
    return out


WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def data_chain(data: dict, path: Path) -> Path:
    chain = copy.deepcopy(TINY_CHAIN)
    chain["stages"] = chain["stages"][:1]
    chain["stages"][0]["budget"] = {"epochs": 2}  # the first pass draws every sample, the damaged ones too
    chain["data"] = {**data, "classnames": WORDS, "templates": ["a handwritten {}."], "max_bad_fraction": 0.5}
    chain["eval"] = {"batch_size": 200}
    path.write_text(yaml.safe_dump(chain))
    return path


# A NUL byte is not among them: Python >= 3.11's csv module reads it as a character like any other.
CSV_DAMAGES = ("non-UTF-8 byte", "caption over 131072 characters", "missing field", "unbalanced quote")


def data_trial(kind: str, work: Path, out: Path, ranks: int, port: int, rng: random.Random, trial: int) -> dict:
    """One stage on damaged data: a shard cut short or with garbage inside (truncated-shard), or a CSV row
    damaged (bad-csv-row). The damage must be counted and named, and the stage must finish."""
    import webdataset

    images = digit_images(work)
    train, val = images[:1280], images[1280:1480]  # 40 batches of 32
    out.mkdir(parents=True)
    if kind == "truncated-shard":
        for name, rows, shards in (("train", train, 4), ("val", val, 1)):
            for s in range(shards):
                with webdataset.TarWriter(str(out / f"{name}-{s}.tar")) as w:
                    for i, (path, label) in enumerate(rows[s::shards]):
                        w.write({"__key__": f"{s}-{i:04d}", "png": path.read_bytes(), "txt": f"a handwritten "
                                 f"{WORDS[label]}.", "cls": str(label)})
        shard = out / f"train-{rng.randrange(4)}.tar"
        size = shard.stat().st_size
        at = rng.randrange(size // 4, size * 3 // 4)
        if trial % 2 == 0:
            with open(shard, "r+b") as f:
                f.truncate(at)
            fault, named = f"{shard.name} cut at byte {at} of {size}", f"{shard.name} (byte"
        else:
            with open(shard, "r+b") as f:
                f.seek(at)
                f.write(bytes(rng.randrange(256) for _ in range(1024)))
            fault, named = f"{shard.name}: 1024 bytes of garbage at byte {at}", f"{shard.name} (byte"
        chain = data_chain({"kind": "webdataset", "train": str(out / "train-{0..3}.tar"),
                            "val": str(out / "val-0.tar")}, out / "chain.yaml")
    else:
        lines = {}
        for name, rows in (("train", train), ("val", val)):
            lines[name] = ["filepath\ttitle\tlabel"] + [f"{path}\ta handwritten {WORDS[label]}.\t{label}"
                                                        for path, label in rows]
        row = rng.randrange(1, len(lines["train"]))
        damage = CSV_DAMAGES[trial % len(CSV_DAMAGES)]
        text = lines["train"][row]
        text = {"non-UTF-8 byte": lambda t: t.replace("handwritten", "handwr\udcffitten"),
                "caption over 131072 characters": lambda t: t.replace("handwritten", "x" * 140000),
                "missing field": lambda t: t.split("\t")[0],
                "unbalanced quote": lambda t: t.replace("\ta handwritten", '\t"a handwritten')}[damage](text)
        lines["train"][row] = text
        for name in ("train", "val"):
            (out / f"{name}.csv").write_bytes("\n".join(lines[name]).encode("utf-8", "surrogateescape") + b"\n")
        fault, named = f"train.csv row {row + 1}: {damage}", f"train.csv row {row + 1}"
        chain = data_chain({"kind": "csv", "train": str(out / "train.csv"), "val": str(out / "val.csv")},
                           out / "chain.yaml")
    done = subprocess.run(command(chain, out / "run", ranks, port), cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    diff = [] if done.returncode == 0 else [f"exited {done.returncode}: {done.stderr.strip().splitlines()[-1:]}"]
    counted = None
    if not diff:
        m = json.loads((out / "run" / "stages" / STAGES[0] / "metrics.json").read_text())
        counted = m["bad_samples"]["count"]
        examples = m["bad_samples"]["examples"]
        if not counted:
            diff.append("not counted")
        elif not any(named in e for e in examples):
            diff.append(f"not named ({examples[:2]})")
    if "Traceback" in done.stderr:
        diff.append("traceback")
    sizes = re.search(r"(\d+) train / \d+ val samples", done.stdout)
    return {"fault": fault, "exit": done.returncode, "bad_samples": counted,
            "train_samples": int(sizes.group(1)) if sizes else None, "differences": diff}


def statuses(out: Path) -> list[str]:
    try:
        return [s["status"] for s in json.loads((out / "manifest.json").read_text())["stages"]]
    except (OSError, ValueError):
        return ["no manifest"]


def same_as(out: Path, ref: Path, stages: list[str] = STAGES) -> list[str]:
    """Stages whose weights or loss curve differ from the reference run."""
    bad = []
    for stage in stages:
        got = load_file(str(out / "stages" / stage / "model.safetensors"))
        want = load_file(str(ref / "stages" / stage / "model.safetensors"))
        if got.keys() != want.keys() or not all(torch.equal(got[n], want[n]) for n in want):
            bad.append(f"{stage} weights")
        if (out / "stages" / stage / "loss.csv").read_text() != (ref / "stages" / stage / "loss.csv").read_text():
            bad.append(f"{stage} loss.csv")
    return bad


OTHER_KINDS = ("sigterm-eval", "sigterm-save", "truncated-shard", "bad-csv-row")


def other_kinds(args) -> int:
    """Trials of every kind in ``args.kinds`` but sigkill; results/faults-<name>.{json,md}."""
    work = REPO / args.workdir
    work.mkdir(parents=True, exist_ok=True)
    chain = work / "chain.yaml"
    chain.write_text(yaml.safe_dump(TINY_CHAIN))
    rng, port, trials, t_start = random.Random(args.seed), args.port, [], time.time()
    for kind in [k for k in args.kinds if k != "sigkill"]:
        for ranks in args.ranks:
            ref = work / f"reference-{ranks}"
            if kind.startswith("sigterm") and not (ref / "results.md").exists():
                if launch(chain, ref, ranks, port).wait() != 0:
                    print(f"reference run with {ranks} rank(s) failed", file=sys.stderr)
                    return 1
                port += 1
            for t in range(args.trials):
                out = work / f"{kind}-{ranks}-{t}"
                if out.exists():
                    subprocess.run(["rm", "-rf", str(out)], check=True)
                started = time.time()
                trial = (signal_trial(kind, work, ref, out, ranks, port, rng) if kind.startswith("sigterm")
                         else data_trial(kind, work, out, ranks, port, rng, t))
                port += 2
                trials.append({"kind": kind, "ranks": ranks, "trial": t, "seconds": round(time.time() - started),
                               **trial})
                print(f"{kind} ranks {ranks} trial {t}: {trials[-1]}", flush=True)
    ok = sum(not tr["differences"] for tr in trials)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    result = {"command": "python benchmarks/faults.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
              "commit": commit.stdout.strip() or None,
              "wall_seconds": round(time.time() - t_start), "trials": trials, "trials_as_expected": ok,
              "trials_total": len(trials)}
    res = REPO / "benchmarks" / "results"
    (res / f"faults-{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Signals in the evaluation and save, damaged data ({result['command']})", "",
             f"{len(trials)} trials, {ok} as expected. Expected: a SIGTERM to the run's process group during a "
             "stage's final evaluation or save: exit 143 (as a shell reports it), no traceback, the rank says where "
             "it stopped, and the rerun ends bit-identical to an uninterrupted run; damaged "
             "data is counted in bad_samples, named by shard and byte or by CSV row, and the stage finishes "
             f"(data.max_bad_fraction 0.5). Code at commit {result['commit']}; {os.cpu_count()} CPUs shared with "
             f"other work (timings noisy), {result['wall_seconds']} s.", "",
             "Data trials: 1280 training samples before the damage; `(train)` is what the loader indexed after it.",
             "", "| kind | ranks | trial | fault | exit | said / bad samples (train) | rerun | s | result |",
             "|---|---|---|---|---|---|---|---|---|"]
    for tr in trials:
        shown = tr["said"] if "said" in tr else f"{tr['bad_samples']} ({tr['train_samples']})"
        lines.append(f"| {tr['kind']} | {tr['ranks']} | {tr['trial']} | {tr['fault']} | {tr['exit']} | "
                     f"{shown} | {tr.get('rerun_exit', '-')} | {tr['seconds']} | "
                     f"{'as expected' if not tr['differences'] else ', '.join(map(str, tr['differences']))} |")
    (res / f"faults-{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if ok == len(trials) else 1


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
    p.add_argument("--kinds", nargs="+", default=["sigkill"], choices=["sigkill", *OTHER_KINDS],
                   help="fault kinds to try (default: sigkill)")
    args = p.parse_args()
    if args.kinds != ["sigkill"]:
        return other_kinds(args)

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
