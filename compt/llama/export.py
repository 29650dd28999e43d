"""Export finished LLaMA chain stages as transformers ``save_pretrained`` folders (config.json,
model.safetensors, the run's tokenizer, a model card) that AutoModelForCausalLM loads offline.

The stage's weights already carry LlamaForCausalLM names, so they are copied byte for byte once
their sha256, names and shapes are checked. As for CLIP, everything is checked before anything
is written, and the export is built in a temporary folder renamed into place at the end.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from compt import export as core
from compt.card import (budget, chain_path, flatten, flops_summary, flops_text, format_value, metadata_header,
                        predecessor)
from compt.export import (ExportError, ExportResult, FinishedStage, check_out, finished_weights, read_json,
                          tensor_mismatch, write_staged)

FAMILY = "llama"  # the chain config's `family:`
FORMATS = ("transformers",)
DEFAULT_FORMAT = "transformers"
TOKENIZER_DIR = "tokenizer"  # <run>/tokenizer/tokenizer.json, shared by every stage
TAGS = ["llama", "compt", "chain-of-models", "transformers"]
DEFAULT_SEQ_LEN = 128  # compt.text.TextDataConfig.seq_len's default


# ---------------------------------------------------------------------------
# A finished stage of a LLaMA run directory.
# ---------------------------------------------------------------------------

def read_stage(stage_dir: str | Path) -> FinishedStage:
    """A stage the manifest marks done, its weights checked against the recorded sha256 and
    against LlamaForCausalLM(config.json)'s tensor names and shapes."""
    return core.read_stage(stage_dir, _stage_from_entry)


def read_run(run_dir: str | Path) -> list[FinishedStage]:
    """Every stage of a run, all finished and intact, or one error naming each problem."""
    return core.read_run(run_dir, _stage_from_entry)


def _stage_from_entry(run: Path, manifest: dict[str, Any], entry: dict[str, Any]) -> FinishedStage:
    from compt.llama.model import resolve_llama_config

    label, weights = finished_weights(run, entry)
    stage_dir = run / entry["dir"]
    config_path = stage_dir / "config.json"
    if not config_path.is_file():
        raise ExportError(f"{label}: model config {config_path} is missing")
    try:
        model_cfg = resolve_llama_config(config_path)
    except ValueError as e:
        raise ExportError(f"{label}: model config {config_path}: {e}") from e
    _check_weights(label, weights, model_cfg)
    # metrics.json is optional here: the card shows what is there.
    metrics_path = stage_dir / "metrics.json"
    metrics = read_json(metrics_path, f"{label}: metrics") if metrics_path.is_file() else {}
    return FinishedStage(run, int(entry["index"]), entry["name"], stage_dir, weights, entry["sha256"],
                         model_cfg, metrics, manifest)


def _check_weights(label: str, weights: Path, model_cfg: dict[str, Any]) -> None:
    """The file holds exactly LlamaForCausalLM(model_cfg)'s stored tensors, so the copy loads strictly."""
    from compt.llama.model import llama_state_shapes
    from compt.weights import open_lazy

    want = llama_state_shapes(model_cfg)
    try:
        with open_lazy(weights) as src:
            got = {k: src.shape(k) for k in src.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise ExportError(f"{label}: weights file {weights} is not a readable safetensors file ({e})") from e
    mismatch = tensor_mismatch(got, want)
    if mismatch:
        raise ExportError(f"{label}: weights file {weights} does not hold LlamaForCausalLM(config.json)'s "
                          f"tensors ({mismatch}): the weights and config.json are from different models; "
                          "retrain the stage (rerun the launcher with the same --output)")


def tokenizer_path(stage: FinishedStage) -> Path:
    return stage.run / TOKENIZER_DIR / "tokenizer.json"


def _check_tokenizer(stage: FinishedStage) -> None:
    path = tokenizer_path(stage)
    if not path.is_file():
        raise ExportError(f"stage {stage.folder}: the run's tokenizer {path} is missing; the text data writes it "
                          "when the chain trains: rerun the launcher with the same --output")
    from tokenizers import Tokenizer

    try:
        size = Tokenizer.from_file(str(path)).get_vocab_size()
    except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception on bad JSON
        raise ExportError(f"stage {stage.folder}: the run's tokenizer {path} is not readable ({e})") from e
    if size > stage.model_cfg["vocab_size"]:
        raise ExportError(f"stage {stage.folder}: the tokenizer {path} has {size} tokens but config.json's "
                          f"vocab_size is {stage.model_cfg['vocab_size']}: the tokenizer is not this model's; "
                          "restore the run's tokenizer/ folder")


# ---------------------------------------------------------------------------
# transformers' save_pretrained layout.
# ---------------------------------------------------------------------------

def _metadata_is_pt(weights: Path) -> bool:
    from compt.weights import open_lazy

    with open_lazy(weights) as src:
        return src.metadata().get("format") == "pt"


def write_transformers(stage: FinishedStage, out: Path) -> list[str]:
    """config.json, generation_config.json, model.safetensors (the stage's file, byte for byte) and
    the tokenizer files; returns notes."""
    from transformers import GenerationConfig, LlamaConfig

    from compt.text import as_transformers

    notes = []
    config = LlamaConfig(**stage.model_cfg)
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(str(out))
    if _metadata_is_pt(stage.weights):
        shutil.copyfile(stage.weights, out / "model.safetensors")
    else:
        # transformers 4.x refuses a safetensors file without metadata format "pt" (5.x does not);
        # the export is for whatever version its users have.
        from safetensors.torch import load_file, save_file

        save_file(load_file(str(stage.weights)), str(out / "model.safetensors"), metadata={"format": "pt"})

    tokenizer = as_transformers(tokenizer_path(stage))
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(str(out))
    for name in ("bos", "eos"):
        ids = getattr(config, f"{name}_token_id"), getattr(tokenizer, f"{name}_token_id")
        if ids[0] != ids[1]:
            notes.append(f"stage {stage.folder}: config.json's {name}_token_id {ids[0]} is not the tokenizer's "
                         f"{getattr(tokenizer, f'{name}_token')} id {ids[1]}")
    generation = GenerationConfig.from_model_config(config)
    generation.pad_token_id = tokenizer.pad_token_id
    generation.save_pretrained(str(out))
    return notes


# ---------------------------------------------------------------------------
# Model cards.
# ---------------------------------------------------------------------------

def _header(license: str) -> str:
    return metadata_header(license, library_name="transformers", pipeline_tag="text-generation", tags=TAGS)


def _seq_len(stage: FinishedStage) -> int:
    return int((stage.manifest["config"].get("data") or {}).get("seq_len") or DEFAULT_SEQ_LEN)


def _params(cfg: dict[str, Any]) -> int:
    from compt.llama.model import llama_state_shapes

    total = 0
    for shape in llama_state_shapes(cfg).values():
        n = 1
        for s in shape:
            n *= s
        total += n
    return total


def _architecture(cfg: dict[str, Any]) -> list[str]:
    heads = f"{cfg['num_attention_heads']} query heads, {cfg['num_key_value_heads']} key/value heads"
    return [
        f"| architecture | LlamaForCausalLM: width {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, "
        f"{heads}, head dim {cfg['head_dim']}, MLP width {cfg['intermediate_size']} |",
        f"| vocabulary | {cfg['vocab_size']:,} ({'tied' if cfg.get('tie_word_embeddings') else 'untied'} "
        "input/output embeddings) |",
        f"| parameters | {_params(cfg):,} |",
    ]


def _flops_rows(stage: FinishedStage) -> list[str]:
    from compt.flops import format_flops
    from compt.llama.flops import count_sequence_flops

    seq_len = _seq_len(stage)
    per_seq = count_sequence_flops(stage.model_cfg, seq_len)
    rows = [f"| FLOPs per training sequence ({seq_len} tokens) | training {format_flops(per_seq.train)}, "
            f"forward {format_flops(per_seq.forward)} |"]
    f = flops_summary(stage)
    if f["total"] is not None:
        rows.append(f"| FLOPs, this stage | {flops_text(f['total'])} (student training "
                    f"{flops_text(f['student_train'])}, teacher forward {flops_text(f['teacher_forward'])}) |")
    if f["chain_total"] is not None:
        rows.append(f"| FLOPs, chain up to this model | {flops_text(f['chain_total'])} |")
    return rows


def _load_snippet(repo_id: str | None, subfolder: str | None) -> list[str]:
    where = f'"{repo_id}"' if repo_id else '"path/to/this/folder"'
    sub = f', subfolder="{subfolder}"' if repo_id and subfolder else ""
    return ["## How to load", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
            f"model = AutoModelForCausalLM.from_pretrained({where}{sub})",
            f"tokenizer = AutoTokenizer.from_pretrained({where}{sub})",
            'inputs = tokenizer("def main():", return_tensors="pt")',
            "logits = model(**inputs).logits",
            "```", "", "The tokenizer is the one the chain trained with: the run's own byte-level BPE (`<s>` is "
            "prepended, as in LLaMA), or the tokenizer its config gave (`data.tokenizer_path`).", ""]


def stage_card(stage: FinishedStage, license: str = "other", repo_id: str | None = None,
               subfolder: str | None = None) -> str:
    """README.md for one exported LLaMA model."""
    n = len(stage.manifest["stages"])
    prev = predecessor(stage)
    data = stage.manifest["config"].get("data") or {}
    lines = [
        _header(license),
        f"# {stage.chain} / {stage.folder}",
        "",
        f"A LLaMA-architecture causal language model, stage {stage.index} of {n} of the chain `{stage.chain}`, "
        "trained with compt (Chain-of-Models Pre-Training on DeepSpeed): each model of the family starts from "
        "its trained predecessor (growth in parameter space) and trains a short budget on the chain's text data, "
        "with its predecessor as a distillation teacher.",
        "",
        "## Model", "", "| | |", "|---|---|", *_architecture(stage.model_cfg), "",
        "## Chain lineage", "", f"Chain: {chain_path(stage)}", "", "| | |", "|---|---|",
        f"| predecessor | {f'`{prev}`' if prev else 'none: first model of the chain'} |",
        f"| budget | {budget(stage)} |",
        f"| training data | {data.get('kind', 'n/a')}, sequences of {_seq_len(stage)} tokens |",
        *_flops_rows(stage), "",
    ]
    rows = flatten({k: v for k, v in stage.metrics.items() if k not in {"stage", "name", "flops", "ranks"}})
    if rows:
        lines += ["## Metrics", "", "From the stage's `metrics.json`.", "", "| metric | value |", "|---|---|",
                  *[f"| {k} | {format_value(v)} |" for k, v in rows], ""]
    lines += _load_snippet(repo_id, subfolder)
    return "\n".join(lines).rstrip() + "\n"


def family_card(stages: list[FinishedStage], license: str = "other", repo_id: str | None = None) -> str:
    """README.md for a whole exported LLaMA chain: one row per model folder."""
    from compt.flops import format_flops
    from compt.llama.flops import count_sequence_flops

    first = stages[0]
    seq_len = _seq_len(first)
    lines = [
        _header(license),
        f"# {first.chain}: a LLaMA model family",
        "",
        f"{len(stages)} causal language models trained as a chain with compt (Chain-of-Models Pre-Training), "
        "smallest first: each model starts from its trained predecessor and distils from it. "
        "One folder per model, each with its own model card.",
        "",
        f"| folder | params | predecessor | budget | training FLOPs per {seq_len}-token sequence |",
        "|---|---|---|---|---|",
    ]
    for s in stages:
        lines.append(f"| [`{s.folder}`]({s.folder}/README.md) | {_params(s.model_cfg):,} | {predecessor(s) or '-'} "
                     f"| {budget(s).split(' (')[0]} "
                     f"| {format_flops(count_sequence_flops(s.model_cfg, seq_len).train)} |")
    sub = stages[-1].folder
    lines += [""] + _load_snippet(repo_id, sub if repo_id else None)
    if not repo_id:
        lines = [ln.replace("path/to/this/folder", f"path/to/this/folder/{sub}") for ln in lines]
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------------------
# One export: stages -> a folder (or a listing, for --dry-run).
# ---------------------------------------------------------------------------

def _check_format(stage: FinishedStage, fmt: str | None) -> None:
    if fmt not in (None, *FORMATS):
        raise ExportError(f"stage {stage.folder} is a LLaMA model: --format {fmt} is for CLIP models; LLaMA stages "
                          "export only as --format transformers (the default for LLaMA): drop --format or pass "
                          "--format transformers")


def export(stages: list[FinishedStage], out: str | Path, fmt: str | None = "transformers", license: str = "other",
           family: bool = False, repo_id: str | None = None, dry_run: bool = False) -> ExportResult:
    """Write one save_pretrained folder per model (``family``: subfolders plus a family card) at ``out``.

    Same contract as every family's export: ``repo_id`` only shapes the cards' loading
    instructions; ``dry_run`` builds the export in a temporary folder, lists and deletes it.
    """
    out = Path(out)
    check_out(out)
    for stage in stages:  # every check before any write
        _check_format(stage, fmt)
        _check_tokenizer(stage)

    def fill(tmp: Path) -> list[str]:
        notes: list[str] = []
        for stage in stages:
            folder = tmp / stage.folder if family else tmp
            folder.mkdir(exist_ok=True)
            notes += write_transformers(stage, folder)
            (folder / "README.md").write_text(stage_card(stage, license=license, repo_id=repo_id,
                                                         subfolder=stage.folder if family else None))
        if family:
            (tmp / "README.md").write_text(family_card(stages, license=license, repo_id=repo_id))
        return notes

    return write_staged(out, dry_run, fill)


def claims(path: Path, whole_run: bool) -> bool:
    """Whether ``path`` (a stage, or a run with ``whole_run``) is a LLaMA one: its run's manifest
    names the family llama, or its config.json is a LlamaConfig."""
    from compt.llama.model import is_llama_config

    config = core.manifest_config(core.run_of(path, whole_run))
    if config is not None and config.get("family") == FAMILY:
        return True
    stage_cfg = None if whole_run else core.stage_config(path)
    return stage_cfg is not None and is_llama_config(stage_cfg)
