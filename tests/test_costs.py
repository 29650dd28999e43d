"""Cost accounting: `compt flops` on the paper preset and on chain YAMLs, checked by hand."""
import json

import pytest

from compt.cli import main
from compt.costs import chain_cost
from compt.clip.flops import count_sample_flops
from compt.recipes import PAPER_MODELS, load_recipe
from conftest import write_chain

EPOCH = 2_890_000
PAPER_CHAIN = [("ViT-T-16", 128), ("ViT-S-16", 24), ("ViT-B-16", 16), ("ViT-L-16", 16)]


@pytest.fixture(scope="module")
def paper():
    return chain_cost(load_recipe("paper-cc3m-vit"))


def _flops_json(capsys, *args) -> dict:
    assert main(["flops", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_paper_preset_models_follow_the_method_table():
    table = {  # vision layers/width/heads, text layers/width/heads (METHOD.md)
        "ViT-T-16": (12, 192, 3, 12, 256, 4), "ViT-S-16": (12, 384, 6, 12, 384, 6),
        "ViT-B-16": (12, 768, 12, 12, 512, 8), "ViT-L-16": (24, 1024, 16, 12, 768, 12),
    }
    recipe = load_recipe("paper-cc3m-vit")
    assert [m.name for m in recipe.models] == list(table)
    assert recipe.captions_per_image == 7 and recipe.samples_per_epoch == EPOCH
    for m in recipe.models:
        v, t = m.config["vision_cfg"], m.config["text_cfg"]
        assert m.config["embed_dim"] == 512
        assert (v["image_size"], v["patch_size"], t["context_length"], t["vocab_size"]) == (224, 16, 77, 49408)
        assert (v["layers"], v["width"], v["width"] // v["head_width"], t["layers"], t["width"], t["heads"]) \
            == table[m.name]


def test_paper_preset_against_a_hand_computation(paper):
    train = {n: count_sample_flops(PAPER_MODELS[n], 7).train for n, _ in PAPER_CHAIN}
    forward = {n: count_sample_flops(PAPER_MODELS[n], 7).forward for n, _ in PAPER_CHAIN}
    baseline = sum(128 * EPOCH * train[n] for n, _ in PAPER_CHAIN)
    chain = 128 * EPOCH * train["ViT-T-16"]
    for (teacher, _), (student, epochs) in zip(PAPER_CHAIN, PAPER_CHAIN[1:]):
        chain += epochs * EPOCH * (train[student] + forward[teacher])
    assert paper.baseline_flops == baseline
    assert paper.chain_flops == chain
    assert paper.acceleration == pytest.approx(baseline / chain, rel=1e-12)
    assert 5.0 < paper.acceleration < 6.0  # 5.53x: the headline figure of this preset


def test_first_model_is_counted_in_both(paper):
    first = paper.per_model[0]
    assert first.chain_flops == first.baseline_flops > 0
    assert first.teacher_forward_per_sample == 0 and first.chain_teacher_flops == 0
    for m in paper.per_model[1:]:
        assert m.chain_teacher_flops > 0 and m.chain_flops < m.baseline_flops


def test_analytic_cross_check_within_five_percent(paper):
    assert paper.analytic_max_rel_diff <= 0.05 and paper.analytic_agrees
    assert paper.analytic_acceleration == pytest.approx(paper.acceleration, rel=0.05)
    for m in paper.per_model:
        assert m.analytic_train_per_sample == pytest.approx(m.train_per_sample, rel=0.05)
        assert m.analytic_teacher_forward_per_sample == pytest.approx(m.teacher_forward_per_sample, rel=0.05)


def test_json_shape(capsys, paper):
    out = _flops_json(capsys, "--chain", "paper-cc3m-vit")
    assert out["baseline_flops"] == paper.baseline_flops and out["chain_flops"] == paper.chain_flops
    assert out["acceleration"] == pytest.approx(paper.acceleration)
    assert [m["name"] for m in out["per_model"]] == [n for n, _ in PAPER_CHAIN]
    for m, (_, epochs) in zip(out["per_model"], PAPER_CHAIN):
        assert {"name", "baseline_flops", "chain_flops", "train_per_sample", "teacher_forward_per_sample"} <= set(m)
        assert m["chain_epochs"] == epochs and m["baseline_epochs"] == 128
    assert sum(m["chain_flops"] for m in out["per_model"]) == out["chain_flops"]
    assert out["analytic_agrees"] is True


def test_table_output(capsys):
    assert main(["flops", "--chain", "paper-cc3m-vit"]) == 0
    out = capsys.readouterr().out
    assert "ViT-L-16" in out and "acceleration (baseline / chain FLOPs): 5.53x" in out


def test_chain_yaml_counts_what_the_launcher_counts(tmp_path, capsys, chain_dict):
    # Batch 32; a: 6 steps, b: 4 steps (aligns), c: 140 samples = 4 steps (does not align).
    for stage, budget in zip(chain_dict["stages"], ({"steps": 6}, {"steps": 4}, {"samples": 140})):
        stage["budget"] = budget
    chain_dict["stages"][2]["transfer"] = {"init": "official", "align": False}  # c pays no teacher forward
    path = write_chain(tmp_path / "chain.yaml", chain_dict)
    out = _flops_json(capsys, "--chain", str(path))
    cfgs = [s["model"] for s in chain_dict["stages"]]
    train = [count_sample_flops(c).train for c in cfgs]
    assert [m["chain_samples"] for m in out["per_model"]] == [192, 128, 128]
    assert [m["baseline_samples"] for m in out["per_model"]] == [192] * 3  # the first stage's budget
    assert [m["chain_flops"] for m in out["per_model"]] == [
        192 * train[0], 128 * (train[1] + count_sample_flops(cfgs[0]).forward), 128 * train[2]]
    assert out["baseline_flops"] == 192 * sum(train)
    assert out["acceleration"] == pytest.approx(out["baseline_flops"] / out["chain_flops"])
    assert out["analytic_max_rel_diff"] <= 0.05


def test_chain_yaml_with_epochs_and_a_baseline_override(tmp_path, capsys, chain_dict):
    # digits: 1,437 training samples; 2 epochs at batch 32 = 89 steps = 2,848 samples.
    chain_dict["stages"][0]["budget"] = {"epochs": 2}
    path = write_chain(tmp_path / "chain.yaml", chain_dict)
    out = _flops_json(capsys, "--chain", str(path))
    assert out["samples_per_epoch"] == 1437
    assert out["per_model"][0]["chain_samples"] == 89 * 32
    assert out["per_model"][0]["chain_epochs"] == pytest.approx(89 * 32 / 1437)
    out = _flops_json(capsys, "--chain", str(path), "--baseline-epochs", "10")
    assert [m["baseline_samples"] for m in out["per_model"]] == [14370] * 3


def test_built_in_chain_preset_and_errors(capsys):
    out = _flops_json(capsys, "--chain", "demo")
    assert [m["name"] for m in out["per_model"]] == ["tiny", "small", "base"]
    assert main(["flops", "--chain", "no-such-recipe"]) == 2
    err = capsys.readouterr().err
    assert "no-such-recipe" in err and "paper-cc3m-vit" in err
    assert main(["flops", "--chain", "paper-cc3m-vit", "--baseline-epochs", "3"]) == 2
    assert "--baseline-epochs" in capsys.readouterr().err
