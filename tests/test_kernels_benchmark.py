"""benchmarks/kernel_bench.py's own logic (argument handling, agreement checks, result dicts,
JSON and markdown) in a CPU dry run (``--device cpu``): the Triton kernels run in Triton's
interpreter at tiny shapes, so the first run on a GPU does not end on a bug in the script.
The numbers measured here mean nothing; what they are computed from and written as does.
"""
import os

# As in the kernel tests: compt's kernels are decorated at first launch, so this only has
# to be set before that (the dry run sets it too).
os.environ["TRITON_INTERPRET"] = "1"

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO

SCRIPT = REPO / "benchmarks" / "kernel_bench.py"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bench():
    """benchmarks/kernel_bench.py as a module (not under the name ``kernels``: see setup.py)."""
    spec = importlib.util.spec_from_file_location("compt_kernels_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def cpu(bench, monkeypatch):
    """The benchmark module with DEVICE = "cpu" (main sets it from --device; restored after)."""
    monkeypatch.setattr(bench, "DEVICE", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return bench


def clip_cfg(width, layers=1, embed=16, ctx=8, vocab=50):
    return {
        "embed_dim": embed,
        "vision_cfg": {"image_size": 16, "patch_size": 8, "width": width, "layers": layers, "head_width": 16},
        "text_cfg": {"context_length": ctx, "vocab_size": vocab, "width": width, "heads": width // 16,
                     "layers": layers},
    }


def write_cfg(path: Path, cfg: dict) -> str:
    path.write_text(json.dumps(cfg))
    return str(path)


def outputs(folder: Path, prefix: str) -> tuple[dict, str]:
    """The one JSON and markdown pair the run wrote, and nothing else."""
    files = sorted(p.name for p in folder.iterdir())
    assert len(files) == 2 and all(f.startswith(prefix + "-cpu-dry-run") for f in files), files
    json_file = next(folder.glob(f"{prefix}-*.json"))
    md_file = json_file.with_suffix(".md")
    assert md_file.exists()
    return json.loads(json_file.read_text()), md_file.read_text()


def table(md: str, header_start: str) -> list[list[str]]:
    """Cells of the markdown table whose header line starts with ``header_start``."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    assert lines[start + 1].startswith("|---")
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def finite_positive(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


# ---------------------------------------------------------------------------
# Without CUDA, arguments.
# ---------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here: the script would benchmark")
def test_without_cuda_prints_a_message_exits_0_and_writes_nothing(tmp_path):
    results = REPO / "benchmarks" / "results"
    before = sorted(results.rglob("*")) if results.exists() else []
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    for extra in ([], ["--distill"]):
        done = subprocess.run([sys.executable, str(SCRIPT), "--results", str(tmp_path / "out"), *extra],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "no CUDA device here" in done.stdout and "nothing written" in done.stdout
    assert not (tmp_path / "out").exists()
    assert (sorted(results.rglob("*")) if results.exists() else []) == before


def test_arguments(bench):
    args = bench.parse_args([])
    assert (args.device, args.batches, args.dims, args.captions) == ("cuda", [1024, 4096, 16384, 32768],
                                                                     [512, 768, 1024], [1, 7])
    assert args.results == str(REPO / "benchmarks" / "results")
    assert args.expansion_models == ["ViT-B-16", "ViT-L-16"] and args.step_model == "ViT-B-16"
    quick = bench.parse_args(["--quick", "--captions", "7"])
    assert (quick.batches, quick.dims, quick.captions) == ([1024, 16384], [512], [7])
    assert bench.parse_args(["--distill-dims", "16:16", "24:40"]).distill_dims == ["16:16", "24:40"]
    for bad in (["--device", "tpu"], ["--distill-dims", "1024"], ["--distill-dims", "16:16", "0:8"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)
    # The GPU agreement cases are the documented ones; the dry run's cover a non-power-of-two
    # batch, 1 and 7 captions and a projection.
    assert bench.AGREEMENT_CASES[-1] == (33, 7, 512, 768)
    dry = bench.DRY_RUN_AGREEMENT_CASES
    assert {c[1] for c in dry} == {1, 7} and any(c[3] for c in dry)
    assert any(b & (b - 1) for b, *_ in dry)
    assert (args.head, args.head_alpha, args.head_impls) == (False, 1.0, ["naive", "fused", "torch-chunked", "liger"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--head-impls", "eager"])
    # The head's rows: each pair with its teacher, then each student dim alone (a stage without one).
    assert bench.head_cases(["1024:1024", "2048:2048", "1024:2048"]) == [
        (1024, 1024), (2048, 2048), (1024, 2048), (1024, None), (2048, None)]
    # Its GPU agreement cases hold a teacher at T=1 and T!=1, padding, and the cross-entropy alone.
    cases = bench.HEAD_AGREEMENT_CASES
    assert any(c[2] is None for c in cases) and {c[4] for c in cases if c[2]} == {1.0, 2.0} and any(c[5] for c in cases)


# ---------------------------------------------------------------------------
# The loss grid (default mode) and its agreement check.
# ---------------------------------------------------------------------------

def test_loss_grid_dry_run(cpu, tmp_path, capsys):
    argv = ["--device", "cpu", "--batches", "5", "8", "--dims", "24", "--captions", "1", "7", "--proj-from", "16",
            "--reps", "2", "--warmup", "1", "--results", str(tmp_path)]
    assert cpu.main(argv) == 0
    out = capsys.readouterr().out
    result, md = outputs(tmp_path, "kernels")

    # Agreement: every dry-run case, fp32 and bf16, fused vs reference within the script's tolerances.
    agreement = result["agreement"]
    n_cases = 2 * len(cpu.DRY_RUN_AGREEMENT_CASES)
    assert len(agreement) == n_cases
    assert f"agreement fused vs reference: {n_cases}/{n_cases} ok" in out and "DISAGREES" not in out
    for r in agreement:
        assert r["tolerance"] == {"float32": 1e-5, "bfloat16": 1e-2}[r["dtype"]]
        assert len(r["rel_err"]) == (4 if r["student_dim"] else 3)  # loss, d image, d text (, d proj)
        assert r["ok"] and all(math.isfinite(e) and 0 <= e <= r["tolerance"] for e in r["rel_err"])
    assert {(r["batch"], r["captions"], r["dim"], r["student_dim"]) for r in agreement} == set(
        cpu.DRY_RUN_AGREEMENT_CASES)

    # The grid: every (proj, captions, dim, batch), three implementations, finite times.
    rows = result["rows"]
    assert [(r["batch"], r["captions"], r["dim"], r["student_dim"]) for r in rows] == [
        (b, c, 24, s) for s in (None, 16) for c in (1, 7) for b in (5, 8)]  # the script's loop order
    for r in rows:
        for name in cpu.IMPLS:
            m = r[name]
            assert set(m) == {"fwd_ms", "fwd_bwd_ms"}  # no memory statistics on CPU
            assert finite_positive(m["fwd_ms"]) and finite_positive(m["fwd_bwd_ms"])
        for other in ("eager", "compile"):
            assert r[f"speedup_vs_{other}"] == pytest.approx(r[other]["fwd_bwd_ms"] / r["fused"]["fwd_bwd_ms"])
    t = result["targets"]
    assert t["min_speedup_vs_eager"] == min(r["speedup_vs_eager"] for r in rows)
    assert t["min_speedup_vs_compile"] == min(r["speedup_vs_compile"] for r in rows)
    assert t["fused_3x_eager_everywhere"] == (t["min_speedup_vs_eager"] >= 3.0)
    assert t["fused_not_slower_than_compile_everywhere"] == (t["min_speedup_vs_compile"] >= 1.0)
    assert (result["dtype"], result["alpha"], result["reps"], result["warmup"]) == ("bf16", 500.0, 2, 1)
    assert result["device"].startswith("cpu dry run") and "--proj-from 16" in result["command"]
    assert "loss_share" not in result

    # Markdown: one table row per grid row, same numbers, memory "-" on CPU.
    cells = table(md, "| B | C | D | proj |")
    assert len(cells) == len(rows)
    for r, c in zip(rows, cells):
        assert c[:4] == [str(r["batch"]), str(r["captions"]), "24", str(r["student_dim"] or "-")]
        assert [float(x) for x in c[4:7]] == pytest.approx([r[n]["fwd_bwd_ms"] for n in cpu.IMPLS], abs=6e-4)
        assert c[9:] == ["-", "-", "-"]
    assert f"{n_cases}/{n_cases} cases within tolerance" in md
    assert out.count(" | fused ") == len(rows) and "wrote" in out


def test_agreement_check_catches_a_wrong_kernel(cpu, monkeypatch):
    """The check is not a tautology: a fused loss off by 1e-3 fails fp32 (1e-5), passes bf16 (1e-2)."""
    import compt.kernels

    fused = compt.kernels.feature_alignment_loss
    monkeypatch.setattr(compt.kernels, "feature_alignment_loss", lambda *a, **k: fused(*a, **k) * 1.001)
    rows = cpu.check_agreement(cases=[(3, 7, 20, None)])
    assert [(r["dtype"], r["ok"]) for r in rows] == [("float32", False), ("bfloat16", True)]
    assert rows[0]["rel_err"][0] == pytest.approx(1e-3, rel=1e-3)


# ---------------------------------------------------------------------------
# --loss-share with a tiny open_clip model (the real step and the FLOPs bound).
# ---------------------------------------------------------------------------

def test_loss_share_dry_run(cpu, tmp_path):
    from compt.clip.flops import count_sample_flops

    cfg = clip_cfg(32, embed=32, ctx=8, vocab=60)
    model = write_cfg(tmp_path / "tiny-clip.json", cfg)
    out = tmp_path / "out"
    argv = ["--device", "cpu", "--batches", "4", "--dims", "32", "--captions", "1", "7", "--no-compile",
            "--skip-check", "--loss-share", "--step-batch", "3", "--step-model", model, "--reps", "2",
            "--warmup", "1", "--results", str(out)]
    assert cpu.main(argv) == 0
    result, md = outputs(out, "kernels")
    assert "agreement" not in result
    assert all("compile" not in r and "speedup_vs_compile" not in r for r in result["rows"])
    assert result["targets"]["min_speedup_vs_compile"] is None
    assert result["targets"]["fused_not_slower_than_compile_everywhere"] is False

    ls = result["loss_share"]
    assert (ls["model"], ls["per_gpu_batch"]) == (model, 3) and finite_positive(ls["matmul_bf16_tflops"])
    assert [r["captions"] for r in ls["rows"]] == [1, 7]
    for r in ls["rows"]:
        train = count_sample_flops(cfg, r["captions"]).train
        assert r["train_flops_per_sample"] == train > 0
        assert r["step_ms_flops_bound"] == pytest.approx(train * 3 / (ls["matmul_bf16_tflops"] * 1e12) * 1e3)
        assert set(r["loss_fwd_bwd_ms"]) == {"fused", "eager"}
        assert "real_step_error" not in r and finite_positive(r["real_step_ms"])
        for key, step in (("share_of_flops_bound_step", r["step_ms_flops_bound"]),
                          ("share_of_real_step", r["real_step_ms"])):
            assert set(r[key]) == {"fused", "eager"}
            for name, share in r[key].items():
                loss = r["loss_fwd_bwd_ms"][name]
                assert 0 < share < 1 and share == pytest.approx(loss / (step + loss))
    cells = table(md, "| C | step ms (FLOPs bound) |")
    assert [c[0] for c in cells] == ["1", "7"]
    assert all(c[2] == f"{r['real_step_ms']:.1f}" for c, r in zip(cells, ls["rows"]))


# ---------------------------------------------------------------------------
# --expansion on a tiny teacher/student pair.
# ---------------------------------------------------------------------------

def test_expansion_dry_run(cpu, tmp_path):
    from compt.clip.grow import plan_tensor, state_shapes

    small, big = clip_cfg(16, embed=16, ctx=8, vocab=50), clip_cfg(32, embed=24, ctx=8, vocab=60)
    models = [write_cfg(tmp_path / "teacher.json", small), write_cfg(tmp_path / "student.json", big)]
    out = tmp_path / "out"
    argv = ["--device", "cpu", "--expansion", "--expansion-models", *models, "--reps", "1",
            "--expansion-ref-reps", "1", "--expansion-ranks", "2", "--bandwidth-gib", "0.01", "--results", str(out)]
    assert cpu.main(argv) == 0
    result, md = outputs(out, "expansion")
    assert not {"dtype", "alpha", "warmup"} & set(result)
    ex = result["expansion"]
    assert (ex["teacher"], ex["student"]) == ("teacher", "student")
    assert ex["configs"] == {"teacher": small, "student": big}
    bw = ex["bandwidth"]
    assert finite_positive(bw["clone_gbs"]) and bw["limit_gbs"] == max(bw["clone_gbs"], bw["copy__gbs"])

    assert [(r["mode"], r["noise"]) for r in ex["rows"]] == list(cpu.EXPANSION_CASES)
    for r in ex["rows"]:
        plans = [p for p in (plan_tensor(n, small, big, r["mode"], r["noise"], 0) for n in state_shapes(big))
                 if p is not None and p.axes]
        assert (r["tensors"], r["elements"]) == (len(plans), sum(p.numel for p in plans)) and r["tensors"] > 10
        assert r["bit_identical"] is True and r["mismatched"] == []
        assert r["kernel_device_ms"] is None and r["kernel_parts_device_ms"] is None  # no profiler on CPU
        assert r["launch_sweep"] == []
        for key in ("kernel_wall", "end_to_end_wall", "reference_wall"):
            ms = r[f"{key}_ms"]
            assert finite_positive(ms) and r[f"{key}_gbs"] == pytest.approx(r["useful_bytes"] / (ms * 1e-3) / 1e9)
        assert r["x_of_bandwidth_limit"] == pytest.approx(bw["limit_gbs"] / r["kernel_wall_gbs"])
        biggest = sorted((p.numel for p in plans), reverse=True)[:3]
        assert [math.prod(t["shape"]) for t in r["largest"]] == biggest
        assert all(finite_positive(t["kernel_ms"]) and finite_positive(t["reference_gbs"]) for t in r["largest"])
    assert ex["bit_identical_everywhere"] is True
    assert ex["target_within_2x_of_bandwidth"] == all(r["x_of_bandwidth_limit"] <= 2 for r in ex["rows"])

    cells = table(md, "| mode | noise | GB |")
    assert [(c[0], float(c[1]), c[-1]) for c in cells] == [(m, n, "True") for m, n in cpu.EXPANSION_CASES]
    assert all(c[3] == c[4] == "-" for c in cells)  # no device times on CPU
    assert len(table(md, "| mode | noise | tensor |")) == 3 * len(cpu.EXPANSION_CASES)
    assert "teacher -> student" in md and "(every tensor, and ZeRO-3 partitions of 8): True." in md


def test_expansion_reports_a_kernel_that_differs(cpu, monkeypatch):
    """One ulp off in one element of one tensor: the bit-identity check names it, whole and per partition."""
    from compt.clip.grow import plan_tensor, state_shapes
    from compt.kernels import expansion_triton

    small, big = clip_cfg(16, embed=16, ctx=8, vocab=50), clip_cfg(32, embed=24, ctx=8, vocab=60)
    plans = [p for p in (plan_tensor(n, small, big, "exact", 0.0, 0) for n in state_shapes(big))
             if p is not None and p.axes]
    target = plans[1]  # among the first 8, whose ZeRO-3 partitions are checked too
    flat_slice = expansion_triton.PreparedExpansion.flat_slice

    def off_by_one_ulp(self, start, end, init_slice=None, *, dtype=None):
        out = flat_slice(self, start, end, init_slice, dtype=dtype)
        if self.plan.name == target.name and end > start:
            out = out.clone()
            out[0] = torch.nextafter(out[0], torch.tensor(math.inf, dtype=out.dtype))
        return out

    monkeypatch.setattr(expansion_triton.PreparedExpansion, "flat_slice", off_by_one_ulp)
    row = cpu.expansion_case(small, big, "exact", 0.0, ranks=2, reps=1, ref_reps=1)
    half = target.numel // 2
    assert row["bit_identical"] is False
    assert row["mismatched"] == [{"name": target.name, "elements": 1, "of": target.numel},
                                 {"name": target.name, "slice": [0, half]},
                                 {"name": target.name, "slice": [half, target.numel]}]


def test_bit_identity_check(bench):
    x = torch.tensor([0.0, 1.0, -2.5])
    assert bench._bits_equal(x, x.clone())
    assert not bench._bits_equal(x, torch.tensor([-0.0, 1.0, -2.5]))  # torch.equal would say equal
    assert not bench._bits_equal(x, torch.nextafter(x, torch.full_like(x, 9.0)))
    assert not bench._bits_equal(x, x.double())


# ---------------------------------------------------------------------------
# Rows only a GPU produces (OOM, memory statistics, the launch sweep, a failing Liger).
# ---------------------------------------------------------------------------
VERSIONS = {"torch": "2.x", "triton": "3.x", "cuda": "12.x", "python": "3.11"}


def test_gpu_loss_rows_with_an_oom(bench):
    row = {"batch": 32768, "captions": 7, "dim": 1024, "student_dim": 768,
           "fused": {"fwd_ms": 1.0, "fwd_bwd_ms": 2.0, "peak_extra_mib": 10.0},
           "eager": {"error": "OOM: CUDA out of memory"},
           "compile": {"fwd_ms": 3.0, "fwd_bwd_ms": 6.0, "peak_extra_mib": 30.0}}
    bench._add_speedups(row)
    assert row["speedup_vs_compile"] == 3.0 and "speedup_vs_eager" not in row
    line = bench._row_line(row)
    assert "proj 768->1024" in line and "fused 2.000 ms 10 MiB" in line and "eager OOM" in line
    assert line.endswith("x3.00 vs compile")
    targets = bench._targets([row])
    assert targets == {"min_speedup_vs_eager": None, "min_speedup_vs_compile": 3.0,
                       "fused_3x_eager_everywhere": False, "fused_not_slower_than_compile_everywhere": True}
    result = {"device": "NVIDIA H100 80GB HBM3", "versions": VERSIONS, "command": "python benchmarks/kernel_bench.py",
              "dtype": "bf16", "reps": 30, "warmup": 5, "date": "today", "rows": [row], "targets": targets}
    json.dumps(result)
    md = bench.to_markdown(result)
    assert table(md, "| B | C | D |") == [["32768", "7", "1024", "768", "2.000", "OOM", "6.000", "-", "3.00",
                                           "10", "OOM", "30"]]
    assert bench.device_slug(result["device"]) == "nvidia-h100-80gb-hbm3"


def test_gpu_expansion_rows_with_a_launch_sweep(bench):
    sweep = [bench._sweep_entry((1024, 256, 8), 2.0, 2e9), bench._sweep_entry((512, 256, 4), None, 2e9)]
    assert sweep == [{"tile": 1024, "max_cols": 256, "warps": 8, "device_ms": 2.0, "device_gbs": 1000.0},
                     {"tile": 512, "max_cols": 256, "warps": 4, "device_ms": None, "device_gbs": None}]
    row = {"mode": "exact", "noise": 0.05, "tensors": 500, "useful_bytes": 2e9, "kernel_device_gbs": 1000.0,
           "kernel_parts_device_gbs": 900.0, "kernel_wall_gbs": 800.0, "end_to_end_wall_gbs": 100.0,
           "reference_wall_gbs": 1.5, "x_of_bandwidth_limit": 3.0, "bit_identical": False,
           "mismatched": [{"name": "t", "slice": [0, 4]}], "launch_sweep": sweep,
           "largest": [{"name": "t", "shape": [4, 4], "kernel_ms": 0.5, "reference_ms": 9.0, "kernel_gbs": 700.0,
                        "reference_gbs": 2.0}]}
    assert "x3.00 of the bandwidth limit | bit-identical False" in bench._expansion_line(row)
    result = {"device": "NVIDIA H100", "versions": VERSIONS, "command": "c", "date": "today", "expansion": {
        "teacher": "ViT-B-16", "student": "ViT-L-16", "bandwidth": {"clone_gbs": 3000.0, "copy__gbs": 2900.0,
                                                                    "limit_gbs": 3000.0},
        "rows": [row], "target_within_2x_of_bandwidth": False, "bit_identical_everywhere": False}}
    md = bench.expansion_markdown(result)
    assert table(md, "| mode | noise | 1024/256/8 | 512/256/4 |") == [["exact", "0.05", "1000", "-"]]
    assert table(md, "| mode | noise | GB |")[0][-2:] == ["3.00", "False"]
    assert "- exact noise 0.05: differs in [{'name': 't', 'slice': [0, 4]}]" in md


def test_gpu_distill_rows_with_a_failing_liger(bench):
    row = {"tokens": 8192, "vocab": 32000, "student_dim": 1024, "teacher_dim": 2048,
           "naive": {"fwd_bwd_ms": 10.0, "peak_extra_mib": 1000.0, "time_vs_naive": 1.0, "peak_vs_naive": 1.0},
           "fused": {"fwd_bwd_ms": 5.0, "peak_extra_mib": 100.0, "time_vs_naive": 0.5, "peak_vs_naive": 0.1},
           "liger": {"error": "TypeError: forward() missing 1 required positional argument"}}
    impls = ["naive", "fused", "liger"]
    line = bench._distill_line(row, impls)
    assert "fused 5.00 ms 100 MiB (10% mem, x0.50 time)" in line and "liger TypeError" in line
    result = {"device": "NVIDIA H100", "versions": VERSIONS, "command": "c", "date": "today", "dtype": "bf16",
              "reps": 30, "warmup": 5, "distill": {
                  "temperature": 1.0, "impls": impls, "notes": ["a note"], "rows": [row],
                  "targets": {"max_peak_vs_naive": 0.1, "max_time_vs_naive": 0.5,
                              "fused_peak_at_most_30pct_of_naive": True, "fused_not_slower_than_naive": True}}}
    md = bench.distill_markdown(result)
    cells = table(md, "| D student | D teacher | impl |")
    assert cells[1] == ["1024", "2048", "fused", "5.00", "100.00", "10%", "0.50"]
    assert cells[2][:3] == ["1024", "2048", "liger"] and cells[2][3].startswith("TypeError")
    assert "- a note" in md and "(max 0.10)" in md


# ---------------------------------------------------------------------------
# --distill at tiny tokens, vocab and dims.
# ---------------------------------------------------------------------------

def test_distill_dry_run(cpu, tmp_path, capsys):
    argv = ["--device", "cpu", "--distill", "--head", "--distill-tokens", "13", "--distill-vocab", "200",
            "--distill-dims", "16:16", "24:40", "--temperature", "2.0", "--reps", "2", "--warmup", "1", "--results",
            str(tmp_path)]
    assert cpu.main(argv) == 0
    out = capsys.readouterr().out
    result, md = outputs(tmp_path, "distill")
    assert "alpha" not in result and result["reps"] == 2

    agreement = result["agreement"]
    n = 2 * 2 * len(cpu.DRY_RUN_DISTILL_AGREEMENT_CASES)  # (fused, torch-chunked) x (fp32, bf16) x cases
    assert len(agreement) == n and f"agreement vs distill_kl_reference: {n}/{n} ok" in out
    assert {r["impl"] for r in agreement} == {"fused", "torch-chunked"}
    for r in agreement:
        assert r["tolerance"] == {"float32": 1e-5, "bfloat16": 1e-2}[r["dtype"]]
        assert len(r["rel_err"]) == 3 and r["ok"] and max(r["rel_err"]) <= r["tolerance"]

    d = result["distill"]
    assert d["temperature"] == 2.0
    assert d["impls"][:3] == ["naive", "fused", "torch-chunked"]
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        assert d["impls"] == ["naive", "fused", "torch-chunked"]
        assert any("liger_kernel is not importable" in note for note in d["notes"])
    assert [(r["tokens"], r["vocab"], r["student_dim"], r["teacher_dim"]) for r in d["rows"]] == [
        (13, 200, 16, 16), (13, 200, 24, 40)]
    for r in d["rows"]:
        assert r["naive"]["time_vs_naive"] == 1.0
        for name in d["impls"]:
            m = r[name]
            assert "peak_extra_mib" not in m and finite_positive(m["fwd_bwd_ms"])
            assert m["time_vs_naive"] == pytest.approx(m["fwd_bwd_ms"] / r["naive"]["fwd_bwd_ms"])
    t = d["targets"]
    assert t["max_time_vs_naive"] == max(r["fused"]["time_vs_naive"] for r in d["rows"])
    assert t["fused_not_slower_than_naive"] == (t["max_time_vs_naive"] <= 1.0)
    assert t["max_peak_vs_naive"] is None and t["fused_peak_at_most_30pct_of_naive"] is False

    cells = table(md, "| D student | D teacher | impl |")
    assert [(c[0], c[1], c[2]) for c in cells] == [(s, t_, name) for s, t_ in (("16", "16"), ("24", "40"))
                                                    for name in d["impls"]]
    assert "Tokens 13, vocab 200." in md and f"{n}/{n} cases within tolerance" in md

    # --head: its agreement check and rows in the same file, after the KL's.
    head_n = 2 * 2 * len(cpu.DRY_RUN_HEAD_AGREEMENT_CASES)
    assert len(result["head_agreement"]) == head_n and all(r["ok"] for r in result["head_agreement"])
    assert f"agreement vs lm_head_loss_reference: {head_n}/{head_n} ok" in out
    h = result["head"]
    assert (h["alpha"], h["temperature"]) == (1.0, 2.0) and h["impls"][:3] == ["naive", "fused", "torch-chunked"]
    assert [(r["student_dim"], r["teacher_dim"], r["loss"]) for r in h["rows"]] == [
        (16, 16, "ce+kl"), (24, 40, "ce+kl"), (16, None, "ce"), (24, None, "ce")]
    for r in h["rows"]:
        for name in h["impls"]:  # on CPU the head's memory is measured too
            assert finite_positive(r[name]["fwd_bwd_ms"]) and finite_positive(r[name]["peak_extra_mib"])
            assert r[name]["peak_vs_naive"] == pytest.approx(r[name]["peak_extra_mib"] / r["naive"]["peak_extra_mib"])
    assert h["targets"]["max_peak_vs_naive"] == max(r["fused"]["peak_vs_naive"] for r in h["rows"])
    assert "## The LLaMA head: cross-entropy + KL (--head)" in md
    cells = table(md, "| loss | D student | D teacher | impl |")
    assert [tuple(c[:4]) for c in cells] == [(loss, s, t_, name) for loss, s, t_ in (
        ("CE+KL", "16", "16"), ("CE+KL", "24", "40"), ("CE", "16", "-"), ("CE", "24", "-")) for name in h["impls"]]
    assert f"{head_n}/{head_n} cases" in md


def test_head_alone_on_cpu_measures_cpu_training(cpu, tmp_path, capsys):
    # --head without --distill: its own file, named after this CPU (not a dry run: naive and torch-chunked
    # are what CPU training runs), with the machine and the note recorded.
    argv = ["--device", "cpu", "--head", "--head-impls", "naive", "torch-chunked", "--head-alpha", "0.5",
            "--distill-tokens", "9", "--distill-vocab", "70", "--distill-dims", "8:12", "--dtype", "fp32", "--reps",
            "1", "--warmup", "0", "--skip-check", "--note", "shared machine", "--results", str(tmp_path)]
    assert cpu.main(argv) == 0
    assert "fused runs in Triton's interpreter" in capsys.readouterr().out
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [f"head-{cpu.device_slug('cpu ' + __import__('platform').machine())}.{x}" for x in ("json", "md")]
    result = json.loads((tmp_path / files[0]).read_text())
    md = (tmp_path / files[1]).read_text()
    assert "cores" in result["machine"] and result["note"] == "shared machine" and "head_agreement" not in result
    assert result["head"]["impls"] == ["naive", "torch-chunked"] and result["head"]["alpha"] == 0.5
    assert result["head"]["targets"]["max_peak_vs_naive"] is None  # fused was not asked for
    assert "Machine: " in md and "Note: shared machine" in md and "--head-impls naive torch-chunked" in md
    assert len(table(md, "| loss | D student |")) == 2 * 2 and "Targets: not measured (fused did not run here)." in md


def test_head_agreement_catches_a_wrong_kernel(cpu, monkeypatch):
    import compt.kernels

    fused = compt.kernels.fused_lm_head_loss

    def wrong(*a, **k):
        out = fused(*a, **k)
        return out._replace(total=out.total * 1.02) if k["backend"] == "triton" else out

    monkeypatch.setattr(compt.kernels, "fused_lm_head_loss", wrong)
    rows = cpu.check_head_agreement(cases=[(5, 8, 8, 40, 1.0, 0.0)])
    assert [(r["impl"], r["dtype"], r["ok"]) for r in rows] == [
        ("fused", "float32", False), ("torch-chunked", "float32", True),
        ("fused", "bfloat16", False), ("torch-chunked", "bfloat16", True)]


def test_gpu_head_rows_with_a_failing_liger(bench):
    row = {"tokens": 8192, "vocab": 32000, "student_dim": 1024, "teacher_dim": None, "loss": "ce",
           "naive": {"fwd_bwd_ms": 10.0, "peak_extra_mib": 1000.0, "time_vs_naive": 1.0, "peak_vs_naive": 1.0},
           "fused": {"fwd_bwd_ms": 8.0, "peak_extra_mib": 250.0, "time_vs_naive": 0.8, "peak_vs_naive": 0.25},
           "liger": {"error": "RuntimeError: no Liger-Kernel loss matched the ce head (see notes)"}}
    impls = ["naive", "fused", "liger"]
    assert "D 1024 CE | naive 10.00 ms 1000 MiB" in bench._head_line(row, impls)
    result = {"device": "NVIDIA H100", "versions": VERSIONS, "command": "c", "date": "today", "dtype": "bf16",
              "reps": 5, "warmup": 2, "head": {
                  "alpha": 1.0, "temperature": 1.0, "impls": impls, "notes": ["a note"], "rows": [row],
                  "memory": "torch.cuda.max_memory_allocated",
                  "targets": {"max_peak_vs_naive": 0.25, "max_time_vs_naive": 0.8,
                              "fused_peak_at_most_30pct_of_naive": True, "fused_not_slower_than_naive": True}}}
    md = bench.head_markdown(result)
    cells = table(md, "| loss | D student | D teacher | impl |")
    assert cells[1] == ["CE", "1024", "-", "fused", "8.00", "250.00", "25%", "0.80"]
    assert cells[2][:4] == ["CE", "1024", "-", "liger"] and cells[2][4].startswith("RuntimeError")
    assert "- a note" in md and "(max 0.25)" in md and "Peak memory: torch.cuda.max_memory_allocated" in md


def test_distill_agreement_catches_a_wrong_kernel(cpu, monkeypatch):
    import compt.kernels

    fused = compt.kernels.fused_linear_kl
    monkeypatch.setattr(compt.kernels, "fused_linear_kl",
                        lambda *a, **k: fused(*a, **k) * (1.02 if k["backend"] == "triton" else 1.0))
    rows = cpu.check_distill_agreement(cases=[(5, 8, 8, 40, 1.0, False)])
    assert [(r["impl"], r["dtype"], r["ok"]) for r in rows] == [
        ("fused", "float32", False), ("torch-chunked", "float32", True),
        ("fused", "bfloat16", False), ("torch-chunked", "bfloat16", True)]
