"""benchmarks/throughput.py runs end to end (tiny settings) and reports what it measured."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

from conftest import REPO


def test_throughput_benchmark_writes_consistent_results(tmp_path):
    env = {**os.environ, "MASTER_PORT": "29731", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "benchmarks/throughput.py", "--batch", "16", "--steps", "2", "--warmup", "1",
           "--repeats", "1", "--results", str(tmp_path), "--profile", "5"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    # The DeepSpeed side ran compt's training loop: its log line (not a terminal, so no progress bar).
    assert re.search(r"throughput: step (\d+)/\1 loss", proc.stdout), proc.stdout[-2000:]

    out = tmp_path / "throughput-cpu{}-demo-base-b16-zero3".format(os.cpu_count())
    result = json.loads(out.with_suffix(".json").read_text())
    sps = result["samples_per_s"]
    for side in ("deepspeed", "plain"):
        assert len(result["seconds"][side]) == 1 and result["seconds"][side][0] > 0
        assert sps[side] == 2 * 16 / result["seconds"][side][0]
        assert result["achieved_tflops"][side] == sps[side] * result["train_flops_per_sample"] / 1e12
    assert result["ratio_deepspeed_over_plain"] == sps["deepspeed"] / sps["plain"]
    # demo-base: the 49408 x 128 text embedding is most of its 7.96M parameters
    assert 7.9e6 < result["params"] < 8.0e6
    assert result["train_flops_per_sample"] > 0
    md = out.with_suffix(".md").read_text()
    assert f"DeepSpeed / plain: {result['ratio_deepspeed_over_plain']:.3f}" in md
    assert "| deepspeed |" in md and "| plain |" in md
    prof = result["profile"]
    assert len(prof["top"]) == 5 and 0 < prof["deepspeed_python_share"] < 1 and prof["profiled_seconds"] > 0
    self_times = [r["self_s"] for r in prof["top"]]
    assert self_times == sorted(self_times, reverse=True) and all(r["calls"] > 0 for r in prof["top"])
    assert f"| `{prof['top'][0]['function']}` |" in md
