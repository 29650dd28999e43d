"""Chain config validation: every problem is reported at once, naming the field and the fix."""
from __future__ import annotations

import pytest

from compt.config import ChainConfigError, load_chain
from conftest import REPO, tiny_model, write_chain

DS = REPO / "ds_configs" / "zero3.json"


def problems_of(tmp_path, chain, ds_config=DS) -> list[str]:
    with pytest.raises(ChainConfigError) as err:
        load_chain(str(write_chain(tmp_path / "c.yaml", chain)), ds_config)
    return err.value.problems


def test_demo_preset_and_tiny_chain_are_valid(chain_yaml):
    demo = load_chain("demo", DS)
    assert [s.name for s in demo.stages] == ["tiny", "small", "base"]
    cfg = load_chain(str(chain_yaml), DS)
    assert cfg.transfer(0) is None and cfg.transfer(1).init == "official"
    assert cfg.stages[1].budget.steps_for(1437, 32) == 8
    assert cfg.stages[2].budget.steps_for(1437, 32) == 4  # 128 samples / 32


def test_every_problem_reported_at_once(tmp_path, chain_dict):
    chain_dict["data"] = {"kind": "csv", "train": str(tmp_path / "missing.csv"), "val": str(tmp_path / "nope.csv")}
    chain_dict["stages"][0]["model"] = "ViT-Nonexistent-99"
    chain_dict["stages"][1]["budget"] = {"epochs": 0}
    chain_dict["stages"][2]["model"] = tiny_model(32, 1)  # smaller than stage 1 (width 64)
    # The budget's type error and the semantic problems (paths, models, sizes) come in one pass.
    probs = problems_of(tmp_path, chain_dict, tmp_path / "no_such_ds.json")
    text = "\n".join(probs)
    assert "stages.1.budget: epochs must be > 0" in text
    assert "data.train" in text and "missing.csv" in text
    assert "data.val" in text
    assert "stages.0.model: unknown open_clip model 'ViT-Nonexistent-99'" in text
    assert "stages.2.model: not larger than its predecessor" in text and "vision_cfg.width 32 < 64" in text
    assert "--ds_config" in text
    assert len(probs) == 6, probs  # and nothing said twice or about the stand-ins for bad fields


def test_budget_and_fields(tmp_path, chain_dict):
    chain_dict["stages"][0]["budget"] = {"steps": -3}
    chain_dict["stages"][1]["budget"] = {"steps": 2, "epochs": 1}
    chain_dict["stages"][1]["lr"] = -1
    chain_dict["stages"][2]["bogus"] = 1
    text = "\n".join(problems_of(tmp_path, chain_dict))
    assert "stages.0.budget: steps must be > 0" in text
    assert "stages.1.budget: give exactly one of epochs, steps or samples" in text
    assert "stages.1.lr" in text
    assert "stages.2.bogus: unknown field" in text


def test_transfer_on_first_stage_and_patch_mismatch(tmp_path, chain_dict):
    chain_dict["stages"][0]["transfer"] = {"init": "official"}
    chain_dict["stages"][1]["model"]["vision_cfg"]["patch_size"] = 4
    text = "\n".join(problems_of(tmp_path, chain_dict))
    assert "stages.0.transfer: the first stage has no predecessor" in text
    assert "stages.1.model: patch_size 4 differs" in text


def test_triton_kernels_need_a_gpu_or_the_interpreter(tmp_path, chain_dict, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    chain_dict["kernels"] = "triton"
    text = "\n".join(problems_of(tmp_path, chain_dict))
    assert "kernels: 'triton' needs a CUDA GPU" in text


def test_same_size_stage_is_rejected(tmp_path, chain_dict):
    chain_dict["stages"][1]["model"] = tiny_model(32, 1)
    text = "\n".join(problems_of(tmp_path, chain_dict))
    assert "stages.1.model: has no more parameters than its predecessor" in text


def test_bad_ds_config_json(tmp_path, chain_dict):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert any("not valid JSON" in p for p in problems_of(tmp_path, chain_dict, bad))
    batch = tmp_path / "batch.json"
    batch.write_text('{"train_batch_size": 8, "zero_optimization": {"stage": 3}}')
    assert any("'train_batch_size' is set by compt" in p for p in problems_of(tmp_path, chain_dict, batch))


def test_unknown_preset_and_bad_yaml(tmp_path):
    with pytest.raises(ChainConfigError, match="neither a file nor a preset"):
        load_chain("no-such-chain")
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [unclosed")
    with pytest.raises(ChainConfigError, match="not valid YAML"):
        load_chain(str(bad))


def test_builtin_model_names_resolve(tmp_path, chain_dict):
    chain_dict["stages"] = [
        {"name": "s", "model": "ViT-S-16", "budget": {"epochs": 1}},
        {"name": "b", "model": "ViT-B-16", "budget": {"epochs": 1}},
    ]
    cfg = load_chain(str(write_chain(tmp_path / "c.yaml", chain_dict)), DS)
    assert cfg.model_cfg(1)["vision_cfg"]["width"] == 768


def test_readme_chain_example_is_valid(tmp_path):
    """The chain YAML shown in the README validates (with its CSV files created)."""
    import re

    import yaml

    text = (REPO / "README.md").read_text()
    block = re.search(r"```yaml\n(name: my-chain.*?)```", text, re.S).group(1)
    chain = yaml.safe_load(block)
    for split in ("train", "val"):  # rows enough for its batch of 1024: the training set's size is checked too
        path = tmp_path / f"{split}.csv"
        path.write_text("filepath\ttitle\tlabel\n" + "".join(f"{i}.png\ta cat\t0\n" for i in range(1024)))
        chain["data"][split] = str(path)
    cfg = load_chain(str(write_chain(tmp_path / "readme.yaml", chain)), DS)
    assert cfg.transfer(1).init == "exact" and cfg.kernels == "auto"


def test_alignment_weight_defaults_depend_on_the_growth(tmp_path, chain_dict):
    """CLIP: 500 (METHOD.md) after official growth or from scratch, 5 after exact growth; an explicit alpha wins."""
    for stage in chain_dict["stages"][1:]:
        stage["transfer"].pop("alpha")
    chain_dict["stages"][2]["transfer"] = {"init": "exact"}
    cfg = load_chain(str(write_chain(tmp_path / "c.yaml", chain_dict)), DS)
    assert (cfg.transfer(1).init, cfg.transfer(1).alpha) == ("official", 500.0)
    assert (cfg.transfer(2).init, cfg.transfer(2).alpha) == ("exact", 5.0)
    chain_dict["stages"][2]["transfer"] = {"init": "exact", "alpha": 500}
    assert load_chain(str(write_chain(tmp_path / "c.yaml", chain_dict)), DS).transfer(2).alpha == 500.0
    chain_dict["stages"][2]["transfer"] = {"init": "none"}
    assert load_chain(str(write_chain(tmp_path / "c.yaml", chain_dict)), DS).transfer(2).alpha == 500.0
    demo = load_chain("demo", DS)
    assert [demo.transfer(k).alpha for k in (1, 2)] == [5.0, 5.0]


def test_llama_distillation_is_off_by_default(tmp_path):
    import yaml

    chain = yaml.safe_load((REPO / "compt" / "chains" / "llama-demo.yaml").read_text())
    for stage in chain["stages"][1:]:
        stage["transfer"].pop("alpha")
    cfg = load_chain(str(write_chain(tmp_path / "c.yaml", chain)), DS)
    assert [cfg.transfer(k).alpha for k in (1, 2)] == [0.0, 0.0]
    from compt.recipes import recipe_from_chain

    assert [m.teacher for m in recipe_from_chain(str(tmp_path / "c.yaml")).models] == [False] * 3  # no teacher
    assert [m.teacher for m in recipe_from_chain("llama-demo").models] == [False, True, True]  # the demo's alpha 1


def test_a_changed_default_counts_as_a_config_change(tmp_path, chain_dict, monkeypatch):
    """A stage trained under compt's earlier default weight is not resumed under a new default unnoticed."""
    import compt.clip.family
    from compt.engine import read_ds_config
    from compt.rundir import RunDir

    chain_dict["stages"][2]["transfer"] = {"init": "exact", "noise": 0.01}  # alpha: the default
    path = write_chain(tmp_path / "c.yaml", chain_dict)
    ds = read_ds_config(DS)
    run = RunDir(tmp_path / "run")
    run.open(load_chain(str(path), DS), ds)
    assert run.read_manifest()["transfers"][2]["alpha"] == 5.0
    run.update_stage(1, status="done")
    run.update_stage(2, status="running")
    assert run.conflict(load_chain(str(path), DS), ds) is None
    monkeypatch.setattr(compt.clip.family, "ALPHA_EXACT", 50.0)
    problem = run.conflict(load_chain(str(path), DS), ds)
    assert problem is not None and "2 'c' (running)" in problem and "1 'b'" not in problem
