"""benchmarks/acceleration.py --quick, as a user runs it: real launcher, real runs, every output checked."""
import json
import subprocess
import sys

import pytest
import yaml

from compt.config import load_chain
from conftest import REPO


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    cmd = [sys.executable, "benchmarks/acceleration.py", "--quick", "--name", "test", "--port", "29871",
           "--workdir", str(root / "work"), "--results", str(root / "results")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    result = json.loads((root / "results" / "acceleration-test.json").read_text())
    return root, result, proc.stdout


def test_outputs_and_provenance(bench):
    root, result, stdout = bench
    assert (root / "results" / "acceleration-test.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (root / "results" / "acceleration-test.md").read_text()
    assert "| method | model | top-1 |" in md and "acceleration (FLOPs)" in md and "## Compute to reach" in md
    assert "--quick" in result["command"] and result["mode"] == "quick"
    assert {"platform", "cpu_count", "torch", "deepspeed"} <= set(result["machine"])
    assert result["seconds"] > 0 and "wrote" in stdout


def test_methods_share_data_seeds_and_first_stage(bench):
    _, result, _ = bench
    exact = result["setup"]["exact_available"]
    assert set(result["summary"]["main"]) == {"baseline", "official"} | ({"exact"} if exact else set())
    if not exact:
        assert any(n.startswith("exact skipped") for n in result["notes"])
    chains = {r["id"]: load_chain(r["chain_yaml"]) for r in result["runs"]}
    base = next(c for rid, c in chains.items() if rid.startswith("baseline"))
    for k, stage in enumerate(base.stages[1:], 1):  # baseline: every model from scratch, full budget
        assert base.transfer(k).init == "none" and not base.transfer(k).align
        assert stage.budget == base.stages[0].budget
    for rid, cfg in chains.items():
        assert cfg.data == base.data and cfg.eval == base.eval and cfg.seed == 0
        assert cfg.stages[0] == base.stages[0]  # the first model is the same run in every method
        if not rid.startswith("baseline"):
            assert all(cfg.transfer(k).align for k in range(1, len(cfg.stages)))
            assert all(s.budget.steps < base.stages[0].budget.steps for s in cfg.stages[1:])
    check = result["summary"]["first_stage_reuse_check"]
    assert check and all(c["identical_weights"] for c in check)


def test_per_model_figures_come_from_the_run_directories(bench):
    _, result, _ = bench
    main = result["summary"]["main"]
    for method, chain in main.items():
        assert [m["name"] for m in chain["per_model"]] == result["setup"]["main"]
        run = next(r for r in result["runs"] if r["method"] == method)
        for row in chain["per_model"]:
            metrics = json.loads(next((REPO / run["run_dir"]).glob(f"stages/*-{row['name']}/metrics.json"))
                                 .read_text())
            assert row["zeroshot_top1"] == metrics["zeroshot_top1"]
            assert row["i2t_R@1"] == metrics["retrieval"]["image_to_text"]["R@1"]
            assert row["flops"] == metrics["flops"]["total"] and row["wall_seconds"] == metrics["wall_seconds"]
    base = main["baseline"]
    assert all(m["zeroshot_top1"] < 0.95 for m in base["per_model"])  # the benchmark does not saturate
    for method in set(main) - {"baseline"}:
        c = main[method]
        assert c["acceleration_flops"] == pytest.approx(base["flops"] / c["flops"]) and c["acceleration_flops"] > 1
        assert c["acceleration_wall"] == pytest.approx(base["wall_seconds"] / c["wall_seconds"])
        assert c["per_model"][0]["flops"] == base["per_model"][0]["flops"]  # counted in both


def test_accounting_tool_predicts_the_measured_flops(bench):
    _, result, _ = bench
    predicted = result["summary"]["predicted_vs_measured_flops"]
    assert predicted and all(p["equal"] for p in predicted.values())


def test_compute_to_reach_is_reported(bench):
    _, result, _ = bench
    rows = result["summary"]["compute_to_reach"]["official"]
    assert [r["model"] for r in rows] == result["setup"]["main"][1:]
    for r in rows:
        assert r["points"] and (r["reached_at_fraction"] is None) == (r["stage_flops_to_reach"] is None)


def test_generated_chains_are_plain_launcher_configs(bench):
    root, result, _ = bench
    for run in result["runs"]:
        raw = yaml.safe_load((root / "work" / f"{run['id']}.yaml").read_text())
        assert raw["data"] == {"kind": "digit-numbers"}
        assert "launch/chain.py" in run["command"] and "ds_configs/zero3.json" in run["command"]
        manifest = json.loads((REPO / run["run_dir"] / "manifest.json").read_text())
        assert [s["status"] for s in manifest["stages"]] == ["done"] * len(run["models"])


# --- the full mode's studies, on synthetic run records (no training) ---------------------

def _load_benchmark():
    import importlib.util

    spec = importlib.util.spec_from_file_location("acceleration", REPO / "benchmarks" / "acceleration.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def _synthetic_runs(bench_mod, setup, exact: bool) -> list[dict]:
    cost = {"xs": 1.0, "s": 2.0, "m": 3.0, "l": 6.0}  # per-sample train cost; a forward is a third
    quality = {"xs": 0.5, "s": 0.6, "m": 0.7, "l": 0.65}
    runs, retrained = [], set()
    for spec in bench_mod.plan(setup, exact):
        stages = []
        for k, name in enumerate(spec.models):
            base = spec.transfer is None or k == 0
            steps = setup.baseline_steps if base else setup.steps(spec.fraction)
            teacher = 0.0 if base or not spec.transfer["align"] else cost[spec.models[k - 1]] / 3
            top1 = quality[name] if base else quality[name] * min(1.0, 0.6 + spec.fraction
                                                                   + 0.1 * (spec.transfer["init"] == "exact"))
            flops = steps * setup.batch_size * (cost[name] + teacher) * 1e9
            stages.append({"name": name, "steps": steps, "samples_seen": steps * setup.batch_size,
                           "zeroshot_top1": top1 + 0.01 * spec.seed, "zeroshot_top5": 0.9, "i2t_R@1": top1 / 2,
                           "t2i_R@1": top1 / 3, "init_zeroshot_top1": None if k == 0 else 0.1, "flops": flops,
                           "student_flops": flops, "teacher_flops": 0, "wall_seconds": flops / 1e11,
                           "train_seconds": flops / 1.2e11, "params": 1, "sha256": f"first-{spec.seed}"
                           if k == 0 else spec.id})
        reused = spec.transfer is not None and spec.seed in retrained
        if spec.transfer is not None:
            retrained.add(spec.seed)
        runs.append({"id": spec.id, "method": spec.method, "models": spec.models, "seed": spec.seed,
                     "fraction": spec.fraction, "transfer": spec.transfer, "studies": sorted(spec.studies),
                     "first_stage_reused": reused, "finished_in_an_earlier_invocation": False, "stages": stages})
    return runs


@pytest.mark.parametrize("exact", [True, False])
def test_full_mode_studies_render(tmp_path, exact):
    bench_mod = _load_benchmark()
    setup = bench_mod.FULL
    runs = _synthetic_runs(bench_mod, setup, exact)
    summary = bench_mod.summarize(setup, runs, exact)
    methods = ["official"] + (["exact"] if exact else [])
    assert list(summary["main"]) == ["baseline", *methods]
    assert summary["main"]["baseline"]["seeds"] == [0, 1, 2]
    official = summary["main"]["official"]
    assert official["seeds"] == [0, 1, 2] and official["acceleration_flops"] > 1
    # compute to reach: the smallest searched fraction whose top-1 matches (synthetic: 0.6 + f >= 1 at f = 0.5)
    reach = {r["model"]: r for r in summary["compute_to_reach"]["official"]}
    assert reach["m"]["searched_fractions"] == [0.125, 0.25, 0.5] and reach["m"]["reached_at_fraction"] == 0.5
    if exact:
        assert summary["compute_to_reach"]["exact"][0]["reached_at_fraction"] == 0.5
    lengths = [(r["method"], r["length"]) for r in summary["chain_length"]]
    assert lengths == [(m, n) for m in methods for n in (2, 3, 4)]
    variants = [r["method"] for r in summary["ablation"]]
    assert variants == [v for v in bench_mod.ABLATION_LABELS if exact or "exact" not in v]
    assert all(c["identical_weights"] for c in summary["first_stage_reuse_check"])
    result = {"name": "synthetic", "mode": "full", "command": "python benchmarks/acceleration.py",
              "machine": {"platform": "p", "cpu_count": 2, "cpus_usable": 2, "torch": "t", "torch_threads": 2,
                          "deepspeed": "d", "open_clip_torch": "o"},
              "loadavg_start": [0, 0, 0], "loadavg_end": [0, 0, 0], "seconds": 1.0, "stage_seconds": 1.0,
              "setup": {"seeds": 3, "main": setup.main, "chain_fraction": setup.chain_fraction},
              "summary": summary, "runs": runs, "notes": ["n"]}
    md = bench_mod.markdown(result)
    for heading in ("## Main comparison", "## Compute to reach", "## Chain length", "## Ablation", "## Notes"):
        assert heading in md
    assert "parameter space only (official init)" in md and "xs → s → m → l" in md
    bench_mod.plot(result, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 10_000
