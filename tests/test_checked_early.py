"""Problems the config, the ds_config and the command line can show are reported before any stage
starts (issue 20, "Checked too late"): each names its field and a fix, exit 2, no stage left `running`."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest

from compt.config import ChainConfigError, load_chain
from conftest import DS, REPO, TINY_CHAIN, tiny_model, write_chain


def problems(tmp_path, chain: dict, ds: dict | None = None) -> str:
    path = write_chain(tmp_path / "c.yaml", chain)
    ds_path = DS
    if ds is not None:
        ds_path = tmp_path / "ds.json"
        ds_path.write_text(json.dumps(ds))
    with pytest.raises(ChainConfigError) as e:
        load_chain(str(path), ds_path)
    return "\n".join(e.value.problems)


def test_nan_and_inf_settings_are_refused_with_their_fields(tmp_path):
    chain = copy.deepcopy(TINY_CHAIN)
    chain["stages"][0]["budget"] = {"epochs": float("nan")}
    chain["stages"][1]["transfer"]["alpha"] = float("inf")
    chain["stages"][2]["transfer"]["noise"] = float("inf")
    text = problems(tmp_path, chain)
    for field in ("stages.0.budget.epochs", "stages.1.transfer.alpha", "stages.2.transfer.noise"):
        assert f"{field}: Input should be a finite number" in text, text


def test_ds_config_gradient_accumulation_and_optimizer_are_checked(tmp_path):
    ds = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    for gas in (0, 2.5, "2"):
        text = problems(tmp_path, copy.deepcopy(TINY_CHAIN), {**ds, "gradient_accumulation_steps": gas})
        assert "gradient_accumulation_steps must be a whole number >= 1" in text
    text = problems(tmp_path, copy.deepcopy(TINY_CHAIN), {**ds, "optimizer": {"type": "AdamQ"}, "zero_optimization": 3})
    assert "optimizer.type 'AdamQ' is neither a DeepSpeed optimizer nor a torch.optim class" in text
    assert "zero_optimization must be a mapping" in text
    load_chain(str(write_chain(tmp_path / "ok.yaml", copy.deepcopy(TINY_CHAIN))), DS)  # the shipped config is fine


def test_a_data_error_does_not_hide_the_others_and_keeps_its_prefix(tmp_path):
    chain = copy.deepcopy(TINY_CHAIN)
    chain["data"]["bogus"] = 1
    chain["defaults"]["lr"] = -1
    text = problems(tmp_path, chain)
    assert "data.bogus: unknown field" in text and "defaults.lr" in text


def test_yaml_aliases_cannot_blow_a_config_up(tmp_path):
    levels = ["a: &a [x, x, x, x, x, x, x, x, x, x]"] + [
        f"{b}: &{b} [{', '.join(['*' + a] * 10)}]" for a, b in zip("abcdefg", "bcdefgh")]
    path = tmp_path / "bomb.yaml"
    path.write_text("name: bomb\n" + "\n".join(levels) + "\nstages: [{name: a, model: {x: *h}, budget: {steps: 1}}]\n")
    with pytest.raises(ChainConfigError, match="expands to more than"):
        load_chain(str(path))


def _launch(tmp_path, chain: dict, output, port: int, ds=DS):
    env = {**os.environ, "MASTER_PORT": str(port), "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "launch/chain.py", "--chain", str(write_chain(tmp_path / "c.yaml", chain)),
                           "--ds_config", str(ds), "--output", str(output)], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env=env)


def test_an_output_that_is_a_file_is_refused_before_anything_runs(tmp_path):
    target = tmp_path / "out"
    target.write_text("not a directory")
    done = _launch(tmp_path, copy.deepcopy(TINY_CHAIN), target, 29791)
    assert done.returncode == 2 and "is a file; give a directory" in done.stderr
    assert target.read_text() == "not a directory"


def test_batches_the_ranks_cannot_take_are_refused_before_any_stage(tmp_path):
    chain = copy.deepcopy(TINY_CHAIN)
    chain["stages"][2]["deepspeed"] = {"gradient_accumulation_steps": 3}  # 32 is no multiple of 1 x 3
    out = tmp_path / "run"
    done = _launch(tmp_path, chain, out, 29792)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "stages.2 (c): batch_size 32 is not divisible by ranks x gradient_accumulation_steps (1 x 3)" in done.stderr
    assert "Traceback" not in done.stderr and not (out / "manifest.json").exists()


def test_a_batch_larger_than_the_training_set_is_named_with_its_stage(tmp_path):
    """Built-in data has a known size: the check is part of validation, before any rank starts."""
    chain = copy.deepcopy(TINY_CHAIN)
    chain["stages"][1]["batch_size"] = 4096
    chain["defaults"]["batch_size"] = 2048
    text = problems(tmp_path, chain)
    assert ("stages.1.batch_size: 4096 is larger than the training set (1437 samples in data.kind digits); give a "
            "batch_size of at most 1437, or more data") in text
    assert "stages.0.batch_size: 2048 (defaults.batch_size) is larger than the training set" in text


def test_the_late_check_names_the_stage_for_data_whose_size_needs_the_ranks(tmp_path):
    """What stays late (webdataset, hf, text: sized once built) still stops before any stage."""
    from compt.engine import batch_problems, read_ds_config

    cfg = load_chain(str(write_chain(tmp_path / "c.yaml", copy.deepcopy(TINY_CHAIN))), DS)
    assert batch_problems(cfg, read_ds_config(DS), 1, 20) == [
        f"stages.{k} ({s.name}): batch_size 32 is larger than the training set (20 samples); lower batch_size"
        for k, s in enumerate(cfg.stages)]
    assert batch_problems(cfg, read_ds_config(DS), 3)[0].startswith("stages.0 (a): batch_size 32 is not divisible")


def test_a_csv_is_sized_and_its_columns_checked_before_any_rank_starts(tmp_path):
    rows = "".join(f"{i}.png\ta digit\t{i % 10}\n" for i in range(20))
    (tmp_path / "train.csv").write_text("filepath\ttitle\tlabel\n" + rows)
    (tmp_path / "val.csv").write_text("filepath\ttitle\tlabel\n" + rows)
    chain = copy.deepcopy(TINY_CHAIN)
    chain["data"] = {"kind": "csv", "train": str(tmp_path / "train.csv"), "val": str(tmp_path / "val.csv")}
    text = problems(tmp_path, chain)
    assert f"stages.0.batch_size: 32 (defaults.batch_size) is larger than the training set (20 samples in " \
           f"data.train); give a batch_size of at most 20" in text
    chain["data"]["caption_key"] = "caption"
    text = problems(tmp_path, chain)
    assert "data.caption_key: column 'caption' is not in" in text and "batch_size" not in text


def test_type_errors_do_not_hide_the_semantic_problems(tmp_path):
    """One pass: each bad field's type error, and what the rest of the config says without it (issue 20: a user
    fixed one batch of errors and then got a second)."""
    chain = copy.deepcopy(TINY_CHAIN)
    chain["kernels"] = "fast"  # type: not a choice
    chain["stages"][0]["model"] = 5  # type: neither a name nor a dict
    chain["stages"][0]["transfer"] = {"init": "official"}  # semantic: the first stage has no predecessor
    chain["stages"][1]["lr"] = "high"  # type
    chain["stages"][1]["budget"] = {"epochs": 0}  # value: a required field, given a stand-in
    chain["stages"][2]["model"] = tiny_model(32, 1)  # semantic: smaller than stage 1
    chain["stages"][2]["transfer"]["init"] = "exact"
    chain["defaults"]["betas"] = [0.9, "x"]
    text = problems(tmp_path, chain)
    for expected in ("kernels: Input should be 'auto', 'triton' or 'reference'",
                     "stages.0.model.str: Input should be a valid string",
                     "stages.1.lr: Input should be a valid number", "stages.1.budget: epochs must be > 0",
                     "defaults.betas.1: Input should be a valid number",
                     "stages.0.transfer: the first stage has no predecessor",
                     "stages.2.model: not larger than its predecessor"):
        assert expected in text, (expected, text)
    # Nothing about the stand-ins, and no comparison with the model that is not one.
    assert "invalid" not in text and "stages.1.model" not in text and "unknown open_clip model" not in text


def test_a_stage_that_is_not_a_mapping_keeps_the_others_checked(tmp_path):
    chain = copy.deepcopy(TINY_CHAIN)
    chain["stages"][1] = "b"
    chain["stages"][0]["model"] = "ViT-Nonexistent-99"
    chain["name"] = "bad name!"
    text = problems(tmp_path, chain)
    assert "stages.1: Input should be a valid dictionary" in text
    assert "stages.0.model: unknown open_clip model 'ViT-Nonexistent-99'" in text
    assert "name: String should match pattern" in text and "invalid" not in text
    chain["stages"] = []
    chain["data"]["val_fraction"] = 2.0
    text = problems(tmp_path, chain)
    assert "stages: List should have at least 1 item" in text and "data.val_fraction: 2.0 is not between 0 and 1" in text


def test_the_launcher_refuses_a_batch_larger_than_the_data_before_writing_anything(tmp_path):
    chain = copy.deepcopy(TINY_CHAIN)
    chain["stages"][2]["batch_size"] = 2000
    out = tmp_path / "run"
    done = _launch(tmp_path, chain, out, 29793)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "stages.2.batch_size: 2000 is larger than the training set (1437 samples" in done.stderr
    assert "Traceback" not in done.stderr and not out.exists()
