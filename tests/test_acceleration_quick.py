"""benchmarks/acceleration.py --quick (CLIP) and --family llama --quick, as a user runs them: real launcher,
real runs, every output checked."""
import json
import math
import subprocess
import sys

import pytest
import yaml

from compt.config import load_chain
from conftest import REPO


# What each family's quick run is checked against: its command, data, quality figure (and which
# metrics.json entries the tables copy), and a sanity bound on the baseline's quality.
FAMILY = {
    "clip": {"args": ["--quick"], "port": "29871", "data": {"kind": "digit-numbers"},
             "copied": {"zeroshot_top1": lambda m: m["zeroshot_top1"],
                        "i2t_R@1": lambda m: m["retrieval"]["image_to_text"]["R@1"]},
             "table": "| method | model | top-1 |",
             "sane": lambda row: row["zeroshot_top1"] < 0.95},  # the benchmark does not saturate
    "llama": {"args": ["--family", "llama", "--quick"], "port": "29881",
              "data": {"kind": "pydoc", "seq_len": 32, "vocab_size": 512},
              "copied": {"val_ppl": lambda m: m["val_ppl"], "val_loss": lambda m: m["val_loss"]},
              "table": "| method | model | val ppl | vs baseline |",
              "sane": lambda row: 1 < row["val_ppl"] < 512},  # learned something, did not memorise val
}


@pytest.fixture(scope="module", params=sorted(FAMILY))
def bench(request, tmp_path_factory):
    family = FAMILY[request.param]
    root = tmp_path_factory.mktemp(f"bench-{request.param}")
    cmd = [sys.executable, "benchmarks/acceleration.py", *family["args"], "--name", "test", "--port", family["port"],
           "--workdir", str(root / "work"), "--results", str(root / "results")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    result = json.loads((root / "results" / "acceleration-test.json").read_text())
    assert result["setup"]["family"] == request.param
    return root, result, proc.stdout


def test_outputs_and_provenance(bench):
    root, result, stdout = bench
    family = FAMILY[result["setup"]["family"]]
    assert (root / "results" / "acceleration-test.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (root / "results" / "acceleration-test.md").read_text()
    assert family["table"] in md and "acceleration (FLOPs)" in md and "## Compute to reach" in md
    assert all(arg in result["command"] for arg in family["args"]) and result["mode"] == "quick"
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
    family = FAMILY[result["setup"]["family"]]
    main = result["summary"]["main"]
    for method, chain in main.items():
        assert [m["name"] for m in chain["per_model"]] == result["setup"]["main"]
        run = next(r for r in result["runs"] if r["method"] == method)
        for row in chain["per_model"]:
            metrics = json.loads(next((REPO / run["run_dir"]).glob(f"stages/*-{row['name']}/metrics.json"))
                                 .read_text())
            for key, read in family["copied"].items():
                assert row[key] == read(metrics)
            assert row["flops"] == metrics["flops"]["total"] and row["wall_seconds"] == metrics["wall_seconds"]
    base = main["baseline"]
    assert all(family["sane"](m) for m in base["per_model"])
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
    family = result["setup"]["family"]
    for run in result["runs"]:
        raw = yaml.safe_load((root / "work" / f"{run['id']}.yaml").read_text())
        assert raw["family"] == family and raw["data"] == FAMILY[family]["data"]
        assert "launch/chain.py" in run["command"] and "ds_configs/zero3.json" in run["command"]
        manifest = json.loads((REPO / run["run_dir"] / "manifest.json").read_text())
        assert [s["status"] for s in manifest["stages"]] == ["done"] * len(run["models"])


def test_exact_growth_starts_at_the_teachers_perplexity(bench):
    _, result, _ = bench
    if result["setup"]["family"] != "llama":
        pytest.skip("perplexity at step 0 is a LLaMA figure")
    main = result["summary"]["main"]
    for row in main["exact"]["per_model"][1:]:  # function-preserving growth: the student starts as its teacher
        assert row["init_val_ppl"] == pytest.approx(row["teacher_val_ppl"], rel=1e-4)
    for method in ("official", "exact"):
        rows = main[method]["per_model"]
        for teacher, student in zip(rows, rows[1:]):  # the teacher is the chain's previous model, as trained
            assert student["teacher_val_ppl"] == pytest.approx(teacher["val_ppl"], rel=1e-4)
    md = (bench[0] / "results" / "acceleration-test.md").read_text()
    assert "val ppl <= baseline val ppl x (1 + 0.05)" in md  # the match rule is stated


# --- the full mode's studies, on synthetic run records (no training) ---------------------

def _load_benchmark():
    import importlib.util

    spec = importlib.util.spec_from_file_location("acceleration", REPO / "benchmarks" / "acceleration.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def _metrics(family: str, value: float, k: int) -> dict:
    """The quality entries of a metrics.json the launcher would write."""
    if family == "clip":
        return {"zeroshot_top1": value, "zeroshot_top5": 0.9, "init_zeroshot_top1": None if k == 0 else 0.1,
                "retrieval": {"image_to_text": {"R@1": value / 2}, "text_to_image": {"R@1": value / 3}}}
    return {"val_ppl": value, "val_loss": math.log(value), "init_val_ppl": None if k == 0 else 500.0,
            "teacher_val_ppl": None if k == 0 else 400.0}


def _synthetic_runs(bench_mod, setup, exact: bool) -> list[dict]:
    cost = {"xs": 1.0, "s": 2.0, "m": 3.0, "l": 6.0}  # per-sample train cost; a forward is a third
    fam = bench_mod.PRESETS[setup.family]
    better = fam.quality.higher_is_better
    quality = {"xs": 0.5, "s": 0.6, "m": 0.7, "l": 0.65} if better else {"xs": 200.0, "s": 150.0, "m": 120.0,
                                                                         "l": 110.0}
    runs, retrained = [], set()
    for spec in bench_mod.plan(setup, exact):
        stages = []
        for k, name in enumerate(spec.models):
            base = spec.transfer is None or k == 0
            steps = setup.baseline_steps if base else setup.steps(spec.fraction)
            teacher = 0.0 if base or not spec.transfer["align"] else cost[spec.models[k - 1]] / 3
            # A short budget costs quality: a fraction of it (top-1), or the perplexity divided by it.
            share = 1.0 if base else min(1.0, 0.6 + spec.fraction + 0.1 * (spec.transfer["init"] == "exact"))
            value = quality[name] * share if better else quality[name] / share
            value += (0.01 if better else 1.0) * spec.seed
            flops = steps * setup.batch_size * (cost[name] + teacher) * 1e9
            stages.append({"name": name, "steps": steps, "samples_seen": steps * setup.batch_size,
                           **fam.figures(_metrics(setup.family, value, k)), "flops": flops,
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


@pytest.mark.parametrize("family", ["clip", "llama"])
@pytest.mark.parametrize("exact", [True, False])
def test_full_mode_studies_render(tmp_path, exact, family):
    bench_mod = _load_benchmark()
    setup = bench_mod.PRESETS[family].full
    runs = _synthetic_runs(bench_mod, setup, exact)
    summary = bench_mod.summarize(setup, runs, exact)
    methods = ["official"] + (["exact"] if exact else [])
    assert list(summary["main"]) == ["baseline", *methods]
    assert summary["main"]["baseline"]["seeds"] == [0, 1, 2]
    official = summary["main"]["official"]
    assert official["seeds"] == [0, 1, 2] and official["acceleration_flops"] > 1
    # compute to reach: the smallest searched fraction whose quality matches (synthetic: 0.6 + f >= 1 at f = 0.5;
    # llama's 5% perplexity tolerance does not cover exact's 1 / 0.95 at f = 0.25)
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
              "setup": {"seeds": 3, "main": setup.main, "chain_fraction": setup.chain_fraction, "family": family,
                        "match_tolerance": setup.match_tolerance, "data": setup.data},
              "summary": summary, "runs": runs, "notes": ["n"]}
    said = bench_mod.verdicts(result)
    assert any("m " in v and "does NOT match" in v for v in said)  # at the chain budget nothing matches
    assert any("reached at 0.5 of the from-scratch budget" in v for v in said)
    md = bench_mod.markdown(result)
    assert "## What the numbers show" in md and "does NOT match" in md
    for heading in ("## Main comparison", "## Compute to reach", "## Chain length", "## Ablation", "## Notes"):
        assert heading in md
    assert "parameter space only (official init)" in md and "xs → s → m → l" in md
    bench_mod.plot(result, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 10_000


def test_quality_says_which_way_is_better():
    from compt.families import family_of

    bench_mod = _load_benchmark()
    for name, preset in bench_mod.PRESETS.items():  # what the figure is and which way is better: compt's
        assert preset.family == name == preset.quick.family
        own = family_of(name).quality
        assert (preset.quality.key, preset.quality.label, preset.quality.higher_is_better) == \
            (own.key, own.label, own.higher_is_better)
    top1, ppl = bench_mod.PRESETS["clip"].quality, bench_mod.PRESETS["llama"].quality
    assert top1.matches(0.70, 0.70, 0.0) and not top1.matches(0.69, 0.70, 0.0) and top1.matches(0.69, 0.70, 0.02)
    assert ppl.matches(90.0, 100.0, 0.0) and not ppl.matches(100.1, 100.0, 0.0)
    assert ppl.matches(104.9, 100.0, 0.05) and not ppl.matches(105.1, 100.0, 0.05)  # tolerance relative to it


def test_per_model_lr_reaches_the_launcher_config(tmp_path):
    bench_mod = _load_benchmark()
    setup = bench_mod.FULL
    spec = next(s for s in bench_mod.plan(setup, True) if s.method == "exact" and s.seed == 0)
    path = tmp_path / "chain.yaml"
    path.write_text(yaml.safe_dump(bench_mod.chain_dict(setup, spec), sort_keys=False))
    cfg = load_chain(str(path))
    lrs = {s.name: s.settings(cfg.defaults).lr for s in cfg.stages}
    assert lrs == {m: setup.model_lr.get(m, setup.lr) for m in spec.models}
    assert lrs["l"] == 1e-3 and lrs["xs"] == setup.lr == 2e-3


def test_only_seeds_splits_the_plan(tmp_path, capsys):
    bench_mod = _load_benchmark()
    assert bench_mod.main(["--name", "split", "--workdir", str(tmp_path), "--only-seeds", "2,1", "--dry-run"]) == 0
    planned = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    assert planned == [f"{m}-xs-m-l-seed{s}" for s in (2, 1)
                       for m in ("baseline", "official-f0.25", "exact-a5-f0.25")]


def test_only_runs_picks_chains_by_id(tmp_path, capsys):
    bench_mod = _load_benchmark()
    ids = "neither-f0.25-xs-m-l-seed0,baseline-xs-s-m-l-seed0"
    assert bench_mod.main(["--name", "pick", "--workdir", str(tmp_path), "--only-runs", ids, "--dry-run"]) == 0
    planned = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    assert planned == ids.split(",")
    with pytest.raises(SystemExit, match="no-such-chain not in this study's plan"):
        bench_mod.main(["--name", "pick", "--workdir", str(tmp_path), "--only-runs", "no-such-chain", "--dry-run"])


def test_methods_and_alpha_share_a_workdir_with_the_default_study(tmp_path, capsys):
    bench_mod = _load_benchmark()
    args = ["--name", "alpha", "--workdir", str(tmp_path), "--methods", "exact,param-only-exact", "--alpha", "5"]
    assert bench_mod.main([*args, "--studies", "main", "--seeds", "2", "--dry-run"]) == 0
    planned = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    # Aligned chains carry the non-default alpha in their id; baselines and unaligned chains keep the default
    # study's ids, so they are reused from its workdir.
    assert planned == [f"{m}-xs-m-l-seed{s}" for s in (0, 1)
                       for m in ("baseline", "exact-a5-f0.25", "param-only-exact-f0.25")]
    setup = bench_mod.build_setup(bench_mod.parse_args(args))
    specs = {s.id: s for s in bench_mod.plan(setup, True)}
    aligned = bench_mod.chain_dict(setup, specs["exact-a5-f0.25-xs-m-l-seed0"])["stages"]
    unaligned = bench_mod.chain_dict(setup, specs["param-only-exact-f0.25-xs-m-l-seed0"])["stages"]
    assert [s["transfer"] for s in aligned[1:]] == [{"init": "exact", "align": True, "alpha": 5.0}] * 2
    assert [s["transfer"] for s in unaligned[1:]] == [{"init": "exact", "align": False}] * 2
    # The ablation still compares both with and without alignment, for the selected methods' init only.
    assert "official-f0.25-xs-m-l-seed0" not in specs and "feature-only-a5-f0.25-xs-m-l-seed0" in specs
    summary = bench_mod.summarize(setup, _synthetic_runs(bench_mod, setup, True), True)
    assert list(summary["main"]) == ["baseline", "exact", "param-only-exact"]
    assert summary["main"]["exact"]["alpha"] == 5.0 and "alpha" not in summary["main"]["param-only-exact"]
    assert list(summary["compute_to_reach"]) == ["exact", "param-only-exact"]
    assert [r["method"] for r in summary["ablation"]] == ["exact", "param-only-exact", "feature-only", "neither"]
    # Without --alpha, compt's defaults: 500 (the paper's, untagged) after official growth, 5 after exact growth,
    # written into the chain and its id, so the default study reuses this --alpha 5 study's exact chains.
    setup = bench_mod.build_setup(bench_mod.parse_args([]))
    default = {s.id: s for s in bench_mod.plan(setup, True)}
    for rid, alpha in (("exact-a5-f0.25-xs-m-l-seed0", 5.0), ("official-f0.25-xs-m-l-seed0", 500.0),
                       ("feature-only-f0.25-xs-m-l-seed0", 500.0)):
        assert bench_mod.chain_dict(setup, default[rid])["stages"][1]["transfer"]["alpha"] == alpha
    assert bench_mod.chain_dict(setup, default["exact-a5-f0.25-xs-m-l-seed0"]) == \
        bench_mod.chain_dict(bench_mod.build_setup(bench_mod.parse_args(args)), specs["exact-a5-f0.25-xs-m-l-seed0"])
    setup = bench_mod.build_setup(bench_mod.parse_args(["--alpha", "500"]))
    assert "exact-f0.25-xs-m-l-seed0" in {s.id for s in bench_mod.plan(setup, True)}
    assert any("alpha: compt's defaults, 500 after official growth" in n for n in bench_mod.clip_notes(bench_mod.FULL))
    with pytest.raises(SystemExit, match="--methods: exactly; pick from official,exact"):
        bench_mod.build_setup(bench_mod.parse_args(["--methods", "exactly"]))
    with pytest.raises(SystemExit, match="--alpha -1: the alignment weight must be >= 0"):
        bench_mod.build_setup(bench_mod.parse_args(["--alpha", "-1"]))


def _fake_finished(bench_mod, setup, spec, workdir, reused: bool) -> None:
    """A run dir as the launcher leaves a finished chain (manifest only, every stage done)."""
    from compt.engine import read_ds_config
    from compt.rundir import RunDir

    path = workdir / f"{spec.id}.yaml"
    path.write_text(yaml.safe_dump(bench_mod.chain_dict(setup, spec), sort_keys=False))
    run = RunDir(workdir / spec.id)
    run.open(load_chain(str(path)), read_ds_config(REPO / bench_mod.DS_CONFIG))
    for k in range(len(spec.models)):
        run.update_stage(k, status="done")
    if reused:
        (run.root / bench_mod.REUSED_MARK).write_text("copied\n")


def test_a_selection_adopts_what_earlier_invocations_finished(tmp_path):
    """--only-runs / --only-seeds without the baseline still grow from the baseline's first stage, and
    do not repeat a seed's first-stage determinism check that a finished chain already made."""
    bench_mod = _load_benchmark()
    setup = bench_mod.QUICK
    specs = {s.id: s for s in bench_mod.plan(setup, True)}
    _fake_finished(bench_mod, setup, specs["baseline-xs-m-l-seed0"], tmp_path, reused=False)
    _fake_finished(bench_mod, setup, specs["official-f0.25-xs-m-l-seed0"], tmp_path, reused=True)
    launcher = bench_mod.Launcher(tmp_path, 29000, retrain_first=False)
    launcher.adopt_finished(setup, list(specs.values()))
    assert launcher.first_stage == {0: tmp_path / "baseline-xs-m-l-seed0" / "stages" / "0-xs"}
    assert launcher.retrained == set()  # the only finished chain copied its first stage: no check made yet
    _fake_finished(bench_mod, setup, specs["exact-a5-f0.25-xs-m-l-seed0"], tmp_path, reused=False)
    launcher.adopt_finished(setup, list(specs.values()))
    assert launcher.retrained == {0}
    # Runs finished under other settings are not adopted.
    other = bench_mod.build_setup(bench_mod.parse_args(["--quick", "--baseline-steps", "7"]))
    fresh = bench_mod.Launcher(tmp_path, 29000, retrain_first=False)
    fresh.adopt_finished(other, bench_mod.plan(other, True))
    assert fresh.first_stage == {} and fresh.retrained == set()
