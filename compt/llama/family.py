"""The LLaMA family (transformers' LlamaForCausalLM on text): what the core asks of it
(compt.families.Family), the same methods as compt/clip/family.py.

A stage trains next-token prediction on packed token blocks; a grown stage adds
``alpha * T^2 * KL(teacher || student)`` over next-token distributions from the frozen
predecessor. Quality is validation loss / perplexity.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from compt.engine import no_decay_by_name
from compt.families import CostCounters, Quality
from compt.growth import MODES
from compt.flops import format_flops
from compt.llama.grow import exact_config, growth_problem, plan_tensor
from compt.llama.model import llama_config_problem, resolve_llama_config
from compt.llama.train import (ChainCausalLM, evaluate_lm, export_name, load_state, loss_parts, plan_name,
                               teacher_outputs, train_loader)
from compt.loss import LossParts
from compt.text.config import TextDataConfig

# The KL-distillation weight: off. On pydoc, KL distillation from the smaller predecessor cost perplexity at
# weight 1 and still at 0.1, for both growths, both later models and each of 3 seeds
# (benchmarks/results/acceleration-llama-main-param-only, -alpha0.1); a stage with alpha 0 loads no teacher.
ALPHA = 0.0


def _num(x: float | None, fmt: str = ".2f") -> str:
    return "-" if x is None else format(x, fmt)


class LlamaFamily:
    name = "llama"
    curve_names = ("lm", "distill")
    data_config = TextDataConfig
    growth_modes = MODES  # every mode of compt.growth; impossible pairs are reported by chain_problems
    quality = Quality("val_ppl", "val ppl", higher_is_better=False)
    result_headers = ["stage", "model", "params", "budget", "teacher ppl", "init ppl", "val ppl", "val loss", "FLOPs",
                      "wall"]

    # -- config -------------------------------------------------------------------------------------------------
    def alpha_default(self, init: str) -> float:
        return ALPHA

    def stage_model_cfg(self, model, prev_cfg: dict | None, init: str | None) -> dict:
        """What the stage builds: exact growth needs the student's ``rms_norm_eps`` scaled from the teacher's
        (compt/llama/grow.py), which compt applies and records in the stage's config.json."""
        cfg = resolve_llama_config(model)
        return exact_config(prev_cfg, cfg) if prev_cfg is not None and init == "exact" else cfg

    def chain_problems(self, cfg) -> list[str]:
        """Configs transformers cannot build, impossible growth, vocabularies and contexts the data does not fit."""
        if not isinstance(cfg.data, TextDataConfig):
            return ["data: a llama chain trains on text; give data.kind pydoc, text, jsonl or hf"]
        problems: list[str] = []
        effective: list[dict | None] = []  # what each stage builds (exact growth rescales the norm eps)
        vocab = cfg.data.tokenizer_size()  # None: data.tokenizer_path does not load (data.problems says why)
        vocab_source = (f"data.vocab_size {vocab} (the tokenizer's size)" if cfg.data.tokenizer_path is None
                        else f"the {vocab} tokens of data.tokenizer_path '{cfg.data.tokenizer_path}'")
        for k, stage in enumerate(cfg.stages):
            p = llama_config_problem(stage.model)
            if p:
                problems.append(f"stages.{k}.model: {p}")
                effective.append(None)
                continue
            m = resolve_llama_config(stage.model)
            mode = cfg.transfer(k).init if k > 0 else "none"
            if mode != "none" and effective[k - 1] is not None:
                p = growth_problem(effective[k - 1], m, mode)
                if p:
                    problems.append(f"stages.{k}.transfer.init: {mode} growth is impossible here: {p}; "
                                    "use another mode or change the model")
                elif mode == "exact":
                    m = exact_config(effective[k - 1], m)
            if vocab is not None and m["vocab_size"] < vocab:
                problems.append(f"stages.{k}.model.vocab_size: {m['vocab_size']} is below {vocab_source}; "
                                f"raise it to at least {vocab}")
            if m["max_position_embeddings"] < cfg.data.seq_len:
                problems.append(f"stages.{k}.model.max_position_embeddings: {m['max_position_embeddings']} is "
                                f"below data.seq_len {cfg.data.seq_len}; raise it or lower data.seq_len")
            effective.append(m)
        return problems

    # -- data ---------------------------------------------------------------------------------------------------
    def build_data(self, data_cfg, run_root: Path, rank: int):
        """Rank 0 trains the run's tokenizer (cached in the run directory), then the other ranks load it."""
        import torch.distributed as dist

        from compt.text import build_text_datasets

        for turn in (0, 1):
            if (rank == 0) == (turn == 0):
                train, val, _ = build_text_datasets(data_cfg, run_root / "tokenizer")
            if dist.is_available() and dist.is_initialized():
                dist.barrier()
        return train, val

    def val_data(self, data_cfg, run_root: Path):
        from compt.text import build_text_datasets

        return build_text_datasets(data_cfg, run_root / "tokenizer").val  # the run's cached tokenizer

    def train_size(self, data_cfg) -> int:
        import tempfile

        from compt.text import build_text_datasets, stream_size

        if data_cfg.streaming:
            return stream_size(data_cfg)

        with tempfile.TemporaryDirectory() as tmp:  # the tokenizer is trained, counted, and dropped
            return len(build_text_datasets(data_cfg, tmp).train)

    # -- a stage ------------------------------------------------------------------------------------------------

    def build(self, model_cfg: dict, teacher_cfg: dict | None) -> torch.nn.Module:
        return ChainCausalLM(model_cfg)

    def hidden_size(self, model_cfg: dict) -> int:
        return int(model_cfg["hidden_size"])

    def library_inits(self) -> list:
        """transformers initialises from post_init, once every submodule exists, module by module through
        PreTrainedModel._initialize_weights(module), which writes that module's own parameters."""
        from transformers import PreTrainedModel

        from compt.partition import LibraryInit

        return [LibraryInit(PreTrainedModel, "_initialize_weights",
                            lambda model, module, *args, **kwargs: module.parameters(recurse=False))]

    def plan(self, name: str, prev_cfg: dict, model_cfg: dict, mode: str, noise: float, seed: int):
        return plan_tensor(plan_name(name), prev_cfg, model_cfg, mode, noise, seed)

    def load_teacher(self, model_cfg: dict, weights: Path) -> torch.nn.Module:
        teacher = ChainCausalLM(model_cfg)
        load_state(teacher, load_file(str(weights)))
        return teacher.eval().requires_grad_(False)

    def no_decay(self, name: str, p: torch.nn.Parameter) -> bool:
        """The rule every family used before families chose their own (open_clip's names): norms and biases
        are not decayed, the token embeddings (``embed_tokens``, no "embedding" in the name) are. Kept so that
        LLaMA chains train bit for bit as before; whether to exempt embed_tokens is a measured change to make."""
        return no_decay_by_name(name, p)

    def enable_activation_checkpointing(self, model: torch.nn.Module) -> None:
        """transformers' own switch (non-reentrant, which ZeRO-3's parameter hooks need)."""
        model.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def loss(self, alpha: float | None, transfer, rank: int, world: int, kernels: str):
        temperature = transfer.temperature if transfer is not None else 1.0

        def step(engine, batch, teacher) -> LossParts:
            t_out = teacher_outputs(teacher, batch.blocks) if teacher is not None and alpha else None
            return loss_parts(engine(batch.blocks, t_out, alpha or 0.0, temperature, kernels))
        return step

    def train_loader(self, train_ds, model_cfg: dict, teacher_cfg: dict | None, **kw):
        return train_loader(train_ds, **kw)

    def init_metrics(self, engine, prev_cfg: dict, probe, model_cfg: dict, val_ds, cfg) -> dict[str, Any]:
        """Where the grown student starts: its validation perplexity next to its teacher's."""
        student = evaluate_lm(engine, val_ds, cfg.eval.batch_size)
        teacher = evaluate_lm(probe, val_ds, cfg.eval.batch_size)
        return {"init_val_loss": student["val_loss"], "init_val_ppl": student["val_ppl"],
                "teacher_val_ppl": teacher["val_ppl"]}

    def evaluate(self, engine, val_ds, model_cfg: dict, cfg) -> dict[str, Any]:
        return evaluate_lm(engine, val_ds, cfg.eval.batch_size)

    def sample_flops(self, model_cfg: dict, data) -> tuple[int, int]:
        """(student train, teacher forward) FLOPs per training sequence of ``data.seq_len`` tokens."""
        from compt.llama.flops import count_sequence_flops

        f = count_sequence_flops(model_cfg, data.seq_len)
        return f.train, f.forward

    def tokens_per_sample(self, data) -> int | None:
        return data.seq_len

    def export_name(self, name: str, tensor: torch.Tensor):
        return export_name(name, tensor)

    def is_exported(self, name: str) -> bool:
        return True

    def write_config(self, path: Path, model_cfg: dict) -> None:
        from transformers import LlamaConfig

        config = LlamaConfig(**model_cfg)
        config.architectures = ["LlamaForCausalLM"]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")
        tmp.replace(path)

    # -- reports and tools ----------------------------------------------------------------------------------------
    def summary(self, metrics: dict[str, Any]) -> dict[str, Any]:
        return {key: metrics.get(key) for key in ("val_loss", "val_ppl", "init_val_ppl", "teacher_val_ppl")}

    def result_row(self, stage, m: dict[str, Any]) -> list[str]:
        model = stage.model if isinstance(stage.model, str) else "inline"
        budget = ", ".join(f"{k}={v}" for k, v in stage.budget.model_dump().items() if v is not None)
        return [f"{m['stage']}-{m['name']}", model, f"{m['params'] / 1e6:.2f}M", f"{budget} ({m['steps']} steps)",
                _num(m.get("teacher_val_ppl")), _num(m.get("init_val_ppl")), _num(m.get("val_ppl")),
                _num(m.get("val_loss"), ".4f"), format_flops(m["flops"]["total"]), f"{m['wall_seconds']:.0f}s"]

    def metrics_lines(self, metrics: dict[str, Any]) -> list[str]:
        """``compt eval``'s text output after its first line."""
        return [f"{metrics['val_tokens']} validation tokens",
                f"  val_loss {metrics['val_loss']:.4f}  val_ppl {metrics['val_ppl']:.2f}"]

    def cost_counters(self, recipe) -> CostCounters:
        import math

        from compt.llama.flops import analytic_sequence_flops, count_sequence_flops
        from compt.llama.model import llama_state_shapes

        def params(cfg: dict) -> int:
            return sum(math.prod(shape) for shape in llama_state_shapes(cfg).values())

        return CostCounters(lambda cfg: count_sequence_flops(cfg, recipe.seq_len),
                            lambda cfg: analytic_sequence_flops(cfg, recipe.seq_len), params)

    def sample_unit(self, recipe, captions_per_image: int) -> str:
        return f"a sample is one sequence of {recipe.seq_len} tokens"

    def exporter(self):
        import compt.llama.export

        return compt.llama.export

    def is_model_config(self, raw) -> bool:
        from compt.llama.grow import is_model_config

        return is_model_config(raw)

    def grow_job(self, small_raw: dict, big_raw: dict, **kw):
        from compt.llama.grow import grow_job

        return grow_job(small_raw, big_raw, **kw)

    def config_hint(self, raw) -> str:
        from compt.llama.grow import config_hint

        return config_hint(raw)
