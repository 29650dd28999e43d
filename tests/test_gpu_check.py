"""benchmarks/gpu_check.py, the first GPU run's one command: its CPU dry run end to end (every part
through the same launchers and child processes as on a GPU, at toy sizes), a failing part recorded
while the others still run, and the GPU-only report pieces from a GPU-shaped result.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO

SCRIPT = REPO / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("compt_gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def results_listing():
    results = REPO / "benchmarks" / "results"
    return sorted(results.rglob("*")) if results.exists() else []


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One `python benchmarks/gpu_check.py --dry-run --out DIR`, as a user runs it."""
    out = tmp_path_factory.mktemp("gpu-check")
    before = results_listing()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    assert results_listing() == before  # a dry run writes only where --out says
    return out, proc.stdout


def test_dry_run_writes_the_json_md_and_log(dry_run):
    out, stdout = dry_run
    stem = f"gpu-cpu-dry-run-{os.cpu_count()}-cores"
    assert sorted(p.name for p in out.iterdir()) == [f"{stem}.json", f"{stem}.log", f"{stem}.md"]
    result = json.loads((out / f"{stem}.json").read_text())
    assert result["device"] == f"cpu dry run ({os.cpu_count()} cores)" and result["dry_run"] is True
    assert result["ok"] is True and result["errors"] == dict.fromkeys(result["parts"])
    assert list(result["parts"]) == ["chain", "throughput", "kernels:expansion", "kernels:distill", "kernels:loss"]
    assert "--dry-run" in result["command"]
    for key in ("torch", "triton", "deepspeed", "open_clip", "transformers", "python"):
        assert result["versions"][key], key
    assert result["preflight"]["missing"] == []
    timings = result["timings"]
    assert all(timings[f"{p}_s"] > 0 for p in result["parts"]) and timings["total_s"] >= sum(
        timings[f"{p}_s"] for p in result["parts"])
    assert all(result["budgets_s"][p] >= timings[f"{p}_s"] for p in result["parts"])
    # Progress lines as it went, each part's output in the log.
    assert "chain: start" in stdout and "kernels:loss: ok" in stdout and "done in" in stdout
    log = (out / f"{stem}.log").read_text()
    assert log.count("===== ") == 5 and "chain 'gpu-check-tiny' (1 rank(s))" in log


def test_dry_run_chain(dry_run):
    out, _ = dry_run
    chain = json.loads(next(out.glob("*.json")).read_text())["chain"]
    assert chain["ok"] is True and chain["returncode"] == 0 and not chain["timed_out"]
    assert chain["command"].startswith("deepspeed --num_gpus 1 --master_port ")
    assert chain["ds_config"]["bf16"] == {"enabled": False}  # on a GPU: True
    assert chain["ds_config"]["zero_optimization"]["stage"] == 3 and chain["manifest_bf16"] == {"enabled": False}
    assert [s["name"] for s in chain["stages"]] == ["a", "b", "c"]
    for s in chain["stages"]:
        assert s["status"] == "done" and s["steps"] == 4 and 0 <= s["zeroshot_top1"] <= 1 and s["wall_seconds"] > 0
    assert chain["vs_cpu"] is None and chain["wall_s"] > sum(s["wall_seconds"] for s in chain["stages"])


def test_dry_run_throughput(dry_run):
    out, _ = dry_run
    t = json.loads(next(out.glob("*.json")).read_text())["throughput"]
    assert t["ok"] is True and t["model"] == "tiny ViT (dry run)" and t["errors"] == {}
    sps = t["samples_per_s"]
    for side in ("compt", "plain"):
        assert len(t["seconds"][side]) == 1 and sps[side] == 2 * 8 / t["seconds"][side][0] > 0
    assert t["compt_vs_plain"] == sps["compt"] / sps["plain"] > 0
    assert t["train_flops_per_sample"] > 0 and t["params"] > 0
    assert t["mfu"] is None or (isinstance(t["mfu"], float) and math.isfinite(t["mfu"]))
    assert t["matmul_peak_tflops_bf16"] is None and t["mfu"] is None  # no bf16 peak measured on CPU


def test_dry_run_kernels(dry_run):
    out, _ = dry_run
    result = json.loads(next(out.glob("*.json")).read_text())
    kernels = result["kernels"]
    assert list(kernels) == ["expansion", "distill", "loss"]
    for mode, k in kernels.items():
        assert k["ok"] and k["returncode"] == 0 and "--device cpu" in k["command"], mode
        assert k["result"]["device"].startswith("cpu dry run")
    assert kernels["loss"]["summary"]["agreement_ok"] == "8/8"
    assert kernels["expansion"]["summary"]["bit_identical_everywhere"] is True
    assert kernels["distill"]["result"]["distill"]["rows"][0]["tokens"] == 13
    t = result["targets"]
    assert t["alignment_vs_eager"]["value"] == kernels["loss"]["result"]["targets"]["min_speedup_vs_eager"]
    assert t["compt_vs_plain"]["value"] == result["throughput"]["compt_vs_plain"]
    assert t["mfu"] == {"target": ">= 40% of the measured bf16 matmul peak", "value": None, "met": None}


def test_dry_run_markdown_names_the_device(dry_run):
    out, _ = dry_run
    md = next(out.glob("*.md")).read_text()
    assert md.startswith(f"# GPU check: cpu dry run ({os.cpu_count()} cores)\n") and "**Dry run on CPU**" in md
    for header in ("| part | ok | seconds | budget s | error |", "## Targets (issue 19)", "## (a) Chain",
                   "## (b) Throughput", "## (c) Kernels", "\n### Fused alignment loss", "\n### Fused weight expansion",
                   "\n### Fused linear KL distillation loss"):
        assert header in md, header
    assert "## Errors" not in md


# ---------------------------------------------------------------------------
# Failures are recorded and the other parts still run.
# ---------------------------------------------------------------------------

def test_a_failing_part_is_recorded_and_the_others_run(gpu_check, monkeypatch, tmp_path, capsys):
    calls = []

    def broken_chain(ctx, timeout):
        calls.append("chain")
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    def fake_throughput(ctx, timeout):
        calls.append("throughput")
        return {"ok": True, "compt_vs_plain": 0.95, "mfu": 0.41, "wall_s": 1.0}

    def fake_kernels(ctx, mode, timeout):
        calls.append(mode)
        return {"ok": True, "wall_s": 1.0, "summary": {}}

    monkeypatch.setattr(gpu_check, "part_chain", broken_chain)
    monkeypatch.setattr(gpu_check, "part_throughput", fake_throughput)
    monkeypatch.setattr(gpu_check, "part_kernels", fake_kernels)
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path), "--workdir", str(tmp_path / "work")]) == 1
    assert calls == ["chain", "throughput", "expansion", "distill", "loss"]
    result = json.loads(next(tmp_path.glob("gpu-*.json")).read_text())
    err = result["chain"]["error"]
    assert result["ok"] is False and result["chain"]["ok"] is False and result["errors"]["chain"] == err
    assert "RuntimeError: CUDA error: an illegal memory access" in err["message"]
    assert "Traceback (most recent call last)" in err["tail"] and "broken_chain" in err["tail"]
    assert result["throughput"]["ok"] and result["targets"]["compt_vs_plain"]["met"] is True
    assert result["targets"]["mfu"]["met"] is True and result["targets"]["chain_completes_bf16"]["met"] is False
    md = next(tmp_path.glob("gpu-*.md")).read_text()
    assert "## Errors" in md and "illegal memory access" in md
    assert "some part FAILED" in capsys.readouterr().out


def test_a_second_run_of_what_broke_merges_the_first(gpu_check, monkeypatch, tmp_path):
    chain_ok = {"value": False}

    def chain(ctx, timeout):
        if not chain_ok["value"]:
            raise RuntimeError("NCCL error")
        return {"ok": True, "wall_s": 2.0, "stages": [], "command": "c", "ds_config": {}, "chain": "demo"}

    monkeypatch.setattr(gpu_check, "part_chain", chain)
    monkeypatch.setattr(gpu_check, "part_throughput", lambda ctx, timeout: {"ok": True, "compt_vs_plain": 0.93,
                                                                            "mfu": 0.45, "wall_s": 1.0})
    monkeypatch.setattr(gpu_check, "part_kernels", lambda ctx, mode, timeout: {
        "ok": True, "wall_s": 1.0, "summary": {"min_speedup_vs_eager": 4.0, "fused_3x_eager_everywhere": True}})
    first, second = tmp_path / "first", tmp_path / "second"
    assert gpu_check.main(["--dry-run", "--out", str(first)]) == 1
    first_json = next(first.glob("gpu-*.json"))
    chain_ok["value"] = True
    monkeypatch.setattr(gpu_check, "part_throughput", None)  # not rerun: taken from the first run
    monkeypatch.setattr(gpu_check, "part_kernels", None)
    assert gpu_check.main(["--dry-run", "--out", str(second), "--parts", "chain", "--merge", str(first_json)]) == 0
    result = json.loads(next(second.glob("gpu-*.json")).read_text())
    assert result["ok"] is True and result["chain"]["ok"] is True and result["errors"]["chain"] is None
    assert list(result["parts"]) == ["throughput", "kernels:expansion", "kernels:distill", "kernels:loss", "chain"]
    assert result["throughput"]["compt_vs_plain"] == 0.93 and result["targets"]["mfu"]["met"] is True
    assert result["targets"]["alignment_vs_eager"]["value"] == 4.0
    assert result["merged_from"]["parts"] == ["throughput", "kernels:expansion", "kernels:distill", "kernels:loss"]
    assert "are from the earlier run of" in next(second.glob("gpu-*.md")).read_text()
    other = json.loads(first_json.read_text())
    other["device"] = "NVIDIA H200"
    (tmp_path / "h200.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="this device is"):
        gpu_check.main(["--dry-run", "--out", str(second), "--parts", "chain", "--merge", str(tmp_path / "h200.json")])


def test_child_process_failure_and_timeout(gpu_check, tmp_path):
    with open(tmp_path / "log", "w") as log:
        crash = gpu_check.run_logged("crash", [sys.executable, "-c", "print('step 1', flush=True); 1 / 0"],
                                     timeout=60, env=dict(os.environ), log=log)
        hang = gpu_check.run_logged("hang", [sys.executable, "-c", "import time; print('up', flush=True); "
                                             "time.sleep(60)"], timeout=2, env=dict(os.environ), log=log)
    assert crash["returncode"] == 1 and not crash["timed_out"]
    err = gpu_check.child_error(crash, "the part")
    assert err["message"] == "the part: exit code 1"
    assert err["tail"].startswith("step 1\nTraceback") and err["tail"].endswith("ZeroDivisionError: division by zero")
    assert hang["timed_out"] and hang["wall_s"] < 30 and hang["output"].startswith("up")
    assert gpu_check.child_error(hang, "x")["message"].startswith("x: timed out after")
    log = (tmp_path / "log").read_text()
    assert "===== crash" in log and "ZeroDivisionError" in log and "===== hang" in log


def test_failure_tail_keeps_the_traceback_and_drops_progress_bars(gpu_check):
    bars = "\r".join(f"stage 0: {i}%" for i in range(100))
    text = "\n".join(["noise"] * 500 + ["Traceback (most recent call last):"] + [f'  File "x.py", line {i}'
                                                                                 for i in range(80)]
                     + [bars, "ValueError: boom", "[launch] exits with return code = 1", ""])
    tail = gpu_check.failure_tail(text)
    assert tail.startswith("Traceback (most recent call last):") and tail.endswith("return code = 1")
    assert "stage 0: 99%" in tail and "stage 0: 98%" not in tail
    assert gpu_check.failure_tail("a\nb\n\nc") == "a\nb\nc"


# ---------------------------------------------------------------------------
# Small pieces, and the report of a GPU-shaped result (what only a GPU produces).
# ---------------------------------------------------------------------------

def test_arguments_and_budget(gpu_check):
    assert gpu_check.parse_args([]).part_list == list(gpu_check.PART_WEIGHTS)
    assert gpu_check.parse_args(["--parts", "kernels,chain"]).part_list == [
        "chain", "kernels:expansion", "kernels:distill", "kernels:loss"]
    assert gpu_check.parse_args(["--parts", "kernels:distill"]).part_list == ["kernels:distill"]
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--parts", "chain,gpu"])
    assert sum(gpu_check.PART_WEIGHTS.values()) == pytest.approx(1.0)
    import time

    now = time.monotonic()
    share = gpu_check.plan_timeout(now + 100, ["throughput", "kernels:loss"])
    assert share == pytest.approx(100 * 0.20 / 0.35, abs=0.5)


def test_table_peaks(gpu_check):
    assert gpu_check.table_peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert gpu_check.table_peak_tflops("NVIDIA H100 PCIe") == 756.5
    assert gpu_check.table_peak_tflops("NVIDIA H100 NVL") == 835.5
    assert gpu_check.table_peak_tflops("NVIDIA H200") == 989.4
    assert gpu_check.table_peak_tflops("cpu dry run (2 cores)") is None
    assert gpu_check.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def test_comparison_with_the_cpu_reference(gpu_check):
    ref = gpu_check.CPU_DEMO_REFERENCE
    stages = [{"name": "tiny", "zeroshot_top1": ref["top1"]["tiny"] - 0.02},
              {"name": "small", "zeroshot_top1": ref["top1"]["small"] + 0.01},
              {"name": "base", "zeroshot_top1": ref["top1"]["base"]}]
    verdict = gpu_check.compare_with_reference(stages, ref)
    assert verdict["within_tolerance"] is True and verdict["stages_compared"] == 3
    assert verdict["max_abs_diff"] == pytest.approx(0.02)
    assert stages[0]["cpu_top1"] == ref["top1"]["tiny"] and stages[0]["top1_minus_cpu"] == pytest.approx(-0.02)
    assert stages[2]["cpu_wall_seconds"] == ref["wall_seconds"]["base"]
    stages[1]["zeroshot_top1"] -= 0.05
    assert gpu_check.compare_with_reference(stages, ref)["within_tolerance"] is False
    unfinished = [dict(stages[0]), {"name": "small"}]  # the chain stopped in stage 1: not a match
    verdict = gpu_check.compare_with_reference(unfinished, ref)
    assert verdict["within_tolerance"] is False and verdict["stages_compared"] == 1
    assert gpu_check.compare_with_reference(stages, None) is None


def test_gpu_shaped_report(gpu_check, dry_run, tmp_path):
    out, _ = dry_run
    result = json.loads(next(out.glob("*.json")).read_text())
    gpu = copy.deepcopy(result)
    gpu.update(device="NVIDIA H100 80GB HBM3", dry_run=False)
    gpu["machine"].update(gpu={"name": "NVIDIA H100 80GB HBM3", "memory_gib": 79.2, "multiprocessors": 132,
                               "capability": "9.0", "bf16_supported": True}, driver="580.159.04")
    chain = gpu["chain"]
    chain.update(chain="demo", ds_config={**chain["ds_config"], "bf16": {"enabled": True}},
                 deepspeed_ops_load_s={"fused_adam": 41.2}, cpu_total_wall_s=225.5)
    for s, name in zip(chain["stages"], ("tiny", "small", "base")):
        s.update(name=name, zeroshot_top1=gpu_check.CPU_DEMO_REFERENCE["top1"][name] - 0.005)
    chain["vs_cpu"] = gpu_check.compare_with_reference(chain["stages"], gpu_check.CPU_DEMO_REFERENCE)
    t = gpu["throughput"]
    t.update(model="ViT-B-16", image_size=224, precision="bf16", matmul_peak_tflops_bf16=790.0,
             table_peak_tflops_bf16=989.4, samples_per_s={"compt": 900.0, "plain": 1000.0},
             achieved_tflops={"compt": 300.0, "plain": 333.3}, peak_memory_gib={"compt": 20.0, "plain": 25.0})
    t.update(compt_vs_plain=0.9, mfu_by_side={k: v / 790.0 for k, v in t["achieved_tflops"].items()},
             mfu_vs_table_peak={k: v / 989.4 for k, v in t["achieved_tflops"].items()})
    t.update(mfu=t["mfu_by_side"]["compt"], mfu_plain=t["mfu_by_side"]["plain"])
    stem = gpu_check.write_results(gpu, tmp_path)
    assert stem.name == "gpu-nvidia-h100-80gb-hbm3"
    md = stem.with_suffix(".md").read_text()
    assert md.startswith("# GPU check: NVIDIA H100 80GB HBM3\n") and "Dry run" not in md
    assert "GPU: NVIDIA H100 80GB HBM3, 79.2 GiB, 132 SMs, compute capability 9.0, driver 580.159.04." in md
    assert "| tiny | done | 96.2% | 96.7% | -0.5 |" in md and "(the CPU run: 226 s)" in md
    assert "within: True" in md and "{'fused_adam': 41.2}" in md
    assert "| compt stage loop (DeepSpeed ZeRO-3) | 900.0 | 300 | 38.0% | 30.3% | 20.0 |" in md
    assert "measured 790 TFLOP/s, data sheet 989" in md
    targets = json.loads(stem.with_suffix(".json").read_text())["targets"]
    assert targets["chain_quality_matches_cpu"]["met"] is True and targets["mfu"]["met"] is False
    assert targets["compt_vs_plain"]["met"] is True


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here: the script would run for real")
def test_without_cuda_and_without_dry_run_it_writes_nothing(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "out")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no CUDA device here" in proc.stdout
    assert not (tmp_path / "out").exists()
