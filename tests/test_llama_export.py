"""compt export on a LLaMA chain: a finished stage becomes a save_pretrained folder that
AutoModelForCausalLM and AutoTokenizer load offline with the stage's exact logits; the family
export; bad input; the Hub upload (mocked: no network here)."""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from compt.cli import main
from compt.llama.model import TIED_HEAD, build_llama, llama_state_shapes, resolve_llama_config
from compt.text import as_transformers, load_or_train_tokenizer, pydoc_documents
from compt.weights import sha256_file

VOCAB = 320
TEXTS = ["def main():\n    return 0", "The for statement", "naïve café 😀 1234", ""]
# a: the first model, GQA and tied embeddings; b: grown, untied, more heads and layers.
STAGES = [
    ("a", dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
               num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
    ("b", dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False)),
]


def _write_weights(path: Path, model: torch.nn.Module, cfg: dict, with_metadata: bool = True) -> str:
    state = model.state_dict()
    # As the trainer writes them: float32, LlamaForCausalLM names, lm_head.weight absent when tied.
    save_file({k: state[k].detach().float().contiguous() for k in llama_state_shapes(cfg)}, str(path),
              metadata={"format": "pt"} if with_metadata else None)
    return sha256_file(path)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished LLaMA run directory shaped like the trainer's, built without training."""
    run = tmp_path_factory.mktemp("llama-run")
    load_or_train_tokenizer(pydoc_documents()[:5], VOCAB, run / "tokenizer")
    chain = {"name": "tiny-llama", "family": "llama", "seed": 0, "data": {"kind": "pydoc", "seq_len": 64},
             "stages": [{"name": n, "model": cfg, "budget": {"steps": 4}} for n, cfg in STAGES]}
    entries = []
    for k, (name, raw) in enumerate(STAGES):
        cfg = resolve_llama_config(raw)
        torch.manual_seed(k)
        model = build_llama(cfg)
        with torch.no_grad():  # non-trivial norm gains, so a mis-mapped norm cannot hide
            for pname, p in model.named_parameters():
                if "norm" in pname:
                    p.copy_(1 + 0.2 * torch.randn(p.shape))
        d = run / "stages" / f"{k}-{name}"
        d.mkdir(parents=True)
        sha = _write_weights(d / "model.safetensors", model, cfg)
        from transformers import LlamaConfig

        LlamaConfig(**cfg).to_json_file(d / "config.json")
        if k == 1:  # metrics.json is optional; the second stage has one
            (d / "metrics.json").write_text(json.dumps({"stage": k, "name": name, "steps": 4, "global_batch": 8,
                                                        "val_loss": 4.25, "samples_seen": 32,
                                                        "flops": {"student_train": 3000, "teacher_forward": 500,
                                                                  "total": 3500}}))
        entries.append({"index": k, "name": name, "status": "done", "dir": f"stages/{k}-{name}",
                        "weights": f"stages/{k}-{name}/model.safetensors", "sha256": sha,
                        "metrics": {"flops_total": 1000 + 2500 * k, "samples_seen": 32}})
    manifest = {"chain": "tiny-llama", "config": chain, "ds_config": {}, "stages": entries}
    (run / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return run


def _stage_model(stage: Path) -> torch.nn.Module:
    """The stage's weights in compt's own build_llama model: the reference an export must match."""
    cfg = resolve_llama_config(stage)
    model = build_llama(cfg).eval()
    missing, unexpected = model.load_state_dict(load_file(str(stage / "model.safetensors")), strict=False)
    assert not unexpected and missing == ([TIED_HEAD] if cfg["tie_word_embeddings"] else [])
    return model


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits


def _front_matter(readme: Path) -> dict:
    text = readme.read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def _check_loads_with_stage_logits(folder: Path, stage: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    assert type(hf).__name__ == "LlamaForCausalLM" and next(hf.parameters()).dtype == torch.float32
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    # The exported tokenizer is the run's tokenizer.
    ref_tokenizer = as_transformers(stage.parent.parent / "tokenizer")
    assert batch.input_ids.tolist() == ref_tokenizer(TEXTS, return_tensors="pt", padding=True).input_ids.tolist()
    assert tokenizer.decode(tokenizer(TEXTS[2]).input_ids, skip_special_tokens=True) == TEXTS[2]
    # Same weights, same transformers code: the logits are bit-identical (max abs diff 0.0).
    assert torch.equal(_logits(hf, batch), _logits(_stage_model(stage), batch))


def test_export_loads_offline_with_identical_logits(run_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for k, (name, _) in enumerate(STAGES):
        stage, out = run_dir / "stages" / f"{k}-{name}", tmp_path / f"export-{name}"
        assert main(["export", str(stage), "--out", str(out), "--license", "apache-2.0"]) == 0
        assert f"wrote {out}" in capsys.readouterr().out
        assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                "tokenizer_config.json", "README.md"} <= {p.name for p in out.iterdir()}
        assert (out / "model.safetensors").read_bytes() == (stage / "model.safetensors").read_bytes()
        _check_loads_with_stage_logits(out, stage)

        meta = _front_matter(out / "README.md")
        assert meta["library_name"] == "transformers" and meta["license"] == "apache-2.0"
        assert meta["pipeline_tag"] == "text-generation" and {"llama", "compt"} <= set(meta["tags"])
        card = (out / "README.md").read_text()
        assert "AutoModelForCausalLM.from_pretrained" in card and "FLOPs per training sequence (64 tokens)" in card
        assert ("none: first model" in card) if k == 0 else ("`0-a`" in card and "val_loss" in card)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = AutoModelForCausalLM.from_pretrained(str(out)), AutoTokenizer.from_pretrained(str(out))
    prompt = tokenizer("def", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=3, do_sample=False)
    assert generated[0, :prompt.input_ids.shape[1]].tolist() == prompt.input_ids[0].tolist()
    assert generated.shape[1] <= prompt.input_ids.shape[1] + 3


def test_weights_without_metadata_are_rewritten_loadable(run_dir, tmp_path, monkeypatch):
    # transformers 4.x would refuse a safetensors file without metadata {"format": "pt"}.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    stage = run / "stages" / "0-a"
    cfg = resolve_llama_config(stage)
    model = _stage_model(stage)
    sha = _write_weights(stage / "model.safetensors", model, cfg, with_metadata=False)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["stages"][0]["sha256"] = sha
    (run / "manifest.json").write_text(json.dumps(manifest))
    assert main(["export", str(stage), "--out", str(tmp_path / "out")]) == 0
    from compt.weights import open_lazy

    with open_lazy(tmp_path / "out" / "model.safetensors") as exported:
        assert exported.metadata() == {"format": "pt"}
    _check_loads_with_stage_logits(tmp_path / "out", stage)


def test_export_all_writes_every_model_and_a_family_card(run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "family"
    assert main(["export", str(run_dir), "--all", "--out", str(out), "--push-to-hub", "org/tiny-llama",
                 "--dry-run"]) == 0
    listing = capsys.readouterr().out
    assert "would upload to org/tiny-llama" in listing and "1-b/model.safetensors" in listing and not out.exists()

    assert main(["export", str(run_dir), "--all", "--out", str(out), "--format", "transformers"]) == 0
    for k, (name, _) in enumerate(STAGES):
        assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= {
            p.name for p in (out / f"{k}-{name}").iterdir()}
    family = (out / "README.md").read_text()
    assert _front_matter(out / "README.md")["library_name"] == "transformers"
    assert all(f"[`{f}`]({f}/README.md)" in family for f in ("0-a", "1-b"))
    _check_loads_with_stage_logits(out / "1-b", run_dir / "stages" / "1-b")


def _copy_run(run_dir: Path, dst: Path) -> Path:
    shutil.copytree(run_dir, dst)
    return dst / "stages" / "0-a"


@pytest.mark.parametrize("problem", ["not_done", "corrupt_weights", "weights_of_another_model", "no_tokenizer",
                                     "open_clip_format", "both_format"])
def test_bad_input_is_a_clear_error_and_writes_nothing(run_dir, tmp_path, capsys, problem):
    stage = _copy_run(run_dir, tmp_path / "run")
    run = stage.parent.parent
    out = tmp_path / "exports" / "model"
    args = ["export", str(stage), "--out", str(out)]
    manifest = json.loads((run / "manifest.json").read_text())
    if problem == "not_done":
        manifest["stages"][0]["status"] = "running"
        expected = "status 'running'"
    elif problem == "corrupt_weights":
        data = bytearray((stage / "model.safetensors").read_bytes())
        data[-1] ^= 0xFF
        (stage / "model.safetensors").write_bytes(bytes(data))
        expected = "does not match the sha256"
    elif problem == "weights_of_another_model":
        # Stage b's (valid, correctly hashed) weights beside stage a's config.json.
        shutil.copyfile(run / "stages" / "1-b" / "model.safetensors", stage / "model.safetensors")
        manifest["stages"][0]["sha256"] = manifest["stages"][1]["sha256"]
        expected = "does not hold LlamaForCausalLM(config.json)'s tensors"
    elif problem == "no_tokenizer":
        shutil.rmtree(run / "tokenizer")
        expected = "tokenizer"
    else:
        args += ["--format", problem.split("_")[0] if problem == "both_format" else "open_clip"]
        expected = "LLaMA stages export only as --format transformers"
    (run / "manifest.json").write_text(json.dumps(manifest))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err, err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written


def test_push_to_hub_uploads_the_export(run_dir, tmp_path, capsys, monkeypatch):
    from huggingface_hub import HfApi

    secret = "hf_doNotPrintThisToken0123456789"
    monkeypatch.setenv("HF_TOKEN", secret)
    calls = {}

    class Repo:
        repo_id = "org/tiny-llama-b"

    def create_repo(self, repo_id, **kw):
        calls["create_repo"] = (repo_id, kw)
        return Repo()

    def create_branch(self, repo_id, **kw):
        calls["create_branch"] = (repo_id, kw)

    def upload_folder(self, **kw):
        calls["upload_folder"] = copy.deepcopy(kw)
        calls["uploaded_files"] = sorted(p.name for p in Path(kw["folder_path"]).iterdir())
        return "https://huggingface.co/org/tiny-llama-b/commit/abc"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_branch", create_branch)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    out = tmp_path / "push"
    assert main(["export", str(run_dir / "stages" / "1-b"), "--out", str(out), "--push-to-hub", "org/tiny-llama-b",
                 "--private"]) == 0
    printed = capsys.readouterr()
    assert calls["create_repo"] == ("org/tiny-llama-b", {"private": True, "exist_ok": True, "repo_type": "model"})
    assert "create_branch" not in calls and Path(calls["upload_folder"]["folder_path"]) == out
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= set(calls["uploaded_files"])
    assert 'from_pretrained("org/tiny-llama-b")' in (out / "README.md").read_text()
    assert "uploaded to https://huggingface.co/org/tiny-llama-b" in printed.out
    assert secret not in printed.out + printed.err
