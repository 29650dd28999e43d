"""Streamed webdataset throughput: compt's training loader against open_clip_train's own webdataset pipeline.

    python benchmarks/data_throughput.py [--quick] [--json] [--workers 2] [--out cpu]

Both read the same synthetic JPEG shards (generated under --tmp), with the same image transform and tokenizer
(open_clip's, for a model of --image-size pixels), the same loader workers and the same 5000-sample shuffle
buffer, in one process, alternating rounds: decoded and augmented samples per second per rank (one rank here),
from local shards and from a loopback HTTP server (http.server in a thread; both pipelines fetch with curl
through webdataset's gopen). Also start-up (building the training set and loader, up to the first batch) for
10 vs 1,000 small local shards: compt streamed (no shard read before the first) and compt map-style (indexes
every shard first). ``--quick --json`` prints one JSON line with ``compt_samples_per_s`` and
``open_clip_samples_per_s``; ``--out NAME`` writes benchmarks/results/data-throughput-NAME.{json,md}.
"""
from __future__ import annotations

import argparse
import functools
import io
import json
import os
import platform
import shutil
import statistics
import sys
import tarfile
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from compt.clip.loader import train_loader
from compt.clip.model import preprocess_for
from compt.data import DataConfig, build_dataset
from compt.loading import loader_options

REPO = Path(__file__).resolve().parents[1]
OPEN_CLIP_NOTE = ("Note: open_clip_train 3.3.0's `group_by_keys_nothrow` fails (KeyError 'fname') on the "
                  "end-of-shard marker that webdataset 1.0.2 yields; its pipeline runs here with its own "
                  "`tarfile_to_samples_nothrow` and that marker off, as with the webdataset it was written against.")
SHUFFLE = 5000  # open_clip_train's sample shuffle buffer (_SAMPLE_SHUFFLE_SIZE); compt's default too


def write_shards(root: Path, shards: int, per: int, size: int, fmt: str = "jpg") -> str:
    """``shards`` tar shards of ``per`` samples (a smooth random image of size x size, a caption, a label);
    returns the brace pattern. One shard is written and copied: the content is what a reader decodes anyway."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(0)
    first = root / "train-000000.tar"
    with tarfile.open(first, "w") as tar:
        for i in range(per):
            small = rng.randint(0, 256, (8, 8, 3), dtype=np.uint8)
            image = Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC)
            buf = io.BytesIO()
            image.save(buf, format="JPEG" if fmt == "jpg" else "PNG", quality=90)
            for ext, data in ((fmt, buf.getvalue()), ("txt", f"a photo of thing {i}".encode()),
                              ("cls", str(i % 10).encode())):
                info = tarfile.TarInfo(f"{i:08d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    for s in range(1, shards):
        shutil.copyfile(first, root / f"train-{s:06d}.tar")
    return str(root / f"train-{{000000..{shards - 1:06d}}}.tar")


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def serve(root: Path) -> tuple[ThreadingHTTPServer, str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}"


def rate(batches, count, warmup: int, measured: int) -> float:
    """Samples/s over ``measured`` batches after ``warmup`` (worker start-up, buffer fill)."""
    it = iter(batches)
    for _ in range(warmup):
        next(it)
    start, n = time.perf_counter(), 0
    for _ in range(measured):
        n += count(next(it))
    return n / (time.perf_counter() - start)


def compt_rate(spec: str, pre, args) -> float:
    cfg = DataConfig(kind="webdataset", train=spec, val=spec, streaming=True, shuffle_buffer=SHUFFLE,
                     workers=args.workers)
    feed = train_loader(build_dataset(cfg, "train"), pre, None, global_batch=args.batch,
                        steps=args.warmup + args.batches, rank=0, world=1, gas=1, seed=0,
                        **loader_options(cfg, "cpu"))
    return rate(feed, lambda b: len(b.captions), args.warmup, args.batches)


def _open_clip_compatible() -> None:
    """open_clip_train 3.3's group_by_keys_nothrow fails (KeyError 'fname') on the end-of-shard marker ``{}``
    that webdataset 1.x's tar_file_expander yields; its own tarfile_to_samples_nothrow, with the marker off
    (what the webdataset it was written against did), is what it runs here."""
    import open_clip_train.data as oc
    from webdataset.tariterators import tar_file_expander, url_opener

    def tarfile_to_samples_nothrow(src, handler=oc.log_and_continue):
        streams = url_opener(src, handler=handler)
        files = tar_file_expander(streams, handler=handler, eof_value=None)
        return oc.group_by_keys_nothrow(files, handler=handler)

    oc.tarfile_to_samples_nothrow = tarfile_to_samples_nothrow


def open_clip_rate(spec: str, pre, args) -> float:
    from open_clip_train.data import get_wds_dataset

    _open_clip_compatible()

    need = (args.warmup + args.batches) * args.batch
    ns = SimpleNamespace(train_data=spec, val_data=None, dataset_resampled=False, train_num_samples=2 * need,
                         train_data_upsampling_factors=None, seed=0, batch_size=args.batch, workers=args.workers,
                         world_size=1)
    info = get_wds_dataset(ns, pre.train_transform, is_train=True, tokenizer=pre.tokenizer)
    return rate(info.dataloader, lambda b: len(b[0]), args.warmup, args.batches)


def startup(spec: str, pre, streaming: bool, workers: int) -> float:
    """Seconds from the data config to the first training batch."""
    start = time.perf_counter()
    cfg = DataConfig(kind="webdataset", train=spec, val=spec, streaming=streaming, shuffle_buffer=0, workers=workers)
    feed = train_loader(build_dataset(cfg, "train"), pre, None, global_batch=4, steps=1, rank=0, world=1, gas=1,
                        seed=0, **loader_options(cfg, "cpu"))
    next(iter(feed))
    return time.perf_counter() - start


def machine() -> dict:
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count(), "load_avg_1min_at_end": load}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one round, fewer batches, no start-up measurement")
    ap.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
    ap.add_argument("--workers", type=int, default=2, help="loader workers, both pipelines (default 2)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--image-size", type=int, default=224, help="the model's input size (transforms)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per pipeline (median reported)")
    ap.add_argument("--tmp", default="/tmp/compt-data-throughput", help="where the synthetic shards go")
    ap.add_argument("--out", default=None, help="write benchmarks/results/data-throughput-OUT.{json,md}")
    args = ap.parse_args()
    args.warmup, args.batches = (2, 10) if args.quick else (4, 30)
    rounds = 1 if args.quick else args.rounds
    torch.set_num_threads(1)  # the workers do the work; as open_clip_train's loader processes

    tmp = Path(args.tmp)
    shutil.rmtree(tmp, ignore_errors=True)
    shard_count = max(8, 2 * args.workers)
    spec = write_shards(tmp / "jpg", shard_count, 256, 256)
    model = {"embed_dim": 32, "vision_cfg": {"image_size": args.image_size, "patch_size": 16, "width": 32,
                                             "layers": 1, "head_width": 16},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    pre = preprocess_for(model)
    httpd, url = serve(tmp / "jpg")
    remote = url + "/" + Path(spec).name
    runs: dict[str, list[float]] = {k: [] for k in ("compt", "open_clip", "compt_http", "open_clip_http")}
    for _ in range(rounds):
        runs["compt"].append(compt_rate(spec, pre, args))
        runs["open_clip"].append(open_clip_rate(spec, pre, args))
        runs["compt_http"].append(compt_rate(remote, pre, args))
        runs["open_clip_http"].append(open_clip_rate(remote, pre, args))
    httpd.shutdown()
    med = {k: statistics.median(v) for k, v in runs.items()}
    result = {"compt_samples_per_s": med["compt"], "open_clip_samples_per_s": med["open_clip"],
              "compt_http_samples_per_s": med["compt_http"], "open_clip_http_samples_per_s": med["open_clip_http"],
              "rounds": runs, "workers": args.workers, "batch": args.batch, "image_size": args.image_size,
              "shards": shard_count, "samples_per_shard": 256, "shuffle_buffer": SHUFFLE}
    if not args.quick:
        result["startup_seconds"] = {}
        for n in (10, 1000):
            small = write_shards(tmp / f"small-{n}", n, 10, 32, fmt="png")
            result["startup_seconds"][str(n)] = {
                "streamed": statistics.median(startup(small, pre, True, args.workers) for _ in range(3)),
                "map_style": statistics.median(startup(small, pre, False, args.workers) for _ in range(3))}
    result["machine"] = machine()
    result["command"] = "python benchmarks/data_throughput.py " + " ".join(sys.argv[1:])
    shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps(result))
    else:
        print(markdown(result))
    if args.out:
        out = REPO / "benchmarks" / "results" / f"data-throughput-{args.out}"
        out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
        out.with_suffix(".md").write_text(markdown(result))
    return 0


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = ["# Streamed webdataset throughput: compt vs open_clip_train", "",
             f"Command: `{r['command']}`", "",
             f"Machine: {m['platform']}, {m['cpus']} CPU(s), python {m['python']}, torch {m['torch']}; 1-min load "
             f"average at the end {m['load_avg_1min_at_end']}. The CPUs were shared with other work: figures are "
             "noisy, compare the two pipelines within a round.", "",
             f"Decoded and augmented samples/s per rank (1 rank, {r['workers']} loader workers each, batch "
             f"{r['batch']}, {r['image_size']}px open_clip train transform, {r['shards']} shards x "
             f"{r['samples_per_shard']} 256px JPEGs, shuffle buffer {r['shuffle_buffer']}); median of "
             f"{len(r['rounds']['compt'])} alternating round(s):", "",
             "| source | compt | open_clip_train | compt / open_clip |", "| --- | --- | --- | --- |"]
    notes = ["", OPEN_CLIP_NOTE]
    for label, key in (("local shards", ""), ("loopback HTTP", "_http")):
        c, o = r[f"compt{key}_samples_per_s"], r[f"open_clip{key}_samples_per_s"]
        lines.append(f"| {label} | {c:.1f} | {o:.1f} | {c / o:.2f} |")
    lines += ["", "Rounds (samples/s): " + "; ".join(f"{k} {', '.join(f'{x:.1f}' for x in v)}"
                                                    for k, v in r["rounds"].items())]
    if "startup_seconds" in r:
        lines += ["", "Start-up, data config to first training batch (seconds, median of 3; 10 samples per shard):",
                  "", "| shards | compt streamed | compt map-style (indexes every shard) |", "| --- | --- | --- |"]
        for n, s in r["startup_seconds"].items():
            lines.append(f"| {n} | {s['streamed']:.2f} | {s['map_style']:.2f} |")
    return "\n".join(lines + notes) + "\n"


if __name__ == "__main__":
    sys.exit(main())
