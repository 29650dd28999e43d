"""Run launch/chain.py in this process with faults injected (a helper of tests/test_faults.py).

    python tests/_fault_job.py [--nan-calls 3,5] [--fsize-limit RANK:BYTES] -- <launch/chain.py arguments>
    deepspeed --num_gpus 2 tests/_fault_job.py ... -- ...      (several ranks)

--nan-calls: the loss of these calls (1-based, counted per stage) is made NaN, as a
diverging model or a poisoned batch would.
--fsize-limit: on that rank only, no file may grow beyond BYTES (RLIMIT_FSIZE), as a full
disk on one node would.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import resource
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

split = sys.argv.index("--")
opts = argparse.ArgumentParser()
opts.add_argument("--nan-calls", default="")
opts.add_argument("--fsize-limit", default="")
opts.add_argument("--local_rank", default=None)  # set by the deepspeed launcher; the rank comes from the env
args = opts.parse_args(sys.argv[1:split])
nan_calls = {int(c) for c in args.nan_calls.split(",") if c}

if args.fsize_limit:
    rank, limit = (int(x) for x in args.fsize_limit.split(":"))
    if int(os.environ.get("RANK", "0")) == rank:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

if nan_calls:
    import compt.clip.family

    class PoisonedLoss(compt.clip.family.ChainLoss):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.calls = 0

        def __call__(self, *a, **k):
            parts = super().__call__(*a, **k)
            self.calls += 1
            if self.calls in nan_calls:
                parts.total = parts.total * float("nan")
            return parts

    compt.clip.family.ChainLoss = PoisonedLoss

spec = importlib.util.spec_from_file_location("chain_launcher", REPO / "launch" / "chain.py")
chain = importlib.util.module_from_spec(spec)
spec.loader.exec_module(chain)
sys.argv = ["launch/chain.py", *sys.argv[split + 1:]]
try:
    code = chain.main()
finally:
    chain.shutdown()
sys.exit(code)
