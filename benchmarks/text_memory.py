"""Peak memory of compt's two text paths per byte of corpus: the in-memory path (every document and its
tokens on every rank, BPE trained per run) and the streamed one (a loader process packing blocks).

    python benchmarks/text_memory.py [--mib 4 16] [--seq-len 128] [--results benchmarks/results/text-memory]

Each measurement runs in a fresh process (peak RSS from getrusage, minus that of a process that only
imports the same modules), on a JSONL corpus of the given size made of pydoc's documentation topics,
repeated with a numbered prefix. IN_MEMORY_BYTES_PER_CORPUS_BYTE in compt/text/config.py comes from here.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CHILD = """
import json, resource, sys, time
from compt.text import TextDataConfig, build_text_datasets
what, corpus, run, seq_len = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
start = time.perf_counter()
if what == "in-memory":
    cfg = TextDataConfig(kind="jsonl", paths=[corpus], seq_len=seq_len, max_memory_bytes=2**62)
    data = build_text_datasets(cfg, run)
    blocks = len(data.train)
elif what == "streaming":
    cfg = TextDataConfig(kind="jsonl", paths=[corpus], seq_len=seq_len, streaming=True, val_documents=20,
                         tokenizer_path=run + "/given/tokenizer.json")
    data = build_text_datasets(cfg, run)
    stream = data.train.stage(global_batch=8, steps=10**9, rank=0, world=1, gas=1, seed=0, start_step=0, workers=0)
    blocks = 0
    for blocks, _ in enumerate(stream, start=1):
        if blocks * (seq_len + 1) * 4 >= 4 * 2**20:  # read well past the shuffle buffer
            break
print(json.dumps({"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "seconds": time.perf_counter() - start, "blocks": blocks}))
"""
BASELINE = "import resource, json; import compt.text, webdataset; from transformers import PreTrainedTokenizerFast; " \
           "print(json.dumps({'peak_rss': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))"


def write_corpus(path: Path, size: int) -> int:
    from compt.text import pydoc_documents

    docs, written, n = pydoc_documents(), 0, 0
    with open(path, "w", encoding="utf-8") as out:
        while written < size:
            line = json.dumps({"text": f"{n}: {docs[n % len(docs)]}"}) + "\n"
            out.write(line)
            written += len(line.encode("utf-8"))
            n += 1
    return written


def child(args: list[str]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", *args], capture_output=True, text=True, env=env, cwd=REPO)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mib", type=float, nargs="+", default=[8, 32])
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--paths", nargs="+", default=["in-memory", "streaming"])
    p.add_argument("--results", default=str(REPO / "benchmarks" / "results" / "text-memory"))
    a = p.parse_args()
    base = child([BASELINE])["peak_rss"]
    rows = []
    for mib in a.mib:
        with tempfile.TemporaryDirectory() as tmp:
            corpus = Path(tmp) / "corpus.jsonl"
            size = write_corpus(corpus, int(mib * 2**20))
            if "streaming" in a.paths:  # a given tokenizer, so that only the stream is measured
                from compt.text import pydoc_documents, train_tokenizer

                given = Path(tmp) / "run-streaming" / "given"
                given.mkdir(parents=True)
                train_tokenizer(pydoc_documents(), 4096).save(str(given / "tokenizer.json"))
            for what in a.paths:
                out = child([CHILD, what, str(corpus), str(Path(tmp) / f"run-{what}"), str(a.seq_len)])
                extra = out["peak_rss"] - base
                rows.append({"path": what, "corpus_bytes": size, "peak_rss": out["peak_rss"], "baseline_rss": base,
                             "extra_rss": extra, "extra_per_corpus_byte": round(extra / size, 2),
                             "seconds": round(out["seconds"], 1), "blocks": out["blocks"]})
                print(json.dumps(rows[-1]), flush=True)
    slopes = {}  # the extra memory each added corpus byte costs, between the smallest and largest corpus
    for what in a.paths:
        mine = sorted((r for r in rows if r["path"] == what), key=lambda r: r["corpus_bytes"])
        if len(mine) > 1:
            slopes[what] = round((mine[-1]["extra_rss"] - mine[0]["extra_rss"])
                                 / (mine[-1]["corpus_bytes"] - mine[0]["corpus_bytes"]), 2)
    record = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "machine": platform.platform(),
              "cpus": os.cpu_count(), "python": platform.python_version(),
              "when": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": rows, "bytes_per_added_corpus_byte": slopes,
              "note": "memory is per process; times are on a CPU shared with other work (noisy)"}
    Path(a.results).parent.mkdir(parents=True, exist_ok=True)
    Path(a.results + ".json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [f"# text memory ({record['when']}, {record['machine']}, {record['cpus']} CPUs)", "",
             f"`{record['command']}`; {record['note']}.", "",
             "| path | corpus MiB | extra peak RSS MiB | per corpus byte | seconds | blocks |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['path']} | {r['corpus_bytes'] / 2**20:.1f} | {r['extra_rss'] / 2**20:.0f} | "
              f"{r['extra_per_corpus_byte']} | {r['seconds']} | {r['blocks']} |" for r in rows]
    lines += ["", "Extra peak memory per added corpus byte: "
              + ", ".join(f"{k} {v}" for k, v in slopes.items()) + "."]
    Path(a.results + ".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
