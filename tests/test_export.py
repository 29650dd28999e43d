"""compt export: a finished stage in open_clip's and transformers' Hub formats, loaded back
with both libraries and compared with compt's own model; the family export; bad input;
the Hub upload (mocked: no network here)."""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

from compt.cli import main
from compt.clip.export import to_transformers_state_dict, transformers_config, transformers_problem
from compt.clip.hf_tokenizer import clip_tokenizer
from compt.clip.model import build_clip, export_name_and_tensor, load_into, preprocess_for, write_model_config
from compt.config import ChainConfig
from compt.weights import save_zero3_module, sha256_file

CTX = 16  # the demo chain's text context length (not open_clip's default 77)
TEXTS = ["a photo of the number 3", "7", "It's a HANDWRITTEN digit, isn't it?",
         "a much longer caption about a handwritten digit that runs past sixteen tokens for sure", "",
         "naïve café 😀 1234"]


def _model_cfg(width: int, layers: int = 1, **vision) -> dict:
    return {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 16, "patch_size": 8, "width": width, "layers": layers, "head_width": 16,
                       **vision},
        "text_cfg": {"context_length": CTX, "vocab_size": 49408, "width": width, "heads": width // 16,
                     "layers": layers},
    }


# a: the first model; b: grown, QuickGELU (exercises hidden_act); c: no_ln_pre, which
# transformers' CLIP cannot express.
STAGES = [
    ("a", _model_cfg(32), None),
    ("b", {**_model_cfg(64, 2), "quick_gelu": True}, {"init": "official", "align": True, "alpha": 500.0}),
    ("c", _model_cfg(64, 2, no_ln_pre=True), {"init": "official", "align": False, "alpha": 0.0}),
]


def _randomise(model: torch.nn.Module, seed: int) -> None:
    # Non-trivial norms and biases too, so a mis-mapped LayerNorm or bias cannot hide.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name == "logit_scale":
                p.fill_(2.5)
            elif "ln" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            else:
                p.copy_(0.1 * noise)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run directory shaped like the launcher's, built without DeepSpeed training."""
    run = tmp_path_factory.mktemp("run")
    chain = {"name": "tiny-export", "seed": 0, "data": {"kind": "digits", "render_size": 16},
             "defaults": {"batch_size": 32},
             "stages": [{"name": n, "model": cfg, "budget": {"steps": 4}, **({"transfer": t} if t else {})}
                        for n, cfg, t in STAGES]}
    resolved = ChainConfig.model_validate(chain).model_dump(mode="json")
    entries = []
    for k, (name, cfg, transfer) in enumerate(STAGES):
        model = build_clip(cfg)
        _randomise(model, k)
        d = run / "stages" / f"{k}-{name}"
        d.mkdir(parents=True)
        sha = save_zero3_module(model, d / "model.safetensors", rename=export_name_and_tensor)
        write_model_config(d / "config.json", cfg)
        params = sum(p.numel() for p in model.parameters())
        metrics = {"stage": k, "name": name, "steps": 4, "global_batch": 32, "ranks": 1, "transfer": transfer,
                   "zeroshot_top1": 0.25 + k / 10, "zeroshot_top5": 0.75,
                   "retrieval": {"image_to_text": {"R@1": 0.1, "R@5": 0.3, "R@10": 0.5},
                                 "text_to_image": {"R@1": 0.2, "R@5": 0.4, "R@10": 0.6}},
                   "init_zeroshot_top1": None if k == 0 else 0.2, "samples_seen": 128,
                   "flops": {"student_train": 1000 * (k + 1), "teacher_forward": 100 * k, "total": 1100 * k + 1000},
                   "params": params, "wall_seconds": 1.5}
        (d / "metrics.json").write_text(json.dumps(metrics, indent=2))
        entries.append({"index": k, "name": name, "status": "done", "dir": f"stages/{k}-{name}",
                        "weights": f"stages/{k}-{name}/model.safetensors", "sha256": sha,
                        "metrics": {"zeroshot_top1": metrics["zeroshot_top1"], "flops_total": metrics["flops"]["total"],
                                    "params": params, "samples_seen": 128}})
    manifest = {"chain": "tiny-export", "config": resolved, "ds_config": {}, "stages": entries}
    (run / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return run


def _compt_model(stage: Path) -> torch.nn.Module:
    model = build_clip(json.loads((stage / "config.json").read_text())).eval()
    load_into(model, load_file(str(stage / "model.safetensors")))
    return model


def _features(x) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected embedding.
    return x if torch.is_tensor(x) else x.pooler_output


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _front_matter(readme: Path) -> dict:
    text = readme.read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_export_loads_in_open_clip_and_transformers_with_the_same_embeddings(run_dir, tmp_path, monkeypatch):
    from transformers import CLIPModel, CLIPProcessor

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    stage, out = run_dir / "stages" / "1-b", tmp_path / "export"
    assert main(["export", str(stage), "--out", str(out), "--license", "apache-2.0"]) == 0

    compt_model = _compt_model(stage)
    tokens = preprocess_for(compt_model_cfg := json.loads((stage / "config.json").read_text())).tokenizer(TEXTS)
    pixels = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))

    oc_model, _, oc_preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    oc_tokens = open_clip.get_tokenizer(f"local-dir:{out}")(TEXTS)
    assert oc_tokens.shape == (len(TEXTS), CTX) and torch.equal(oc_tokens, tokens)

    hf_model = CLIPModel.from_pretrained(str(out)).eval()
    processor = CLIPProcessor.from_pretrained(str(out))
    hf_inputs = processor(text=TEXTS, padding="max_length", max_length=CTX, truncation=True, return_tensors="pt")
    # Same ids up to and including the end token; open_clip pads with 0, transformers with the end token.
    eot = (tokens == 49407).int().argmax(-1)
    for i, n in enumerate(eot.tolist()):
        assert hf_inputs.input_ids[i, :n + 1].tolist() == tokens[i, :n + 1].tolist()

    with torch.no_grad():
        ref_img, ref_txt = compt_model.encode_image(pixels), compt_model.encode_text(tokens)
        oc_img, oc_txt = oc_model.eval().encode_image(pixels), oc_model.encode_text(oc_tokens)
        hf_img = _features(hf_model.get_image_features(pixel_values=pixels))
        hf_txt = _features(hf_model.get_text_features(**hf_inputs))
    assert _maxdiff(oc_img, ref_img) <= 1e-6 and _maxdiff(oc_txt, ref_txt) <= 1e-6
    assert _maxdiff(hf_img, oc_img) <= 1e-5 and _maxdiff(hf_txt, oc_txt) <= 1e-5
    assert hf_model.logit_scale.item() == pytest.approx(oc_model.logit_scale.item())
    assert hf_model.config.text_config.hidden_act == "quick_gelu"

    # The image processor is the eval transform up to resampling differences.
    image = Image.fromarray((np.random.RandomState(0).rand(40, 30, 3) * 255).astype("uint8"))
    hf_pixels = processor(images=image, return_tensors="pt").pixel_values[0]
    oc_pixels = oc_preprocess(image)
    assert hf_pixels.shape == oc_pixels.shape == (3, 16, 16)
    assert _maxdiff(hf_pixels, oc_pixels) < 0.05 and (hf_pixels - oc_pixels).abs().mean() < 1e-2

    meta = _front_matter(out / "README.md")
    assert meta["library_name"] == "open_clip" and meta["license"] == "apache-2.0"
    assert meta["pipeline_tag"] == "zero-shot-image-classification"
    assert {"clip", "compt", "chain-of-models"} <= set(meta["tags"])
    card = (out / "README.md").read_text()
    for expected in ("`0-a`", "alpha = 500", "steps=4", "zeroshot_top1", "local-dir:", "CLIPModel.from_pretrained",
                     "FLOPs, from scratch"):
        assert expected in card
    assert not compt_model_cfg.get("preprocess_cfg")


def test_tokenizer_ids_match_open_clip():
    ours, theirs = clip_tokenizer(CTX), open_clip.SimpleTokenizer(context_length=CTX)
    texts = TEXTS + ["A  lot\tof   whitespace\n", "punctuation!!! ... ?", "x" * 40, "#hashtag @user 3.14"]
    ids = ours(texts, padding="max_length", max_length=CTX, truncation=True, return_tensors="pt").input_ids
    ref = theirs(texts)
    for i, n in enumerate((ref == 49407).int().argmax(-1).tolist()):
        assert ids[i, :n + 1].tolist() == ref[i, :n + 1].tolist(), texts[i]
        assert set(ids[i, n + 1:].tolist()) <= {49407}


def test_export_all_writes_every_model_and_a_family_card(run_dir, tmp_path, capsys):
    out = tmp_path / "family"
    assert main(["export", str(run_dir), "--all", "--out", str(out), "--push-to-hub", "org/tiny",
                 "--dry-run"]) == 0
    listing = capsys.readouterr().out
    assert "would upload to org/tiny" in listing and "1-b/model.safetensors" in listing and not out.exists()

    assert main(["export", str(run_dir), "--all", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "2-c: transformers format skipped" in printed and "no_ln_pre" in printed
    for folder in ("0-a", "1-b"):
        assert {"open_clip_model.safetensors", "model.safetensors", "config.json", "tokenizer.json",
                "README.md"} <= {p.name for p in (out / folder).iterdir()}
    assert {p.name for p in (out / "2-c").iterdir()} == {"open_clip_config.json", "open_clip_model.safetensors",
                                                        "README.md"}
    assert "no_ln_pre" in (out / "2-c" / "README.md").read_text()
    family = (out / "README.md").read_text()
    assert _front_matter(out / "README.md")["library_name"] == "open_clip"
    assert all(f"[`{f}`]({f}/README.md)" in family for f in ("0-a", "1-b", "2-c"))
    # The open_clip-only model still loads and matches compt's model.
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out / '2-c'}")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert _maxdiff(model.eval().encode_image(x), _compt_model(run_dir / "stages" / "2-c").encode_image(x)) <= 1e-6


def test_transformers_problem_names_what_cannot_be_expressed():
    base = _model_cfg(32)
    assert transformers_problem(base) is None
    assert transformers_problem({**base, "quick_gelu": True}) is None
    cases = {
        "attentional_pool": {**base, "vision_cfg": {**base["vision_cfg"], "attentional_pool": True}},
        "no_ln_pre": {**base, "vision_cfg": {**base["vision_cfg"], "no_ln_pre": True}},
        "pool_type 'avg'": {**base, "vision_cfg": {**base["vision_cfg"], "pool_type": "avg"}},
        "with bias": {**base, "text_cfg": {**base["text_cfg"], "proj_bias": True}},
        "logit bias": {**base, "init_logit_bias": -10.0},
        "hf_tokenizer_name": {**base, "text_cfg": {**base["text_cfg"], "hf_tokenizer_name": "bert-base-uncased"}},
    }
    for needle, cfg in cases.items():
        problem = transformers_problem(cfg)
        assert problem and needle in problem, (needle, problem)


@pytest.mark.parametrize("variant", [
    {"quick_gelu": True},
    {"vision_cfg": {"final_ln_after_pool": True, "mlp_ratio": 2.5, "norm_kwargs": {"eps": 1e-6}}},
    {"text_cfg": {"pool_type": "eos", "eos_id": 49407}},
])
def test_conversion_matches_open_clip_for_expressible_variants(variant):
    from transformers import CLIPModel

    cfg = copy.deepcopy(_model_cfg(32, 2))
    for key, value in variant.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) else value
    assert transformers_problem(cfg) is None
    model = build_clip(cfg).eval()
    _randomise(model, 7)
    state = {k: export_name_and_tensor(k, v)[1] for k, v in model.state_dict().items()}
    hf = CLIPModel(transformers_config(cfg)).eval()
    hf.load_state_dict(to_transformers_state_dict(state.__getitem__, cfg), strict=True)
    pixels = torch.randn(2, 3, 16, 16)
    tokens = open_clip.SimpleTokenizer(context_length=CTX)(TEXTS)  # padded with 0, as open_clip does
    with torch.no_grad():
        assert _maxdiff(_features(hf.get_image_features(pixel_values=pixels)), model.encode_image(pixels)) <= 1e-5
        assert _maxdiff(_features(hf.get_text_features(input_ids=tokens)), model.encode_text(tokens)) <= 1e-5


def _copy_run(run_dir: Path, dst: Path, stage: str) -> Path:
    """Manifest plus one stage: enough for a single-stage export, cheap to break."""
    dst.mkdir()
    shutil.copy(run_dir / "manifest.json", dst / "manifest.json")
    shutil.copytree(run_dir / "stages" / stage, dst / "stages" / stage)
    return dst / "stages" / stage


def _set_status(run: Path, index: int, status: str) -> None:
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["stages"][index]["status"] = status
    (run / "manifest.json").write_text(json.dumps(manifest))


def _set_entry(run: Path, index: int, **fields) -> None:
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["stages"][index].update(fields)
    (run / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("problem", ["not_done", "missing_weights", "corrupt_weights", "out_not_empty",
                                     "transformers_unsupported", "weights_outside_run", "weights_absolute",
                                     "pickle_weights", "malformed_header", "foreign_tensors", "out_is_a_file",
                                     "out_is_the_stage"])
def test_bad_input_is_a_clear_error_and_writes_nothing(run_dir, tmp_path, capsys, problem):
    stage = _copy_run(run_dir, tmp_path / "run", "2-c" if problem == "transformers_unsupported" else "0-a")
    out = tmp_path / "exports" / "model"
    args = ["export", str(stage), "--out", str(out)]
    if problem == "not_done":
        _set_status(tmp_path / "run", 0, "running")
        expected = "status 'running'"
    elif problem == "missing_weights":
        (stage / "model.safetensors").unlink()
        expected = "is missing"
    elif problem == "corrupt_weights":
        data = bytearray((stage / "model.safetensors").read_bytes())
        data[-1] ^= 0xFF
        (stage / "model.safetensors").write_bytes(bytes(data))
        expected = "does not match the sha256"
    elif problem == "out_not_empty":
        out.mkdir(parents=True)
        (out / "keep.txt").write_text("mine")
        expected = "not an empty directory"
    elif problem in ("weights_outside_run", "weights_absolute"):
        # A manifest naming a file outside the run, with that file's sha256: never exported.
        victim = tmp_path / "secret.safetensors"
        shutil.copy(stage / "model.safetensors", victim)
        rel = "../secret.safetensors" if problem == "weights_outside_run" else str(victim)
        _set_entry(tmp_path / "run", 0, weights=rel, sha256=sha256_file(victim))
        expected = f"stage 0 'weights' is {rel!r}, which leads outside"
    elif problem in ("pickle_weights", "malformed_header", "foreign_tensors"):
        # The weights replaced and the manifest's sha256 updated to match: still refused.
        weights = stage / "model.safetensors"
        if problem == "pickle_weights":
            torch.save({"visual.proj": torch.zeros(2)}, weights)
            expected = "is not a valid safetensors file"
        elif problem == "malformed_header":
            weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + bytes(64))
            expected = "is not a valid safetensors file"
        else:
            save_file({"visual.proj": torch.zeros(2, 2), "extra": torch.zeros(1)}, str(weights))
            expected = "does not hold the tensors of the model in its config.json (missing: "
        _set_entry(tmp_path / "run", 0, sha256=sha256_file(weights))
        args += ["--format", "open_clip"]
    elif problem == "out_is_a_file":
        out.parent.mkdir(parents=True)
        out.write_text("mine")
        expected = "already exists and is not an empty directory"
    elif problem == "out_is_the_stage":
        args[args.index("--out") + 1] = str(stage)
        expected = "already exists and is not an empty directory"
    else:
        args += ["--format", "transformers"]
        expected = "cannot express vision_cfg.no_ln_pre"
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err, err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written


def test_push_to_hub_uploads_the_export_and_never_prints_the_token(run_dir, tmp_path, capsys, monkeypatch):
    from huggingface_hub import HfApi

    secret = "hf_doNotPrintThisToken0123456789"
    monkeypatch.setenv("HF_TOKEN", secret)
    calls = {}

    class Repo:
        repo_id = "org/tiny-a"

    def create_repo(self, repo_id, **kw):
        calls["create_repo"] = (repo_id, kw)
        return Repo()

    def create_branch(self, repo_id, **kw):
        calls["create_branch"] = (repo_id, kw)

    def upload_folder(self, **kw):
        calls["upload_folder"] = copy.deepcopy(kw)
        calls["uploaded_files"] = sorted(p.name for p in Path(kw["folder_path"]).iterdir())
        return "https://huggingface.co/org/tiny-a/commit/abc"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_branch", create_branch)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)

    stage = run_dir / "stages" / "0-a"
    out = tmp_path / "dry"
    assert main(["export", str(stage), "--out", str(out), "--push-to-hub", "org/tiny-a", "--private",
                 "--revision", "dev", "--dry-run"]) == 0
    dry = capsys.readouterr()
    assert not calls and not out.exists()
    assert "would upload to org/tiny-a (private, revision dev)" in dry.out and "open_clip_model.safetensors" in dry.out

    out = tmp_path / "push"
    assert main(["export", str(stage), "--out", str(out), "--format", "open_clip", "--push-to-hub", "org/tiny-a",
                 "--private", "--revision", "dev"]) == 0
    printed = capsys.readouterr()
    assert calls["create_repo"] == ("org/tiny-a", {"private": True, "exist_ok": True, "repo_type": "model"})
    assert calls["create_branch"][0] == "org/tiny-a" and calls["create_branch"][1]["branch"] == "dev"
    assert calls["upload_folder"]["repo_id"] == "org/tiny-a" and calls["upload_folder"]["revision"] == "dev"
    assert Path(calls["upload_folder"]["folder_path"]) == out
    assert calls["uploaded_files"] == ["README.md", "open_clip_config.json", "open_clip_model.safetensors"]
    assert 'hf-hub:org/tiny-a' in (out / "README.md").read_text()
    assert secret not in printed.out + printed.err + dry.out + dry.err
    assert all(secret not in json.dumps(c, default=str) for c in calls.values())

    # No token: refused before anything is written.
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    assert main(["export", str(stage), "--out", str(tmp_path / "none"), "--push-to-hub", "org/tiny-a"]) == 2
    assert "no Hugging Face token" in capsys.readouterr().err and not (tmp_path / "none").exists()


def test_format_choices_are_every_familys_formats(capsys):
    # `compt export --format` lists its choices without importing the families; they must agree.
    from compt.families import all_families

    with pytest.raises(SystemExit):
        main(["export", "--help"])
    listed = capsys.readouterr().out.split("--format {")[1].split("}")[0].split(",")
    formats = [f for family in all_families() for f in family.exporter().FORMATS]
    assert sorted(listed) == sorted(set(formats))
    assert all(family.exporter().DEFAULT_FORMAT in family.exporter().FORMATS for family in all_families())


@pytest.mark.parametrize("problem", ["corrupt_weights", "weights_outside_run", "foreign_tensors"])
def test_compt_eval_verifies_the_manifest_sha256_and_the_tensors(run_dir, tmp_path, capsys, problem):
    """compt eval scores only the weights the manifest recorded: a flipped byte, a file outside the run or
    another model's tensors are refused (exit 2), never evaluated."""
    stage = _copy_run(run_dir, tmp_path / "run", "0-a")
    weights = stage / "model.safetensors"
    if problem == "corrupt_weights":
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
        expected = "does not match the sha256 in the manifest"
    elif problem == "weights_outside_run":
        shutil.copy(weights, tmp_path / "elsewhere.safetensors")
        _set_entry(tmp_path / "run", 0, weights="../elsewhere.safetensors",
                   sha256=sha256_file(tmp_path / "elsewhere.safetensors"))
        expected = "stage 0 'weights' is '../elsewhere.safetensors', which leads outside"
    else:
        save_file({"visual.proj": torch.zeros(2, 2)}, str(weights))
        _set_entry(tmp_path / "run", 0, sha256=sha256_file(weights))
        expected = "does not hold the tensors of the model in its config.json"
    assert main(["eval", str(stage)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err, err


def test_compt_eval_of_an_intact_stage_still_works(run_dir, tmp_path, capsys):
    stage = _copy_run(run_dir, tmp_path / "run", "0-a")
    assert main(["eval", str(stage), "--json"]) == 0
    assert "zeroshot_top1" in json.loads(capsys.readouterr().out)
