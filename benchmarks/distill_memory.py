"""Peak memory of the LM distillation loss on CPU: naive (full logits) vs chunked (compt.kernels).

    python benchmarks/distill_memory.py [--tokens 8192] [--vocab 32000] [--hidden 512]

Each variant runs forward + backward once in a fresh process; the figure is the growth of
the process's peak RSS over its RSS just before the call (inputs already allocated), so it
counts what the loss itself allocates. The chunked path here is the PyTorch backend of
``fused_linear_kl`` (the same chunking as the Triton kernel, whose GPU figures come from
``benchmarks/kernel_bench.py --distill``). Writes benchmarks/results/distill-memory-cpu.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time, torch
from compt.kernels import distill_kl_reference, fused_linear_kl
variant, n, v, d = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(0)
hs = torch.randn(n, d, requires_grad=True)
ws = (torch.randn(v, d) * d ** -0.5).requires_grad_()
ht, wt = torch.randn(n, d), torch.randn(v, d) * d ** -0.5
def rss_mib():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024
before = rss_mib()
t0 = time.perf_counter()
if variant == "naive":
    loss = distill_kl_reference(hs, ws, ht, wt, temperature=2.0)
else:
    loss = fused_linear_kl(hs, ws, ht, wt, temperature=2.0, backend="torch")
loss.backward()
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"variant": variant, "loss": loss.item(), "peak_over_inputs_mib": peak - before,
                  "seconds": seconds, "grad_norm": ws.grad.norm().item()}))
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=512)
    args = p.parse_args()
    rows = []
    for variant in ("naive", "chunked"):
        out = subprocess.run([sys.executable, "-c", CHILD, variant, str(args.tokens), str(args.vocab),
                              str(args.hidden)], capture_output=True, text=True, cwd=REPO)
        if out.returncode != 0:
            print(out.stderr[-3000:], file=sys.stderr)
            return 1
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    naive, chunked = rows
    ratio = chunked["peak_over_inputs_mib"] / naive["peak_over_inputs_mib"]
    result = {"command": "python benchmarks/distill_memory.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
              "shape": {"tokens": args.tokens, "vocab": args.vocab, "hidden": args.hidden, "dtype": "float32"},
              "runs": rows, "chunked_over_naive_peak": ratio,
              "loss_rel_diff": abs(chunked["loss"] - naive["loss"]) / abs(naive["loss"]),
              "date": time.strftime("%Y-%m-%d")}
    res = REPO / "benchmarks" / "results" / "distill-memory-cpu"
    res.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    md = [f"# LM distillation loss, peak memory on CPU ({result['command']})", "",
          f"{args.tokens} tokens, vocab {args.vocab}, hidden {args.hidden}, float32, forward + backward, "
          f"{os.cpu_count()} CPUs. Peak RSS growth over the inputs.", "",
          "| variant | peak MiB | seconds | loss |", "|---|---|---|---|"]
    md += [f"| {r['variant']} | {r['peak_over_inputs_mib']:.0f} | {r['seconds']:.1f} | {r['loss']:.6f} |" for r in rows]
    md += ["", f"chunked / naive peak: **{ratio:.1%}** (target <= 30%); loss relative difference "
               f"{result['loss_rel_diff']:.1e}."]
    res.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
