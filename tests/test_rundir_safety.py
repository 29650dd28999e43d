"""A run directory is user input: the paths its manifest holds must stay inside it. A manifest someone
edited (or sent you) whose stage `dir` or `weights` leads elsewhere stops the run with exit 2 naming the
entry, before anything is moved, hashed as verified, or trained."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from compt.config import ChainConfig
from compt.engine import read_ds_config
from compt.rundir import RunDir, RunDirError
from compt.stage import finished_stage
from compt.weights import sha256_file
from conftest import DS, REPO, write_chain


def _run(tmp_path, chain_dict) -> tuple[RunDir, ChainConfig, dict]:
    """A run directory as the launcher opens it (nothing trained), stage 0 marked done."""
    cfg, ds = ChainConfig.model_validate(chain_dict), read_ds_config(DS)
    run = RunDir(tmp_path / "run")
    run.open(cfg, ds)
    (run.stage_dir(0, "a")).mkdir(parents=True)
    (run.stage_dir(0, "a") / "model.safetensors").write_bytes(b"weights of a")
    (run.stage_dir(0, "a") / "metrics.json").write_text("{}")
    run.update_stage(0, status="done", weights="stages/0-a/model.safetensors",
                     sha256=sha256_file(run.stage_dir(0, "a") / "model.safetensors"))
    return run, cfg, ds


def _edit(run: RunDir, k: int, **fields) -> None:
    manifest = run.read_manifest()
    manifest["stages"][k].update(fields)
    run.manifest_path.write_text(json.dumps(manifest))


def _victim(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("not compt's")
    return victim


@pytest.mark.parametrize("where", ["relative", "absolute", "symlink"])
def test_accepting_a_config_change_never_moves_a_directory_outside_the_run(tmp_path, chain_dict, where):
    run, cfg, ds = _run(tmp_path, chain_dict)
    victim = _victim(tmp_path)
    if where == "relative":
        rel = "../victim"
    elif where == "absolute":
        rel = str(victim)
    else:  # a stage folder that is a symlink out of the run
        (run.root / "stages" / "9-link").symlink_to(victim)
        rel = "stages/9-link"
    _edit(run, 0, dir=rel)
    chain_dict["stages"][0]["lr"] = 5.0e-4  # stage 0 changed: --accept-config-change would move its dir aside
    changed = ChainConfig.model_validate(chain_dict)
    problem = run.conflict(changed, ds, accept_change=True)
    assert problem is not None and f"stage 0 'dir' is {rel!r}, which leads outside" in problem, problem
    with pytest.raises(RunDirError, match="stage 0 'dir'"):
        run.open(changed, ds, accept_change=True)
    assert (victim / "precious.txt").read_text() == "not compt's" and not (run.root / "replaced").exists()


def test_weights_outside_the_run_are_never_taken_as_a_finished_stage(tmp_path, chain_dict):
    """A manifest `weights` of ../../elsewhere with that file's sha256 used to count as verified."""
    run, cfg, _ = _run(tmp_path, chain_dict)
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes(b"someone else's file")
    _edit(run, 0, weights="../elsewhere.safetensors", sha256=sha256_file(outside))
    assert "stage 0 'weights' is '../elsewhere.safetensors'" in run.conflict(cfg, read_ds_config(DS))
    with pytest.raises(RunDirError, match="leads outside"):
        finished_stage(run, cfg, 0)


def test_an_intact_manifest_is_trusted(tmp_path, chain_dict):
    run, cfg, ds = _run(tmp_path, chain_dict)
    assert run.conflict(cfg, ds) is None and run.untrusted() is None
    assert finished_stage(run, cfg, 0).weights == run.stage_dir(0, "a") / "model.safetensors"
    chain_dict["stages"][0]["lr"] = 5.0e-4  # a confirmed change still moves the stage's own folder aside
    run.open(ChainConfig.model_validate(chain_dict), ds, accept_change=True)
    assert [p.relative_to(run.root / "replaced").parts[1:] for p in (run.root / "replaced").glob("*/*")] == [("0-a",)]
    assert not run.stage_dir(0, "a").exists() and run.read_manifest()["stages"][0]["status"] == "pending"


def test_the_launcher_exits_2_naming_the_entry_and_moves_nothing(tmp_path, chain_dict):
    run, _, _ = _run(tmp_path, chain_dict)
    victim = _victim(tmp_path)
    _edit(run, 0, dir="../victim")
    before = run.manifest_path.read_text()
    chain_dict["stages"][0]["lr"] = 5.0e-4
    chain = write_chain(tmp_path / "changed.yaml", chain_dict)
    proc = subprocess.run([sys.executable, "launch/chain.py", "--chain", str(chain), "--ds_config", DS,
                           "--output", str(run.root), "--accept-config-change"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "stage 0 'dir' is '../victim', which leads outside" in proc.stderr
    assert (victim / "precious.txt").exists() and run.manifest_path.read_text() == before
    assert not (run.root / "replaced").exists()
